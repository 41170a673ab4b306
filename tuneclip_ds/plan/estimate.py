"""Per-GPU memory of a training run and the ring loss's traffic, from a ``ModelShape`` and a ``Setup``.

Model states (bytes per parameter; P parameters, N ranks, L the largest layer):

==================  =========  ========  ===============================
state               bf16/fp16  fp32      partitioned from ZeRO stage
==================  =========  ========  ===============================
parameters          2          4         3
gradients           2 (0-2)    4         2
fp32 gradients      4          -         1
fp32 master         4          4 (1-3)   1
Adam moments        8          8         1
==================  =========  ========  ===============================

plus, at stage 3, the largest layer gathered whole with its gradient (2 x 2 bytes x L in 16 bits).
At stage 3 in 16 bits the gradient partition counts once, as fp32 gradients, as DeepSpeed counts
it. Optimizer offload moves every partitioned state but the parameters to the CPU; parameter
offload (stage 3) moves the parameters too. In 16 bits at stages 2 and 3 this is exactly
DeepSpeed's ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
(GPU side); DeepSpeed has no estimator for stages 0 and 1 or for fp32, which follow the same
table. ZeRO's communication buckets, the CUDA context and allocator fragmentation are not counted.

Activations, per sample and block of width d, MLP width m, t tokens, w bytes per element: what
autograd keeps from forward to backward, read off the saved tensors of open_clip's blocks on the
CPU (fused ``scaled_dot_product_attention``, which keeps no t x t matrix, as on GPUs):

* 8 tensors of width d: the block's input, the normalised input to the qkv projection, q, k and v,
  the attention output (shared with the output projection's input), the input of the second norm
  and its output;
* 2 tensors of width m (the MLP's hidden layer before and after GELU; 3 with QuickGELU);
* in fp32: the two norms' mean and inverse deviation and the attention's log-sum-exp per head.

Each tower also keeps a few width-d tensors outside its blocks (``Tower.outer``). Gradient
checkpointing keeps only each block's input and recomputes one block at a time in backward. The
peak adds to everything kept the most one block's backward holds at once: the gradient of its
output and of the MLP's hidden layer, (d + m) per token, or, when checkpointing, the recomputed
block too; and the gradient of the largest parameter, which backward makes whole (when it comes
while everything is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneclip_ds.errors import InputError
from tuneclip_ds.plan.shape import ModelShape, Tower

GIB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOSSES = ("infonce", "siglip", "gcl", "hgcl")
MODEL_STATE_ROWS = ("parameters", "gradients", "optimizer states", "gathered layer")
# Similarity tiles alive at once in the ring loss's backward: benchmarks/loss_memory.py measures
# 6 (InfoNCE) to 9 (SigLIP) at b=2048, d=512, tile 512, fp32, 2 ranks; the most is taken.
LOSS_TILES_ALIVE = 9


@dataclass(frozen=True)
class Setup:
    """A training run as far as memory goes (the names follow the experiment config)."""

    nodes: int = 1
    gpus_per_node: int = 1
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # stage 3 only, with offload_optimizer
    precision: str = "bf16"
    grad_checkpointing: bool = False
    loss: str = "infonce"
    tile_size: int = 1024
    gpu_memory_gib: float = 80.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """Raise ``InputError`` naming the first value that makes no sense."""
        for key in ("nodes", "gpus_per_node", "batch_size", "grad_accum", "tile_size"):
            if getattr(self, key) < 1:
                raise InputError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.gpu_memory_gib <= 0:
            raise InputError(f"gpu memory must be positive, got {self.gpu_memory_gib} GiB")
        choices = {"zero_stage": (0, 1, 2, 3), "precision": tuple(PRECISION_BYTES), "loss": LOSSES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise InputError(f"{key} must be one of {', '.join(map(str, allowed))}, got {getattr(self, key)!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise InputError("optimizer offload needs ZeRO stage 1, 2 or 3")
        if self.offload_params and not (self.zero_stage == 3 and self.offload_optimizer):
            raise InputError("parameter offload needs ZeRO stage 3 with optimizer offload")


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    setup: Setup
    gpu: dict[str, float]  # bytes per GPU by row, in display order
    cpu_per_node: int  # DeepSpeed's estimate of the model states' CPU memory per node
    traffic: dict[str, float]  # bytes one rank sends per micro-step, by part

    @property
    def model_states(self) -> float:
        return sum(self.gpu[row] for row in MODEL_STATE_ROWS)

    @property
    def total(self) -> float:
        return sum(self.gpu.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.gpu_memory_gib * GIB


def make_plan(shape: ModelShape, setup: Setup) -> Plan:
    setup.check()
    gpu = model_states(shape, setup)
    gpu["activations"] = activation_bytes(shape, setup.batch_size, setup.precision, setup.grad_checkpointing)
    gpu["loss buffers"] = loss_buffer_bytes(shape.embed_dim, setup)
    return Plan(shape, setup, gpu, cpu_per_node(shape, setup), ring_traffic(shape.embed_dim, setup))


def model_states(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Bytes per GPU of each row of ``MODEL_STATE_ROWS`` (see the module's table)."""
    rows = dict.fromkeys(MODEL_STATE_ROWS, 0.0)
    for row, bytes_per_param, first_partitioned_stage in _state_components(setup):
        partitioned = setup.zero_stage >= first_partitioned_stage
        offloaded = setup.offload_params if row == "parameters" else setup.offload_optimizer and partitioned
        if not offloaded:
            rows[row] += bytes_per_param * shape.params / (setup.world_size if partitioned else 1)
    if setup.zero_stage == 3:  # a layer's parameters and gradients, gathered whole while it runs
        rows["gathered layer"] = 2 * PRECISION_BYTES[setup.precision] * shape.largest_layer
    return rows


def _state_components(setup: Setup) -> list[tuple[str, int, int]]:
    """(row, bytes per parameter, first ZeRO stage that partitions it) of each model state."""
    width = PRECISION_BYTES[setup.precision]
    mixed = setup.precision != "fp32"
    components = [("parameters", width, 3)]
    if not (mixed and setup.zero_stage == 3):  # ZeRO-3 counts the gradient partition once, in fp32
        components.append(("gradients", width, 2))
    if mixed:  # the fp32 gradients of the optimizer's partition
        components.append(("gradients", 4, 1))
    if mixed or setup.zero_stage > 0:  # ZeRO copies even fp32 weights to a master
        components.append(("optimizer states", 4, 1))
    return components + [("optimizer states", 8, 1)]  # Adam's two moments


def cpu_per_node(shape: ModelShape, setup: Setup) -> int:
    """DeepSpeed's own estimate of the CPU memory per node for the model states (with its 1.5 buffer
    factor); stages 0 and 1 as stage 2. Stage 3 assumes construction under ``zero.Init``."""
    if setup.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, _, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, setup.gpus_per_node, setup.nodes,
            cpu_offload=setup.offload_optimizer, cpu_offload_params=setup.offload_params, zero_init=True)
        return cpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, _ = estimate_zero2_model_states_mem_needs(shape.params, setup.gpus_per_node, setup.nodes,
                                                   cpu_offload=setup.offload_optimizer)
    return cpu


def activation_bytes(shape: ModelShape, batch_size: int, precision: str, checkpointing: bool) -> float:
    """Peak bytes of the towers' activations in one forward and backward of ``batch_size`` samples
    (see the module's docstring)."""
    width = PRECISION_BYTES[precision]
    kept, working = zip(*(_tower_activations(tower, width, checkpointing) for tower in shape.towers))
    # Backward also makes each parameter's gradient whole before it is accumulated or reduced: the
    # largest one (often the token embedding) may come while everything is kept.
    return batch_size * sum(kept) + max(batch_size * max(working), width * shape.largest_param)


def _tower_activations(tower: Tower, width: int, checkpointing: bool) -> tuple[float, float]:
    """Per sample: the bytes the tower keeps from forward to backward, and the most one block's
    backward adds at once."""
    d, m, t = tower.width, tower.mlp_width, tower.tokens
    fp32_statistics = 4 * (2 * 2 + tower.heads)  # two norms' mean and 1/std, one log-sum-exp per head
    block = t * (width * (8 * d + tower.mlp_saved * m) + fp32_statistics)
    outer = t * tower.outer * (width * d + 2 * 4)
    gradients = t * width * (d + m)
    if checkpointing:
        return tower.layers * t * width * d + outer, block + gradients
    return tower.layers * block + outer, gradients


def loss_buffer_bytes(embed_dim: int, setup: Setup) -> float:
    """The ring loss's memory at its peak, in backward: the fp32 gradients of both features, the
    block in flight and the similarity tiles; in 16 bits also fp32 copies of this rank's and of the
    visiting features, and this rank's block in 16 bits."""
    b = setup.batch_size
    fp32_features = 2 * b * embed_dim * 4
    block = _backward_block(embed_dim, setup)
    copies = 2 * fp32_features + block if setup.precision != "fp32" else 0
    tile = min(b, setup.tile_size)
    return fp32_features + block + copies + LOSS_TILES_ALIVE * tile * tile * 4


def ring_traffic(embed_dim: int, setup: Setup) -> dict[str, float]:
    """Bytes one rank sends per micro-step: its blocks go around the ring W-1 times in forward
    (the column features) and again in backward (both features with the anchors' statistics);
    GCL/HGCL also route each sample's estimator to its owner and back. A few scalar all-reduces
    are left out."""
    others = setup.world_size - 1
    forward_block = _directions(setup.loss) * setup.batch_size * embed_dim * PRECISION_BYTES[setup.precision]
    traffic = {"forward": others * forward_block, "backward": others * _backward_block(embed_dim, setup)}
    if setup.loss in ("gcl", "hgcl"):
        # the counts (int64 per rank), then per sample its id (int64) and log g (2 x fp32) out and
        # the new log u (2 x fp32) back, for the (W-1)/W of the samples another rank owns
        traffic["estimators"] = 8 * others + 24 * setup.batch_size * others / setup.world_size
    return traffic


def _directions(loss: str) -> int:
    return 1 if loss == "siglip" else 2  # SigLIP's anchors are images only


def _backward_block(embed_dim: int, setup: Setup) -> int:
    """Both features in the training precision, and in fp32 the positives and, per direction, the
    row statistics and their upstream gradients."""
    b = setup.batch_size
    features = 2 * b * embed_dim * PRECISION_BYTES[setup.precision]
    return features + 4 * b * (1 + 2 * _directions(setup.loss))
