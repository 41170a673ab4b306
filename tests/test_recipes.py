"""The shipped experiment configs: each loads, and each large-model recipe's header quotes planner
commands whose per-GPU figures are what the planner prints, with the recipe itself fitting 80 GB
GPUs with room to spare (the planner leaves out the CUDA context, NCCL's buffers, fragmentation)."""

import re
import shlex
from pathlib import Path

import pytest

from tuneclip_ds.config import load_config
from tuneclip_ds.engine import build_ds_config
from tuneclip_ds.plan.__main__ import main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))  # not configs/eval/, which holds evaluation suites
LARGE_RECIPES = ["tuneclip_vitl14.yaml", "tuneclip_vitbigg14.yaml", "tuneclip_siglip_so400m.yaml"]
HEADROOM_GIB = 60  # of 80: what the planner leaves out (CUDA context, NCCL, fragmentation) needs some
# "#   python -m tuneclip_ds.plan ARGS" followed by "#   -> X GiB per GPU"
PLANNER_LINES = re.compile(r"^#\s+python -m tuneclip_ds\.plan (.+)\n#\s+-> ([\d.]+) GiB per GPU", re.MULTILINE)
ESTIMATE = re.compile(r"\(([\d.]+) GiB estimated")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_loads_and_fills_its_deepspeed_json(path, monkeypatch):
    monkeypatch.chdir(REPO)  # train.deepspeed_config is relative to the repository root
    config = load_config(path)
    assert build_ds_config(config, world_size=8)["zero_optimization"]["stage"] == config.train.zero_stage


def documented_plans(recipe: str) -> list[tuple[list[str], float]]:
    """The planner's arguments and the per-GPU GiB quoted after them, in the order of the header."""
    header = (REPO / "configs" / recipe).read_text()
    return [(shlex.split(args), float(gib)) for args, gib in PLANNER_LINES.findall(header)]


@pytest.mark.parametrize("recipe", LARGE_RECIPES)
def test_recipe_fits_80_gb_gpus_as_its_header_says(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name configs/ relative to the repository root
    plans = documented_plans(recipe)
    assert plans and plans[0][0][:2] == ["--config", f"configs/{recipe}"]
    assert not [arg for arg in plans[0][0] if "=" in arg]  # the first command plans the recipe as written
    outputs = []
    for argv, documented_gib in plans:
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
        assert "\n  = total " in outputs[-1]
        assert float(ESTIMATE.search(outputs[-1]).group(1)) == documented_gib, argv
    assert "verdict: FITS in 80 GiB per GPU" in outputs[0]
    assert plans[0][1] < HEADROOM_GIB


def test_vit_bigg_recipe_uses_zero3_with_the_large_model_json(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config("configs/tuneclip_vitbigg14.yaml")
    zero = build_ds_config(config, world_size=16)["zero_optimization"]
    assert config.model.name == "ViT-bigG-14" and zero["stage"] == 3
    assert "stage3_max_live_parameters" in zero  # came from ds_configs/zero3_large.json
