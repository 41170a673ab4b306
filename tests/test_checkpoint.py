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


def ema_snapshot(trainer) -> dict:
    """The EMA of the weights gathered whole (a collective) and its update count; empty without an EMA."""
    ema = trainer.ema
    return {} if ema is None else {"ema": ema.full_averages(), "ema_updates": ema.updates}


def train_and_snapshot(rank, world_size, overrides, interrupt_after=None, nonfinite_at=()):
    """Run the trainer; return the final full weights, Adam moments and EMA (gathered from the partitions)."""
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
        **ema_snapshot(trainer),
    }


def assert_bit_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what} differ: {different[:5]}"


def check_resume_is_bit_identical(pool, shards, tmp_path, *overrides, keys=("params", "exp_avg", "exp_avg_sq")):
    """A run interrupted after step 3 and resumed ends as the uninterrupted one: losses and ``keys``."""
    common = TINY_RUN + [f"data.train_shards={shards}", "train.batch_size=8", "data.shuffle_buffer=16", *overrides]
    straight, _ = pool.run(train_and_snapshot, common + [f"output_dir={tmp_path}/a", "train.steps=6"])
    pool.run(train_and_snapshot, common + [f"output_dir={tmp_path}/b", "train.steps=6"], 3)
    resumed, _ = pool.run(train_and_snapshot,
                          common + [f"output_dir={tmp_path}/b", "train.steps=6", "checkpoint.resume=latest"])
    assert resumed["step"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == straight["losses"][3:]
    for key in keys:
        assert_bit_identical(straight[key], resumed[key], key)
    return straight, resumed


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bit_identical(pool, synthetic_shards, tmp_path, stage):
    check_resume_is_bit_identical(pool, synthetic_shards, tmp_path, f"train.zero_stage={stage}")
