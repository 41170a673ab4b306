"""Tiled, gather-free row statistics over all (anchor, column) pairs of the global batch.

Every loss of this package is a function of one statistic per anchor,

    R_i = reduce_j v(s_ij, s_ii, scale, bias)     over all columns j of the global batch,

where ``reduce`` is a log-sum-exp (InfoNCE, GCL, HGCL) or a sum (SigLIP), ``s_ij = <A_i, C_j>``
and ``s_ii`` is the anchor's positive similarity. Direction 0 takes image anchors and text
columns, direction 1 text anchors and image columns.

Forward: the column blocks travel around the ring; each visiting block is compared with the
local anchors in tiles of ``tile_size`` columns, accumulating R online.
Backward: the blocks travel again with their anchors' R and upstream gradients dLoss/dR. For
each visiting block and each local modality, one recomputed similarity tile (local features x
visiting features of the other modality) serves both roles of the local features: as anchors
against the visiting columns, and as columns for the visiting anchors. So each rank computes the
full gradient of its own features, and its share (its anchors' rows) of the scale and bias
gradients, without communicating any gradient. No tile is wider than ``tile_size``: memory is
O(b*d + b*tile_size).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuneclip_ds.losses.ring import GroupInfo, ring_blocks

# v(similarity [a, c], positive [a, 1] or [1, c], scale [], bias [] or None) -> pair values [a, c]
PairValue = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class PairReduction:
    """How a loss reduces the pairs of one anchor to its row statistic R_i."""

    pair_value: PairValue
    logsumexp: bool  # R_i = log sum_j exp(v_ij); otherwise R_i = sum_j v_ij
    exclude_positive: bool  # leave out the anchor's own pair j == i
    both_directions: bool  # image and text anchors; otherwise image anchors only

    @property
    def num_directions(self) -> int:
        return 2 if self.both_directions else 1

    @property
    def empty_value(self) -> float:
        """The value that contributes nothing to the reduction."""
        return -math.inf if self.logsumexp else 0.0


@dataclass(frozen=True)
class LossInputs:
    """One rank's loss inputs in the compute dtype (float32, or float64 for float64 features).

    Casting once here makes autograd sum every gradient of a feature in the compute dtype and round
    to the input dtype once. Ring blocks travel in ``wire_dtype``, the features' own dtype, which
    is lossless since they were cast up from it.
    """

    image: torch.Tensor  # [b, d]
    text: torch.Tensor  # [b, d]
    positive: torch.Tensor  # [b], s_ii
    scale: torch.Tensor  # []
    bias: torch.Tensor | None  # []
    wire_dtype: torch.dtype

    @classmethod
    def prepare(cls, image_features, text_features, logit_scale, logit_bias=None) -> "LossInputs":
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        image, text = image_features.to(dtype), text_features.to(dtype)
        return cls(
            image=image,
            text=text,
            positive=(image * text).sum(dim=-1),
            scale=logit_scale.to(dtype).reshape(()),
            bias=None if logit_bias is None else logit_bias.to(dtype).reshape(()),
            wire_dtype=image_features.dtype,
        )

    @property
    def local_batch(self) -> int:
        return self.image.shape[0]


def pair_statistics(
    reduction: PairReduction, inputs: LossInputs, tile_size: int, info: GroupInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics ``R`` [directions, b] of this rank's anchors, differentiable w.r.t. the
    features, positives, scale and bias of ``inputs``, and the number of pairs per direction with
    ``v_ij > 0`` among this rank's anchors (not differentiable).

    All ranks must call it with the same ``b`` and, in backward, call backward together.
    """
    return _PairStatistics.apply(
        reduction, tile_size, info, inputs.wire_dtype,
        inputs.image, inputs.text, inputs.positive, inputs.scale, inputs.bias,
    )


class _PairStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reduction, tile_size, info, wire_dtype, image, text, positive, scale, bias):
        local = _Scalars(positive, scale, bias)
        directions = range(reduction.num_directions)
        stats = image.new_full((len(directions), image.shape[0]), reduction.empty_value)
        active = torch.zeros(len(directions), dtype=torch.int64, device=image.device)
        features = (image, text)
        column_blocks = tuple(features[1 - d].to(wire_dtype) for d in directions)
        for source, visiting in ring_blocks(column_blocks, info):
            for d in directions:
                columns = visiting[d].to(image.dtype)
                for start in range(0, columns.shape[0], tile_size):
                    similarity = features[d] @ columns[start:start + tile_size].T
                    values = _pair_values(reduction, similarity, positive[:, None], local, start, source == info.rank)
                    stats[d] = _combine(reduction, stats[d], values)
                    active[d] += (values > 0).sum()
        ctx.reduction, ctx.tile_size, ctx.info, ctx.wire_dtype = reduction, tile_size, info, wire_dtype
        ctx.save_for_backward(image, text, positive, scale, bias, stats)
        ctx.mark_non_differentiable(active)
        return stats, active

    @staticmethod
    def backward(ctx, grad_stats, _grad_active):
        image, text, positive, scale, bias, stats = ctx.saved_tensors
        local = _Scalars(positive, scale, bias)
        features = (image, text)
        grad_features = [torch.zeros_like(f) for f in features]
        grad_scalars = [torch.zeros_like(x) for x in local.tensors()]
        payload = (image.to(ctx.wire_dtype), text.to(ctx.wire_dtype), positive, stats, grad_stats.contiguous())
        for source, (v_image, v_text, v_positive, v_stats, v_grad_stats) in ring_blocks(payload, ctx.info):
            visiting_features = (v_image.to(image.dtype), v_text.to(image.dtype))
            for side in (0, 1):
                grads = _side_grads(
                    ctx.reduction, side, features[side], visiting_features[1 - side],
                    _AnchorRows(local.positive, stats, grad_stats), _AnchorRows(v_positive, v_stats, v_grad_stats),
                    local, source == ctx.info.rank, ctx.tile_size,
                )
                grad_features[side] += grads[0]
                for total, grad in zip(grad_scalars, grads[1:]):
                    total += grad
        grad_positive, grad_scale, *grad_bias = grad_scalars
        return (None, None, None, None, *grad_features, grad_positive, grad_scale, *(grad_bias or [None]))


@dataclass
class _Scalars:
    """Per-anchor positives [a] and the scale and bias (0-dim; bias may be None)."""

    positive: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.positive, self.scale] + ([] if self.bias is None else [self.bias])

    def leaves(self) -> "_Scalars":
        return _Scalars(*(None if t is None else _leaf(t) for t in (self.positive, self.scale, self.bias)))


@dataclass
class _AnchorRows:
    """What the backward needs about a block's anchors: positives [b], R and dLoss/dR [directions, b]."""

    positive: torch.Tensor
    stats: torch.Tensor
    grads: torch.Tensor


def _pair_values(reduction, similarity, positive, scalars, start, is_local_block):
    """Pair values of a similarity tile whose columns start at ``start``; ``positive`` broadcasts
    over the tile (a column [a, 1] for row anchors, a row [1, c] for column anchors). Positive pairs
    are set to the reduction's empty value when the loss excludes them."""
    values = reduction.pair_value(similarity, positive, scalars.scale, scalars.bias)
    if reduction.exclude_positive and is_local_block:
        values = values.masked_fill(_positive_mask(values.shape, start, values.device), reduction.empty_value)
    return values


def _positive_mask(shape, start, device):
    """True where row sample i meets its own column, i.e. i == start + j."""
    rows = torch.arange(shape[0], device=device)[:, None]
    columns = torch.arange(start, start + shape[1], device=device)[None, :]
    return rows == columns


def _combine(reduction, stats, values):
    if reduction.logsumexp:
        return torch.logaddexp(stats, torch.logsumexp(values, dim=1))
    return stats + values.sum(dim=1)


def _pair_weights(reduction, values, stats, grads):
    """dLoss/dv = dLoss/dR * dR/dv (a softmax weight for log-sum-exp, 1 for a sum); ``stats`` and
    ``grads`` of the anchors broadcast over the tile like their positives."""
    if reduction.logsumexp:
        return grads * torch.exp(values - stats)
    return grads.expand_as(values)


def _side_grads(reduction, side, features, columns, local, visiting, scalars, is_local_block, tile_size):
    """Gradients from all pairs of this rank's ``features`` (modality ``side``, as tile rows) with the
    visiting ``columns`` (the other modality): as anchors of direction ``side`` and as columns for
    the visiting anchors of direction ``1 - side``. Both use the same similarity tile. Returns the
    gradient of ``features``, then, when they are anchors, those of their positives, the scale
    and the bias."""
    as_anchors = side < reduction.num_directions
    as_columns = 1 - side < reduction.num_directions
    features = _leaf(features)
    leaves = scalars.leaves()
    inputs = [features] + (leaves.tensors() if as_anchors else [])
    totals = [torch.zeros_like(x) for x in inputs]
    with torch.enable_grad():
        for start in range(0, columns.shape[0], tile_size):
            tile = slice(start, start + tile_size)
            similarity = features @ columns[tile].T
            outputs, weights = [], []
            if as_anchors:  # the scale and bias of these pairs are this rank's share of their gradient
                values = _pair_values(reduction, similarity, leaves.positive[:, None], leaves, start, is_local_block)
                outputs.append(values)
                weights.append(_pair_weights(
                    reduction, values.detach(), local.stats[side][:, None], local.grads[side][:, None]
                ))
            if as_columns:  # the visiting anchors' positives, scale and bias are another rank's share
                values = _pair_values(reduction, similarity, visiting.positive[None, tile], scalars, start, is_local_block)
                outputs.append(values)
                weights.append(_pair_weights(
                    reduction, values.detach(), visiting.stats[1 - side][None, tile], visiting.grads[1 - side][None, tile]
                ))
            for total, grad in zip(totals, torch.autograd.grad(outputs, inputs, weights, allow_unused=True)):
                if grad is not None:  # a loss whose pair values ignore the positive (InfoNCE) or the bias
                    total += grad
    return totals


def _leaf(tensor):
    """A detached copy of ``tensor`` that a tile can be differentiated with respect to."""
    return tensor.detach().requires_grad_()
