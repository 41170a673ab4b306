"""Config loading, validation, overrides, and the DeepSpeed JSON merge."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tuneclip_ds.config import ConfigError, ModelConfig, OptimConfig, load_config, load_model_config, save_config
from tuneclip_ds.engine import build_ds_config
from tuneclip_ds.optim import param_groups

REPO = Path(__file__).resolve().parent.parent


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_load():
    for path in (REPO / "configs").glob("*.yaml"):
        assert load_config(path).run_name


def test_yaml_values_and_overrides(tmp_path):
    path = write_yaml(tmp_path, {"train": {"steps": 7, "batch_size": 4}, "optim": {"lr": "1e-5"}})
    config = load_config(path, ["train.batch_size=8", "optim.betas=[0.8, 0.9]", "data.synthetic.num_samples=64"])
    assert config.train.steps == 7
    assert config.train.batch_size == 8
    assert config.optim.lr == 1e-5
    assert config.optim.betas == (0.8, 0.9)
    assert config.data.synthetic.num_samples == 64
    assert config.data.synthetic.image_size == 64  # the rest of a section keeps its defaults


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write_yaml(tmp_path, {"train": {"steps": 3}}), ["optim.betas=[0.5, 0.6]"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize(
    "data, override, message",
    [
        ({"train": {"steps": 1, "batch_sise": 4}}, None, "unknown key train.batch_sise"),
        ({"train": {"steps": 1}, "optimizer": {}}, None, "unknown key optimizer"),
        ({"train": {"steps": "ten"}}, None, "train.steps must be of type int"),
        ({"train": {"steps": 1, "batch_size": True}}, None, "train.batch_size must be of type int"),
        ({"train": {"steps": 1, "precision": "fp8"}}, None, "train.precision must be one of"),
        ({"train": {"steps": 1}, "optim": {"betas": [0.9]}}, None, "optim.betas must be a list of 2"),
        ({"train": {"steps": 1}, "optim": {"lr": "fast"}}, None, "optim.lr must be of type float"),
        ({"train": {"steps": 1}, "model": "ViT-B-16"}, None, "'model' must be a mapping"),
        ({"train": {}}, None, "exactly one of train.steps, train.samples and train.epochs"),
        ({"train": {"steps": 1, "samples": 10}}, None, "exactly one of train.steps, train.samples and train.epochs"),
        ({"train": {"steps": 1, "batch_size": 0}}, None, "train.batch_size must be at least 1"),
        ({"train": {"steps": 1, "zero_stage": 0, "offload_optimizer": True}}, None, "needs train.zero_stage"),
        ({"train": {"steps": 1}, "optim": {"betas": [0.9, 1.0]}}, "optim.lr=1e-4",  # an unrelated override
         "optim.betas[1] must be in [0, 1), got 1.0"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, data, override, message):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_config(path, [override] if override else [])
    assert message in str(error.value)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nme=x"], "override model.nme=x: unknown key model.nme"),
        (["eval.select=5"], "override eval.select=5: eval.select must be of type str, got 5"),
        (["optim.betas=[0.9, 2]"], "override optim.betas=[0.9, 2]: optim.betas[1] must be in [0, 1), got 2.0"),
        (["optim={lr: -1}"], "override optim={lr: -1}: optim.lr must be at least 0"),  # set with its section
        (["train.samples=64"], "FILE and override train.samples=64: set exactly one of train.steps"),
    ],
)
def test_bad_override_names_the_override(tmp_path, overrides, message):
    path = write_yaml(tmp_path, {"train": {"steps": 1}, "optim": {"lr": 1e-4}})
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert str(error.value).startswith(message.replace("FILE", str(path)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr must be at least 0, got -1.0"),  # torch: "Invalid learning rate"
        ("optim.lr=.nan", "optim.lr must be at least 0, got nan"),
        ("optim.lr=inf", "optim.lr must be at least 0, got inf"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be at least 0, got -0.1"),
        ("optim.betas=[-0.1, 0.98]", "optim.betas[0] must be in [0, 1), got -0.1"),
        ("optim.betas=[0.9, 1]", "optim.betas[1] must be in [0, 1), got 1.0"),
        ("optim.eps=-1e-8", "optim.eps must be at least 0, got -1e-08"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be at least 0, got -1"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
        ("optim.layer_decay=0", "optim.layer_decay must be in (0, 1], got 0.0"),
        ("optim.layer_decay=1.5", "optim.layer_decay must be in (0, 1], got 1.5"),
        ("optim.image_layer_decay=0", "optim.image_layer_decay must be in (0, 1], got 0.0"),
        ("optim.text_layer_decay=1.01", "optim.text_layer_decay must be in (0, 1], got 1.01"),
        ("optim.image_lr=-1e-5", "optim.image_lr must be at least 0, got -1e-05"),
        ("optim.text_lr=-1", "optim.text_lr must be at least 0, got -1.0"),
        ("optim.image_weight_decay=-0.1", "optim.image_weight_decay must be at least 0, got -0.1"),
        ("optim.text_weight_decay=.nan", "optim.text_weight_decay must be at least 0, got nan"),
        ("loss.gamma_min=-0.2", "loss.gamma_min must be in [0, 1], got -0.2"),
        ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1), got 1.0"),
        ("train.grad_clip=-1", "train.grad_clip must be at least 0, got -1.0"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps must be at least 0, got -1"),
        ("osr.steps=-3", "osr.steps must be at least 0, got -3"),
        ("osr.min_steps=-1", "osr.min_steps must be at least 0, got -1"),
        ("eval.every=-1", "eval.every must be at least 0, got -1"),
        ("data.num_workers=-1", "data.num_workers must be at least 0, got -1"),
        ("train.wait_timeout_minutes=0", "train.wait_timeout_minutes must be greater than 0, got 0.0"),
        ("train.wait_timeout_minutes=-5", "train.wait_timeout_minutes must be greater than 0, got -5.0"),
        ("ema.decay=1.0", "ema.decay must be in [0, 1), got 1.0"),
        ("ema.decay=-0.1", "ema.decay must be in [0, 1), got -0.1"),
        ("ema.every=0", "ema.every must be at least 1, got 0"),
        ("ema.start_step=-1", "ema.start_step must be at least 0, got -1"),
        ("ema.device=gpu", "ema.device must be one of ['same', 'cpu'], got 'gpu'"),
    ],
)
def test_numbers_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.steps=1", override])
    assert str(error.value) == f"override {override}: {message}"


def test_label_smoothing_reaches_the_infonce_loss_only():
    from tuneclip_ds.builders import build_loss_from_config

    config = load_config(None, ["train.steps=1", "loss.label_smoothing=0.1"])
    assert build_loss_from_config(config.loss).label_smoothing == 0.1
    with pytest.raises(ConfigError, match="loss.label_smoothing applies to loss.name=infonce, not hgcl"):
        load_config(None, ["train.steps=1", "loss.label_smoothing=0.1", "loss.name=hgcl"])


def test_numbers_at_the_edges_of_their_ranges_load():
    config = load_config(None, ["train.steps=0", "optim.lr=0", "optim.weight_decay=0", "optim.betas=[0, 0.999]",
                                "optim.eps=0", "optim.min_lr_ratio=1", "train.grad_clip=0", "osr.steps=0",
                                "train.wait_timeout_minutes=0.05", "optim.layer_decay=1", "optim.text_layer_decay=1e-6",
                                "optim.image_lr=0", "optim.text_weight_decay=0", "data.num_workers=0"])
    assert config.optim.betas == (0.0, 0.999) and config.optim.lr == 0.0
    assert config.optim.text_layer_decay == 1e-6 and config.optim.image_lr == 0.0
    assert config.train.wait_timeout_minutes == 0.05 and config.data.num_workers == 0
    assert load_config(None, ["train.steps=0"]).data.num_workers is None  # automatic
    assert load_config(None, ["train.steps=0", "data.num_workers=null"]).data.num_workers is None


def test_empty_string_keys_accept_null_and_an_empty_override(tmp_path):
    path = write_yaml(tmp_path, {"train": {"steps": 1}, "model": {"pretrained": "weights.pt"},
                                 "eval": {"tasks": "suite.yaml", "select": "average"}})
    for empty in ("", "null", "''"):
        config = load_config(path, [f"eval.tasks={empty}", f"model.pretrained={empty}"])
        assert (config.eval.tasks, config.eval.select, config.model.pretrained) == ("", "", "")
    with pytest.raises(ConfigError, match="run_name must be of type str, got None"):  # no empty meaning: refused
        load_config(path, ["run_name="])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])


def test_ds_config_filled_from_experiment(tmp_path):
    config = load_config(None, ["train.steps=1", "train.batch_size=6", "train.grad_accum=3", "train.zero_stage=3",
                                "train.precision=bf16", "train.grad_clip=0.5"])
    ds = build_ds_config(config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert "stage3_prefetch_bucket_size" in ds["zero_optimization"]  # came from ds_configs/zero3.json


def test_ds_config_offload_file_is_chosen():
    config = load_config(None, ["train.steps=1", "train.zero_stage=2", "train.offload_optimizer=true"])
    assert build_ds_config(config, 2)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_ds_config_contradictions_are_reported(tmp_path):
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
    }))
    config = load_config(None, ["train.steps=1", "train.batch_size=8", "train.zero_stage=2",
                                "train.precision=fp32", f"train.deepspeed_config={user_json}"])
    with pytest.raises(ConfigError) as error:
        build_ds_config(config, world_size=2)
    text = str(error.value)
    assert "train_micro_batch_size_per_gpu = 16 but train.batch_size gives 8" in text
    assert "zero_optimization.stage = 3 but train.zero_stage gives 2" in text
    assert "bf16.enabled = True but train.precision gives False" in text
    assert "gradient_accumulation_steps" not in text  # "auto" is filled, not a contradiction


def test_ds_config_optimizer_and_scheduler_sections_are_refused(tmp_path):
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}))
    config = load_config(None, ["train.steps=1", f"train.deepspeed_config={user_json}"])
    with pytest.raises(ConfigError, match="has a 'optimizer' and a 'scheduler' section.*remove the section"):
        build_ds_config(config, 1)


def test_stage_lengths_in_steps_and_epochs():
    from tuneclip_ds.trainer import stage_lengths

    config = load_config(None, ["train.epochs=2", "osr.epochs=1.5", "data.num_samples=1000", "train.batch_size=50"])
    assert stage_lengths(config, world_size=4) == (8, 10)  # ceil(1500 / 200), 2000 / 200
    assert stage_lengths(load_config(None, ["train.samples=90", "train.batch_size=8"]), 2) == (0, 6)
    with pytest.raises(ConfigError, match="osr.epochs is set: set data.num_samples"):
        load_config(None, ["train.steps=1", "osr.epochs=1", "data.synthetic=null"])
    with pytest.raises(ConfigError, match="at most one of osr.steps and osr.epochs"):
        load_config(None, ["train.steps=1", "osr.epochs=1", "osr.steps=3", "data.num_samples=10"])


def test_ds_config_missing_file():
    config = load_config(None, ["train.steps=1", "train.deepspeed_config=/no/such.json"])
    with pytest.raises(ConfigError, match="/no/such.json does not exist"):
        build_ds_config(config, 1)


def test_param_groups_exempt_gains_biases_and_temperature():
    import open_clip

    import tuneclip_ds.models  # noqa: F401  (registers the tiny model configs)

    model = open_clip.create_model("tiny-ViT-sigmoid", nonscalar_logit_scale=True)
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias", "visual.class_embedding", "ln_final.weight", "ln_final.bias"} <= exempt
    assert all(model.get_parameter(n).ndim >= 2 for n in (names[id(p)] for p in decay["params"]))
    assert "text_projection" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_runs_model_section_reads_alone(tmp_path):
    """WiSE-FT reads a run's saved config.yaml for its starting weights: keys of other sections that a later
    version no longer knows do not matter."""
    path = write_yaml(tmp_path, {"data": {"a_removed_key": 1}, "model": {"name": "tiny-ViT", "pretrained": "w.pt"}})
    assert load_model_config(path) == ModelConfig(name="tiny-ViT", pretrained="w.pt")
    with pytest.raises(ConfigError, match="unknown key model.nme"):
        load_model_config(write_yaml(tmp_path, {"model": {"nme": "tiny-ViT"}}))


@pytest.mark.parametrize("overrides,message", [
    (["data.sources=[{shards: a, weight: 0, num_samples: 4}]"], "data.sources[0].weight must be greater than 0"),
    (["data.sources=[{shards: a, num_samples: 4}, {shards: b}]"], "data.sources[1].num_samples is missing"),
    (["data.sources=[{shards: '', num_samples: 4}]"], "data.sources[0].shards is empty"),
    (["data.train_shards=x", "data.sources=[{shards: a}]"], "data.sources replaces data.train_shards"),
])
def test_bad_sources_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["train.steps=1", *overrides])


def test_the_corpus_of_several_sources_is_their_sum():
    from tuneclip_ds.config import corpus_size

    config = load_config(None, ["train.steps=1", "data.sources=[{shards: a, num_samples: 4}, "
                                "{shards: b, weight: 3, num_samples: 6}]"])
    assert corpus_size(config) == 10 and config.data.sources[1].weight == 3.0


def test_ds_config_on_cpu_reduces_in_buckets_glibc_reuses(tmp_path):
    """Buckets the JSON leaves to DeepSpeed (5e8 elements) are made small on CPUs; a JSON's own size is kept."""
    from tuneclip_ds.engine import CPU_BUCKET_ELEMENTS

    config = load_config(None, ["train.steps=1", "train.zero_stage=2"])
    zero = build_ds_config(config, 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == CPU_BUCKET_ELEMENTS
    assert CPU_BUCKET_ELEMENTS * 4 <= 32 << 20  # a float32 bucket within glibc's largest mmap threshold
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123456}}))
    config = load_config(None, ["train.steps=1", "train.zero_stage=2", f"train.deepspeed_config={user_json}"])
    zero = build_ds_config(config, 2)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (123456, CPU_BUCKET_ELEMENTS)
    assert "stage3_allgather_sequential" not in zero


def test_ds_config_on_cpu_gathers_zero3_parameters_one_at_a_time(tmp_path):
    """At ZeRO-3 on CPUs parameters are gathered one synchronous all-gather each (gloo may finish a batch of
    asynchronous ones out of order); a JSON's own choice is kept."""
    config = load_config(None, ["train.steps=1", "train.zero_stage=3"])
    assert build_ds_config(config, 2)["zero_optimization"]["stage3_allgather_sequential"] is True
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"zero_optimization": {"stage3_allgather_sequential": False}}))
    config = load_config(None, ["train.steps=1", "train.zero_stage=3", f"train.deepspeed_config={user_json}"])
    assert build_ds_config(config, 2)["zero_optimization"]["stage3_allgather_sequential"] is False
