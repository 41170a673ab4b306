"""End-to-end training: 2 gloo ranks through the DeepSpeed engine, every ZeRO stage."""

import math

import pytest
import torch


TINY_RUN = [
    "model.name=tiny-ViT",
    "data.num_workers=0",  # worker start-up dominates tiny runs; workers are covered by the data and launch tests
    "data.shuffle_buffer=64",
    "train.batch_size=32",
    "train.precision=fp32",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "log.every=5",
]



def train_on_ranks(rank, world_size, overrides):
    """Build the run exactly as ``tuneclip_ds.train`` does; return losses and how far parameters moved."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim.state import full_parameters

    config = load_config(None, overrides)
    trainer = build_run(config, rank, world_size)
    before = full_parameters(trainer.engine)
    history = trainer.run()
    after = full_parameters(trainer.engine)
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    return history.losses, moved


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_rank_training_learns_at_every_zero_stage(pool, synthetic_shards, tmp_path, stage):
    overrides = TINY_RUN + [
        f"data.train_shards={synthetic_shards}",
        f"output_dir={tmp_path}",
        f"train.zero_stage={stage}",
        "train.steps=40",
    ]
    (losses, moved), (losses_1, moved_1) = pool.run(train_on_ranks, overrides)
    assert losses == losses_1  # the loss is the global-batch loss, the same on both ranks
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(change > 0 for change in moved.values()), [n for n, c in moved.items() if c == 0]
    assert moved == moved_1  # both ranks hold the same model after the step


def test_gradient_accumulation_and_bf16(pool, synthetic_shards, tmp_path):
    overrides = TINY_RUN + [
        f"data.train_shards={synthetic_shards}",
        f"output_dir={tmp_path}",
        "train.zero_stage=2",
        "train.precision=bf16",
        "train.grad_accum=2",
        "train.steps=6",
    ]
    (losses, moved), _ = pool.run(train_on_ranks, overrides)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert max(moved.values()) > 0


def nonfinite_on_ranks(rank, world_size, overrides, bad_micro_batches):
    """Train with a loss that is NaN on chosen calls; return losses and the number of skipped batches."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    trainer = build_run(load_config(None, overrides), rank, world_size)
    loss_fn, calls = trainer.loss_fn, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if len(calls) in bad_micro_batches else loss

    trainer.loss_fn = sometimes_nan
    try:
        history = trainer.run()
    except Exception as error:  # the test inspects the message
        return f"{type(error).__name__}: {error}"
    return history.losses, history.skipped_batches


def test_nonfinite_loss_skip_and_stop(pool, synthetic_shards, tmp_path):
    base = TINY_RUN + [f"data.train_shards={synthetic_shards}", f"output_dir={tmp_path}", "train.steps=4"]
    skipped = pool.run(nonfinite_on_ranks, base + ["train.on_nonfinite_loss=skip"], {2, 3})
    losses, count = skipped[0]
    assert count == 2 and len(losses) == 4 and all(math.isfinite(x) for x in losses)

    stopped = pool.run(nonfinite_on_ranks, base + ["train.on_nonfinite_loss=stop"], {2})
    assert stopped[0].startswith("NonFiniteLossError: step 2: loss is nan")
    assert "train.on_nonfinite_loss=stop" in stopped[0]

    too_many = pool.run(
        nonfinite_on_ranks, base + ["train.on_nonfinite_loss=skip", "train.max_skipped_steps=2"], {2, 3, 4}
    )
    assert "3 batches in a row had a non-finite loss" in too_many[0]


def skipped_call_on_ranks(rank, world_size, overrides, bad_call):
    """Train with NaN image features on the last rank in loss call ``bad_call`` (a NaN forward there: it
    reaches every rank through the ring); return the state at the start of that call and of the next
    one (weights, Adam moments, estimators, step), the losses and the number of skipped batches."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim.state import full_optimizer_states, full_parameters

    trainer = build_run(load_config(None, overrides), rank, world_size)
    loss_fn, forward, calls, snapshots = trainer.loss_fn, trainer.loss_fn.forward, [], []

    def forward_with_nan(image_features, *args, **kwargs):
        calls.append(1)
        if len(calls) in (bad_call, bad_call + 1):
            snapshots.append({"params": full_parameters(trainer.engine), "step": trainer.step,
                              "exp_avg": full_optimizer_states(trainer.engine, "exp_avg"),
                              "exp_avg_sq": full_optimizer_states(trainer.engine, "exp_avg_sq"),
                              "estimators": loss_fn.state_dict()})
        if len(calls) == bad_call and rank == world_size - 1:
            image_features = image_features * float("nan")
        return forward(image_features, *args, **kwargs)

    loss_fn.forward = forward_with_nan
    history = trainer.run()
    return snapshots, history.losses, history.skipped_batches


@pytest.mark.parametrize("overrides,bad_call,steps", [
    (["loss.name=gcl", "osr.steps=3", "train.steps=1"], 2, 4),  # in stage I (lr frozen, estimators recover)
    (["loss.name=hgcl", "train.grad_accum=2", "train.steps=3"], 4, 3),  # in step 2's second micro-batch
], ids=["gcl-stage1", "hgcl-grad-accum"])
def test_a_skipped_nonfinite_batch_changes_no_weight_moment_or_estimator(pool, synthetic_shards, tmp_path,
                                                                         overrides, bad_call, steps):
    """The NaN comes after one optimizer step (the moments exist); the skipped call changes nothing."""
    base = TINY_RUN + [f"data.train_shards={synthetic_shards}", "data.num_samples=1024", f"output_dir={tmp_path}",
                       "train.on_nonfinite_loss=skip"]
    for (before, after), losses, skipped in pool.run(skipped_call_on_ranks, base + overrides, bad_call):
        assert skipped == 1 and len(losses) == steps and all(math.isfinite(x) for x in losses)
        assert after["step"] == before["step"]
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert all(torch.equal(after[key][name], before[key][name]) for name in before[key]), key
        assert torch.isfinite(after["estimators"]["log_u"]).all()
        assert after["estimators"]["ids"].tolist() == before["estimators"]["ids"].tolist()
        assert torch.equal(after["estimators"]["log_u"], before["estimators"]["log_u"])


def test_lr_schedule_warmup_then_cosine():
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim import lr_lambda

    optim = load_config(None, ["train.steps=1", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    factor = lr_lambda(optim, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(14) == pytest.approx(0.1)
    assert torch.tensor([factor(s) for s in range(4, 15)]).diff().le(0).all()
