"""Resume on another number of ranks: weights, Adam moments, optimizer options and loss estimators carry over."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoint import assert_bit_identical, ema_snapshot
from test_launch import REPO
from test_training import TINY_RUN



def build_trainer(rank, world_size, overrides):
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    return build_run(load_config(None, overrides), rank, world_size)


def snapshot(trainer) -> dict:
    """What a resume must restore: full fp32 weights and moments (collective), optimizer options, estimators."""
    from tuneclip_ds.optim.state import full_optimizer_states, full_parameters

    engine = trainer.engine
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO's base optimizer, else the client's
    return {
        "step": engine.global_steps,
        "adam_steps": sorted({float(state["step"]) for state in adam.state.values() if "step" in state}),
        "params": full_parameters(engine),
        "exp_avg": full_optimizer_states(engine, "exp_avg"),
        "exp_avg_sq": full_optimizer_states(engine, "exp_avg_sq"),
        "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups],
        "estimators": trainer.loss_fn.state_dict(),
        "data": trainer.batches.state_dict(),
        **ema_snapshot(trainer),
    }


def train_and_snapshot(rank, world_size, overrides):
    trainer = build_trainer(rank, world_size, overrides)
    trainer.run()
    return snapshot(trainer)


class WarningRecorder(logging.Handler):
    """The package's warnings, for a test to read back from a pool process."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def resume_and_finish(rank, world_size, overrides):
    """Resume (with a snapshot right after loading, before any step), train to the end, snapshot again."""
    trainer = build_trainer(rank, world_size, overrides)
    loaded = {}
    resume = trainer.resume

    def resume_then_snapshot():
        resume()
        loaded.update(snapshot(trainer))

    trainer.resume = resume_then_snapshot
    recorder = WarningRecorder()
    logging.getLogger("tuneclip_ds").addHandler(recorder)
    try:
        history = trainer.run()
    finally:
        logging.getLogger("tuneclip_ds").removeHandler(recorder)
    return {"loaded": loaded, "final": snapshot(trainer), "losses": history.losses, "warnings": recorder.messages}


def resume_without_converting(rank, world_size, overrides):
    """``resume_and_finish`` from a checkpoint converted ahead of the job: converting again fails."""
    from tuneclip_ds import checkpoint

    def convert_again(folder, workers):
        raise AssertionError(f"{folder} was converted again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "convert_to_universal", convert_again)
        return resume_and_finish(rank, world_size, overrides)


def convert_offline(run_dir: Path) -> None:
    """``python -m tuneclip_ds.checkpoint convert RUN_DIR`` with 2 processes (forked: not from pytest's process, whose
    threads would deadlock them)."""
    command = [sys.executable, "-m", "tuneclip_ds.checkpoint", "convert", str(run_dir), "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    universal = run_dir / "checkpoints" / "step_00000003" / "universal"
    assert f"wrote {universal}: a resume on another number of ranks loads it without converting" in result.stdout


def estimator_entries(states: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's estimators as one table sorted by sample id."""
    ids = torch.cat([state["ids"] for state in states])
    log_u = torch.cat([state["log_u"] for state in states])
    order = torch.argsort(ids)
    return ids[order], log_u[order]


def check_resume_on_other_world_size(pools, shards, tmp_path, stage, saved_ranks, resumed_ranks, *overrides,
                                     convert_ahead=False):
    """``convert_ahead``: with ``python -m tuneclip_ds.checkpoint convert`` between the runs. Returns the saved
    and the resumed runs' snapshots (see ``train_and_snapshot`` and ``resume_and_finish``)."""
    common = TINY_RUN + [f"data.train_shards={shards}", "data.num_samples=1024", "train.batch_size=8",
                         "data.shuffle_buffer=16", "data.num_workers=0", f"train.zero_stage={stage}",
                         "loss.name=gcl", f"output_dir={tmp_path}", *overrides]
    saved = pools[saved_ranks].run(train_and_snapshot, common + ["train.steps=3"])
    if convert_ahead:
        convert_offline(tmp_path / "run")
    resume = resume_without_converting if convert_ahead else resume_and_finish
    resumed = pools[resumed_ranks].run(resume, common + ["train.steps=5", "checkpoint.resume=latest"])
    for result in resumed:
        loaded = result["loaded"]
        assert loaded["step"] == 3 and result["final"]["step"] == 5 and len(result["losses"]) == 2
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert_bit_identical(saved[0][key], loaded[key], key)
        assert loaded["param_groups"] == saved[0]["param_groups"]  # weight decay per group, lr, betas
        assert loaded["adam_steps"] == saved[0]["adam_steps"] == [3.0]  # Adam's bias correction continues
        assert loaded["data"] == {"epoch": saved[0]["data"]["epoch"], "batches_in_epoch": 0,
                                  "samples_read": [0], "next_reader": 0}  # the epoch's start
    assert any("does not carry over" in message for message in resumed[0]["warnings"])
    saved_ids, saved_log_u = estimator_entries([rank["estimators"] for rank in saved])
    loaded_ids, loaded_log_u = estimator_entries([rank["loaded"]["estimators"] for rank in resumed])
    assert saved_ids.numel() == 3 * 8 * saved_ranks  # every sample of 3 global batches
    assert torch.equal(saved_ids, loaded_ids) and torch.equal(saved_log_u, loaded_log_u)
    converted = tmp_path / "run" / "checkpoints" / "step_00000003"  # ZeRO-0 state is replicated: no conversion
    assert (converted / "universal").is_dir() == (stage > 0) and not (converted / "latest_universal").exists()
    return saved, resumed


@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(2, 1), (1, 2)])
def test_zero3_resumes_on_another_world_size(pools, synthetic_shards, tmp_path, saved_ranks, resumed_ranks):
    check_resume_on_other_world_size(pools, synthetic_shards, tmp_path, 3, saved_ranks, resumed_ranks)


def test_checkpoint_converted_ahead_resumes_on_another_world_size(pools, synthetic_shards, tmp_path):
    check_resume_on_other_world_size(pools, synthetic_shards, tmp_path, 2, 2, 1, convert_ahead=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(2, 1), (1, 2)])
def test_every_stage_resumes_on_another_world_size(pools, synthetic_shards, tmp_path, stage, saved_ranks,
                                                   resumed_ranks):
    check_resume_on_other_world_size(pools, synthetic_shards, tmp_path, stage, saved_ranks, resumed_ranks)


@pytest.mark.slow
@pytest.mark.parametrize("stage, setting", [(1, "train.precision=bf16"), (2, "train.precision=bf16"),
                                            (3, "train.precision=bf16"), (2, "train.offload_optimizer=true"),
                                            (3, "train.offload_optimizer=true")])
def test_bf16_and_offload_resume_on_another_world_size(pools, synthetic_shards, tmp_path, stage, setting):
    check_resume_on_other_world_size(pools, synthetic_shards, tmp_path, stage, 2, 1, setting)
