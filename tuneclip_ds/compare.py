"""Runs that differ in a few config keys, trained one after another and compared by their evaluations.

An *arm* is a base experiment YAML plus overrides (``loss.name=infonce``, ``osr.steps=null``, ...). Each arm
is launched as a normal multi-rank training run (torchrun on this machine) and evaluated during training
(``eval.at_steps``); its ``RUN_DIR/eval.jsonl`` gives a curve: metric by stage-II step. ``make demo`` and
``benchmarks/reproduce`` compare arms this way.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneclip_ds.config import load_config


@dataclass
class Arm:
    name: str
    overrides: list[str] = field(default_factory=list)


Curve = dict[int, float]  # stage-II step -> metric


class ArmFailedError(RuntimeError):
    """A training run of an arm exited with an error."""


def launch(config_path: str, overrides: list[str], nproc: int, log_path: Path | None = None) -> Path:
    """Train ``config_path`` with ``overrides`` on ``nproc`` local ranks from a fresh run directory (removed
    first: an arm's results must be its own). Output goes to ``log_path`` (else to this console). Returns the
    run directory; raises ``ArmFailedError`` naming the log when the run fails."""
    run_dir = load_config(config_path, overrides).run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    status = torchrun(["tuneclip_ds.train", "--config", config_path, *overrides], nproc, log_path)
    if status != 0:
        where = f"; see {log_path}" if log_path is not None else ""
        raise ArmFailedError(f"training {config_path} with {' '.join(overrides) or 'no overrides'} failed "
                             f"(exit status {status}){where}")
    return run_dir


def torchrun(module_and_args: list[str], nproc: int, log_path: Path | None = None, append: bool = False) -> int:
    """Runs ``python -m MODULE ARGS`` on ``nproc`` local ranks (torchrun, the cores shared among them);
    output to ``log_path`` (appended to with ``append``) or else to this console. Returns the exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", *module_and_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if log_path is None:
        return subprocess.run(command, env=env).returncode
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """Every metric of ``RUN_DIR/eval.jsonl`` by stage-II step (stage-I evaluations left out; the last
    record of a step wins)."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run evaluated nothing (set eval.tasks)")
    curves: dict[str, Curve] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        position = record.pop("stage2_step")
        record.pop("step")
        if position is None:
            continue
        for name, value in record.items():
            curves.setdefault(name, {})[position] = value
    return curves


@dataclass
class Summary:
    """A curve in five numbers: before training, after the first evaluated step, the worst of the first
    ``window`` steps, the end, the best."""

    start: float
    first: float
    worst: float
    final: float
    best: float

    @classmethod
    def of(cls, curve: Curve, window: int = 20) -> "Summary":
        steps = sorted(curve)
        trained = [curve[s] for s in steps if s > 0] or [curve[steps[0]]]
        early = [curve[s] for s in steps if 0 < s <= window] or trained[-1:]
        return cls(curve[steps[0]], trained[0], min(early), curve[steps[-1]], max(trained))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std_cell(values: list[float]) -> str:
    """``mean ± std`` to one decimal (the mean alone for one value): a cell of this package's tables."""
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def summary_table(curves: dict[str, list[Curve]], window: int = 20, scale: float = 100.0) -> str:
    """A Markdown table, one row per arm: mean +- std over its runs of start, first step, worst, final, best."""
    header = f"| arm | runs | start | first step | worst (steps 1-{window}) | final | best |"
    rows = [header, "|---|---|---|---|---|---|---|"]
    for arm, runs in curves.items():
        summaries = [Summary.of(curve, window) for curve in runs]
        cells = [mean_std_cell([getattr(s, key) * scale for s in summaries])
                 for key in ("start", "first", "worst", "final", "best")]
        rows.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_curves(curves: dict[str, list[Curve]], baseline: float, path: Path, title: str,
                ylabel: str, scale: float = 100.0) -> None:
    """Metric against stage-II step, one line per arm (the mean over its runs, a band of +- one std),
    with the starting model's level as a dashed line; the step axis is symmetric-log to show the first steps."""
    figure, axes = new_plot()
    evaluated = sorted(set().union(*(curve for runs in curves.values() for curve in runs)))
    for arm, runs in curves.items():
        steps = sorted(set.intersection(*(set(curve) for curve in runs)))
        plot_band(axes, steps, [[curve[s] * scale for curve in runs] for s in steps], arm)
    plot_start(axes, baseline * scale)
    axes.set_xscale("symlog", linthresh=1)
    axes.set_xlim(0, evaluated[-1])
    axes.set_xticks(evaluated, [str(step) for step in evaluated])
    axes.minorticks_off()
    save_plot(figure, axes, path, "fine-tuning step (stage II)", ylabel, title)


def plot_band(axes, xs: list[float], values: list[list[float]], label: str) -> None:
    """The mean of ``values[i]`` at ``xs[i]`` as a line, with a band of +- one std when there are several."""
    stats = [mean_std(at_x) for at_x in values]
    line, = axes.plot(xs, [mean for mean, _ in stats], marker="o", markersize=3, label=label)
    if len(values[0]) > 1:
        axes.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15,
                          color=line.get_color())


def plot_start(axes, level: float) -> None:
    """The starting model's level, dashed."""
    axes.axhline(level, color="black", linestyle="--", linewidth=1, label="starting model")


def new_plot():
    """A figure and its axes in the size of this package's plots, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def save_plot(figure, axes, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and legend in this package's style; written to ``path`` as PNG, then closed."""
    import matplotlib.pyplot as plt

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
