"""Where the time of a step goes: seconds per phase (data, forward, loss, ...), without slowing the step.

On a CPU the ops run synchronously, so the host clock around a phase is its time. On a GPU the host only
queues work: the host clock would measure the queueing, and synchronising around each phase would stall the
pipeline. There CUDA events, recorded on the current stream between phases, time what the GPU did; they are
read after the step's own synchronisation point (the trainer's ``loss.item()``), so they add no waiting.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class PhaseTimer:
    """Host-clock seconds per phase name, summed over calls (e.g. a step's micro-batches) until ``totals()``."""

    def __init__(self):
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - began

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last call, in the order the phases first ran."""
        totals, self._seconds = dict(self._seconds), defaultdict(float)
        return totals


class CudaPhaseTimer:
    """Like ``PhaseTimer``, with a pair of CUDA events per phase on the current stream.

    ``totals()`` reads the events: call it after the step's work has been waited for (then it waits for
    nothing); called earlier it would wait for the last phase to finish.
    """

    def __init__(self, event_class=torch.cuda.Event):
        self._event_class = event_class  # replaced by a fake in the tests on machines without a GPU
        self._events: list[tuple[str, object, object]] = []

    def _recorded(self):
        event = self._event_class(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def phase(self, name: str):
        start = self._recorded()
        try:
            yield
        finally:
            self._events.append((name, start, self._recorded()))

    def totals(self) -> dict[str, float]:
        if self._events:
            self._events[-1][2].synchronize()  # already done after the step's synchronisation point
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self._events:
            totals[name] += start.elapsed_time(end) / 1000  # milliseconds
        self._events = []
        return dict(totals)


class NoTimer:
    """Timing switched off (``log.timing=false``, or ranks that log nothing): no work at all."""

    def phase(self, name: str):
        return nullcontext()

    def totals(self) -> dict[str, float]:
        return {}


def phase_timer(device: torch.device, enabled: bool = True):
    """The timer for ``device``: CUDA events on a CUDA device, the host clock where ops are synchronous."""
    if not enabled:
        return NoTimer()
    return CudaPhaseTimer() if torch.device(device).type == "cuda" else PhaseTimer()
