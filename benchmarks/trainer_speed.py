"""Our trainer's speed on CPU ranks (or GPUs): step time, samples/s, start-up, memory, where the time goes, and what
logging that costs.

    .venv/bin/python benchmarks/trainer_speed.py                   # 2 ranks, tiny-ViT, b 64, 40 steps, 2 rounds
    .venv/bin/python benchmarks/trainer_speed.py --steps 20 --repeats 1
    .venv/bin/python benchmarks/trainer_speed.py --peer-site /tmp/peer-site   # open_clip_train's trainer too
    .venv/bin/python benchmarks/trainer_speed.py --peer-site /tmp/peer-site --cases zero0,open_clip_train --repeats 8

Every run is a fresh world of ``--world-size`` ranks (``python -m tuneclip_ds.train``'s own
``init_distributed``, hence its threads per rank: gloo on CPUs, nccl on GPUs), InfoNCE, ``--precision``
(fp32 by default), on the default synthetic corpus:

* ``zero0`` / ``zero2``: stage II alone at that ZeRO stage, rank 0 timing every other step only (the
  timed and untimed steps alternate within the run, so that a change in the machine's load hits both
  alike, and swap places from one repeat to the next, against any even/odd rhythm of the steps);
* ``osr``: ZeRO-2, ``--steps`` steps of stage I (lr frozen) then ``--steps`` of stage II;
* ``open_clip_train`` (with ``--peer-site``): open_clip_train 3.3.0's trainer through
  ``open_clip_peer.py`` and torchrun, DDP, ``--local-loss --gather-with-grad``, the same model, batch,
  steps and data workers. It needs webdataset 0.2.86 (it fails with 1.0.2: KeyError 'fname') and
  pandas, kept apart from the project's environment:
  ``.venv/bin/pip install --target /tmp/peer-site --no-deps webdataset==0.2.86 pandas``.
  Its step time is its ``Batch (t)`` (logged every step), its data share ``Data (t)``, the end of a
  step the moment that step's log line reaches the benchmark.

The cases run in rounds, each case once a round, each round in an order rotated from the last. Per case: the
median step time (``train/step_time``) of the steps after the first ``--warmup`` of each
stage, samples/s of the global batch at that median, the seconds from spawning the ranks to the end of
the first step (interpreter, imports, model, engine and data pipeline included) and of the third (the
first steps touch most of a rank's memory, and a trainer that allocates early pays for it in its first
step where another pays in its second: see ``first_touch.py``), each rank's peak
resident memory (its own process, not its data workers), and each phase's median share of the step.
The logging overhead is the timed steps' median over the untimed ones', and the timer's own cost, timed
alone, per step of five phases. Ours / open_clip_train is taken round by round, from runs minutes apart at
most, and given as the median and range over the rounds: this shared machine's speed drifts by up to 1.5x
between windows of a few minutes, which pooling all runs of a case would mix into the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

from open_clip_peer import REPO, peer_environment
from tuneclip_ds.distributed import free_port

PHASES = ["data", "forward", "loss", "backward", "step"]
CASES = ["zero0", "zero2", "osr", "open_clip_train"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="tiny-ViT")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=40, help="steps of each run (and of each OSR stage)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each stage left out of the medians")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds: each runs every case once, in an order rotated from round to round")
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all; open_clip_train "
                                         "only with --peer-site)")
    parser.add_argument("--image-size", type=int, help="the model's image size forced to this (both trainers)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: ours DeepSpeed bf16 (fp32 masters), the peer's amp_bf16")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers per rank")
    parser.add_argument("--peer-site", help="a folder with webdataset 0.2.86 and pandas: time open_clip_train too")
    parser.add_argument("--override", action="append", default=[],
                        help="a config override for our trainer's runs (repeatable), e.g. train.deepspeed_config=FILE")
    parser.add_argument("--record", help="a JSON file to write every run's steps to (per case, round and rank)")
    options = parser.parse_args(argv)
    if options.cases is None:
        options.cases = [case for case in CASES if case != "open_clip_train" or options.peer_site]
    else:
        options.cases = options.cases.split(",")
    unknown = set(options.cases) - set(CASES)
    if unknown or not options.cases:
        parser.error(f"--cases: {', '.join(sorted(unknown)) or 'none given'}; choose among {', '.join(CASES)}")
    if "open_clip_train" in options.cases and not options.peer_site:
        parser.error("--cases open_clip_train needs --peer-site (a folder with webdataset 0.2.86 and pandas)")
    if options.steps < max(3, options.warmup + 1):
        parser.error(f"--steps {options.steps}: at least 3 (the third step's time is reported) and more than "
                     f"--warmup {options.warmup}")
    return options


def case_overrides(case: str, options: argparse.Namespace, shards: str, output_dir: str) -> list[str]:
    zero = {"zero0": 0, "zero2": 2, "osr": 2}[case]
    common = [f"model.name={options.model}", f"data.train_shards={shards}", f"data.num_workers={options.workers}",
              f"train.batch_size={options.batch_size}", f"train.precision={options.precision}", "loss.name=infonce",
              f"train.steps={options.steps}", f"output_dir={output_dir}", "run_name=speed",
              "checkpoint.save_at_end=false", f"log.every={options.steps}"]
    osr = [f"osr.steps={options.steps}"] if case == "osr" else []
    image_size = [f"model.force_image_size={options.image_size}"] if options.image_size else []
    return common + osr + image_size + [f"train.zero_stage={zero}"] + options.override


def rank_main(rank: int, world_size: int, port: int, overrides: list[str], untimed_parity: int | None,
              launched: float, out: str) -> None:
    """One rank: train, recording each step's stage, step time, phase seconds and when it ended; with
    ``untimed_parity`` (0 or 1), rank 0 leaves the steps of that parity untimed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    # mp.spawn's children inherit its start method: the data workers would start as fresh interpreters
    # (~3 s before the first batch); ranks that torchrun starts have the platform's default
    multiprocessing.set_start_method(None, force=True)
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config
    from tuneclip_ds.distributed import init_distributed, shutdown
    from tuneclip_ds.timing import NoTimer

    init_distributed()
    trainer = build_run(load_config(None, overrides), rank, world_size)
    steps, train_step, timers = [], trainer.train_step, [trainer.timer, NoTimer()]

    def recorded_step():
        stage = 1 if trainer.osr.active else 2
        if untimed_parity is not None:
            trainer.timer = timers[(len(steps) + 1 + untimed_parity) % 2]
        result = train_step()
        steps.append({"stage": stage, "seconds": result.step_time, "phases": result.phase_seconds,
                      "since_launch": time.time() - launched})
        return result

    trainer.train_step = recorded_step
    trainer.run()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "peak_mib": peak_mib}))
    shutdown()


def run_case(case: str, options: argparse.Namespace, shards: str, repeat: int) -> list[dict]:
    """A fresh world trains the case; each rank's record."""
    untimed_parity = None if case == "osr" else repeat % 2
    with tempfile.TemporaryDirectory() as out:
        overrides = case_overrides(case, options, shards, out)
        mp.spawn(rank_main, args=(options.world_size, free_port(), overrides, untimed_parity, time.time(), out),
                 nprocs=options.world_size)
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(options.world_size)]


def run_peer(options: argparse.Namespace, shards: str) -> list[dict]:
    """open_clip_train trains the same steps; rank 0's steps read from its log, each rank's memory."""
    last_shard = len(list(Path(shards).glob("*.tar"))) - 1
    import torch

    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[options.precision]
    arguments = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--model", options.model,
                 "--precision", precision, *(["--force-image-size", str(options.image_size)] if options.image_size else []),
                 "--train-data", f"{shards}/train-{{000000..{last_shard:06d}}}.tar", "--dataset-type", "webdataset",
                 "--train-num-samples", str(options.batch_size * options.world_size * options.steps),
                 "--batch-size", str(options.batch_size), "--workers", str(options.workers), "--epochs", "1",
                 "--lr", "1e-3", "--warmup", "2", "--local-loss", "--gather-with-grad", "--log-every-n-steps", "1",
                 "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--name", "peer"]
    with tempfile.TemporaryDirectory() as out:  # open_clip_train logs to ./logs (torchrun takes --logs* itself)
        launched = time.time()
        ends = _line_seconds(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(options.world_size),
             str(REPO / "benchmarks" / "open_clip_peer.py"), *arguments],
            out, peer_environment(options.peer_site), "Train Epoch:", launched)
        log = Path(out, "logs", "peer", "out.log").read_text()
        peaks = [float(Path(out, f"peak_mib_rank{rank}.txt").read_text()) for rank in range(options.world_size)]
    steps = [{"stage": 2, "seconds": float(batch), "phases": {"data": float(data)}, "since_launch": end}
             for (data, batch), end in zip(PEER_STEP.findall(log), ends)]
    return [{"steps": steps, "peak_mib": peaks[0]}] + [{"steps": [], "peak_mib": peak} for peak in peaks[1:]]


def _line_seconds(command: list[str], cwd: str, env: dict, marker: str, launched: float) -> list[float]:
    """Run ``command`` to its end; the seconds from ``launched`` to each of its output lines holding ``marker``
    (its log's own timestamps count whole seconds)."""
    seconds = []
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            if marker in line:
                seconds.append(time.time() - launched)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return seconds


PEER_STEP = re.compile(r"^\S+ \| INFO \| Train Epoch: .* Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", re.M)


def steady(steps: list[dict], stage: int, warmup: int) -> list[dict]:
    return [step for step in steps if step["stage"] == stage][warmup:]


def summary(runs: list[list[dict]], options: argparse.Namespace, stage: int = 2, timed: bool | None = None) -> dict:
    """The case's numbers over its runs (rank 0's steps of ``stage``, those ``timed`` or not if given; every
    rank's memory)."""
    steps = [step for ranks in runs for step in steady(ranks[0]["steps"], stage, options.warmup)
             if timed is None or bool(step["phases"]) == timed]
    median = statistics.median(step["seconds"] for step in steps)
    shares = {phase: statistics.median(step["phases"][phase] / step["seconds"] for step in steps)
              for phase in PHASES if phase in steps[0]["phases"]}
    return {
        "median_s": median,
        "samples_per_s": options.batch_size * options.world_size / median,
        "first_step_s": statistics.median(ranks[0]["steps"][0]["since_launch"] for ranks in runs),
        "third_step_s": statistics.median(ranks[0]["steps"][2]["since_launch"] for ranks in runs),
        "peak_mib": [max(ranks[rank]["peak_mib"] for ranks in runs) for rank in range(options.world_size)],
        "shares": shares,
    }


def timer_cost_per_step(repeats: int = 20000) -> float:
    """Seconds the host-clock timer adds to a step: five phases entered and left, and their totals read."""
    from tuneclip_ds.timing import PhaseTimer

    timer = PhaseTimer()
    began = time.perf_counter()
    for _ in range(repeats):
        for phase in PHASES:
            with timer.phase(phase):
                pass
        timer.totals()
    return (time.perf_counter() - began) / repeats


def markdown(results: dict[str, dict], options: argparse.Namespace, runs: dict[str, list], timer_cost: float) -> str:
    lines = ["| case | median step (s) | samples/s | first step (s) | third step (s) | peak RSS per rank (MiB) | "
             + " | ".join(PHASES) + " |", "|---" * (6 + len(PHASES)) + "|"]
    for case, found in results.items():
        shares = [f"{100 * found['shares'][phase]:.0f}%" if phase in found["shares"] else "-" for phase in PHASES]
        rss = " / ".join(f"{mib:.0f}" for mib in found["peak_mib"])
        lines.append(f"| {case} | {found['median_s']:.3f} | {found['samples_per_s']:.0f} | "
                     f"{found['first_step_s']:.1f} | {found['third_step_s']:.1f} | {rss} | " + " | ".join(shares)
                     + " |")
    lines.append("")
    for case in ("zero0", "zero2"):
        if f"{case} timed" in results:
            ratio = results[f"{case} timed"]["median_s"] / results[f"{case} untimed"]["median_s"]
            lines.append(f"timed / untimed steps, {case}: {ratio:.4f}x")
    any_step = next(iter(results.values()))["median_s"]
    lines.append(f"the timer's own cost: {1e6 * timer_cost:.1f} us per step ({100 * timer_cost / any_step:.4f}% of "
                 f"the first case's step)")
    if "osr" in runs:
        stage1, stage2 = results["osr stage I"]["median_s"], results["osr stage II"]["median_s"]
        lines.append(f"OSR stage I / stage II step: {stage1 / stage2:.3f}x")
    if "open_clip_train" in runs:
        lines += ["", *peer_ratios(runs, options)]
    return "\n".join(lines)


def peer_ratios(runs: dict[str, list], options: argparse.Namespace) -> list[str]:
    """Ours / open_clip_train's per round (each round's runs follow one another, so a drift of the machine's speed
    between rounds cancels): step time (our untimed steps), time to the end of the first and the third step,
    rank 0's peak memory; the median and range over the rounds."""
    lines = ["| ours / open_clip_train, per round | step | first step | third step | peak RSS rank 0 |",
             "|---|---|---|---|---|"]
    for case in ("zero0", "zero2"):
        if case not in runs:
            continue
        ratios: list[list[float]] = [[], [], [], []]  # the columns' values, a round each
        for ours, peer in zip(runs[case], runs["open_clip_train"]):
            ours_one, peer_one = summary([ours], options, timed=False), summary([peer], options)
            for column, key in zip(ratios, ("median_s", "first_step_s", "third_step_s", "peak_mib")):
                mine, theirs = ours_one[key], peer_one[key]
                column.append(mine[0] / theirs[0] if key == "peak_mib" else mine / theirs)  # rank 0's memory
        lines.append(f"| {case} | " + " | ".join(
            f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})" for values in ratios)
            + " |")
    return lines


def rotated(cases: list[str], round_index: int) -> list[str]:
    """The round's order: each case leads in turn, so none always follows the same neighbour."""
    shift = round_index % len(cases)
    return cases[shift:] + cases[:shift]


def main(argv=None) -> None:
    options = parse_args(argv)
    import tuneclip_ds  # noqa: F401  (torchvision on a CPU-only torch, before open_clip)
    from tuneclip_ds.config import SyntheticConfig
    from tuneclip_ds.data.synthetic import write_synthetic_corpus

    runs: dict[str, list] = {case: [] for case in options.cases}
    with tempfile.TemporaryDirectory() as folder:
        spec = SyntheticConfig()
        write_synthetic_corpus(folder, spec.num_samples, spec.samples_per_shard, spec.image_size,
                               difficulty=spec.difficulty, seed=spec.seed, progress=False)
        for repeat in range(options.repeats):
            for case in rotated(options.cases, repeat):
                print(f"round {repeat + 1}/{options.repeats}: {case}", file=sys.stderr, flush=True)
                peer = case == "open_clip_train"
                runs[case].append(run_peer(options, folder) if peer else run_case(case, options, folder, repeat))
    if options.record:
        Path(options.record).write_text(json.dumps(runs))
    results = {f"{case} {kind}": summary(runs[case], options, timed=kind == "timed")
               for case in ("zero0", "zero2") if case in runs for kind in ("timed", "untimed")}
    if "osr" in runs:
        results["osr stage I"] = summary(runs["osr"], options, stage=1)
        results["osr stage II"] = summary(runs["osr"], options, stage=2)
    if "open_clip_train" in runs:
        results["open_clip_train"] = summary(runs["open_clip_train"], options)
    print(markdown(results, options, runs, timer_cost_per_step()))


if __name__ == "__main__":
    main()
