"""Measured activation peak of an open_clip model on the CPU, against the planner's estimate.

    python -m tuneclip_ds.plan.measure --model tiny-ViT --batch-size 256 --precision fp32 bf16 \\
        --grad-checkpointing off on

Each setting builds the model, gives every parameter a zero gradient (so that gradients, which the
planner counts as model states, exist before the measurement), takes one small warm-up step
(lazily allocated kernel state), then measures one forward and backward of the batch with a loss
that keeps nothing of its own. The measure is the peak growth of the resident set size over the
step: writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` to the current
RSS, so ``VmHWM`` after the step minus ``VmRSS`` before it is what the step added at its peak. The
process runs with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``; the command
restarts itself with it), so every tensor of 64 KiB or more is mapped when allocated and unmapped
when freed: the RSS follows the tensors alive, and memory freed earlier cannot be reused unseen.
One torch thread: per-thread kernel buffers stay out of the figure. Linux only.

The ring loss's ops per hop and time per op, for the planner's loss-time model (``loss_time.py``):

    python -m tuneclip_ds.plan.measure --ring-ops [--loss infonce ...] [--device cuda]

runs the loss (8 samples of width 16 per rank, one tile per block) on 2 and then 3 ranks (gloo on
the CPU, NCCL on 3 GPUs), counts with the torch profiler the ops dispatched at the top level in
forward and in backward (``losses.profile.dispatched_ops``: by the loss's thread or autograd's), and times a step (the median: in the
thread's CPU time on the CPU, wall time on GPUs). The third rank adds one hop: the differences are
the ops per hop and the time per hop. The time per op comes from one process without a ring: the
loss on 128 samples in one tile per direction and then in tiles of 16, the same flops in many more
ops (on one GPU, this alone: the ring on GPUs needs 3). What a hop costs beyond its ops is its send
and receive (``--*-latency-us`` on GPUs).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

from tuneclip_ds.plan.estimate import LOSSES

MMAP_THRESHOLD = str(64 * 1024)


class RssPeak:
    """Peak growth of this process's resident set size since ``start`` (Linux)."""

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets the high-water mark VmHWM to the current RSS
        self.before = _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        return _proc_status_bytes("VmHWM") - self.before


class AllocatorPeak:
    """Peak growth of the bytes torch allocates on the CPU during a call, from the profiler's
    allocation events (exact, whatever glibc does with the memory)."""

    def measure(self, call) -> int:
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            call()
        # one event per allocation (bytes > 0) and per release (bytes < 0), from every thread
        events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda event: event.start_ns())
        return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{key} not in /proc/self/status: measuring the RSS needs Linux")


def measure_step_peak(name: str, batch_size: int, precision: str, checkpointing: bool) -> int:
    """Bytes one forward and backward of ``batch_size`` random samples adds at its peak (see the
    module's docstring); meaningful only with ``MALLOC_MMAP_THRESHOLD_`` set at process start."""
    import open_clip
    import torch

    import tuneclip_ds.models  # noqa: F401  (registers the tiny configs)

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = open_clip.create_model(name).to(dtype).train()
    model.set_grad_checkpointing(checkpointing)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    _step(model, *_inputs(model, 2, dtype))  # warm-up
    images, tokens = _inputs(model, batch_size, dtype)
    gc.collect()
    peak = RssPeak()
    peak.start()
    _step(model, images, tokens)
    return peak.peak()


def _inputs(model, batch_size: int, dtype):
    import torch

    images = torch.randn(batch_size, 3, *model.visual.image_size, dtype=dtype)
    return images, torch.randint(0, model.vocab_size, (batch_size, model.context_length))


def _step(model, images, tokens) -> None:
    image, text = model.encode_image(images), model.encode_text(tokens)
    (image * text).sum().backward()


RING_BATCH, RING_DIM, RING_TILE = 8, 16, 64  # one tile per block and direction
SPLIT_BATCH, SPLIT_TILE = 128, 16  # one process: one tile per direction, then 64


def ring_op_counts(rank: int, world_size: int, group, loss_name: str, repeats: int = 0) -> dict:
    """On each rank of an initialised process group (``group``; None: the world): the ops of one forward and
    backward of the flat ring loss (``forward``, ``backward``; see ``losses.profile.dispatched_ops``) and, over
    ``repeats`` more steps, the median ``seconds`` of a step."""
    import torch

    device = torch.device("cuda", rank) if torch.distributed.get_backend(group) == "nccl" else torch.device("cpu")
    return _count_and_time(loss_name, RING_TILE, _inputs_of_rank(rank, RING_BATCH, device), repeats, group)


def seconds_per_op(loss_name: str, device: str, repeats: int) -> float:
    """The time of one dispatched op in one process, no ring: the loss on ``SPLIT_BATCH`` samples in one
    tile per direction, then in tiles of ``SPLIT_TILE``: the same flops in many more ops."""
    inputs = _inputs_of_rank(0, SPLIT_BATCH, _device(device))
    one, split = (_count_and_time(loss_name, tile, inputs, repeats) for tile in (SPLIT_BATCH, SPLIT_TILE))
    ops = split["forward"] + split["backward"] - one["forward"] - one["backward"]
    return (split["seconds"] - one["seconds"]) / ops


def _device(name: str):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def _inputs_of_rank(rank: int, batch_size: int, device) -> tuple:
    """Normalised image and text features, sample ids, logit scale and bias of one rank."""
    import torch

    generator = torch.Generator().manual_seed(rank)
    image, text = (torch.nn.functional.normalize(torch.randn(batch_size, RING_DIM, generator=generator), dim=-1)
                   .to(device).requires_grad_() for _ in range(2))
    ids = torch.arange(rank * batch_size, (rank + 1) * batch_size, device=device)
    return image, text, torch.tensor([10.0], device=device), torch.tensor([-10.0], device=device), ids


def _count_and_time(loss_name: str, tile_size: int, inputs: tuple, repeats: int, group=None) -> dict:
    """The ops of one step of the loss dispatched in ``forward`` and ``backward``, and the median ``seconds``
    of ``repeats`` more (None for none)."""
    import torch

    from tuneclip_ds.losses import build_loss
    from tuneclip_ds.losses.profile import dispatched_ops

    loss = build_loss(loss_name, tile_size=tile_size, group=group, topology="ring")
    image, text, scale, bias, ids = inputs

    def step():
        with torch.profiler.record_function("forward"):
            value = loss(image, text, scale, bias, sample_ids=ids)
        with torch.profiler.record_function("backward"):
            value.backward()

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    forward, backward = (dispatched_ops(profile.events(), phase) for phase in ("forward", "backward"))
    return {"forward": len(forward), "backward": len(backward),
            "seconds": _median_seconds(step, image.device, repeats) if repeats else None}


def _median_seconds(step, device, repeats: int) -> float:
    """The median step: on the CPU in the calling thread's CPU time (ranks that share cores do not count
    each other's turns, nor gloo's threads), on GPUs in wall time."""
    import torch
    import torch.distributed as dist

    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    seconds = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(clock() - start)
    return statistics.median(seconds)


def measure_ring_ops(loss_name: str, device: str, repeats: int, ring: bool = True) -> dict:
    """Microseconds per op and, with ``ring``, ops per hop (forward, backward), milliseconds per
    step on 2 and 3 ranks and per hop, and what a hop costs beyond its ops (see the module's docstring)."""
    per_op = seconds_per_op(loss_name, device, repeats)
    result = {"loss": loss_name, "device": device, "us_per_op": 1e6 * per_op}
    if not ring:
        return result
    from tuneclip_ds.distributed import spawn_ranks

    backend = "nccl" if device == "cuda" else "gloo"
    on_ranks = {world_size: spawn_ranks(world_size, ring_op_counts, loss_name, repeats, backend=backend)[0]
                for world_size in (2, 3)}
    per_hop = {key: on_ranks[3][key] - on_ranks[2][key] for key in ("forward", "backward", "seconds")}
    hop_ops = per_hop["forward"] + per_hop["backward"]
    return result | {"ops_per_hop": [per_hop["forward"], per_hop["backward"]],
                     "ms_per_step": {world_size: 1e3 * counts["seconds"] for world_size, counts in on_ranks.items()},
                     "ms_per_hop": 1e3 * per_hop["seconds"],
                     "us_per_hop_beyond_ops": 1e6 * (per_hop["seconds"] - hop_ops * per_op)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.plan.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-ViT")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--grad-checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--ring-ops", action="store_true", help="the ring loss's ops per hop and time per op")
    parser.add_argument("--loss", nargs="+", choices=LOSSES, default=["infonce"], help="with --ring-ops")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="with --ring-ops: the ring on GPUs needs 3 (with fewer, the time per op only)")
    parser.add_argument("--repeats", type=int, default=200, help="with --ring-ops: timed steps per world size")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.ring_ops:
        return _print_ring_ops(parser, args)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # glibc reads it at start only
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1")
        os.execve(sys.executable, [sys.executable, "-m", "tuneclip_ds.plan.measure", *argv], env)
    import torch

    from tuneclip_ds.plan.estimate import activation_bytes
    from tuneclip_ds.plan.shape import model_shape

    torch.set_num_threads(1)
    shape = model_shape(args.model)
    for precision in args.precision:
        for checkpointing in (mode == "on" for mode in args.grad_checkpointing):
            measured = measure_step_peak(args.model, args.batch_size, precision, checkpointing)
            estimated = activation_bytes(shape, args.batch_size, precision, checkpointing)
            print(json.dumps({"model": args.model, "batch_size": args.batch_size, "precision": precision,
                              "grad_checkpointing": checkpointing, "measured": measured, "estimated": estimated,
                              "ratio": estimated / measured}), flush=True)
    return 0


def _print_ring_ops(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    ring = args.device == "cpu" or torch.cuda.device_count() >= 3
    if not ring:
        print(f"{torch.cuda.device_count()} GPU(s): the time per op only (the ring on GPUs needs 3, NCCL takes "
              "one per rank)", file=sys.stderr)
    torch.set_num_threads(1)  # as in each rank
    for loss_name in args.loss:
        print(json.dumps(measure_ring_ops(loss_name, args.device, args.repeats, ring)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
