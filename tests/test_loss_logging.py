"""The loss statistics a training run logs to TensorBoard, against an independent computation."""

import pytest
import torch

from test_launch import scalars
from test_losses import ReferenceGCL
from test_training import TINY_RUN

METRICS = ["batch_log_u_mean", "batch_log_u_min", "batch_log_u_max", "inside_margin_fraction"]
MARGIN = 0.1


def recorded_hgcl_run(rank, world_size, overrides):
    """Train, recording every loss call's inputs and the loss's gamma; return the records."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    trainer = build_run(load_config(None, overrides), rank, world_size)
    records = []

    def record(loss_fn, args, kwargs):
        image, text, logit_scale = (x.detach().double() for x in args[:3])
        records.append({"image": image, "text": text, "scale": logit_scale.reshape(1),
                        "ids": kwargs["sample_ids"].cpu(), "gamma": loss_fn.gamma})

    trainer.loss_fn.register_forward_pre_hook(record, with_kwargs=True)
    trainer.run()
    return records


def test_hgcl_run_logs_estimator_statistics_and_inside_margin_fraction(pool, synthetic_shards, tmp_path):
    overrides = TINY_RUN + [
        f"data.train_shards={synthetic_shards}", "data.num_samples=1024", f"output_dir={tmp_path}",
        "run_name=logged", "loss.name=hgcl", f"loss.margin={MARGIN}", "train.steps=4",
        "checkpoint.save_at_end=false",
    ]
    per_rank = pool.run(recorded_hgcl_run, overrides)
    logged = scalars(tmp_path / "logged")

    steps = len(per_rank[0])
    for tag in ["train/loss"] + [f"loss/{name}" for name in METRICS]:
        assert len(logged[tag]) == steps == 4, tag
    # The same statistics from the global batch of each step (the ranks' rows concatenated),
    # computed with full B x B matrices and estimators in linear space.
    reference = ReferenceGCL("hinge_sq", margin=MARGIN)
    for step, calls in enumerate(zip(*per_rank)):
        batch = {key: torch.cat([call[key] for call in calls]) for key in ("image", "text", "ids")}
        reference.gamma = calls[0]["gamma"]
        loss = reference(batch["image"], batch["text"], calls[0]["scale"], sample_ids=batch["ids"])
        expected = reference.last_metrics
        found = {name: logged[f"loss/{name}"][step] for name in METRICS}
        assert 0 <= found["inside_margin_fraction"] <= 1
        assert found["batch_log_u_min"] <= found["batch_log_u_mean"] <= found["batch_log_u_max"]
        global_batch = batch["ids"].numel()
        # fp32 tiles against a float64 matrix may disagree on a pair right at the margin
        assert found["inside_margin_fraction"] == pytest.approx(
            expected["inside_margin_fraction"], abs=2 / (2 * global_batch * (global_batch - 1)))
        for name in METRICS[:3]:
            assert found[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-4), name
        assert logged["train/loss"][step] == pytest.approx(loss.item(), rel=1e-4)
