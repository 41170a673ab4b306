"""One global batch split over 2 ranks trains exactly like the whole batch on 1 rank."""

import pytest
import torch


GLOBAL_BATCH = 16



def fixed_global_batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {
        "image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
        "text": torch.randint(1, 49407, (GLOBAL_BATCH, 32), generator=generator),
        "sample_id": torch.arange(GLOBAL_BATCH) + 100 * step,
    }


def two_steps(rank, world_size, loss_name, model_name, zero_stage=2, bucket_elements=None, node_size=None):
    """Two optimizer steps on fixed global batches, this rank taking its contiguous share (``bucket_elements``:
    gradients reduced in buckets of that size, counted; ``node_size``: ranks per node, for the loss's
    hierarchical ring)."""
    import os

    if node_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(node_size)  # the pool's process: restored below
        try:
            return two_steps(rank, world_size, loss_name, model_name, zero_stage, bucket_elements)
        finally:
            os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    import tuneclip_ds.engine
    from tuneclip_ds.builders import build_loss_from_config
    from tuneclip_ds.config import load_config
    from tuneclip_ds.engine import build_engine
    from tuneclip_ds.models import build_model
    from tuneclip_ds.optim.state import full_parameters
    from tuneclip_ds.trainer import Trainer

    local = GLOBAL_BATCH // world_size
    config = load_config(None, [
        "train.steps=2", f"train.batch_size={local}", "train.precision=fp32", f"train.zero_stage={zero_stage}",
        f"model.name={model_name}", f"loss.name={loss_name}", "loss.tile_size=3", "data.num_samples=1000",
        "optim.lr=1e-3", "checkpoint.save_at_end=false", "output_dir=/tmp/unused",
    ])
    torch.manual_seed(0)
    model = build_model(config.model).model
    tuneclip_ds.engine.CPU_BUCKET_ELEMENTS = bucket_elements or tuneclip_ds.engine.CPU_BUCKET_ELEMENTS
    engine = build_engine(config, model, total_steps=2)
    buckets = []
    reduce_bucket = engine.allreduce_bucket
    engine.allreduce_bucket = lambda bucket, *args, **kwargs: buckets.append(bucket) or reduce_bucket(bucket, *args, **kwargs)
    shares = ({k: v[rank * local:(rank + 1) * local] for k, v in fixed_global_batch(s).items()} for s in range(2))
    trainer = Trainer(config, engine, shares, build_loss_from_config(config.loss), total_steps=2)
    results = [trainer.train_step() for _ in range(2)]
    return [r.loss for r in results], [r.grad_norm for r in results], full_parameters(engine), len(buckets)


@pytest.mark.parametrize("loss_name, model_name, zero_stage", [
    ("infonce", "tiny-ViT", 2), ("siglip", "tiny-ViT-sigmoid", 2), ("hgcl", "tiny-ViT", 2),
    ("siglip", "tiny-ViT-sigmoid", 3),  # the temperature and the bias partitioned like every parameter
    ("infonce", "tiny-ViT", 0),  # the trainer's own gradient norm (stage 0 reports none) against ZeRO-2's
])
def test_two_ranks_equal_one_rank(pools, loss_name, model_name, zero_stage):
    # stage 0 reduces its gradients in buckets of reduce_bucket_size elements: many small ones here
    bucket_elements = 20_000 if zero_stage == 0 else None
    (losses_1, norms_1, params_1, _), = pools[1].run(two_steps, loss_name, model_name)
    (losses_2, norms_2, params_2, buckets), _ = pools[2].run(two_steps, loss_name, model_name, zero_stage,
                                                             bucket_elements)
    if bucket_elements:
        assert buckets >= 2 * 5  # in each of the 2 steps (1 a step unbucketed: tiny-ViT has 3.4 M parameters)
    assert_equal_training(losses_1, norms_1, params_1, losses_2, norms_2, params_2)


def test_four_ranks_as_two_nodes_equal_one_rank(pools, gloo_pools):
    """loss.topology=hierarchical (the default) on 2 nodes of 2 ranks: blocks gathered in each node, a ring
    between the nodes, estimators and all."""
    (losses_1, norms_1, params_1, _), = pools[1].run(two_steps, "hgcl", "tiny-ViT")
    (losses_4, norms_4, params_4, _), *_ = gloo_pools(4).run(two_steps, "hgcl", "tiny-ViT", 2, None, 2)
    assert_equal_training(losses_1, norms_1, params_1, losses_4, norms_4, params_4)


def assert_equal_training(losses_1, norms_1, params_1, losses_2, norms_2, params_2):
    assert losses_2 == pytest.approx(losses_1, rel=1e-5)
    # Adam's first steps hide a wrongly scaled gradient; the gradient norm does not.
    assert norms_2 == pytest.approx(norms_1, rel=1e-4)
    for name in params_1:
        # atol: Adam divides tiny gradients by eps, so a few last-bit differences grow to ~1e-6 (lr is 1e-3)
        torch.testing.assert_close(params_2[name], params_1[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
