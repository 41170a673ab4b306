"""An endless, resumable stream of one rank's batches, epoch after epoch."""

from __future__ import annotations

import logging
from typing import Iterator

logger = logging.getLogger(__name__)


class BatchStream:
    """Batches of a re-iterable loader (each ``iter()`` one epoch) with a saveable position.

    The position is (epoch, batches taken in that epoch). Every epoch's batch
    order is a pure function of the seed, the epoch and the rank (see the
    pipeline), so resuming re-opens the epoch and skips the batches already
    taken: exact, at the cost of reading and decoding them again.
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.batches_in_epoch = 0
        self._batches: Iterator[dict] | None = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        while True:
            if self._batches is None:
                self._batches = self._open_epoch()
            batch = next(self._batches, None)
            if batch is not None:
                self.batches_in_epoch += 1
                return batch
            self.epoch, self.batches_in_epoch, self._batches = self.epoch + 1, 0, None

    def _open_epoch(self) -> Iterator[dict]:
        self.loader.set_epoch(self.epoch)
        batches = iter(self.loader)
        if self.batches_in_epoch:
            logger.info("repositioning the data: skipping %d batches of epoch %d", self.batches_in_epoch, self.epoch)
        for _ in range(self.batches_in_epoch):
            next(batches)
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._batches = None
