"""Evaluate a model on a suite of tasks: a table on stdout, the metrics in a JSON file.

    python -m tuneclip_ds.eval --model ViT-B-16 --pretrained weights.safetensors --tasks configs/eval/synthetic.yaml
    torchrun --nproc_per_node 8 -m tuneclip_ds.eval ...     # the samples split over 8 ranks

--pretrained is a local weights file or open_clip folder (empty: random initialisation), or a
training run (its latest checkpoint) or one of its checkpoints/step_* folders: those are exported
to a temporary open_clip folder first, as `python -m tuneclip_ds.export --folder` does (the
folder's config then defines the model, tokenizer included), once per node: the node's other ranks
wait and read it. --tokenizer names a folder of Hugging Face tokenizer files, as model.tokenizer
does in training.

    python -m tuneclip_ds.eval --model ViT-B-16 --pretrained RUN_DIR --wise-ft 0:1:0.1 --tasks SUITE

evaluates WiSE-FT interpolations of a training run toward its starting weights (model.pretrained), one
per alpha: a table (a row per alpha), the metrics in --output and a plot beside it (--output's name
with .png), see tuneclip_ds/eval/sweep.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from tuneclip_ds.config import ConfigError
from tuneclip_ds.distributed import init_distributed, shutdown
from tuneclip_ds.errors import InputError
from tuneclip_ds.eval import sweep
from tuneclip_ds.eval.loading import (AUTOCAST_DTYPES, evaluate_model, exported_weights, load_model, resolve_device,
                                     training_checkpoint)
from tuneclip_ds.eval.runner import check_suite
from tuneclip_ds.eval.tasks import Suite, load_suite

logger = logging.getLogger("tuneclip_ds.eval")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="open_clip model name (or one in tuneclip_ds/model_configs)")
    parser.add_argument("--pretrained", default="",
                        help="local weights file, open_clip folder, training run or checkpoint folder")
    parser.add_argument("--tokenizer", default="", help="folder of Hugging Face tokenizer files (model.tokenizer)")
    parser.add_argument("--tasks", required=True, help="suite YAML (see configs/eval/)")
    parser.add_argument("--output", default="eval_results.json", help="where to write the metrics as JSON")
    parser.add_argument("--batch-size", type=int, help="batch size of every task (default: the suite's)")
    parser.add_argument("--workers", type=int, help="data-loading workers per rank (default: the suite's)")
    parser.add_argument("--device", help="default: cuda (the local rank's GPU) when available, else cpu")
    parser.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--wise-ft", metavar="ALPHAS", help="with --pretrained RUN_DIR: evaluate WiSE-FT "
                        "interpolations toward the run's starting weights, alpha START:STOP:STEP (e.g. 0:1:0.1, "
                        "STOP included) or A,B,... (0: the starting weights, 1: the fine-tuned ones)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        suite = suite_from_args(args)
        check_suite(suite)
        training_checkpoint(args.pretrained)  # a damaged run is one message before any process group
        alphas = None if args.wise_ft is None else sweep.alphas_to_evaluate(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rank, world_size = start_distributed()
    from tuneclip_ds.train import setup_logging

    setup_logging(rank)
    try:
        if alphas is None:
            results = evaluate_pretrained(args, suite, rank, world_size)
        else:
            results = sweep.evaluate_sweep(args, suite, alphas, rank, world_size)
    except InputError as error:
        logger.error("%s", error)
        return 2
    finally:
        shutdown()
    if rank == 0 and alphas is None:
        write_report(args, results, world_size)
    elif rank == 0:
        sweep.write_report(args, suite, results, world_size)
    return 0


def write_report(args: argparse.Namespace, results: dict[str, float], world_size: int) -> None:
    print(format_table(results))
    report = {"model": args.model, "pretrained": args.pretrained, "tasks": args.tasks,
              "world_size": world_size, "metrics": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


def suite_from_args(args: argparse.Namespace) -> Suite:
    suite = load_suite(args.tasks)
    overrides = {"batch_size": args.batch_size, "num_workers": args.workers}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides.get("batch_size", 1) < 1 or overrides.get("num_workers", 0) < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    return Suite([dataclasses.replace(task, **overrides) for task in suite.tasks], suite.averages)


def start_distributed() -> tuple[int, int]:
    """(rank, world size): a process group when a launcher (torchrun, deepspeed) started several ranks."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    return init_distributed()


def evaluate_pretrained(args: argparse.Namespace, suite: Suite, rank: int, world_size: int) -> dict[str, float]:
    """The metrics of the model ``args`` names, on this rank's share of the samples (collective)."""
    with exported_weights(args.pretrained) as weights:
        return run(args, weights, suite, rank, world_size)


def run(args: argparse.Namespace, weights: str, suite: Suite, rank: int, world_size: int) -> dict[str, float]:
    device = resolve_device(args.device)
    return evaluate_model(args, load_model(args, weights, device, rank), suite, device, rank, world_size)


def format_table(results: dict[str, float]) -> str:
    width = max(len("metric"), *(len(name) for name in results))
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in results.items()]
    return "\n".join(lines)
