"""A miniature reproduction of TuneCLIP's claim: fine-tuning a well-pretrained CLIP on more data of its own
kind, naive fine-tuning (cold Adam, cold estimators) first degrades it, while OSR + HGCL does not.

    .venv/bin/python benchmarks/reproduce/run.py [--seeds 3] [--nproc 2] [--reuse] [--out docs/reproduce]

The model is the shipped shapes CLIP (tuneclip_ds/pretrained/, made by pretrain.py); the fine-tuning data
are fresh samples of its pretraining corpus (the "train" split of configs/demo.yaml's synthetic corpus, the
model saw the disjoint "pretrain" split); evaluation is configs/eval/shapes.yaml: held-out zero-shot
classification, the same classes on unseen scenery (shift), and image-text retrieval. Every run is
configs/demo.yaml with the overrides below: same data, steps and optimizer settings in every arm, except
what the arm changes. First a learning-rate sweep (one seed, naive and TuneCLIP, the first steps), then
every arm with each seed, then weight averaging on naive and TuneCLIP (the EMA of stage II's weights,
evaluated beside them in the same runs, and WiSE-FT of each run's final weights toward the start). Writes
OUT/results.json (every number; the results of arms, rates and averaged arms not run this time are kept
from an earlier OUT/results.json), OUT/results.md (tables, mean +- std over seeds) and OUT/*.png (metric
against step or WiSE-FT's alpha, the starting model as a dashed line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import tuneclip_ds  # noqa: F401  (torchvision on a CPU-only torch, before open_clip)
from tuneclip_ds.compare import (Arm, ArmFailedError, launch, mean_std_cell, new_plot, plot_band, plot_curves,
                                 plot_start, read_curves, save_plot, summary_table, torchrun)
from tuneclip_ds.config import load_config, to_dict

BASE = "configs/demo.yaml"
STAGE1, STAGE2 = 64, 128  # steps: 2 and 4 epochs of the 8192-sample fine-tuning corpus at global batch 256
EVAL_AT = [1, 2, 5, 10, 20, 50, 100]  # and at 0 and the end
COMMON = ["output_dir=runs/reproduce", f"train.steps={STAGE2}", f"osr.steps={STAGE1}",
          f"eval.at_steps={EVAL_AT}", "log.every=32"]
COLD = "osr.steps=null"
ARMS = [  # the paper's arms, then the variants beyond it
    Arm("naive (InfoNCE)", ["loss.name=infonce", COLD]),
    Arm("GCL cold (FastCLIP)", ["loss.name=gcl", COLD]),
    Arm("HGCL cold", [COLD]),
    Arm("OSR(m,v) + HGCL", ["osr.recover=[m,v]"]),
    Arm("OSR(m,v,u) + HGCL (TuneCLIP)", []),
    Arm("OSR(v) + HGCL", ["osr.recover=[v]"]),
    Arm("OSR(v,u) + HGCL", ["osr.recover=[v,u]"]),
    Arm("OSR 16 steps + HGCL", ["osr.steps=16"]),
    # ||m|| moves by 1-10 % per step from gradient noise at this batch: a tolerance of 0.2 % never triggers
    Arm("OSR until settled + HGCL", ["osr.until_converged=0.1", "osr.patience=4", "osr.min_steps=8"]),
    # stage I with the other losses: is it the loss or the recovery?
    Arm("OSR + InfoNCE", ["loss.name=infonce"]),
    Arm("OSR + GCL", ["loss.name=gcl"]),
]
PLOTS = {"paper": [arm.name for arm in ARMS[:5]],  # the paper's arms; stage I's variants; each loss cold and warm
         "osr": [arm.name for arm in ARMS[3:9]],
         "loss": [arm.name for arm in (*ARMS[:3], *ARMS[9:], ARMS[4])]}
# Weight averaging on the two arms that matter: decay 0.98 is a 50-step horizon, 0.4 of stage II (as 0.999
# is of a 2,500-step run); WiSE-FT's table names alpha 0.5, its usual mix. Both fixed before any run.
AVERAGED = [ARMS[0], ARMS[4]]
EMA_DECAY = 0.98
AVERAGING = [f"ema.decay={EMA_DECAY}", "eval.weights=both", "checkpoint.save_at_end=true"]
WISE_ALPHAS = "0:1:0.1"
WISE_NAMED = 0.5
SWEEP_LRS = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
SWEEP_ARMS = [ARMS[0], ARMS[4]]
SWEEP_STEPS = 20
METRICS = {"average": "zero-shot average", "heldout/top1": "held-out top-1", "shifted/top1": "shifted top-1",
           "retrieval/mean_R@1": "retrieval mean R@1"}
WINDOW = 20


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


class Runner:
    """Trains arms one after another; with ``reuse``, a finished run with the same resolved config is kept."""

    def __init__(self, base: str, common: list[str], nproc: int, reuse: bool):
        self.base, self.common, self.nproc, self.reuse = base, common, nproc, reuse
        self.minutes: dict[str, float] = {}

    def curves(self, run_name: str, overrides: list[str]) -> dict:
        overrides = [*self.common, *overrides, f"run_name={run_name}"]
        config = load_config(self.base, overrides)
        run_dir = config.run_dir
        if self.reuse and self._finished(run_dir, config):
            print(f"  {run_name}: reused {run_dir}", flush=True)
            return read_curves(run_dir)
        began = time.time()
        launch(self.base, overrides, self.nproc, log_path=run_dir.with_suffix(".log"))
        self.minutes[run_name] = (time.time() - began) / 60
        curves = read_curves(run_dir)
        final = {name: curve[max(curve)] for name, curve in curves.items() if name in METRICS}
        print(f"  {run_name}: {self.minutes[run_name]:.1f} min, final "
              + ", ".join(f"{name} {value:.3f}" for name, value in final.items()), flush=True)
        return curves

    @staticmethod
    def _finished(run_dir: Path, config) -> bool:
        import yaml

        saved = run_dir / "config.yaml"
        if not (saved.is_file() and (run_dir / "eval.jsonl").is_file()):
            return False
        same = yaml.safe_load(saved.read_text()) == to_dict(config)
        return same and max(read_curves(run_dir)["average"]) == config.train.steps

    def wise_ft(self, run_name: str, overrides: list[str], alphas: str) -> list[dict]:
        """The WiSE-FT sweep of a finished run's final weights: [{"alpha", "metrics"}], alpha ascending."""
        config = load_config(self.base, [*self.common, *overrides, f"run_name={run_name}"])
        output = config.run_dir / "wise_ft.json"
        command = ["tuneclip_ds.eval", "--model", config.model.name, "--pretrained", str(config.run_dir),
                   "--wise-ft", alphas, "--tasks", config.eval.tasks, "--output", str(output)]
        log = config.run_dir.with_suffix(".log")
        if torchrun(command, self.nproc, log, append=True) != 0:
            raise ArmFailedError(f"the WiSE-FT sweep of {config.run_dir} failed; see {log}")
        return json.loads(output.read_text())["wise_ft"]


def lr_sweep(runner: Runner, rates: list[float], steps: int) -> dict:
    """Naive and TuneCLIP at each rate for the first ``steps`` of stage II (one seed)."""
    at_steps = [s for s in EVAL_AT if s < steps]
    results = {}
    for lr in rates:
        for arm in SWEEP_ARMS:
            overrides = [*arm.overrides, f"train.steps={steps}", f"eval.at_steps={at_steps}", f"optim.lr={lr}"]
            results.setdefault(f"{lr:g}", {})[arm.name] = runner.curves(f"sweep-{slug(arm.name)}-lr{lr:g}", overrides)
    return results


def all_arms(runner: Runner, seeds: int, arms: list[Arm]) -> dict:
    results = {arm.name: {"overrides": arm.overrides, "runs": []} for arm in arms}
    for seed in range(seeds):  # seed by seed: partial results stay balanced over the arms
        for arm in arms:
            curves = runner.curves(f"{slug(arm.name)}-seed{seed}", [*arm.overrides, f"seed={seed}"])
            results[arm.name]["runs"].append(curves)
    return results


def averaged_arms(runner: Runner, seeds: int, arms: list[Arm], alphas: str) -> dict:
    """Each arm with the EMA (its runs' curves hold ``ema/...`` beside the weights') and the WiSE-FT sweep
    of each run's final weights."""
    results = {arm.name: {"overrides": [*arm.overrides, *AVERAGING], "runs": []} for arm in arms}
    for seed in range(seeds):
        for arm in arms:
            name, overrides = f"{slug(arm.name)}-averaged-seed{seed}", [*arm.overrides, *AVERAGING, f"seed={seed}"]
            run = {"curves": runner.curves(name, overrides), "wise_ft": runner.wise_ft(name, overrides, alphas)}
            results[arm.name]["runs"].append(run)
    return results


def write_report(results: dict, out: Path) -> None:
    arms = {name: arm for name, arm in results["arms"].items() if arm["runs"]}
    lines = [f"# Reproduction results\n\n{results['conditions']}\n"]
    for metric, label in METRICS.items() if arms else ():
        table = summary_table({name: [run[metric] for run in arm["runs"]] for name, arm in arms.items()}, WINDOW)
        lines.append(f"## {label} (%)\n\n{table}\n")
        start = next(iter(arms.values()))["runs"][0][metric][0]
        for group, names in PLOTS.items():
            curves = {name: [run[metric] for run in arms[name]["runs"]] for name in names if name in arms}
            if curves:
                plot_curves(curves, start, out / f"{slug(metric)}-{group}.png",
                            f"Fine-tuning the shapes CLIP: {label}", f"{label} (%)")
    sweep = results["lr_sweep"]
    if sweep:
        curves = {f"{arm} lr {lr}": [c["average"]] for lr, runs in sweep.items() for arm, c in runs.items()}
        steps = max(max(runs[0]) for runs in curves.values())
        lines.append(f"## Learning-rate sweep (one seed, {steps} steps of stage II): zero-shot average (%)\n")
        for lr, runs in sweep.items():
            table = summary_table({arm: [c["average"]] for arm, c in runs.items()}, WINDOW)
            lines.append(f"lr {lr}\n\n{table}\n")
        start = next(iter(curves.values()))[0][0]  # every run starts from the same model
        plot_curves(curves, start, out / "lr-sweep.png", "Learning-rate sweep: zero-shot average",
                    "zero-shot average (%)")
    lines += averaging_report(results.get("averaged", {}), out)
    (out / "results.md").write_text("\n".join(lines))


def averaging_report(averaged: dict, out: Path) -> list[str]:
    """Per metric: the weights' and the EMA's curves in the same runs, and WiSE-FT by alpha; plots of both."""
    arms = {name: arm["runs"] for name, arm in averaged.items() if arm["runs"]}
    if not arms:
        return []
    lines = [f"## Weight averaging: EMA (decay {EMA_DECAY}) and WiSE-FT of the final weights\n"]
    for metric, label in METRICS.items():
        curves = {}
        for name, runs in arms.items():
            curves[f"{name}: weights"] = [run["curves"][metric] for run in runs]
            curves[f"{name}: EMA"] = [run["curves"][f"ema/{metric}"] for run in runs]
        lines.append(f"### {label} (%), the same runs' weights and EMA\n\n{summary_table(curves, WINDOW)}\n")
        start = next(iter(curves.values()))[0][0]
        plot_curves(curves, start, out / f"{slug(metric)}-averaged.png", f"Weights and their EMA: {label}",
                    f"{label} (%)")
        lines.append(f"### {label} (%), WiSE-FT of the final weights by alpha (0: start, 1: final)\n\n"
                     f"{wise_table(arms, metric)}\n")
        plot_wise_ft(arms, metric, start, out / f"{slug(metric)}-wise-ft.png", f"WiSE-FT: {label}", f"{label} (%)")
    return lines


def wise_table(arms: dict[str, list[dict]], metric: str, scale: float = 100.0) -> str:
    """A Markdown table, a row per alpha, a column per arm: mean +- std over its runs."""
    alphas = [point["alpha"] for point in next(iter(arms.values()))[0]["wise_ft"]]
    rows = ["| alpha | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for index, alpha in enumerate(alphas):
        cells = [mean_std_cell([run["wise_ft"][index]["metrics"][metric] * scale for run in runs])
                 for runs in arms.values()]
        named = " (chosen in advance)" if math.isclose(alpha, WISE_NAMED) else ""
        rows.append(f"| {alpha:g}{named} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_wise_ft(arms: dict[str, list[dict]], metric: str, start: float, path: Path, title: str, ylabel: str,
                 scale: float = 100.0) -> None:
    """Metric against alpha, one line per arm (mean, a band of +- one std), the starting model dashed."""
    figure, axes = new_plot()
    for name, runs in arms.items():
        alphas = [point["alpha"] for point in runs[0]["wise_ft"]]
        plot_band(axes, alphas, [[run["wise_ft"][i]["metrics"][metric] * scale for run in runs]
                                 for i in range(len(alphas))], name)
    plot_start(axes, start * scale)
    save_plot(figure, axes, path, "WiSE-FT alpha (0: starting weights, 1: fine-tuned)", ylabel, title)


def chosen(arms: list[Arm], words: list[str] | None) -> list[Arm]:
    """The arms whose names contain one of ``words`` (None: every arm; an empty list: none)."""
    return [arm for arm in arms if words is None or any(word in arm.name for word in words)]


def kept(earlier: dict, new: dict, order: list[str]) -> dict:
    """This invocation's results, with an earlier invocation's for the names it did not run, in ``order``."""
    merged = {**earlier, **new}
    return {name: merged[name] for name in order if name in merged}


def read_results(out: Path) -> dict:
    """OUT/results.json, a curve's steps numbers again (JSON keeps them as strings)."""
    return json.loads((out / "results.json").read_text(),
                      object_hook=lambda mapping: {int(key) if key.isdigit() else key: value
                                                   for key, value in mapping.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduce"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs whose resolved config is the same")
    parser.add_argument("--arms", nargs="*", help="only the arms whose names contain one of these words (none: "
                        "no arm)")
    parser.add_argument("--averaged", nargs="*", help="weight averaging only on the arms (naive, TuneCLIP) whose "
                        "names contain one of these words (none: no averaging)")
    parser.add_argument("--wise-ft", default=WISE_ALPHAS, help="WiSE-FT's alphas, START:STOP:STEP or A,B,...")
    parser.add_argument("--sweep-lrs", type=float, nargs="*", default=SWEEP_LRS, help="none: no sweep")
    parser.add_argument("--sweep-steps", type=int, default=SWEEP_STEPS)
    parser.add_argument("--report-only", action="store_true", help="write the tables and plots of OUT/results.json")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. optim.lr=1e-3)")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(read_results(args.out), args.out)
        return 0
    began = time.time()
    runner = Runner(BASE, [*COMMON, *args.overrides], args.nproc, args.reuse)
    print("learning-rate sweep", flush=True)
    sweep = lr_sweep(runner, args.sweep_lrs, args.sweep_steps)
    print(f"arms x {args.seeds} seeds", flush=True)
    arms = all_arms(runner, args.seeds, chosen(ARMS, args.arms))
    print(f"weight averaging x {args.seeds} seeds", flush=True)
    averaged = averaged_arms(runner, args.seeds, chosen(AVERAGED, args.averaged), args.wise_ft)
    minutes = (time.time() - began) / 60
    base = load_config(BASE, runner.common)
    earlier = read_results(args.out) if (args.out / "results.json").is_file() else {}
    results = {
        "commands": [*earlier.get("commands", []), {
            "command": " ".join(["benchmarks/reproduce/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "minutes": round(minutes, 1)}],
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, no GPU, {args.nproc} ranks, "
                   f"torch {torch.__version__}",
        "conditions": (f"{base.model.name} from {base.model.pretrained}; fine-tuning corpus "
                       f"{base.data.synthetic.num_samples} fresh samples ({base.data.synthetic.domain} scenery); "
                       f"global batch {base.train.batch_size * args.nproc}; lr {base.optim.lr:g} "
                       f"({base.optim.schedule}, warm-up {base.optim.warmup_steps}); stage I {base.osr.steps} steps, "
                       f"stage II {base.train.steps} steps; temperature frozen; HGCL margin {base.loss.margin}."),
        "run_minutes": {**earlier.get("run_minutes", {}), **runner.minutes},
        "lr_sweep": kept(earlier.get("lr_sweep", {}), sweep, sorted({*earlier.get("lr_sweep", {}), *sweep},
                                                                     key=float)),
        "arms": kept(earlier.get("arms", {}), arms, [arm.name for arm in ARMS]),
        "averaged": kept(earlier.get("averaged", {}), averaged, [arm.name for arm in AVERAGED]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.out)
    print(f"wrote {args.out}/results.json, results.md and plots in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
