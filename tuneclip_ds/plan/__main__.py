"""Per-GPU memory of a training run, and whether it fits:

    python -m tuneclip_ds.plan --model ViT-bigG-14 --nodes 2 --gpus-per-node 8 --batch-size 32 --zero 3 \\
        --precision bf16 --grad-checkpointing
    python -m tuneclip_ds.plan --config configs/X.yaml [key.sub=value ...] --nodes 4 --gpus-per-node 8

With ``--config`` the experiment's model, batch, accumulation, precision, ZeRO stage, offload,
checkpointing, loss and ring topology are the defaults; flags given as well override them.

Then the loss's time per step on each topology, from the model in ``tuneclip_ds/plan/loss_time.py``,
with the link and device constants below (estimates for H100/H200 nodes until measured).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path

from tuneclip_ds.errors import command
from tuneclip_ds.plan.estimate import (DEVICES, EMA_PLACES, GIB, LOSSES, OPTIMIZERS, PRECISION_BYTES, TOPOLOGIES,
                                       Plan, Setup, ZeroSettings, make_plan)
from tuneclip_ds.plan.loss_time import (MEASURE_COMMAND, Links, LossTime, hop_ops, loss_times,
                                        nodes_where_loss_passes, towers_time)

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="take the defaults from this experiment YAML")
    parser.add_argument("overrides", nargs="*", help="with --config: overrides such as train.batch_size=64")
    parser.add_argument("--model", help="open_clip model name (or tiny-ViT)")
    parser.add_argument("--force-image-size", type=int, help="the vision tower's input size")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="per GPU and micro-step (default 32)")
    parser.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default 2)")
    parser.add_argument("--offload", action="store_true", default=None, help="optimizer states on the CPU")
    parser.add_argument("--offload-params", action="store_true", default=False,
                        help="ZeRO-3: parameters on the CPU too (with --offload)")
    parser.add_argument("--precision", choices=sorted(PRECISION_BYTES), help="default bf16")
    parser.add_argument("--grad-checkpointing", action="store_true", default=None)
    parser.add_argument("--loss", choices=LOSSES, help="default infonce")
    parser.add_argument("--tile-size", type=int, help="the ring loss's tile width (default 1024)")
    parser.add_argument("--gpu-memory", type=float, default=Setup.gpu_memory_gib, help="GiB per GPU (default 80)")
    parser.add_argument("--deepspeed-config", help="the DeepSpeed JSON whose bucket sizes and stage-3 limits count "
                        "(default: train.deepspeed_config, else ds_configs/zero<stage>[_offload].json)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="torch (AdamW, default) or deepspeed (fused Adam)")
    parser.add_argument("--device", choices=DEVICES, default=Setup.device,
                        help="where torch's AdamW runs: cuda (foreach, default) or cpu (one tensor at a time)")
    parser.add_argument("--pretrained", action="store_true", default=None,
                        help="a pretrained file is read at start-up (default: model.pretrained is set)")
    parser.add_argument("--ema", choices=EMA_PLACES, help="an EMA of the weights beside the masters (same) or in "
                        "CPU memory (cpu); default: none, or ema.device when the config sets ema.decay")
    parser.add_argument("--topology", choices=TOPOLOGIES,
                        help="the ring loss's topology (default: loss.topology, else hierarchical)")
    _add_link_arguments(parser)
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error(f"overrides {' '.join(args.overrides)} need --config")
    if not (args.model or args.config):
        parser.error("give --model or --config")
    return args


LINK_HELP = {
    "intra_node_gbs": "GB/s per direction inside a node (default NVLink 4: %(default)g)",
    "inter_node_gbs": "GB/s per GPU between nodes (default 400 Gb/s InfiniBand NDR: %(default)g)",
    "intra_node_latency_us": "microseconds per send inside a node (default %(default)g)",
    "inter_node_latency_us": "microseconds per send between nodes (default %(default)g)",
    "op_us": f"microseconds per dispatched op (default %(default)g, eager CUDA on an H200; measure: {MEASURE_COMMAND})",
    "fp32_tflops": "achieved fp32 matmul TFLOPS, the ring loss's (default %(default)g)",
    "bf16_tflops": "achieved 16-bit matmul TFLOPS, the towers' (default %(default)g)",
}


def _add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Links`` field, e.g. ``--inter-node-gbs``."""
    for item in fields(Links):
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=float, default=item.default,
                            help=LINK_HELP[item.name])


def links_from(args: argparse.Namespace) -> Links:
    return Links(**{item.name: getattr(args, item.name) for item in fields(Links)})


def resolve(args: argparse.Namespace) -> tuple[str, int | None, Setup]:
    """The model name, forced image size and setup that the flags and the experiment config give."""
    experiment = None
    if args.config:
        from tuneclip_ds.config import load_config

        experiment = load_config(args.config, args.overrides)

    def pick(flag: str, key: str, default=None):
        value = getattr(args, flag)
        if value is None and experiment is not None:
            section, name = key.split(".")
            value = getattr(getattr(experiment, section), name)
        return default if value is None else value

    zero_stage = pick("zero", "train.zero_stage", Setup.zero_stage)
    offload = pick("offload", "train.offload_optimizer", Setup.offload_optimizer)
    setup = Setup(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        batch_size=pick("batch_size", "train.batch_size", Setup.batch_size),
        grad_accum=pick("grad_accum", "train.grad_accum", Setup.grad_accum),
        zero_stage=zero_stage,
        offload_optimizer=offload,
        offload_params=args.offload_params,
        precision=pick("precision", "train.precision", Setup.precision),
        grad_checkpointing=pick("grad_checkpointing", "model.grad_checkpointing", Setup.grad_checkpointing),
        loss=pick("loss", "loss.name", Setup.loss),
        tile_size=pick("tile_size", "loss.tile_size", Setup.tile_size),
        topology=pick("topology", "loss.topology", Setup.topology),
        gpu_memory_gib=args.gpu_memory,
        optimizer=pick("optimizer", "optim.implementation", Setup.optimizer),
        device=args.device,
        pretrained=bool(pick("pretrained", "model.pretrained", Setup.pretrained)),
        ema=args.ema or _ema_place(experiment),
    )
    setup.check()  # before the JSON is looked for: a stage and offload that cannot go together have none
    setup = replace(setup, zero=_zero_settings(pick("deepspeed_config", "train.deepspeed_config"), zero_stage, offload))
    return pick("model", "model.name"), pick("force_image_size", "model.force_image_size"), setup


def _ema_place(experiment) -> str:
    """Where the experiment keeps an EMA of the weights ("none" without one)."""
    if experiment is None or experiment.ema.decay is None:
        return Setup.ema
    return experiment.ema.device


def _zero_settings(path: str | None, zero_stage: int, offload: bool) -> ZeroSettings:
    """The ZeRO settings of the DeepSpeed JSON the trainer would read."""
    from tuneclip_ds.engine import default_ds_config_path

    return ZeroSettings.from_file(Path(path) if path else default_ds_config_path(zero_stage, offload))


def format_plan(plan: Plan, links: Links) -> str:
    shape, setup = plan.shape, plan.setup
    options = [f"ZeRO-{setup.zero_stage}", setup.precision]
    options += ["optimizer offload"] * setup.offload_optimizer + ["parameter offload"] * setup.offload_params
    options += ["gradient checkpointing"] * setup.grad_checkpointing
    options += [f"EMA of the weights ({'in CPU memory' if setup.ema == 'cpu' else 'beside the masters'})"] * (
        setup.ema != "none")
    global_batch = setup.batch_size * setup.grad_accum * setup.world_size
    lines = [
        f"{shape.name}: {shape.params / 1e6:,.1f}M parameters (image {shape.image_params / 1e6:,.1f}M, "
        f"text and the rest {shape.text_params / 1e6:,.1f}M; largest layer {shape.largest_layer / 1e6:,.1f}M)",
        f"{setup.nodes} node(s) x {setup.gpus_per_node} GPU(s) = {setup.world_size} ranks, {', '.join(options)}; "
        f"batch {setup.batch_size} per GPU x {setup.grad_accum} accumulation = global {global_batch:,}; "
        f"loss {setup.loss}, tile {setup.tile_size}",
        "",
        f"{'per GPU':<50}{'GiB':>9}",
    ]
    lines += [f"  {row:<48}{value / GIB:>9.3f}" for row, value in plan.rows()]
    lines += ["", f"CPU per node for the model states (DeepSpeed's estimate): {plan.cpu_per_node / GIB:,.1f} GiB, "
              f"and while the model is built {plan.startup_cpu_per_node / GIB:,.1f} GiB more"]
    if plan.ema_cpu_per_node:
        lines += [f"CPU per node for the EMA of the weights: {plan.ema_cpu_per_node / GIB:,.1f} GiB"]
    lines += [_traffic_line(plan), "", _verdict(plan), "", *_loss_time_lines(plan, links)]
    return "\n".join(lines)


def _traffic_line(plan: Plan) -> str:
    parts = ", ".join(f"{part} {value / MIB:,.2f}" for part, value in plan.traffic.items())
    micro_step = sum(plan.traffic.values())
    return (f"ring loss traffic per rank: {micro_step / MIB:,.2f} MiB sent per micro-step ({parts}), "
            f"{micro_step * plan.setup.grad_accum / MIB:,.2f} MiB per optimizer step")


def _verdict(plan: Plan) -> str:
    available = plan.setup.gpu_memory_gib
    used = plan.total / GIB
    if plan.fits:
        return (f"verdict: FITS in {available:g} GiB per GPU ({used:.1f} GiB estimated, {available - used:.1f} GiB "
                "left for the CUDA context, NCCL and fragmentation)")
    return (f"verdict: DOES NOT FIT in {available:g} GiB per GPU ({used:.1f} GiB estimated, "
            f"{used - available:.1f} GiB over)")


def _loss_time_lines(plan: Plan, links: Links) -> list[str]:
    """The loss-time model's inputs, its time per topology and a verdict."""
    setup, embed_dim = plan.setup, plan.shape.embed_dim
    ops = hop_ops(setup.loss, setup.precision)
    times = loss_times(embed_dim, setup, links)
    lines = [
        f"loss time per micro-step (a model, tuneclip_ds/plan/loss_time.py): {setup.world_size} ranks = {setup.nodes} "
        f"node(s) x {setup.gpus_per_node} ranks per node, batch {setup.batch_size} per rank, features {embed_dim}, "
        f"{setup.loss}: {ops.forward} + {ops.backward} ops per visited block (forward + backward), {ops.matmuls} "
        f"matmuls of {setup.batch_size} x {setup.batch_size} x {embed_dim}",
        f"  constants: intra-node {links.intra_node_gbs:g} GB/s, {links.intra_node_latency_us:g} us; inter-node "
        f"{links.inter_node_gbs:g} GB/s, {links.inter_node_latency_us:g} us; {links.op_us:g} us per op; "
        f"{links.fp32_tflops:g} TFLOPS fp32, {links.bf16_tflops:g} TFLOPS 16-bit",
        f"  (estimates for H100/H200 nodes until measured on yours: --op-us with {MEASURE_COMMAND}, "
        "the links with nccl-tests' sendrecv_perf inside and between nodes)",
        f"  {'topology':<16}{'hops':>8}{'ms':>11}{'latency':>10}{'launches':>10}{'bandwidth':>11}{'matmuls':>10}",
    ]
    lines += [_loss_time_row(name, time) for name, time in times.items()]
    global_batch = setup.world_size * setup.batch_size
    lines += [f"  (hops: per pass, over the slowest link; all-gather: one {global_batch:,} x {global_batch:,} "
              f"similarity matrix is {4 * global_batch**2 / GIB:,.1f} GiB in fp32)"]
    return lines + ["", _loss_verdict(plan, links, times[setup.topology])]


def _loss_time_row(name: str, time: LossTime) -> str:
    return (f"  {name:<16}{time.hops:>8,}{1e3 * time.total:>11,.2f}{1e3 * time.latency:>10,.2f}"
            f"{1e3 * time.launch:>10,.2f}{1e3 * time.transfer:>11,.2f}{1e3 * time.matmul:>10,.2f}")


def _loss_verdict(plan: Plan, links: Links, time: LossTime) -> str:
    """Which topology the run uses, its loss time, and from how many nodes the loss outlasts the towers."""
    setup = plan.setup
    towers = towers_time(plan.shape, setup, links)
    nodes = nodes_where_loss_passes(plan.shape, setup, links, setup.topology)
    head = (f"loss verdict: {_ring_used(setup)} (loss.topology {setup.topology}) takes {1e3 * time.total:,.1f} ms "
            f"per micro-step, {100 * time.overhead / time.total:.0f} % of it latency and launches")
    if nodes is None:
        return f"{head}; it stays under the towers' time at any size"
    tense = "already outlasts" if nodes <= setup.nodes else "will outlast"
    return (f"{head}; it {tense} the towers' ~{1e3 * towers:,.1f} ms (estimate) from {nodes:,} node(s) "
            f"({nodes * setup.gpus_per_node:,} ranks): there it stops scaling (its time grows with the ranks, the "
            "towers' does not)")


def _ring_used(setup: Setup) -> str:
    if setup.topology == "ring":
        return "the flat ring"
    if setup.nodes == 1 or setup.gpus_per_node == 1:
        return "the flat ring (hierarchical falls back to it here)"
    return "the hierarchical ring"


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # open_clip warns that the meta model has no weights
    name, force_image_size, setup = resolve(args)
    from tuneclip_ds.plan.shape import model_shape

    print(format_plan(make_plan(model_shape(name, force_image_size), setup), links_from(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
