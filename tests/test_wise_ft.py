"""WiSE-FT: a run's fine-tuned weights interpolated toward its starting weights (the shipped pretrained model),
exported at ZeRO-0 and ZeRO-2 and swept in evaluation; bad input is one clear message."""

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from test_checkpoint_errors import fake_checkpoint
from test_eval import cli_suite, heldout, run_cli  # noqa: F401  (heldout: a fixture, 45 held-out samples)
from test_export import read_weights, train_overrides
from test_reproduce import SHIPPED
from tuneclip_ds import export
from tuneclip_ds.config import ModelConfig
from tuneclip_ds.errors import InputError
from tuneclip_ds.eval.cli import main as eval_main
from tuneclip_ds.wise_ft import parse_alpha, parse_sweep, wise_ft


def train_from_shipped(rank, world_size, overrides):
    """Train as the command does (RUN_DIR/config.yaml included)."""
    from tuneclip_ds.config import load_config
    from tuneclip_ds.train import run

    run(load_config(None, overrides), rank, world_size)


@dataclass
class FinishedRun:
    folder: Path  # the run directory
    start: ModelConfig  # the model it was fine-tuned from


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, synthetic_shards, gloo_pools):
    """``finished_runs(stage)``: a run fine-tuned for 3 steps at that ZeRO stage on 2 ranks, with checkpoints at
    steps 2 and 3; trained once per module. It starts from the shipped model; ZeRO-2's from an fp32 copy of it
    at another image size (the position embedding resized), which its starting weights must be built with."""
    runs = {}

    def get(stage: int) -> FinishedRun:
        if stage not in runs:
            folder = tmp_path_factory.mktemp(f"zero{stage}")
            start = ModelConfig(name="tiny-ViT", pretrained=str(SHIPPED))
            if stage == 2:  # fp32: open_clip cannot resize an fp16 position embedding on the CPU
                torch.save(shipped_weights(), folder / "start.pt")
                start = ModelConfig(name="tiny-ViT", pretrained=str(folder / "start.pt"), force_image_size=48)
            overrides = train_overrides(synthetic_shards, folder, stage) + [
                f"model.pretrained={start.pretrained}", f"model.force_image_size={start.force_image_size or 'null'}",
                "checkpoint.every=2"]
            gloo_pools(2).run(train_from_shipped, overrides)
            runs[stage] = FinishedRun(folder / "run", start)
        return runs[stage]

    return get


def shipped_weights() -> dict[str, torch.Tensor]:
    """The start as stored (fp16, 0-dim logit_scale), in fp32 as an export writes it."""
    from safetensors.torch import load_file

    return {name: tensor.float() for name, tensor in load_file(SHIPPED).items()}


def built_weights(model: ModelConfig) -> dict[str, torch.Tensor]:
    """``model`` built as training builds it, its weights as an export writes them."""
    from tuneclip_ds.models import build_model

    return export.open_clip_state_dict(build_model(model).model.state_dict())


def export_weights(source, output, *flags) -> dict[str, torch.Tensor]:
    assert export.main([str(source), "--output", str(output), *flags]) == 0
    return read_weights(output)


def assert_equal(weights, expected):
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("stage", [0, 2, *(pytest.param(stage, marks=pytest.mark.slow) for stage in (1, 3))])
def test_export_interpolates_toward_the_starting_weights(finished_runs, tmp_path, stage):
    run, start = finished_runs(stage).folder, built_weights(finished_runs(stage).start)
    finetuned = export_weights(run, tmp_path / "plain.pt")
    if finished_runs(stage).start.force_image_size is None:
        assert_equal(start, shipped_weights())
    assert not torch.equal(start["visual.proj"], finetuned["visual.proj"])  # fine-tuning moved the weights
    assert_equal(export_weights(run, tmp_path / "zero.pt", "--wise-ft", "0"), start)
    assert_equal(export_weights(run, tmp_path / "one.pt", "--wise-ft", "1"), finetuned)
    half = export_weights(run, tmp_path / "half.pt", "--wise-ft", "0.5")
    assert half.keys() == start.keys()
    for name, tensor in half.items():
        torch.testing.assert_close(tensor, (start[name] + finetuned[name]) / 2, rtol=1e-6, atol=1e-7)


def test_folder_export_of_the_best_checkpoint(finished_runs, tmp_path):
    run = finished_runs(0).folder
    (run / "checkpoints" / "best").write_text("step_00000002")  # as eval.select marks it
    best = export_weights(run, tmp_path / "best.pt", "--best")
    assert not torch.equal(best["visual.proj"], export_weights(run, tmp_path / "last.pt")["visual.proj"])
    assert export.main([str(run), "--best", "--wise-ft", "0.25", "--folder", str(tmp_path / "folder")]) == 0
    mixed = read_weights(tmp_path / "folder" / export.FOLDER_WEIGHTS)
    start = shipped_weights()
    for name, tensor in mixed.items():
        torch.testing.assert_close(tensor, 0.75 * start[name] + 0.25 * best[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- evaluation sweep


def test_sweep_ends_are_the_start_and_the_run(finished_runs, heldout, tmp_path, capsys):  # noqa: F811
    run = finished_runs(0).folder
    suite = cli_suite(tmp_path, heldout)

    def evaluate(pretrained, name, *flags):
        output = tmp_path / f"{name}.json"
        command = ["--model", "tiny-ViT", "--pretrained", str(pretrained), "--tasks", str(suite), "--workers", "0"]
        assert eval_main(command + ["--output", str(output), *flags]) == 0
        return json.loads(output.read_text())

    sweep = evaluate(run, "sweep", "--wise-ft", "0:1:0.5")
    table = capsys.readouterr().out
    rows = {row["alpha"]: row["metrics"] for row in sweep["wise_ft"]}
    assert list(rows) == [0.0, 0.5, 1.0] and sweep["start"] == str(SHIPPED)
    assert rows[0.0] == evaluate(SHIPPED, "start")["metrics"]
    assert rows[1.0] == evaluate(run, "plain")["metrics"]
    assert rows[0.0] != rows[1.0] != rows[0.5]  # the ends tell the start from the run
    assert table.splitlines()[0].split() == ["alpha", "cls/top1", "ret/mean_R@1", "average"]
    assert ["1", *(f"{rows[1.0][key]:.4f}" for key in ("cls/top1", "ret/mean_R@1", "average"))] in \
        [line.split() for line in table.splitlines()]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_on_two_ranks_equals_one_process(finished_runs, heldout, tmp_path):  # noqa: F811
    suite, run = cli_suite(tmp_path, heldout), str(finished_runs(0).folder)
    sweep = ["-m", "tuneclip_ds.eval", "--wise-ft", "0,0.5,1"]  # before the options run_cli adds: argparse takes both
    alone, _ = run_cli([sys.executable, *sweep], tmp_path, suite, run, threads=1, name="one")
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
    together, result = run_cli(torchrun + sweep, tmp_path, suite, run, threads=1, name="two")
    assert together["world_size"] == 2 and together["wise_ft"] == alone["wise_ft"]
    assert result.stdout.count("wrote ") == 1  # rank 0 reports


# ---------------------------------------------------------------- the interpolation


def test_interpolation_keeps_the_ends_exactly_and_integer_buffers_fine_tuned():
    start = {"w": torch.tensor([-0.0, 1.0, float("inf")]), "ids": torch.arange(3)}
    finetuned = {"w": torch.tensor([2.0, 3.0, 5.0]), "ids": torch.arange(3) + 7}
    assert torch.equal(wise_ft(start, finetuned, 0)["w"].signbit(), start["w"].signbit())  # -0.0 stays
    assert wise_ft(start, finetuned, 1)["w"] is finetuned["w"]
    mixed = wise_ft(start, finetuned, 0.25)
    assert torch.equal(mixed["w"][:2], torch.tensor([0.5, 1.5])) and mixed["ids"] is finetuned["ids"]


def test_a_bf16_tensor_mixes_with_an_fp32_start_in_fp32():
    """A frozen parameter (e.g. a frozen logit scale) stays in bf16 in a bf16 run's checkpoint (seen on a GPU:
    torch.lerp refused the mixed dtypes)."""
    mixed = wise_ft({"s": torch.tensor([1.0])}, {"s": torch.tensor([3.0], dtype=torch.bfloat16)}, 0.5)
    assert mixed["s"].dtype == torch.float32 and mixed["s"].item() == 2.0


@pytest.mark.parametrize("finetuned, message", [
    ({"w": torch.zeros(2)}, "1 tensor\\(s\\) only in the starting weights \\(b\\)"),
    ({"w": torch.zeros(2), "b": torch.zeros(1), "extra": torch.zeros(1)}, "only in the fine-tuned weights \\(extra\\)"),
    ({"w": torch.zeros(3), "b": torch.zeros(1)}, "of other shapes \\(w\\).*model.force_image_size"),
])
def test_interpolation_needs_matching_weights(finetuned, message):
    with pytest.raises(InputError, match=message):
        wise_ft({"w": torch.zeros(2), "b": torch.zeros(1)}, finetuned, 0.5)


def test_alphas():
    assert parse_sweep("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_sweep("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]  # STOP is included when the steps reach it
    assert parse_sweep("1,0,0.5,0") == [0.0, 0.5, 1.0]
    assert parse_alpha("0.25") == 0.25


@pytest.mark.parametrize("text, message", [
    ("1.5", "alpha must be a number in \\[0, 1\\]"), ("x", "alpha must be a number"), ("0,nan", "must be a number"),
    ("0:1", "give START:STOP:STEP"), ("0:1:x", "give START:STOP:STEP"),
    ("0:2:0.5", "needs 0 <= START <= STOP <= 1"), ("1:0:0.1", "START <= STOP"), ("0:1:0", "a STEP above 0"),
    ("0:1:0.001", "makes 1001 alphas"),
])
def test_bad_alphas(text, message):
    with pytest.raises(InputError, match=message):
        parse_sweep(text)


# ---------------------------------------------------------------- runs that cannot be interpolated


def run_without_start(tmp_path, pretrained=""):
    """A run directory (fake checkpoint files) whose config.yaml names ``pretrained``."""
    from tuneclip_ds.config import load_config, save_config

    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 4)
    config = load_config(None, ["train.steps=4", "model.name=tiny-ViT", f"model.pretrained={pretrained}"])
    save_config(config, run / "config.yaml")
    return run


def run_without_config(tmp_path):
    return fake_checkpoint(tmp_path / "run" / "checkpoints", 4).parent.parent


def run_from_a_deleted_file(tmp_path):
    return run_without_start(tmp_path, str(tmp_path / "deleted.pt"))


@pytest.mark.parametrize("make_run, alpha, message", [
    (run_without_start, "0.5", "started from random weights .*: WiSE-FT interpolates toward pretrained starting "
                               "weights, so it does not apply; export or evaluate the run without --wise-ft"),
    (run_without_start, "2", "--wise-ft 2: alpha must be a number in \\[0, 1\\]"),
    (run_without_config, "0.5", "config.yaml does not exist: WiSE-FT reads the weights a run started from"),
    (run_from_a_deleted_file, "0.5", "the run's starting weights \\(.*config.yaml\\): .*deleted.pt.* is not a local"),
])
def test_export_bad_wise_ft_input(tmp_path, capsys, make_run, alpha, message):
    output = tmp_path / "wise.pt"
    assert export.main([str(make_run(tmp_path)), "--wise-ft", alpha, "--output", str(output)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


@pytest.mark.parametrize("pretrained, alphas, message", [
    ("random start", "0:1:0.1", "started from random weights"),
    ("weights file", "0,1", f"--pretrained {SHIPPED} is not a run: give a run directory"),
    ("random start", "0:1.5:0.5", "needs 0 <= START <= STOP <= 1"),
])
def test_sweep_bad_input_is_one_message(tmp_path, heldout, capsys, pretrained, alphas, message):  # noqa: F811
    source = run_without_start(tmp_path) if pretrained == "random start" else SHIPPED
    suite = cli_suite(tmp_path, heldout)
    assert eval_main(["--model", "tiny-ViT", "--pretrained", str(source), "--tasks", str(suite),
                      "--wise-ft", alphas]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
