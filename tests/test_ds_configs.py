"""Every DeepSpeed JSON in ds_configs/, as the trainer fills it in, passes DeepSpeed's own parser and
keeps every ZeRO setting where DeepSpeed reads it."""

import json

import pytest

from tuneclip_ds.config import load_config
from tuneclip_ds.engine import DS_CONFIG_DIR, build_ds_config

CONFIGS = sorted(DS_CONFIG_DIR.glob("*.json"))


def _experiment(path, precision):
    """An experiment config that agrees with the JSON's ZeRO stage and optimizer offload."""
    zero = json.loads(path.read_text())["zero_optimization"]
    offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
    return load_config(None, ["train.steps=1", f"train.zero_stage={zero['stage']}",
                              f"train.offload_optimizer={str(offload).lower()}", f"train.deepspeed_config={path}",
                              f"train.precision={precision}"])


def _assert_parsed_as_written(parsed: dict, written: dict, key: str = "zero_optimization") -> None:
    for name, value in written.items():
        if isinstance(value, dict):
            _assert_parsed_as_written(parsed[name], value, f"{key}.{name}")
        else:
            assert parsed[name] == value, f"{key}.{name}: DeepSpeed read {parsed[name]!r}, the file says {value!r}"


def test_the_large_model_configs_exist():
    assert {"zero3_large.json", "zero3_large_offload.json"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_passes_deepspeeds_parser(path, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_ds_config(_experiment(path, precision), world_size=1)  # no process group: DeepSpeed takes 1
    parsed = DeepSpeedConfig(ds)  # unknown keys inside zero_optimization are errors
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
    assert parsed.bfloat16_config.enabled == (precision == "bf16") and not parsed.float16_config.enabled
    assert parsed.train_batch_size == parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps
    _assert_parsed_as_written(parsed.zero_config.model_dump(by_alias=True, mode="json"), ds["zero_optimization"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_no_zero_setting_at_the_top_level(path):
    """DeepSpeed ignores unknown top-level keys: a stage-3 setting there would silently do nothing."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero_keys = {field.alias or name for name, field in DeepSpeedZeroConfig.model_fields.items()}
    assert not zero_keys & set(json.loads(path.read_text()))
