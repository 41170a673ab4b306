"""Tiled, gather-free row statistics over all (anchor, column) pairs of the global batch.

Every loss of this package is a function of one statistic per anchor,

    R_i = reduce_j v(s_ij, s_ii, scale, bias)     over all columns j of the global batch,

where ``reduce`` is a log-sum-exp (InfoNCE, GCL, HGCL) or a sum (SigLIP), ``s_ij = <A_i, C_j>``
and ``s_ii`` is the anchor's positive similarity. Direction 0 takes image anchors and text
columns, direction 1 text anchors and image columns.

Forward: the column blocks travel around the ring; each visiting block is compared with the
local anchors in tiles of ``tile_size`` columns, accumulating R online.
Backward: the anchor blocks travel again with their R and their upstream gradients dLoss/dR;
each rank computes the gradient of its own features as anchors (against every visiting column)
and as columns (for every visiting anchor), recomputing the tiles. Nothing but the ring blocks
is communicated and no tile is wider than ``tile_size``: memory is O(b*d + b*tile_size).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuneclip_ds.losses.ring import GroupInfo, ring_blocks

# v(similarity [a, c], positive [a, 1], scale [], bias [] or None) -> pair values [a, c]
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


def pair_statistics(
    reduction: PairReduction,
    image: torch.Tensor,
    text: torch.Tensor,
    positive: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    tile_size: int,
    info: GroupInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics ``R`` [directions, b] of this rank's anchors, differentiable w.r.t. all inputs,
    and the number of pairs per direction with ``v_ij > 0`` over this rank's anchors (no gradient).

    All ranks must call it with the same ``b`` and, in backward, call backward together.
    """
    return _PairStatistics.apply(reduction, tile_size, info, image, text, positive, scale, bias)


class _PairStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reduction, tile_size, info, image, text, positive, scale, bias):
        compute_dtype = torch.promote_types(image.dtype, torch.float32)
        local = _Scalars.converted(positive, scale, bias, compute_dtype)
        directions = range(reduction.num_directions)
        stats = image.new_full((len(directions), image.shape[0]), reduction.empty_value, dtype=compute_dtype)
        active = torch.zeros(len(directions), dtype=torch.int64, device=image.device)
        features = (image, text)
        anchors = [features[d].to(compute_dtype) for d in directions]
        column_blocks = tuple(features[1 - d] for d in directions)
        for source, visiting in ring_blocks(column_blocks, info):
            for d in directions:
                columns = visiting[d].to(compute_dtype)
                for start in range(0, columns.shape[0], tile_size):
                    tile = columns[start:start + tile_size]
                    values = _values(reduction, anchors[d], tile, local, start, source == info.rank)
                    stats[d] = _combine(reduction, stats[d], values)
                    active[d] += (values > 0).sum()
        ctx.reduction, ctx.tile_size, ctx.info = reduction, tile_size, info
        ctx.save_for_backward(image, text, positive, scale, bias, stats)
        ctx.mark_non_differentiable(active)
        return stats, active

    @staticmethod
    def backward(ctx, grad_stats, _grad_active):
        image, text, positive, scale, bias, stats = ctx.saved_tensors
        reduction, info, tile_size = ctx.reduction, ctx.info, ctx.tile_size
        compute_dtype = stats.dtype
        local = _Scalars.converted(positive, scale, bias, compute_dtype)
        features = (image.to(compute_dtype), text.to(compute_dtype))
        grad_features = [torch.zeros_like(f) for f in features]
        grad_scalars = [torch.zeros_like(x) for x in local.tensors()]
        payload = (image, text, positive, stats, grad_stats.contiguous())
        for source, (v_image, v_text, v_positive, v_stats, v_grad_stats) in ring_blocks(payload, info):
            visiting_features = (v_image.to(compute_dtype), v_text.to(compute_dtype))
            visiting = _Scalars.converted(v_positive, scale, bias, compute_dtype)
            is_local_block = source == info.rank
            for d in range(reduction.num_directions):
                # (a) this rank's features as anchors against the visiting columns
                anchor_grads = _anchor_side_grads(
                    reduction, features[d], visiting_features[1 - d], local,
                    stats[d], grad_stats[d], is_local_block, tile_size,
                )
                grad_features[d] += anchor_grads[0]
                for total, grad in zip(grad_scalars, anchor_grads[1:]):
                    total += grad
                # (b) this rank's features as columns for the visiting anchors
                grad_features[1 - d] += _column_side_grads(
                    reduction, visiting_features[d], features[1 - d], visiting,
                    v_stats[d], v_grad_stats[d], is_local_block, tile_size,
                )
        grad_positive, grad_scale, *grad_bias = grad_scalars
        return (
            None, None, None,
            grad_features[0].to(image.dtype),
            grad_features[1].to(text.dtype),
            grad_positive.to(positive.dtype),
            grad_scale.to(scale.dtype).reshape(scale.shape),
            grad_bias[0].to(bias.dtype).reshape(bias.shape) if bias is not None else None,
        )


@dataclass
class _Scalars:
    """Per-anchor positives [a] and the scale and bias (0-dim; bias may be None)."""

    positive: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def converted(cls, positive, scale, bias, dtype) -> "_Scalars":
        bias = None if bias is None else bias.to(dtype).reshape(())
        return cls(positive.to(dtype), scale.to(dtype).reshape(()), bias)

    def tensors(self) -> list[torch.Tensor]:
        return [self.positive, self.scale] + ([] if self.bias is None else [self.bias])

    def leaves(self) -> "_Scalars":
        return _Scalars(*(None if t is None else _leaf(t) for t in (self.positive, self.scale, self.bias)))


def _values(reduction, anchors, columns, scalars, start, is_local_block):
    """Pair values of ``anchors`` against the tile ``columns`` starting at column ``start``;
    positive pairs are set to the reduction's empty value when the loss excludes them."""
    similarity = anchors @ columns.T
    values = reduction.pair_value(similarity, scalars.positive[:, None], scalars.scale, scalars.bias)
    if reduction.exclude_positive and is_local_block:
        values = values.masked_fill(_positive_mask(values.shape, start, values.device), reduction.empty_value)
    return values


def _positive_mask(shape, start, device):
    """True where anchor row i meets its own column, i.e. i == start + j."""
    rows = torch.arange(shape[0], device=device)[:, None]
    columns = torch.arange(start, start + shape[1], device=device)[None, :]
    return rows == columns


def _combine(reduction, stats, values):
    if reduction.logsumexp:
        return torch.logaddexp(stats, torch.logsumexp(values, dim=1))
    return stats + values.sum(dim=1)


def _pair_weights(reduction, values, row_stats, row_grads):
    """dLoss/dv_ij = dLoss/dR_i * dR_i/dv_ij (a softmax weight for log-sum-exp, 1 for a sum)."""
    if reduction.logsumexp:
        return row_grads[:, None] * torch.exp(values - row_stats[:, None])
    return row_grads[:, None].expand_as(values)


def _anchor_side_grads(reduction, anchors, columns, scalars, row_stats, row_grads, is_local_block, tile_size):
    """Gradients of the anchors, their positives, the scale (and the bias) from one column block."""
    anchors = _leaf(anchors)
    scalars = scalars.leaves()
    inputs = [anchors, *scalars.tensors()]
    totals = [torch.zeros_like(x) for x in inputs]
    with torch.enable_grad():
        for start in range(0, columns.shape[0], tile_size):
            values = _values(reduction, anchors, columns[start:start + tile_size], scalars, start, is_local_block)
            weights = _pair_weights(reduction, values.detach(), row_stats, row_grads)
            for total, grad in zip(totals, torch.autograd.grad(values, inputs, weights, allow_unused=True)):
                if grad is not None:  # a loss whose pair values ignore the positive (InfoNCE) or the bias
                    total += grad
    return totals


def _column_side_grads(reduction, anchors, columns, scalars, row_stats, row_grads, is_local_block, tile_size):
    """Gradient of the local ``columns`` from the visiting ``anchors`` with their statistics."""
    grad_columns = torch.zeros_like(columns)
    with torch.enable_grad():
        for start in range(0, columns.shape[0], tile_size):
            tile = _leaf(columns[start:start + tile_size])
            values = _values(reduction, anchors, tile, scalars, start, is_local_block)
            weights = _pair_weights(reduction, values.detach(), row_stats, row_grads)
            (grad_columns[start:start + tile_size],) = torch.autograd.grad(values, [tile], weights)
    return grad_columns


def _leaf(tensor):
    """A detached copy of ``tensor`` that a tile can be differentiated with respect to."""
    return tensor.detach().requires_grad_()
