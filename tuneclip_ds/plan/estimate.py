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
An EMA of the weights (``ema.decay``) is one more fp32 copy of the rank's share of the masters, 4
bytes per parameter, partitioned from stage 1, held beside the masters (on the CPU with optimizer
offload) or, with ``ema.device: cpu``, in CPU memory with a pinned copy that each update fills from
the GPU (twice the bytes). Its copy of the parameters swapped out while the EMA is evaluated is not
counted (the planner leaves evaluation out).
At stage 3 in 16 bits the gradient partition counts once, as fp32 gradients, as DeepSpeed counts
it. Optimizer offload moves every partitioned state but the parameters to the CPU; parameter
offload (stage 3) moves the parameters too. In 16 bits at stages 2 and 3 this is exactly
DeepSpeed's ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
(GPU side); DeepSpeed has no estimator for stages 0 and 1 or for fp32, which follow the same
table.

Held beside them at stage 3: ZeRO's gradient bucket, ``reduce_bucket_size`` elements in the
training precision, allocated once.

On top of what is held, the step has two peaks, of which the larger counts:

* forward and backward: the activations and the loss's buffers (below); at stages 1-2 the
  gradient buckets, made in each backward (``reduce_bucket_size`` elements, two with
  ``overlap_comm``); at stage 3 the flat copy of a full bucket that the gradient reduce-scatter
  makes, and the parameters gathered beyond the one layer: from the second step on, DeepSpeed keeps a parameter gathered after use when it
  comes back within ``stage3_max_reuse_distance`` elements, which holds the last half of that
  distance of forward across the turn into backward, and prefetches ``stage3_prefetch_bucket_size``
  ahead within ``stage3_max_live_parameters``; the whole model at most;
* the optimizer step, run on the G elements of one group's partition at a time (at stage 3 at
  most ``sub_group_size``; whole groups at stage 0): at stages 1-3 the group's gradient made flat
  in fp32, 4G (counted among the model states in 16 bits at stages 1-2), and the optimizer's
  temporaries: torch's AdamW on a GPU (``foreach``) 4G, on the CPU (one tensor at a time) 8 bytes
  per element of the largest tensor, DeepSpeed's fused Adam none. Offload runs the step on the CPU.

The CUDA context, NCCL's own buffers and allocator fragmentation are not counted.

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

from dataclasses import dataclass, field
from pathlib import Path

from tuneclip_ds.errors import InputError
from tuneclip_ds.losses.ring import TOPOLOGIES
from tuneclip_ds.plan.shape import ModelShape, Tower

GIB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOSSES = ("infonce", "siglip", "gcl", "hgcl")
OPTIMIZERS = ("torch", "deepspeed")  # optim.implementation: torch's AdamW, DeepSpeed's fused Adam
DEVICES = ("cuda", "cpu")  # where torch's AdamW runs: foreach on GPUs, one tensor at a time on the CPU
EMA_PLACES = ("none", "same", "cpu")  # no EMA of the weights, one beside the masters, one in CPU memory
MODEL_STATE_ROWS = ("parameters", "gradients", "optimizer states", "gathered layer")
# Similarity tiles alive at once in the ring loss's backward: benchmarks/loss_memory.py measures
# 6 (InfoNCE) to 9 (SigLIP) at b=2048, d=512, tile 512, fp32, 2 ranks; the most is taken.
LOSS_TILES_ALIVE = 9


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed JSON's settings that size ZeRO's buffers; the defaults are DeepSpeed's."""

    reduce_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on at stage 3 only
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_file(cls, path: Path) -> ZeroSettings:
        from tuneclip_ds.engine import read_ds_json

        return cls.from_json(read_ds_json(path), str(path))

    @classmethod
    def from_json(cls, ds_config: dict, source: str) -> ZeroSettings:
        """Read through DeepSpeed's own parser; a value it refuses is an ``InputError`` naming ``source``."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        section = dict(ds_config.get("zero_optimization", {}))
        section.pop("stage", None)  # the experiment config (or --zero) sets the stage
        try:
            zero = DeepSpeedZeroConfig(**section)
        except ValidationError as error:
            raise InputError(f"{source}: zero_optimization is not valid for DeepSpeed: {error}") from None
        # overlap_comm as written: DeepSpeed resolves its default by the stage, set only later
        return cls(int(zero.reduce_bucket_size), zero.contiguous_gradients, section.get("overlap_comm"),
                   int(zero.prefetch_bucket_size), int(zero.max_live_parameters), int(zero.max_reuse_distance),
                   int(zero.sub_group_size))

    def overlaps(self, stage: int) -> bool:
        return stage == 3 if self.overlap_comm is None else self.overlap_comm


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
    topology: str = "hierarchical"  # loss.topology (TOPOLOGIES): the flat ring on one node
    gpu_memory_gib: float = 80.0
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    optimizer: str = "torch"
    device: str = "cuda"
    pretrained: bool = False  # a pretrained file is read at start-up
    ema: str = "none"  # an EMA of the weights (EMA_PLACES: ema.device, "none" without ema.decay)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def width(self) -> int:
        """Bytes per element in the training precision."""
        return PRECISION_BYTES[self.precision]

    def check(self) -> None:
        """Raise ``InputError`` naming the first value that makes no sense."""
        for key in ("nodes", "gpus_per_node", "batch_size", "grad_accum", "tile_size"):
            if getattr(self, key) < 1:
                raise InputError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.gpu_memory_gib <= 0:
            raise InputError(f"gpu memory must be positive, got {self.gpu_memory_gib} GiB")
        choices = {"zero_stage": (0, 1, 2, 3), "precision": tuple(PRECISION_BYTES), "loss": LOSSES,
                   "optimizer": OPTIMIZERS, "device": DEVICES, "ema": EMA_PLACES, "topology": TOPOLOGIES}
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
    held: dict[str, float]  # bytes per GPU held through the step, by row, in display order
    forward_backward: dict[str, float]  # what forward and backward add at their peak
    optimizer_step: dict[str, float]  # what the optimizer step adds at its peak
    cpu_per_node: int  # DeepSpeed's estimate of the model states' CPU memory per node
    ema_cpu_per_node: float  # the EMA of the weights in CPU memory, per node
    startup_cpu_per_node: float  # the full copies the node's ranks build while the model is made
    traffic: dict[str, float]  # bytes one rank sends per micro-step, by part

    @property
    def model_states(self) -> float:
        return sum(self.held[row] for row in MODEL_STATE_ROWS)

    @property
    def peaks(self) -> dict[str, float]:
        """What each phase of the step adds to what is held."""
        return {"forward-backward": sum(self.forward_backward.values()),
                "optimizer step": sum(self.optimizer_step.values())}

    @property
    def total(self) -> float:
        return sum(self.held.values()) + max(self.peaks.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.gpu_memory_gib * GIB

    def rows(self) -> list[tuple[str, float]]:
        """(label, bytes per GPU) in display order: what is held, each phase's additions, the sums."""
        rows = [(row, self.held[row]) for row in MODEL_STATE_ROWS]
        rows += [("= model states", self.model_states)]
        rows += [(row, value) for row, value in self.held.items() if row not in MODEL_STATE_ROWS]
        rows += [("= held through the step", sum(self.held.values()))]
        for phase, added in (("forward-backward", self.forward_backward), ("optimizer step", self.optimizer_step)):
            rows += [(f"{phase}: {row}", value) for row, value in added.items()]
            rows += [(f"= {phase} peak, added", self.peaks[phase])]
        return rows + [("= total (held + the larger peak)", self.total)]


def make_plan(shape: ModelShape, setup: Setup) -> Plan:
    setup.check()
    held = model_states(shape, setup)
    if ema_on_gpu(setup):
        held["EMA of the weights"] = ema_bytes(shape, setup)
    forward_backward = {
        "activations": activation_bytes(shape, setup.batch_size, setup.precision, setup.grad_checkpointing),
        "loss buffers": loss_buffer_bytes(shape.embed_dim, setup),
    }
    # ZeRO-3 allocates its bucket once; stages 1-2 theirs in each backward, released at its end
    (held if setup.zero_stage == 3 else forward_backward)["gradient buckets"] = bucket_bytes(setup)
    forward_backward.update(stage3_transients(shape, setup))
    return Plan(shape, setup, held, forward_backward, optimizer_step_bytes(shape, setup), cpu_per_node(shape, setup),
                ema_cpu_per_node(shape, setup), startup_cpu_bytes(shape, setup), ring_traffic(shape.embed_dim, setup))


def model_states(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Bytes per GPU of each row of ``MODEL_STATE_ROWS`` (see the module's table)."""
    rows = dict.fromkeys(MODEL_STATE_ROWS, 0.0)
    for row, bytes_per_param, first_partitioned_stage in _state_components(setup):
        partitioned = setup.zero_stage >= first_partitioned_stage
        offloaded = setup.offload_params if row == "parameters" else setup.offload_optimizer and partitioned
        if not offloaded:
            rows[row] += bytes_per_param * shape.params / (setup.world_size if partitioned else 1)
    if setup.zero_stage == 3:  # a layer's parameters and gradients, gathered whole while it runs
        rows["gathered layer"] = 2 * setup.width * shape.largest_layer
    return rows


def _state_components(setup: Setup) -> list[tuple[str, int, int]]:
    """(row, bytes per parameter, first ZeRO stage that partitions it) of each model state."""
    mixed = setup.precision != "fp32"
    components = [("parameters", setup.width, 3)]
    if not (mixed and setup.zero_stage == 3):  # ZeRO-3 counts the gradient partition once, in fp32
        components.append(("gradients", setup.width, 2))
    if mixed:  # the fp32 gradients of the optimizer's partition
        components.append(("gradients", 4, 1))
    if mixed or setup.zero_stage > 0:  # ZeRO copies even fp32 weights to a master
        components.append(("optimizer states", 4, 1))
    return components + [("optimizer states", 8, 1)]  # Adam's two moments


def ema_bytes(shape: ModelShape, setup: Setup) -> float:
    """The EMA of the weights on one rank: an fp32 copy of the masters it owns (all of them at stage 0)."""
    if setup.ema == "none":
        return 0.0
    return 4 * shape.params / (setup.world_size if setup.zero_stage > 0 else 1)


def ema_on_gpu(setup: Setup) -> bool:
    return setup.ema == "same" and not setup.offload_optimizer


def ema_cpu_per_node(shape: ModelShape, setup: Setup) -> float:
    """The node's ranks' EMAs in CPU memory: beside offloaded masters, or with ``ema.device: cpu`` (then with
    the pinned copy of the GPU's masters each update makes)."""
    if setup.ema == "none" or ema_on_gpu(setup):
        return 0.0
    copies = 1 if setup.offload_optimizer else 2
    return setup.gpus_per_node * copies * ema_bytes(shape, setup)


def bucket_bytes(setup: Setup) -> float:
    """ZeRO's gradient buckets (``contiguous_gradients``): at stages 1-2 one of ``reduce_bucket_size``
    elements, two with ``overlap_comm``; at stage 3 one. All in the training precision, DeepSpeed's
    default communication type."""
    zero = setup.zero
    if setup.zero_stage == 0 or not zero.contiguous_gradients:
        return 0.0
    buckets = 2 if setup.zero_stage < 3 and zero.overlaps(setup.zero_stage) else 1
    return buckets * zero.reduce_bucket_size * setup.width


def stage3_transients(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """At stage 3, what forward and backward gather and copy beyond the model states: the parameters
    kept or prefetched beyond the one gathered layer, and the reduce-scatter's flat copy of a full
    bucket (see the module's docstring)."""
    if setup.zero_stage != 3:
        return {}
    zero = setup.zero
    kept = min(zero.max_reuse_distance / 2, shape.params)
    prefetched = min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - kept))
    gathered = max(0, min(kept + prefetched, shape.params) - shape.largest_layer)
    reduce_copy = min(zero.reduce_bucket_size, shape.params) if setup.world_size > 1 else 0
    return {"parameters gathered ahead": setup.width * gathered, "reduce-scatter copy": setup.width * reduce_copy}


def optimizer_step_bytes(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """What the optimizer step adds on the GPU (see the module's docstring): nothing under offload."""
    if setup.offload_optimizer:
        return {}
    if setup.zero_stage == 0:
        stepped = shape.params
    else:
        stepped = shape.params / setup.world_size
        if setup.zero_stage == 3:
            stepped = min(stepped, setup.zero.sub_group_size)
    rows = {}
    if setup.zero_stage == 3 or (setup.zero_stage > 0 and setup.precision == "fp32"):
        rows["flat fp32 gradient"] = 4 * stepped
    if setup.optimizer == "torch":
        largest_tensor = stepped if setup.zero_stage > 0 else shape.largest_param
        rows["optimizer temporaries"] = 4 * stepped if setup.device == "cuda" else 8 * largest_tensor
    return rows


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


def startup_cpu_bytes(shape: ModelShape, setup: Setup) -> float:
    """CPU memory per node while the model is built: a whole fp32 copy on every rank below stage 3,
    on the first rank alone at stage 3 (it fills the partitions from it); a pretrained file adds its
    state dict to each copy, counted in fp32."""
    copies = 1 if setup.zero_stage == 3 else setup.gpus_per_node
    return copies * 4 * shape.params * (2 if setup.pretrained else 1)


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
    GCL/HGCL also all-gather each sample's id and log g and all-reduce the new log u (ring algorithms:
    an all-reduce sends twice its share). A few scalar all-reduces are left out."""
    others = setup.world_size - 1
    traffic = {part: others * size for part, size in block_bytes(embed_dim, setup).items()}
    if setup.loss in ("gcl", "hgcl"):
        # per sample its id (int64) and log g (2 x fp32) to every other rank, then the all-reduce of the
        # global batch's new log u (2 x fp32 per sample)
        traffic["estimators"] = 16 * setup.batch_size * others + 2 * others * setup.batch_size * 8
    return traffic


def block_bytes(embed_dim: int, setup: Setup) -> dict[str, int]:
    """The bytes of one rank's ring block in forward (the column features) and in backward."""
    forward = _directions(setup.loss) * setup.batch_size * embed_dim * setup.width
    return {"forward": forward, "backward": _backward_block(embed_dim, setup)}


def _directions(loss: str) -> int:
    return 1 if loss == "siglip" else 2  # SigLIP's anchors are images only


def _backward_block(embed_dim: int, setup: Setup) -> int:
    """Per direction the features its anchors' columns meet, in the training precision, and in fp32 the
    positives and, per direction, the row statistics and their upstream gradients (SigLIP: the text side
    only, the image anchors' gradients were taken in forward)."""
    b, directions = setup.batch_size, _directions(setup.loss)
    return directions * b * embed_dim * setup.width + 4 * b * (1 + 2 * directions)
