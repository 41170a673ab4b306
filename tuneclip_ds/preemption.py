"""Preemption: a signal asks the run to save a checkpoint after the step in flight, then stop.

Slurm sends its warning signal before a time limit or a preemption (``--signal``;
slurm/train.sbatch passes USR1 on, submitit's jobs get USR2). The handler only
notes the request: the trainer reads it between steps and agrees with the other
ranks (``Trainer._agree_to_save``), because the signal may reach some ranks only,
at any moment (even in the middle of a save), while saving is collective.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_requested = False


def install(signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
    """Handle ``signals`` in this process: note the request, and let the run save and stop at a step boundary.

    Call it before data-loader workers start: forked workers inherit the handler and so survive the
    signal, which Slurm sends to every process of a task.
    """
    for signum in signals:
        signal.signal(signum, _note_request)
        # Restart interrupted system calls: the signal must not break a collective or a write in flight.
        signal.siginterrupt(signum, False)


def requested() -> bool:
    """Whether a preemption signal reached this process."""
    return _requested


def _note_request(signum: int, frame) -> None:
    global _requested
    _requested = True
    if multiprocessing.parent_process() is not None:
        return  # a data-loader worker, which got the signal along with its rank: the rank reports it
    logger.warning("received %s: saving a checkpoint after the step in flight, then stopping",
                   signal.Signals(signum).name)
