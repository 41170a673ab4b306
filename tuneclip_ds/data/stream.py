"""An endless, resumable stream of one rank's batches, epoch after epoch."""

from __future__ import annotations

import itertools
import logging
from typing import Iterator

from tuneclip_ds.data.pipeline import ReadPosition

logger = logging.getLogger(__name__)


class BatchStream:
    """Batches of a re-iterable loader (each ``iter()`` one epoch) with a saveable position.

    The position is the epoch, the batches taken in it and where the loader's readers stand
    (``ReadPosition``). Every epoch's batch order is a pure function of the seed, the epoch and the
    rank (see the pipeline), so resuming re-opens the epoch at that position: each reader drops the
    samples it had taken right after its shuffle buffer, without decoding them.
    """

    def __init__(self, loader):
        self.loader = loader  # a TrainLoader
        self.epoch = 0
        self.batches_in_epoch = 0
        self.position = ReadPosition.start(loader.readers)
        self._batches_to_decode_again = 0  # resuming from a state without reader positions
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
                self.position.advance(batch)
                return batch
            self.epoch, self.batches_in_epoch, self._batches = self.epoch + 1, 0, None
            self.position = ReadPosition.start(self.loader.readers)

    def _open_epoch(self) -> Iterator[dict]:
        if any(self.position.samples_read):
            logger.info("resuming epoch %d after its first %d batches: dropping the %d samples they read, undecoded",
                        self.epoch, self.batches_in_epoch, sum(self.position.samples_read))
        self.loader.set_epoch(self.epoch, self.position.copy())  # the loader keeps it; this stream moves its own
        batches = iter(self.loader)
        for batch in itertools.islice(batches, self._batches_to_decode_again):
            self.position.advance(batch)
        self._batches_to_decode_again = 0
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "samples_read": list(self.position.samples_read), "next_reader": self.position.next_reader}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.position = ReadPosition(list(state.get("samples_read", [])), state.get("next_reader", 0))
        self._batches_to_decode_again = 0
        if self.position.readers != self.loader.readers:
            # Saved before reader positions were, or with another data.num_workers: take the batches
            # again, decoding them (the only way then; with other workers, in another order anyway).
            self.position = ReadPosition.start(self.loader.readers)
            self._batches_to_decode_again = self.batches_in_epoch
            if self.batches_in_epoch:
                logger.warning("no reader positions for %d data readers in the checkpoint: reading and decoding "
                               "the %d batches of epoch %d taken before", self.loader.readers, self.batches_in_epoch,
                               self.epoch)
        self._batches = None
