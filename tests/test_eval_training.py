"""Evaluation during training: ZeRO-3 on 2 ranks, TensorBoard, the best checkpoint kept and exported."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_launch import scalars
from test_training import TINY_RUN


def write_suite(folder: Path, val_shards: Path) -> Path:
    suite = {
        "defaults": {"batch_size": 16, "num_workers": 0},
        "tasks": [
            {"name": "cls", "kind": "classification", "data": str(val_shards), "classnames": "synthetic",
             "templates": "synthetic", "label_field": "label"},
            {"name": "ret", "kind": "retrieval", "data": str(val_shards)},
        ],
        "averages": {"average": "all"},
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def train_with_evaluation(rank, world_size, overrides):
    """Train; return the final evaluation of the engine and of the exported file, each run in this pool."""
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    trainer = build_run(load_config(None, overrides), rank, world_size)
    trainer.run()
    return trainer.evaluator.tracker.state_dict()


def evaluate_exported(rank, world_size, weights: str, suite: str):
    """The exported model evaluated on one process, with open_clip's own model class."""
    from tuneclip_ds.config import ModelConfig
    from tuneclip_ds.eval import evaluate, load_suite
    from tuneclip_ds.models import build_model

    import open_clip  # after tuneclip_ds, which makes torchvision importable on CPU torch

    bundle = build_model(ModelConfig(name="tiny-ViT"))
    model = open_clip.create_model("tiny-ViT", pretrained=weights)
    return evaluate(model, load_suite(suite), bundle.preprocess_val, bundle.tokenizer, "cpu")


def evaluate_run_counting_exports(rank, world_size, run_dir: str, suite: str):
    """``python -m tuneclip_ds.eval --pretrained RUN_DIR`` on each rank; returns the metrics and the folders this
    rank exported the run to."""
    from tuneclip_ds import export
    from tuneclip_ds.eval import cli

    exported, export_folder = [], export.export_folder

    def counted(source, output, *args, **kwargs):
        exported.append(output)
        return export_folder(source, output, *args, **kwargs)

    args = cli.parse_args(["--model", "tiny-ViT", "--pretrained", run_dir, "--tasks", suite])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "export_folder", counted)
        return cli.evaluate_pretrained(args, cli.suite_from_args(args), rank, world_size), exported


def test_zero3_evaluation_during_training_keeps_and_exports_the_best(pools, tmp_path):
    from tuneclip_ds import export
    from tuneclip_ds.eval.cli import main as eval_main

    data, run_dir = tmp_path / "data", tmp_path / "run"
    suite = write_suite(tmp_path, data / "val")
    overrides = TINY_RUN + [
        f"data.train_shards={data / 'train'}", "data.synthetic.num_samples=256", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=32", f"data.synthetic.val_shards={data / 'val'}",
        "data.synthetic.val_samples=48", "train.batch_size=8", "train.steps=6", "train.zero_stage=3",
        f"output_dir={tmp_path}", "run_name=run", f"eval.tasks={suite}", "eval.every=2",
        # "min" picks an early evaluation, which keep_last=1 would otherwise prune
        "eval.select=cls/top1", "eval.mode=min", "checkpoint.keep_last=1",
    ]
    best, _ = pools[2].run(train_with_evaluation, overrides)

    logged = scalars(run_dir)
    assert len(logged["eval/cls/top1"]) == 4  # steps 0 (the start), 2, 4, 6
    assert {"eval/ret/mean_R@1", "eval/average", "eval/cls/top5"} <= logged.keys()
    assert len(logged["time/eval"]) == 4 and all(seconds > 0 for seconds in logged["time/eval"])
    values = logged["eval/cls/top1"]
    best_step = 2 * values.index(min(values))  # the first of equal values wins
    assert best["best_step"] == best_step and best["best"] == pytest.approx(min(values))  # TensorBoard keeps float32
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "best").read_text() == f"step_{best_step:08d}"
    kept = sorted(p.name for p in checkpoints.glob("step_*"))
    assert kept == sorted({f"step_{best_step:08d}", "step_00000006"})

    for which, flags in (("best", ["--best"]), ("last", [])):
        assert export.main([str(run_dir), "--output", str(tmp_path / f"{which}.pt"), *flags]) == 0
    (last,) = pools[1].run(evaluate_exported, str(tmp_path / "last.pt"), str(suite))
    # The 2-rank ZeRO-3 evaluation of the trained engine equals one process on the exported weights.
    assert last["cls/top1"] == pytest.approx(values[-1], abs=1e-6)
    assert last["ret/mean_R@1"] == pytest.approx(logged["eval/ret/mean_R@1"][-1], abs=1e-6)
    # The command-line evaluation takes the run directory itself (exported on the fly).
    assert eval_main(["--model", "tiny-ViT", "--pretrained", str(run_dir), "--tasks", str(suite),
                      "--output", str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["metrics"] == last
    # On 2 ranks of one node, rank 0 alone converts the run (local rank 0; the other waits and reads its folder,
    # removed afterwards), and the metrics are those of one process.
    (metrics_0, exported), (metrics_1, none) = pools[2].run(evaluate_run_counting_exports, str(run_dir), str(suite))
    assert metrics_0 == metrics_1 == last
    assert len(exported) == 1 and none == [] and not exported[0].parent.exists()
    best_weights = torch.load(tmp_path / "best.pt")
    last_weights = torch.load(tmp_path / "last.pt")
    assert best_step == 6 or not torch.equal(best_weights["visual.proj"], last_weights["visual.proj"])


def test_missing_evaluation_data_stops_before_training(tmp_path):
    from tuneclip_ds.builders import build_evaluator
    from tuneclip_ds.config import load_config
    from tuneclip_ds.errors import InputError
    from tuneclip_ds.models import build_model

    suite = write_suite(tmp_path, tmp_path / "no_such_folder")
    config = load_config(None, ["train.steps=1", "model.name=tiny-ViT", f"eval.tasks={suite}"])
    with pytest.raises(InputError, match="no_such_folder"):
        build_evaluator(config, build_model(config.model))


def test_select_needs_tasks():
    from tuneclip_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.select='average' needs eval.tasks"):
        load_config(None, ["train.steps=1", "eval.select=average"])
