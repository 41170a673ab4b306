"""Pretrain the small CLIP that `make demo` and the reproduction fine-tune, and ship it as an open_clip file.

    .venv/bin/python benchmarks/reproduce/pretrain.py [--nproc 2] [key.sub=value ...]

Trains benchmarks/reproduce/pretrain.yaml (tiny-ViT from random weights, InfoNCE, cosine to 0, on the
synthetic shapes corpus it writes to data/shapes/) on NPROC CPU ranks with the project's own trainer,
exports the last checkpoint in fp16 to tuneclip_ds/pretrained/shapes-tiny-ViT.safetensors, evaluates that
file on configs/eval/shapes.yaml and writes its card (metrics, the pretraining curve, SHA-256, the command)
beside it as a .json. The same command on the same machine kind (torch 2.13 CPU, 2 ranks, one thread
each) writes the same file bit for bit: data order, initialisation and reduction order are all seeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import tuneclip_ds  # noqa: F401  (torchvision on a CPU-only torch, before open_clip)
from tuneclip_ds.compare import launch, read_curves
from tuneclip_ds.config import load_config
from tuneclip_ds.export import export

CONFIG = Path(__file__).with_name("pretrain.yaml")
OUTPUT = Path("tuneclip_ds/pretrained/shapes-tiny-ViT.safetensors")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the .safetensors file to write")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=20 (for a smoke run)")
    return parser.parse_args(argv)


def evaluate_file(model_name: str, weights: Path, suite: str) -> dict[str, float]:
    """The suite's metrics for an open_clip file, in this process (one rank)."""
    import torch

    from tuneclip_ds.config import ModelConfig
    from tuneclip_ds.eval.runner import evaluate
    from tuneclip_ds.eval.tasks import load_suite
    from tuneclip_ds.models import build_model

    bundle = build_model(ModelConfig(name=model_name, pretrained=str(weights)))
    return evaluate(bundle.model, load_suite(suite), bundle.preprocess_val, bundle.tokenizer, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = load_config(args.config, args.overrides)
    began = time.time()
    print(f"pretraining {config.model.name} for {config.train.steps} steps on {args.nproc} ranks "
          f"(log: {config.run_dir}.log)", flush=True)
    run_dir = launch(args.config, args.overrides, args.nproc, log_path=Path(f"{config.run_dir}.log"))
    minutes = (time.time() - began) / 60
    print(export(run_dir, args.output, safetensors=True, dtype="fp16"))
    metrics = evaluate_file(config.model.name, args.output, config.eval.tasks)
    card = {
        "model": config.model.name,
        "weights": args.output.name,
        "sha256": hashlib.sha256(args.output.read_bytes()).hexdigest(),
        "evaluation": {"suite": config.eval.tasks, "metrics": metrics},
        "pretraining": {
            "command": " ".join(["benchmarks/reproduce/pretrain.py", f"--nproc {args.nproc}", *args.overrides]),
            "config": os.path.relpath(args.config),  # from the repository root, where make runs it
            "overrides": args.overrides,
            "ranks": args.nproc,
            "minutes": round(minutes, 1),
            "curve": read_curves(run_dir),  # metric -> {step: value}, every eval.every steps
        },
    }
    card_path = args.output.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    main_metrics = ("top1", "mean_R@1")  # each task's main metric, and the suite's averages (no "/")
    summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()
                        if "/" not in name or name.endswith(main_metrics))
    print(f"wrote {card_path}: {summary}; pretraining took {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
