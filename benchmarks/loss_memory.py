"""Peak memory and time of one loss forward+backward per rank: our gather-free losses against
open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` and ``SigLipLoss``.

    python benchmarks/loss_memory.py                      # the full run: 4 CPU ranks (gloo)
    python benchmarks/loss_memory.py --batch-sizes 1024 --dims 512 --losses infonce
    python benchmarks/loss_memory.py --device cuda --world-size 8   # one GPU per rank (nccl)

All candidates run in one process group, one configuration (local batch ``b``, feature dimension
``d``) after another. A candidate's inputs are this rank's L2-normalised image and text features
``[b, d]`` and the logit scale (and bias for the sigmoid losses), all requiring grad. A call is
the loss forward plus ``torch.autograd.grad`` of the loss with respect to all inputs, so both
sides allocate and free the feature gradients within the call. Each candidate makes a warm-up
call (lazy initialisation of buffers and communication: the first call of open_clip's ClipLoss
allocates more than the later ones) and a call measured for memory; then ``--repeats`` rounds of
one timed call of each candidate follow, ours and open_clip's back to back, so that a change in
the load of a shared machine hits both alike.

* Peak memory: the most the call allocates at once on top of what was allocated before it (the
  inputs; the model of a real run), the largest over ranks.

  - CPU: torch's CPU allocations are invisible to ``tracemalloc``, and the resident set size
    depends on how glibc reuses freed blocks. ``torch.profiler`` with ``profile_memory`` records
    every allocation and release of torch's CPU allocator, with its size and time; their running
    sum in time order is the bytes alive, and its maximum the peak. (Cross-check, 4 ranks, b=1024,
    d=512: the growth of peak RSS of processes whose glibc maps every block of 64 KiB or more
    afresh, ``MALLOC_MMAP_THRESHOLD_=65536``, agreed with it within 0.1 MiB for all five losses;
    open_clip's ClipLoss peaked at 84 MiB there and peaks at 92 MiB in this script's order of calls.)
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call (nccl's own buffers are not counted).

* Time: wall clock from a barrier to the end of the call (after a device synchronisation on
  GPU), of the slowest rank; and processor time of the busiest rank's process (all its threads,
  gloo's included; on GPU only the host's share). The table gives medians over repetitions, and
  for the ratios the median of the ratios of back-to-back calls. On a shared machine the
  processor time is the steadier measure; the wall clock also shows waiting in the ring.

Ratios: open_clip / ours for memory, ours / open_clip for time. ``hgcl`` has no open_clip
counterpart; it is compared with ``ClipLoss``, the softmax loss it would replace. Our tile width
defaults to ``loss.tile_size`` of the experiment config.
"""

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import tuneclip_ds  # noqa: F401  (before open_clip: lets torchvision import on a CPU-only torch)
from tuneclip_ds.config import LossConfig
from tuneclip_ds.distributed import free_port
from tuneclip_ds.losses import build_loss
from tuneclip_ds.plan.measure import AllocatorPeak

CLIP_LOSS = "open_clip ClipLoss"
SIGLIP_LOSS = "open_clip SigLipLoss"
BASELINES = {"infonce": CLIP_LOSS, "siglip": SIGLIP_LOSS, "hgcl": CLIP_LOSS, "gcl": CLIP_LOSS}
SIGMOID_LOSSES = {"siglip", SIGLIP_LOSS}
MIB = 2**20


@dataclass(frozen=True)
class Measurement:
    peak_bytes: float  # of the memory call, largest over ranks
    seconds: list[float]  # wall clock per repetition, of the slowest rank
    cpu_seconds: list[float]  # processor time per repetition, of the busiest rank


def main(argv=None) -> None:
    options = parse_args(argv)
    if options.device == "cuda" and options.world_size > torch.cuda.device_count():
        sys.exit(f"--world-size {options.world_size} needs as many GPUs (nccl: one per rank); "
                 f"{torch.cuda.device_count()} visible")
    mp.spawn(_rank_main, args=(options, free_port()), nprocs=options.world_size)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-size", type=int, default=4, help="ranks (processes)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="local batch b")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768], help="feature dimension d")
    parser.add_argument("--losses", nargs="+", choices=sorted(BASELINES), default=["infonce", "siglip", "hgcl"],
                        help="our losses; each brings its open_clip counterpart")
    parser.add_argument("--tile-size", type=int, default=LossConfig().tile_size)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each loss, after a warm-up "
                        "and a memory call")
    parser.add_argument("--threads", type=int, help="torch threads per rank on CPU (default: cores / ranks)")
    options = parser.parse_args(argv)
    if options.threads is None:
        options.threads = max(1, (os.cpu_count() or 1) // options.world_size)
    return options


def _rank_main(rank: int, options: argparse.Namespace, port: int) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module="open_clip")  # its all_gather
    device = _init_process_group(rank, options, port)
    names = list(dict.fromkeys(name for loss in options.losses for name in (loss, BASELINES[loss])))
    results = {}
    for batch in options.batch_sizes:
        for dim in options.dims:
            for name, found in measure(names, batch, dim, device, options).items():
                results[batch, dim, name] = found
                if rank == 0:
                    print(f"b={batch} d={dim} {name}: {found.peak_bytes / MIB:.1f} MiB, wall s {found.seconds}, "
                          f"CPU s {found.cpu_seconds}", file=sys.stderr, flush=True)
    if rank == 0:
        print(markdown_table(results, options))
    dist.destroy_process_group()


def _init_process_group(rank: int, options: argparse.Namespace, port: int) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if options.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(options.threads)
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=options.world_size,
                            timeout=datetime.timedelta(minutes=30))
    return device


def measure(names: list[str], batch: int, dim: int, device: torch.device, options) -> dict[str, Measurement]:
    """For each loss in ``names`` a warm-up call and a call measured for memory, then
    ``options.repeats`` rounds of one timed call of each, the losses alternating so that a change
    in the machine's load hits all alike."""
    calls = {name: loss_call(name, batch, dim, device, options.tile_size) for name in names}
    for call in calls.values():
        call()
    meter = CudaPeak(device) if device.type == "cuda" else AllocatorPeak()
    peaks = torch.tensor([meter.measure(call) for call in calls.values()], dtype=torch.float64)
    # [repetition, loss, (wall, CPU)]
    times = torch.tensor([[timed(call, device) for call in calls.values()] for _ in range(options.repeats)],
                         dtype=torch.float64)
    # the largest peak; per repetition the slowest and the busiest rank
    peaks, times = _max_over_ranks(peaks, device), _max_over_ranks(times, device)
    return {name: Measurement(peaks[i].item(), times[:, i, 0].tolist(), times[:, i, 1].tolist())
            for i, name in enumerate(names)}


def timed(call, device: torch.device) -> tuple[float, float]:
    """Wall clock and processor seconds of ``call``, started together on all ranks."""
    gc.collect()
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    _synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _max_over_ranks(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu()


def loss_call(name: str, batch: int, dim: int, device: torch.device, tile_size: int):
    """A call of loss ``name``'s forward and backward on this rank's inputs of ``batch`` x ``dim``."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    loss_fn = make_loss(name, rank, world_size, tile_size)
    leaves, sample_ids = make_inputs(batch, dim, rank, device, sigmoid=name in SIGMOID_LOSSES)

    def call():
        loss = loss_fn(*leaves, sample_ids)
        torch.autograd.grad(loss, [x for x in leaves if x is not None])

    return call


def make_loss(name: str, rank: int, world_size: int, tile_size: int):
    """``fn(image, text, scale, bias, sample_ids) -> loss`` for our loss or open_clip's ``name``."""
    if name == CLIP_LOSS:
        from open_clip.loss import ClipLoss

        clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        return lambda image, text, scale, bias, ids: clip(image, text, scale)
    if name == SIGLIP_LOSS:
        from open_clip.loss import SigLipLoss

        siglip = SigLipLoss(rank=rank, world_size=world_size)
        return lambda image, text, scale, bias, ids: siglip(image, text, scale, bias)
    ours = build_loss(name, tile_size=tile_size)
    return lambda image, text, scale, bias, ids: ours(image, text, scale, bias, sample_ids=ids)


def make_inputs(batch: int, dim: int, rank: int, device: torch.device, sigmoid: bool):
    """``[image, text, scale, bias]`` (bias None unless ``sigmoid``), all requiring grad, and the
    sample ids of this rank's rows."""
    generator = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(image + torch.randn(batch, dim, generator=generator), dim=-1)
    # open_clip's initial values: exp(logit_scale) = 1/0.07 for CLIP, 10 with bias -10 for SigLIP
    scale = torch.tensor(10.0 if sigmoid else 1 / 0.07)
    bias = torch.tensor(-10.0) if sigmoid else None
    leaves = [None if x is None else x.to(device).requires_grad_() for x in (image, text, scale, bias)]
    sample_ids = torch.arange(rank * batch, (rank + 1) * batch, device=device)
    return leaves, sample_ids


class CudaPeak:
    """Peak growth of the memory torch allocated on ``device`` during a call."""

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, call) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        call()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown_table(results: dict, options: argparse.Namespace) -> str:
    """One row per configuration and loss of ours: ours / open_clip's counterpart, and the ratio."""
    columns = ["local b", "global B", "d", "ours vs open_clip", "peak MiB", "memory open_clip/ours",
               "wall s", "wall ours/open_clip", "CPU s", "CPU ours/open_clip"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for batch in options.batch_sizes:
        for dim in options.dims:
            for loss in options.losses:
                ours, theirs = results[batch, dim, loss], results[batch, dim, BASELINES[loss]]
                row = [batch, batch * options.world_size, dim, f"{loss} vs {BASELINES[loss].split()[1]}",
                       f"{ours.peak_bytes / MIB:.0f} / {theirs.peak_bytes / MIB:.0f}",
                       f"{theirs.peak_bytes / ours.peak_bytes:.1f}x",
                       f"{statistics.median(ours.seconds):.2f} / {statistics.median(theirs.seconds):.2f}",
                       f"{_paired_ratio(ours.seconds, theirs.seconds):.2f}x",
                       f"{statistics.median(ours.cpu_seconds):.2f} / {statistics.median(theirs.cpu_seconds):.2f}",
                       f"{_paired_ratio(ours.cpu_seconds, theirs.cpu_seconds):.2f}x"]
                lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def _paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over repetitions of the ratio of two calls made one right after the other."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


if __name__ == "__main__":
    main()
