"""A WiSE-FT sweep: a training run evaluated at several interpolations toward its starting weights.

    python -m tuneclip_ds.eval --model M --pretrained RUN_DIR --wise-ft 0:1:0.1 --tasks SUITE --output wise_ft.json

Every rank loads the run's starting weights (its model.pretrained, as training loaded them) once, and the
run is exported once per node, as for a plain evaluation; then each alpha's weights are made on the device
and evaluated (on all ranks, like a plain evaluation). Rank 0 prints a table (a row per alpha, a column per
task's main metric and per suite average), writes every metric to --output as JSON and plots the table
beside it (--output's name with .png).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from tuneclip_ds.errors import InputError
from tuneclip_ds.eval import loading
from tuneclip_ds.eval.tasks import Suite
from tuneclip_ds.wise_ft import parse_sweep, run_model_config, run_start_weights, wise_ft

logger = logging.getLogger("tuneclip_ds.eval")

Sweep = dict[float, dict[str, float]]  # alpha -> metrics


def alphas_to_evaluate(args: argparse.Namespace) -> list[float]:
    """--wise-ft's alphas, once --pretrained is known to be a run that started from pretrained weights."""
    alphas = parse_sweep(args.wise_ft)
    checkpoint = loading.training_checkpoint(args.pretrained)
    if checkpoint is None:
        raise InputError(f"--wise-ft interpolates a training run toward its starting weights, but --pretrained "
                         f"{args.pretrained or '(empty)'} is not a run: give a run directory or one of its "
                         "checkpoints/step_* folders")
    run_model_config(checkpoint)
    return alphas


def evaluate_sweep(args: argparse.Namespace, suite: Suite, alphas: list[float], rank: int,
                   world_size: int) -> Sweep:
    """The metrics at each alpha (collective, like ``cli.evaluate_pretrained``)."""
    device = loading.resolve_device(args.device)
    start = _on(device, run_start_weights(loading.training_checkpoint(args.pretrained)))
    with loading.exported_weights(args.pretrained) as weights:
        bundle = loading.load_model(args, weights, device, rank)
        finetuned = {name: tensor.clone() for name, tensor in bundle.model.state_dict().items()}
        sweep = {}
        for alpha in alphas:
            if rank == 0:
                logger.info("WiSE-FT alpha %g", alpha)
            bundle.model.load_state_dict(wise_ft(start, finetuned, alpha))
            sweep[alpha] = loading.evaluate_model(args, bundle, suite, device, rank, world_size)
    return sweep


def _on(device: torch.device, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in state_dict.items()}


def write_report(args: argparse.Namespace, suite: Suite, sweep: Sweep, world_size: int) -> None:
    """The table on stdout, every metric in --output (JSON) and the table's columns plotted beside it."""
    print(format_table(sweep, task_metrics(suite) + list(suite.averages)))
    output = Path(args.output)
    start = run_model_config(loading.training_checkpoint(args.pretrained)).pretrained
    report = {"model": args.model, "pretrained": args.pretrained, "start": start, "tasks": args.tasks,
              "world_size": world_size, "wise_ft": [{"alpha": alpha, "metrics": m} for alpha, m in sweep.items()]}
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot = output.with_suffix(".png")
    plot_sweep(sweep, suite, plot, f"WiSE-FT of {args.pretrained}")
    print(f"wrote {output} and {plot}")


def task_metrics(suite: Suite) -> list[str]:
    """Each task's main metric (top-1, mean R@1): what the suite's averages average."""
    return [f"{task.name}/{task.main_metric}" for task in suite.tasks]


def format_table(sweep: Sweep, columns: list[str]) -> str:
    widths = [max(len(column), 6) for column in columns]
    lines = ["alpha  " + "  ".join(f"{column:>{width}}" for column, width in zip(columns, widths))]
    for alpha, metrics in sweep.items():
        cells = [f"{metrics[column]:>{width}.4f}" for column, width in zip(columns, widths)]
        lines.append(f"{alpha:<5g}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, suite: Suite, path: Path, title: str, scale: float = 100.0) -> None:
    """Each task's main metric against alpha, and the suite's averages dashed."""
    from tuneclip_ds.compare import new_plot, save_plot

    figure, axes = new_plot()
    alphas = list(sweep)
    lines = [(metric, "-") for metric in task_metrics(suite)] + [(average, "--") for average in suite.averages]
    for metric, style in lines:
        axes.plot(alphas, [sweep[alpha][metric] * scale for alpha in alphas], style, marker="o", markersize=3,
                  label=metric)
    save_plot(figure, axes, path, "WiSE-FT alpha (0: starting weights, 1: fine-tuned)", "metric (%)", title)
