"""Large-model machinery: partitioned construction (zero.Init), gradient checkpointing, locked towers."""

import pytest
import torch

from test_global_batch import GLOBAL_BATCH, fixed_global_batch

BASE = ["train.precision=fp32", "train.zero_stage=3", "loss.name=infonce", "optim.lr=1e-3",
        "checkpoint.save_at_end=false", "output_dir=/tmp/unused"]


def build_and_load(rank, world_size, overrides):
    """Build the ZeRO-3 run from a pretrained file; report the partition sizes, then save a checkpoint."""
    from tuneclip_ds import checkpoint
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    config = load_config(None, BASE + ["train.steps=1", f"train.batch_size={GLOBAL_BATCH // world_size}"]
                         + overrides)
    trainer = build_run(config, rank, world_size, batches=iter(()))
    params = list(trainer.engine.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    whole_on_this_rank = [p.ds_shape for p in params if p.data.numel() == p.ds_numel and p.ds_numel > 1]
    checkpoint.save(trainer.engine, trainer.checkpoint_root, 0, trainer.checkpoint_metadata(), {}, keep_last=1)
    return local, total, whole_on_this_rank


@pytest.mark.parametrize("layout", ["file", "hub-cache"])
def test_zero_init_partitions_the_model_and_loads_pretrained_weights_exactly(pool, tmp_path, layout):
    from test_weights import hub_snapshot, open_clip_repo_files
    from tuneclip_ds import export
    from tuneclip_ds.config import ModelConfig
    from tuneclip_ds.models import build_model

    torch.manual_seed(123)  # not the run's seed: the weights must come from the file
    saved = build_model(ModelConfig(name="tiny-ViT")).model.state_dict()
    pretrained = tmp_path / "pretrained.pt"
    if layout == "hub-cache":  # an open_clip folder: every rank takes the architecture from its config
        pretrained = tmp_path / "models--org--tiny"
        hub_snapshot(pretrained, "c0ffee", open_clip_repo_files(saved))
    else:
        torch.save(saved, pretrained)
    overrides = ["model.name=tiny-ViT", f"model.pretrained={pretrained}", f"output_dir={tmp_path}", "run_name=run"]
    (local_0, total, whole_0), (local_1, _, whole_1) = pool.run(build_and_load, overrides)
    assert whole_0 == whole_1 == []  # no rank holds a full parameter outside forward
    assert local_0 + local_1 >= total and max(local_0, local_1) <= total / 2 + 64 * len(saved)  # halves (+ padding)

    assert export.main([str(tmp_path / "run"), "--output", str(tmp_path / "exported.pt")]) == 0
    exported = torch.load(tmp_path / "exported.pt")
    assert exported.keys() == saved.keys()
    different = [name for name in saved if not torch.equal(exported[name].reshape(saved[name].shape), saved[name])]
    assert not different


def loss_and_gradients(rank, world_size, overrides):
    """One forward and backward on a fixed global batch; full gradients gathered from the partitions."""
    from deepspeed.utils import safe_get_full_grad

    from tuneclip_ds.builders import build_loss_from_config, build_run
    from tuneclip_ds.config import load_config

    local = GLOBAL_BATCH // world_size
    config = load_config(None, BASE + ["train.steps=1", f"train.batch_size={local}"] + overrides)
    trainer = build_run(config, rank, world_size, batches=iter(()))
    engine = trainer.engine
    batch = {k: v[rank * local:(rank + 1) * local] for k, v in fixed_global_batch(0).items()}
    text = torch.nn.functional.pad(batch["text"], (0, engine.module.context_length - batch["text"].shape[1]))
    image_features, text_features, logit_scale = engine(batch["image"], text)
    loss = build_loss_from_config(config.loss)(image_features, text_features, logit_scale)
    engine.backward(loss)
    return loss.item(), {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}


@pytest.mark.parametrize("model", ["tiny-ViT", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_at_zero3(pool, model):
    overrides = [f"model.name={model}"] + (["model.force_image_size=32"] if model == "ViT-B-32" else [])
    (plain_loss, plain), _ = pool.run(loss_and_gradients, overrides)
    (checkpointed_loss, checkpointed), _ = pool.run(loss_and_gradients, overrides + ["model.grad_checkpointing=true"])
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def train_one_step(rank, world_size, overrides):
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim.state import full_parameters

    local = GLOBAL_BATCH // world_size
    config = load_config(None, BASE + ["train.steps=1", f"train.batch_size={local}"] + overrides)
    batches = ({k: v[rank * local:(rank + 1) * local] for k, v in fixed_global_batch(step).items()}
               for step in range(10))
    trainer = build_run(config, rank, world_size, batches=batches)
    before = full_parameters(trainer.engine)
    trainer.run()
    after = full_parameters(trainer.engine)
    return [name for name in before if not torch.equal(before[name], after[name])]


def test_locked_image_tower_stays_and_the_text_tower_trains(pool):
    moved, _ = pool.run(train_one_step, ["model.name=tiny-ViT", "model.lock_image=true", "train.zero_stage=2"])
    assert moved and not [name for name in moved if name.startswith("visual.")]
    assert "text_projection" in moved
