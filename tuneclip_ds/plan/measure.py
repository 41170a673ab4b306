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
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.plan.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-ViT")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--grad-checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
