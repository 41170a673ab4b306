"""Export: open_clip loads the exported file and computes the trained engine's features, at every ZeRO stage."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoint import ema_snapshot
from test_checkpoint_errors import fake_checkpoint
from test_training import TINY_RUN
from tuneclip_ds import export



def sample_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 49408, (4, 32), generator=generator)


def encode(model, dtype=torch.float32) -> dict[str, torch.Tensor]:
    image, text = sample_inputs()
    with torch.no_grad():  # under ZeRO-3 each layer gathers its parameters as it runs
        return {"image": model.encode_image(image.to(dtype)).float(), "text": model.encode_text(text).float()}


def train_and_export(rank, world_size, overrides, exports):
    """Train; encode fixed inputs with the engine's model; then rank 0 exports each (source, output, *flags) of
    ``exports`` (the command's entry point), loads each output with open_clip and encodes the same inputs.
    Runs in the pool, where open_clip and DeepSpeed are imported already."""
    import contextlib
    import io

    import open_clip

    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.optim.osr import moment_norms
    from tuneclip_ds.optim.state import full_optimizer_states, full_parameters

    config = load_config(None, overrides)
    trainer = build_run(config, rank, world_size)
    trainer.run()
    module = trainer.engine.module
    engine = {"features": encode(module.eval(), trainer.input_dtype),
              "model": {name: param.detach().clone() for name, param in module.named_parameters()},
              "params": full_parameters(trainer.engine), "norms": moment_norms(trainer.engine),
              **{key: full_optimizer_states(trainer.engine, key) for key in ("exp_avg", "exp_avg_sq")},
              **ema_snapshot(trainer)}
    if rank != 0:
        return engine
    exported = {}
    for source, output, *flags in exports:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert export.main([str(source), "--output", str(output), *flags]
                               + ["--safetensors"] * is_safetensors(output)) == 0
        model = open_clip.create_model(config.model.name, pretrained=str(output)).eval()
        exported[output] = {"tensors": read_weights(output), "features": encode(model), "printed": printed.getvalue()}
    return engine, exported


def is_safetensors(path) -> bool:
    return path.suffix == ".safetensors"


def read_weights(path) -> dict[str, torch.Tensor]:
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


def train_overrides(shards, tmp_path, stage, precision="fp32"):
    return TINY_RUN + [f"data.train_shards={shards}", "train.batch_size=8", "data.shuffle_buffer=16",
                       "data.num_workers=0", "train.steps=3", f"train.zero_stage={stage}",
                       f"train.precision={precision}", f"output_dir={tmp_path}"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exported_model_gives_the_engines_features(pool, synthetic_shards, tmp_path, stage):
    run = tmp_path / "run"
    outputs = [tmp_path / "model.pt", tmp_path / "model.safetensors"]
    exports = [(run, outputs[0]), (run / "checkpoints" / "step_00000003", outputs[1])]  # a run, a checkpoint
    (engine, exported), _ = pool.run(train_and_export, train_overrides(synthetic_shards, tmp_path, stage), exports)
    for output in outputs:
        tensors, features = exported[output]["tensors"], exported[output]["features"]
        printed = exported[output]["printed"]  # tiny-ViT is ours: open_clip alone does not know it
        assert f"open_clip.create_model('tiny-ViT', pretrained='{output}') after open_clip.add_model_config(" in printed
        assert "or export with --folder" in printed
        assert tensors["logit_scale"].ndim == 0  # as in open_clip's own checkpoints
        assert all(torch.equal(tensors[name].reshape(param.shape), param) for name, param in engine["params"].items())
        for kind in ("image", "text"):
            torch.testing.assert_close(features[kind], engine["features"][kind], rtol=1e-5, atol=1e-5)


def precision_combinations() -> list:
    """Every ZeRO stage, precision and AdamW DeepSpeed trains with on CPU (not fp16); ZeRO-0 in bf16 in the fast
    suite, where DeepSpeed wraps AdamW in one of two optimizers of its own: an unfused one with an fp32 master
    per parameter (torch's AdamW), and a fused one with a flat fp32 master per param group (its FusedAdam)."""
    def combination(stage, precision, implementation):
        fast = (stage, precision) == (0, "bf16")
        return pytest.param(stage, precision, implementation, marks=() if fast else pytest.mark.slow)

    return [combination(*values) for values in itertools.product(range(4), ["fp32", "bf16"], ["torch", "deepspeed"])]


@pytest.mark.parametrize("stage, precision, implementation", precision_combinations())
def test_export_and_optimizer_states_read_the_fp32_masters(pool, synthetic_shards, tmp_path, stage, precision,
                                                          implementation):
    overrides = train_overrides(synthetic_shards, tmp_path, stage, precision)
    assert_export_and_optimizer_states_read_the_masters(pool, tmp_path, overrides, implementation, stage)


@pytest.mark.parametrize("implementation", ["torch", "deepspeed"])
def test_export_finds_the_masters_of_many_param_groups(pool, synthetic_shards, tmp_path, implementation):
    """ZeRO-0 in bf16 keeps its masters by param group, in the order the checkpoint's options made the groups."""
    from test_param_groups import OVERRIDES

    overrides = train_overrides(synthetic_shards, tmp_path, 0, "bf16") + OVERRIDES
    assert_export_and_optimizer_states_read_the_masters(pool, tmp_path, overrides, implementation, stage=0)


def assert_export_and_optimizer_states_read_the_masters(pool, tmp_path, overrides, implementation, stage):
    output = tmp_path / "model.pt"
    (engine, exported), _ = pool.run(train_and_export, overrides + [f"optim.implementation={implementation}"],
                                     [(tmp_path / "run", output)])
    masters, tensors = engine["params"], exported[output]["tensors"]
    if stage < 3:  # each the master of its parameter, which is it rounded (at ZeRO-3 the module holds partitions)
        assert all(torch.equal(master.to(engine["model"][name].dtype), engine["model"][name])
                   for name, master in masters.items())
    assert not all(torch.equal(master.bfloat16().float(), master) for master in masters.values())  # finer than bf16
    assert all(tensors[name].dtype == torch.float32 for name in masters)
    assert all(torch.equal(tensors[name].reshape(master.shape), master) for name, master in masters.items())
    for key in ("exp_avg", "exp_avg_sq"):  # by parameter, and as the optimizer holds them
        assert engine[key].keys() == masters.keys()
        assert all(engine[key][name].shape == master.shape for name, master in masters.items())
        norm = torch.stack([moment.double().norm() for moment in engine[key].values()]).norm().item()
        assert norm == pytest.approx(engine["norms"][f"{key}_norm"], rel=1e-4)  # fp32 sums in other orders


def incomplete_run(tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints", 4, complete=False)
    return tmp_path / "run"


@pytest.mark.parametrize("make_source, message", [
    (lambda tmp_path: tmp_path / "missing", "does not exist"),
    (lambda tmp_path: tmp_path, "is not a run directory or checkpoint"),
    (lambda tmp_path: fake_checkpoint(tmp_path, 4, complete=False), "is incomplete"),
    (incomplete_run, "holds no complete checkpoint"),
])
def test_export_of_bad_input_is_a_clear_error(tmp_path, capsys, make_source, message):
    assert export.main([str(make_source(tmp_path)), "--output", str(tmp_path / "model.pt")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()


def test_load_hint_names_the_model_only_where_open_clip_knows_its_config():
    import open_clip

    config = open_clip.get_model_config("ViT-B-32")
    create = "load it with open_clip.create_model('ViT-B-32', pretrained='model.pt')"

    def hint(metadata):
        return export._load_hint({"model": "ViT-B-32", **metadata}, Path("model.pt"))

    assert hint({"open_clip_config": {"model_cfg": config}}) == create
    assert hint({}) == create  # older checkpoints record no config
    config["vision_cfg"]["image_size"] = 384  # trained with model.force_image_size
    assert "export with --folder" in hint({"open_clip_config": {"model_cfg": config}})
    assert "create_model(" not in hint({"open_clip_config": {"model_cfg": config}})


def existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").touch()
    return fake_checkpoint(tmp_path, 4)


@pytest.mark.parametrize("make_source, flags, message", [
    (lambda tmp_path: fake_checkpoint(tmp_path, 4), [], "does not record its model's open_clip config"),
    (existing_folder, [], "exists and is not an empty folder"),
    (lambda tmp_path: fake_checkpoint(tmp_path, 4), ["--safetensors"], "--safetensors goes with --output"),
])
def test_folder_export_of_bad_input_is_a_clear_error(tmp_path, capsys, make_source, flags, message):
    source = make_source(tmp_path)
    files_before = sorted(tmp_path.rglob("*"))
    assert export.main([str(source), "--folder", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == files_before


def test_export_refuses_a_safetensors_flag_without_the_suffix(tmp_path, capsys):
    source = fake_checkpoint(tmp_path, 4)
    assert export.main([str(source), "--output", str(tmp_path / "model.pt"), "--safetensors"]) == 2
    assert "use a .safetensors name" in capsys.readouterr().err


def test_export_command_exits_2_without_a_traceback(tmp_path):
    command = [sys.executable, "-m", "tuneclip_ds.export", str(tmp_path / "missing"), "--output", "model.pt"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
