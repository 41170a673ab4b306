"""Checkpoints: exact resume, crash safety, bad input."""

import pytest
import torch

from test_training import TINY_RUN



def stop_at(trainer, step: int):
    """Interrupt the run after ``step`` as a preemption signal would (save, then stop)."""
    train_step = trainer.train_step

    def step_then_maybe_stop():
        result = train_step()
        trainer.stop_requested = trainer.step == step
        return result

    trainer.train_step = step_then_maybe_stop


def make_gradients_nonfinite(trainer, steps):
    """Make one parameter's gradient infinite in ``steps`` (numbered from 1), as an fp16 overflow would: DeepSpeed
    then skips the update (in bf16 at ZeRO-1/2 too)."""
    def poison(grad):
        return grad + float("inf") if trainer.step + 1 in steps else grad

    trainer.engine.module.logit_scale.register_hook(poison)


def train_and_snapshot(rank, world_size, overrides, interrupt_after=None, nonfinite_at=()):
    """Run the trainer; return the final full weights and Adam moments (gathered from the partitions)."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim.state import full_optimizer_states, full_parameters

    trainer = build_run(load_config(None, overrides), rank, world_size)
    if interrupt_after is not None:
        stop_at(trainer, interrupt_after)
    make_gradients_nonfinite(trainer, nonfinite_at)
    history = trainer.run()
    engine = trainer.engine
    return {
        "losses": history.losses,
        "step": engine.global_steps,
        "params": full_parameters(engine),
        "exp_avg": full_optimizer_states(engine, "exp_avg"),
        "exp_avg_sq": full_optimizer_states(engine, "exp_avg_sq"),
    }


def assert_bit_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what} differ: {different[:5]}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bit_identical(pool, synthetic_shards, tmp_path, stage):
    common = TINY_RUN + [f"data.train_shards={synthetic_shards}", f"train.zero_stage={stage}",
                         "train.batch_size=8", "data.shuffle_buffer=16"]
    straight, _ = pool.run(train_and_snapshot, common + [f"output_dir={tmp_path}/a", "train.steps=6"])
    pool.run(train_and_snapshot, common + [f"output_dir={tmp_path}/b", "train.steps=6"], 3)
    resumed, _ = pool.run(train_and_snapshot,
                          common + [f"output_dir={tmp_path}/b", "train.steps=6", "checkpoint.resume=latest"])
    assert resumed["step"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == straight["losses"][3:]
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert_bit_identical(straight[key], resumed[key], key)
