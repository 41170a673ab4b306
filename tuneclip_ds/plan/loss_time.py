"""The loss's time per step: a model of where the ring loss stops scaling, per topology.

Per micro-step (forward and backward), for ``W`` ranks on ``N`` nodes of ``L`` ranks, ``b`` samples
per rank, blocks of ``B_f`` bytes in forward and ``B_b`` in backward (``estimate.block_bytes``):

* flat ring (``loss.topology: ring``): ``W-1`` hops in each pass, every hop over the slowest link
  (inter-node when ``N > 1``: a ring step waits for the one that crosses nodes)::

      2 (W-1) latency + W (ops_f + ops_b) op + (W-1) (B_f + B_b) / bandwidth + W matmuls 2 b^2 d / flops

* hierarchical ring (``loss.topology: hierarchical``, ``N > 1`` and ``L > 1``; else the flat ring):
  each pass gathers the blocks inside the node (a ring all-gather: ``L-1`` steps over the local
  fabric), then ``N-1`` hops across nodes with node-sized blocks (``L`` blocks). The blocks are
  still worked on one by one (``ring._hierarchical_blocks``), so the launches and flops are the
  flat ring's::

      2 ((L-1) latency_intra + (N-1) latency_inter) + W (ops_f + ops_b) op
      + (L-1) (B_f + B_b) / bandwidth_intra + (N-1) L (B_f + B_b) / bandwidth_inter + flops as above

* all-gather loss (open_clip's ``ClipLoss`` with gathered features, no ``local_loss``): one ring
  all-gather of both features in forward (``W-1`` steps over the slowest link; the gather carries
  no gradient, so backward sends nothing) and the full ``Wb x Wb`` similarity matrix: one matmul in
  forward and two in backward, in the training precision (under autocast)::

      (W-1) latency + (W-1) 2 b d w / bandwidth + 3 x 2 (Wb)^2 d / flops

``ops_f``, ``ops_b`` and ``matmuls`` are the ops (and products of ``b x b x d``) the loss dispatches
per visited block, from ``hop_ops``; each rank visits ``W`` blocks, its own included. The ring losses'
products run in the training precision (``pairs.LossInputs``; fp32 without TF32), the rest in fp32.

Left out: the transfer overlapping the work on the previous block (so the ring's time lies between
the largest of its parts and their sum, which is given); the per-step ops outside the ring (a few
dozen) and the scalar all-reduces; GCL/HGCL's estimator all-gather and all-reduce (16 + 16 bytes per
sample); the all-gather loss's element-wise passes over its matrix and its memory ((Wb)^2 x 4 bytes
per matrix); the kernels' own time beyond the matmuls.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from tuneclip_ds.errors import InputError
from tuneclip_ds.plan.estimate import Setup, block_bytes
from tuneclip_ds.plan.shape import ModelShape, Tower


class HopOps(NamedTuple):
    forward: int  # ops dispatched per visited block in forward
    backward: int  # ... in backward
    matmuls: int  # b x b x d products per visited block, forward and backward (a batched product counts each)


# The one place to update when the losses change: ops per hop from ``losses.profile.ops_per_hop`` (gloo,
# ranks 3 minus ranks 2, local batch <= tile size: one tile per block and direction; fp32, no labels), which
# tests/test_ring_ops.py measures again. Products: forward one per direction; backward, per modality, one
# similarity tile and one product turning its gradient into the features' (SigLIP: the image anchors'
# gradient comes from forward's tiles, at one more product there, and backward has the text side only).
OPS_PER_HOP = {
    "infonce": HopOps(7, 16, 6),
    "siglip": HopOps(10, 8, 4),
    "gcl": HopOps(11, 20, 6),
    "hgcl": HopOps(13, 28, 6),
}
# What 16-bit features add to a hop, their products being 16-bit: the similarities' cast to fp32, each way; in
# backward the pair gradients' cast to 16 bits and their product added apart (``baddbmm_`` takes one dtype), and so
# in SigLIP's forward, which takes its image anchors' gradient there.
OPS_16BIT_EXTRA = {"infonce": (1, 3), "siglip": (3, 3), "gcl": (1, 3), "hgcl": (1, 3)}
MEASURE_COMMAND = "python -m tuneclip_ds.plan.measure --ring-ops [--device cuda]"


@dataclass(frozen=True)
class Links:
    """The machine's constants; the defaults are estimates for H100/H200 nodes from their specifications, but
    ``op_us``, measured on one H200."""

    intra_node_gbs: float = 450.0  # GB/s per direction: NVLink 4
    inter_node_gbs: float = 50.0  # GB/s per GPU: one 400 Gb/s InfiniBand NDR NIC each
    intra_node_latency_us: float = 3.0  # one NCCL send/receive over NVLink
    inter_node_latency_us: float = 8.0  # ... over InfiniBand
    # one eager op, dispatch to launch and run: 12-19 us measured on one H200 (infonce 18.0, siglip 12.2, gcl 15.9,
    # hgcl 18.9; the loss in tiles as in ``measure.seconds_per_op``; no host sync inside a call)
    op_us: float = 16.0
    fp32_tflops: float = 50.0  # achieved fp32 matmul rate (fp32 training)
    bf16_tflops: float = 400.0  # achieved 16-bit matmul rate (the towers and the losses in 16-bit training)

    def check(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0:  # NaN too
                raise InputError(f"--{item.name.replace('_', '-')} must be positive, got {value:g}")

    def matmul_flops(self, precision: str) -> float:
        return 1e12 * (self.fp32_tflops if precision == "fp32" else self.bf16_tflops)


@dataclass(frozen=True)
class LossTime:
    """Seconds per micro-step, by part."""

    hops: int  # hops per pass over the slowest link
    latency: float
    launch: float
    transfer: float
    matmul: float

    @property
    def overhead(self) -> float:
        """What each hop costs whatever the batch: latency and launches."""
        return self.latency + self.launch

    @property
    def total(self) -> float:
        return self.overhead + self.transfer + self.matmul


def loss_times(embed_dim: int, setup: Setup, links: Links) -> dict[str, LossTime]:
    """The loss's time per micro-step on the flat ring, the hierarchical ring and with an all-gather."""
    links.check()
    return {"ring": flat_ring_time(embed_dim, setup, links),
            "hierarchical": hierarchical_ring_time(embed_dim, setup, links),
            "all-gather": all_gather_time(embed_dim, setup, links)}


def flat_ring_time(embed_dim: int, setup: Setup, links: Links) -> LossTime:
    hops = setup.world_size - 1
    latency, bandwidth = _slowest_link(setup, links)
    return LossTime(hops, 2 * hops * latency, _launch(setup, links),
                    hops * _pass_bytes(embed_dim, setup) / bandwidth, _ring_matmul(embed_dim, setup, links))


def hierarchical_ring_time(embed_dim: int, setup: Setup, links: Links) -> LossTime:
    """The flat ring's time where the loss falls back to it: one node, or one rank per node."""
    nodes, size = setup.nodes, setup.gpus_per_node
    if nodes == 1 or size == 1:
        return flat_ring_time(embed_dim, setup, links)
    latency = 2 * ((size - 1) * links.intra_node_latency_us + (nodes - 1) * links.inter_node_latency_us) / 1e6
    block = _pass_bytes(embed_dim, setup)
    transfer = (size - 1) * block / (1e9 * links.intra_node_gbs) + (nodes - 1) * size * block / (
        1e9 * links.inter_node_gbs)
    return LossTime(nodes - 1, latency, _launch(setup, links), transfer, _ring_matmul(embed_dim, setup, links))


def all_gather_time(embed_dim: int, setup: Setup, links: Links) -> LossTime:
    steps = setup.world_size - 1
    latency, bandwidth = _slowest_link(setup, links)
    features = 2 * setup.batch_size * embed_dim * setup.width
    global_batch = setup.world_size * setup.batch_size
    matmul = 3 * 2 * global_batch**2 * embed_dim / links.matmul_flops(setup.precision)
    return LossTime(steps, steps * latency, 0.0, steps * features / bandwidth, matmul)


def _slowest_link(setup: Setup, links: Links) -> tuple[float, float]:
    """(latency in s, bandwidth in bytes/s) of the link a flat ring step waits for."""
    if setup.nodes > 1:
        return links.inter_node_latency_us / 1e6, 1e9 * links.inter_node_gbs
    return links.intra_node_latency_us / 1e6, 1e9 * links.intra_node_gbs


def _pass_bytes(embed_dim: int, setup: Setup) -> int:
    """A rank's block in forward and in backward, together."""
    return sum(block_bytes(embed_dim, setup).values())


def hop_ops(loss: str, precision: str) -> HopOps:
    """The ops per visited block of ``loss`` with features in ``precision``: ``OPS_PER_HOP``'s, and for 16-bit
    features ``OPS_16BIT_EXTRA``."""
    ops = OPS_PER_HOP[loss]
    if precision == "fp32":
        return ops
    forward, backward = OPS_16BIT_EXTRA[loss]
    return ops._replace(forward=ops.forward + forward, backward=ops.backward + backward)


def _launch(setup: Setup, links: Links) -> float:
    ops = hop_ops(setup.loss, setup.precision)
    return setup.world_size * (ops.forward + ops.backward) * links.op_us / 1e6


def _ring_matmul(embed_dim: int, setup: Setup, links: Links) -> float:
    flops = OPS_PER_HOP[setup.loss].matmuls * 2 * setup.batch_size**2 * embed_dim
    return setup.world_size * flops / links.matmul_flops(setup.precision)


def towers_time(shape: ModelShape, setup: Setup, links: Links) -> float:
    """Seconds of the towers' transformer blocks, forward and backward, per micro-step: 2 flops per
    weight and token and 4 t^2 d for attention in forward, twice that in backward (and a second
    forward with gradient checkpointing), at the training precision's matmul rate."""
    passes = 4 if setup.grad_checkpointing else 3
    forward = sum(_block_forward_flops(tower) for tower in shape.towers)
    return passes * forward * setup.batch_size / links.matmul_flops(setup.precision)


def _block_forward_flops(tower: Tower) -> float:
    """One sample's forward through the tower's blocks: qkv and output projections, the MLP, attention."""
    d, t = tower.width, tower.tokens
    weights = 4 * d * d + 2 * d * tower.mlp_width
    return tower.layers * (2 * t * weights + 4 * t * t * d)


MAX_NODES = 2**20


def nodes_where_loss_passes(shape: ModelShape, setup: Setup, links: Links, topology: str) -> int | None:
    """The fewest nodes (of ``setup.gpus_per_node`` ranks) at which the loss on ``topology`` takes longer
    than the towers (None: not up to ``MAX_NODES``). The loss grows with the ranks, the towers do not."""
    towers = towers_time(shape, setup, links)

    def loss_is_longer(nodes: int) -> bool:
        return loss_times(shape.embed_dim, replace(setup, nodes=nodes), links)[topology].total > towers

    nodes = bisect.bisect_left(range(1, MAX_NODES + 1), True, key=loss_is_longer) + 1
    return nodes if nodes <= MAX_NODES else None
