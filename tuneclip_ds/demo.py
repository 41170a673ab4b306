"""`make demo`: TuneCLIP beside the naive fine-tuning it replaces, on the small pretrained CLIP shipped here.

    python -m tuneclip_ds.demo [--config configs/demo.yaml] [--nproc 2] [key.sub=value ...]

Trains the config twice on NPROC local ranks, as it is (TuneCLIP: stage I then HGCL) and with the naive
overrides (InfoNCE with a cold Adam, no stage I), both evaluated at the same stage-II steps, then prints a
side-by-side table (start, worst of the first steps, end), writes a PNG of the two curves and their numbers
as JSON next to the runs, and names the TensorBoard directory. Overrides apply to both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneclip_ds.compare import Arm, ArmFailedError, launch, plot_curves, read_curves, summary_table
from tuneclip_ds.config import load_config
from tuneclip_ds.errors import command

ARMS = [
    Arm("naive fine-tuning", ["run_name=naive", "loss.name=infonce", "osr.steps=null"]),
    Arm("TuneCLIP", []),
]
METRICS = {"heldout/top1": "held-out top-1", "shifted/top1": "shifted top-1",
           "retrieval/mean_R@1": "retrieval R@1", "average": "average"}
WINDOW = 20  # the "worst" column: the first steps of stage II


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. optim.lr=3e-3")
    args = parser.parse_args(argv)
    output = load_config(args.config, args.overrides).output_dir
    curves = {}
    for arm in ARMS:
        overrides = [*args.overrides, *arm.overrides]
        print(f"\n=== {arm.name}: {args.config} {' '.join(overrides)}", flush=True)
        try:
            curves[arm.name] = read_curves(launch(args.config, overrides, args.nproc))
        except ArmFailedError as error:  # the run printed its own error above
            print(f"error: {error}", file=sys.stderr)
            return 1
    report(curves, Path(output))
    return 0


def report(curves: dict[str, dict], output: Path) -> None:
    """The comparison as a table on the console, a PNG of the average and a JSON of every number."""
    print(f"\nzero-shot results in %, by stage-II step (worst: steps 1-{WINDOW}):")
    for metric, label in METRICS.items():
        print(f"\n{label}\n" + summary_table({arm: [runs[metric]] for arm, runs in curves.items()}, WINDOW))
    start = next(iter(curves.values()))["average"][0]
    plot = output / "comparison.png"
    plot_curves({arm: [runs["average"]] for arm, runs in curves.items()}, start, plot,
                "Fine-tuning the shipped shapes CLIP", "zero-shot average (%)")
    (output / "comparison.json").write_text(json.dumps(curves, indent=1) + "\n")
    print(f"\nplot: {plot}\nnumbers: {output / 'comparison.json'}\nTensorBoard: tensorboard --logdir {output}")


if __name__ == "__main__":
    sys.exit(main())
