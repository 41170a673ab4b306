"""ZeRO-3 training steps of ViT-L-14 on 2 CPU ranks: each rank's measured peak memory against
the memory planner's per-GPU estimate for the same setup.

    .venv/bin/python benchmarks/zero3_vitl14_memory.py                          # checkpointing off, then on
    .venv/bin/python benchmarks/zero3_vitl14_memory.py --grad-checkpointing on --model ViT-B-32

Each setting starts 2 fresh ranks (gloo, one thread each) that build the run as the trainer does,
through ``build_run`` at ``train.zero_stage=3`` in fp32 with batch 1 per rank and random weights:
the model built under ``deepspeed.zero.Init`` and filled from rank 0's CPU copy, the DeepSpeed
engine with torch's AdamW, the InfoNCE ring loss. The DeepSpeed JSON is
``ds_configs/zero3_large.json``, the one for large models: ``zero3.json``'s reduce bucket (5e8
elements) and reuse distance (1e9) exceed ViT-L-14's 428M parameters, so its whole fp32 gradient
would be bucketed and, from the second step, its whole model kept gathered, more than 2 ranks can
hold beside each other on a 24 GiB machine. Each rank then takes two optimizer steps
(``Trainer.train_step``: forward, loss, backward, gradient reduction, clipping, AdamW) on a fixed
random batch (``--steps``). The second is the steady state the planner estimates: it holds Adam's
moments and ZeRO's bucket from the start and keeps parameters gathered along the first step's
trace. The planner is asked for the same setup with the same JSON and ``device="cpu"`` (torch's
AdamW steps one tensor at a time on the CPU).

Memory is the resident set size, read with ``tuneclip_ds.plan.measure``'s ``RssPeak`` (the ranks
run with glibc's mmap threshold at 64 KiB, so the RSS follows the tensors alive). Figures count
from a rank's RSS just before ``build_run``, after the imports and the process group (Python,
torch, DeepSpeed, open_clip: no part of the planner's figure):

* construction peak: the highest RSS while ``build_run`` ran. Rank 0 holds the whole model in
  fp32 for a while then, to fill the partitions from (a pretrained file adds its state dict): a
  start-up cost the planner reports apart (CPU while the model is built), which is why the step is
  measured on its own;
* held at start: the RSS when the step starts (the partitioned parameters, fp32 masters and
  gradients; after the first step also Adam's moments and ZeRO's bucket);
* forward-backward and optimizer-step peaks: the highest RSS in each phase of the step, the
  high-water mark being reset when the step starts and again when ``engine.step`` starts, so the
  construction does not count. Their maximum, the step peak, is what the planner's per-GPU total
  estimates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.multiprocessing as mp

import tuneclip_ds  # noqa: F401  (before open_clip: lets torchvision import on a CPU-only torch)
from tuneclip_ds.engine import DS_CONFIG_DIR
from tuneclip_ds.plan.measure import MMAP_THRESHOLD, RssPeak

WORLD_SIZE = 2
GIB = 2**30
PHASES = ("held at start", "forward-backward peak", "optimizer step peak")


def main(argv=None) -> None:
    options = parse_args(argv)
    # read by glibc and torch when the ranks start (see the module's docstring)
    os.environ.update(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1")
    results = {}
    for checkpointing in (mode == "on" for mode in options.grad_checkpointing):
        results[checkpointing] = run_ranks(options, checkpointing)
    plans = {checkpointing: planned(options, checkpointing) for checkpointing in results}
    print(markdown_tables(options.model, results, plans))


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--grad-checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps measured, one after the other")
    parser.add_argument("--deepspeed-config", default=str(DS_CONFIG_DIR / "zero3_large.json"))
    return parser.parse_args(argv)


def run_ranks(options: argparse.Namespace, checkpointing: bool) -> list[dict]:
    """Start the ranks for one setting; each rank's figures, in rank order."""
    from tuneclip_ds.distributed import free_port

    overrides = [f"model.name={options.model}", f"model.grad_checkpointing={str(checkpointing).lower()}",
                 "train.precision=fp32", "train.zero_stage=3", "train.batch_size=1", f"train.steps={options.steps}",
                 f"train.deepspeed_config={options.deepspeed_config}", "checkpoint.save_at_end=false"]
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as output_dir:  # rank 0's TensorBoard writer
        mp.spawn(_rank_main, args=(free_port(), overrides + [f"output_dir={output_dir}"], options.steps, results),
                 nprocs=WORLD_SIZE)
    return results.get()


def _rank_main(rank: int, port: int, overrides: list[str], steps: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.distributed import init_distributed

    init_distributed()
    config = load_config(None, overrides)
    construction = RssPeak()
    construction.start()  # the baseline: imports and process group only
    trainer = build_run(config, rank, WORLD_SIZE, batches=fixed_batches(config.model.name, rank))
    figures = {"construction peak": construction.peak(), "steps": []}
    for step in range(1, steps + 1):
        figures["steps"].append(measure_step(trainer, construction.before))
        print(f"rank {rank}, step {step}: {figures['steps'][-1]}", file=sys.stderr, flush=True)  # progress
    gathered = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(gathered, figures)
    if rank == 0:
        results.put(gathered)
    torch.distributed.destroy_process_group()


def measure_step(trainer, baseline: int) -> dict:
    """One optimizer step: the RSS over ``baseline`` when it starts and at the peak of each phase,
    and its wall-clock seconds."""
    engine, figures = trainer.engine, {}
    passes = RssPeak()

    def measured_optimizer_step():
        figures["forward-backward peak"] = passes.before + passes.peak() - baseline
        update = RssPeak()
        update.start()
        optimizer_step()
        figures["optimizer step peak"] = update.before + update.peak() - baseline

    optimizer_step = engine.step
    with mock.patch.object(engine, "step", measured_optimizer_step):
        passes.start()
        figures["held at start"] = passes.before - baseline
        began = time.perf_counter()
        trainer.train_step()
        figures["seconds"] = time.perf_counter() - began
    return figures


def fixed_batches(model: str, rank: int):
    """Endless batches of one random sample, the same every step (another one on each rank)."""
    import open_clip

    config = open_clip.get_model_config(model)
    size, text = config["vision_cfg"]["image_size"], config["text_cfg"]
    generator = torch.Generator().manual_seed(rank)
    batch = {"image": torch.randn(1, 3, size, size, generator=generator),
             "text": torch.randint(0, text.get("vocab_size", 49408), (1, text["context_length"]), generator=generator),
             "sample_id": torch.tensor([rank])}
    while True:
        yield batch


def planned(options: argparse.Namespace, checkpointing: bool):
    """The planner's figures for the same setup: one node of 2 'GPUs', batch 1, ZeRO-3, fp32, the same
    DeepSpeed JSON, torch's AdamW as it runs on the CPU."""
    from tuneclip_ds.plan import Setup, ZeroSettings, make_plan, model_shape

    zero = ZeroSettings.from_file(Path(options.deepspeed_config))
    setup = Setup(nodes=1, gpus_per_node=WORLD_SIZE, batch_size=1, zero_stage=3, precision="fp32",
                  grad_checkpointing=checkpointing, zero=zero, device="cpu")
    return make_plan(model_shape(options.model), setup)


def markdown_tables(model: str, results: dict, plans: dict) -> str:
    header = f"{model}, ZeRO-3, fp32, batch 1 per rank, {WORLD_SIZE} CPU ranks; GiB"
    return "\n\n".join([header, measured_table(results, plans), planner_table(plans)])


def measured_table(results: dict, plans: dict) -> str:
    """A row per setting, rank and step: the measured figures beside the planner's total."""
    columns = ["checkpointing", "rank", "construction peak", "step", *PHASES, "step peak", "planner total",
               "planner / step peak", "step s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for checkpointing, ranks in results.items():
        total = plans[checkpointing].total
        for rank, figures in enumerate(ranks):
            for step, phases in enumerate(figures["steps"], 1):
                peak = max(phases[phase] for phase in PHASES)
                row = [_on_off(checkpointing), rank, _gib(figures["construction peak"]), step,
                       *(_gib(phases[phase]) for phase in PHASES), _gib(peak), _gib(total),
                       f"{total / peak:.2f}", f"{phases['seconds']:.0f}"]
                lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def planner_table(plans: dict) -> str:
    """The planner's rows per GPU, a column per setting."""
    lines = ["| planner, per GPU | " + " | ".join(f"checkpointing {_on_off(c)}" for c in plans) + " |",
             "|---|" + "---|" * len(plans)]
    columns = [plan.rows() for plan in plans.values()]
    for cells in zip(*columns):
        lines.append(f"| {cells[0][0]} | " + " | ".join(_gib(value) for _, value in cells) + " |")
    return "\n".join(lines)


def _on_off(checkpointing: bool) -> str:
    return "on" if checkpointing else "off"


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


if __name__ == "__main__":
    main()
