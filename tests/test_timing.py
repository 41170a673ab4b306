"""Where the time of a step goes: the phase timers, and the time/* scalars of a 2-rank run."""

import pytest
import torch

from test_launch import scalars
from test_training import TINY_RUN
from tuneclip_ds.timing import CudaPhaseTimer, NoTimer, PhaseTimer, phase_timer
from tuneclip_ds.trainer import StepResult, _progress_line

PHASES = ["data", "forward", "loss", "backward", "step"]


class FakeClock:
    """The GPU's clock of the fake events: every recorded event is 2 ms after the previous one."""

    def __init__(self):
        self.now_ms = 0.0
        self.synchronized = []

    def event_class(self, enable_timing):
        assert enable_timing
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, clock: FakeClock):
        self.clock, self.time_ms = clock, None

    def record(self):
        self.clock.now_ms += 2.0
        self.time_ms = self.clock.now_ms

    def synchronize(self):
        self.clock.synchronized.append(self)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.time_ms is not None and end.time_ms is not None, "read before both were recorded"
        return end.time_ms - self.time_ms


def test_host_timer_sums_each_phase_over_calls_and_starts_again_after_totals():
    timer = PhaseTimer()
    for _ in range(2):  # two micro-batches
        with timer.phase("forward"):
            pass
        with timer.phase("loss"):
            pass
    totals = timer.totals()
    assert list(totals) == ["forward", "loss"] and all(seconds >= 0 for seconds in totals.values())
    assert timer.totals() == {}


def test_cuda_timer_reads_its_events_once_the_last_is_done_in_seconds():
    clock = FakeClock()
    timer = CudaPhaseTimer(event_class=clock.event_class)
    for _ in range(2):
        with timer.phase("forward"):
            clock.now_ms += 10.0  # the GPU works 10 ms between the phase's two events
        with timer.phase("loss"):
            pass
    assert clock.synchronized == []  # nothing waited for while the phases ran
    assert timer.totals() == pytest.approx({"forward": 2 * 0.012, "loss": 2 * 0.002})
    assert len(clock.synchronized) == 1  # the last event only, already done after the step's .item()
    assert timer.totals() == {}


def test_timer_follows_the_device_and_the_switch():
    assert isinstance(phase_timer(torch.device("cpu")), PhaseTimer)
    assert isinstance(phase_timer(torch.device("cuda", 1)), CudaPhaseTimer)
    assert isinstance(phase_timer(torch.device("cuda"), enabled=False), NoTimer)
    with NoTimer().phase("forward"):
        pass
    assert NoTimer().totals() == {}


def test_progress_line_shows_each_phase_share_of_the_step():
    seconds = dict(zip(PHASES, [0.1, 0.3, 0.05, 0.4, 0.1]))
    result = StepResult(loss=1.0, lr_factor=1.0, grad_norm=None, logit_scale=14.3, step_time=1.0, samples=64,
                        phase_seconds=seconds)
    line = _progress_line(1, 10, result, 1e-3, 1.0, "")
    assert "| 1.00 s/step | data 10% fwd 30% loss 5% bwd 40% opt 10% | eta" in line
    untimed = StepResult(loss=1.0, lr_factor=1.0, grad_norm=None, logit_scale=14.3, step_time=1.0, samples=64)
    assert "| 1.00 s/step | eta" in _progress_line(1, 10, untimed, 1e-3, 1.0, "")


def timed_run(rank, world_size, overrides):
    """Train; return each step's phase seconds on this rank and the kind of timer it used."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    trainer = build_run(load_config(None, overrides), rank, world_size)
    phase_seconds = []
    train_step = trainer.train_step

    def recorded_step():
        result = train_step()
        phase_seconds.append(result.phase_seconds)
        return result

    trainer.train_step = recorded_step
    trainer.run()
    return phase_seconds, type(trainer.timer).__name__


def test_phases_add_up_to_the_step_time_and_only_rank_0_times_them(pool, synthetic_shards, tmp_path):
    overrides = TINY_RUN + [f"data.train_shards={synthetic_shards}", f"output_dir={tmp_path}", "run_name=timed",
                            "train.steps=4", "train.grad_accum=2", "checkpoint.every=2"]
    (seconds_0, timer_0), (seconds_1, timer_1) = pool.run(timed_run, overrides)
    logged = scalars(tmp_path / "timed")

    assert (timer_0, timer_1) == ("PhaseTimer", "NoTimer")
    assert seconds_1 == [{}] * 4  # rank 1 times nothing (and has no writer to log it)
    assert [list(step) for step in seconds_0] == [PHASES] * 4
    for step in range(4):
        parts = sum(logged[f"time/{phase}"][step] for phase in PHASES)
        # CPU ops are synchronous: the phases hold all of a step but its bookkeeping (norms, .item())
        assert 0.9 <= parts / logged["train/step_time"][step] <= 1.005, (step, parts)
    assert len(logged["time/checkpoint"]) == 2 and all(seconds > 0 for seconds in logged["time/checkpoint"])
    assert "time/eval" not in logged  # no evaluator


def test_timing_switched_off_logs_no_time_scalars(pool, synthetic_shards, tmp_path):
    overrides = TINY_RUN + [f"data.train_shards={synthetic_shards}", f"output_dir={tmp_path}", "run_name=untimed",
                            "train.steps=2", "log.timing=false", "checkpoint.every=1"]
    (seconds_0, timer_0), _ = pool.run(timed_run, overrides)
    assert timer_0 == "NoTimer" and seconds_0 == [{}] * 2
    assert not [tag for tag in scalars(tmp_path / "untimed") if tag.startswith("time/")]
