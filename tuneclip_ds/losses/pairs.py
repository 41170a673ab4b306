"""Tiled, gather-free row statistics over all (anchor, column) pairs of the global batch.

Every loss of this package is a function of one statistic per anchor,

    R_i = reduce_j v(s_ij, s_ii, scale, bias)     over all columns j of the global batch,

where ``reduce`` is a log-sum-exp (InfoNCE, GCL, HGCL) or a sum (SigLIP), ``s_ij = <A_i, C_j>``
and ``s_ii`` is the anchor's positive similarity. Direction 0 takes image anchors and text
columns, direction 1 text anchors and image columns. With class labels, ``v`` also knows which
pairs share a label (``loss.same_label_positives``): the labels travel around the ring with the
features, so no rank gathers them either.

Forward: the column blocks travel around the ring; each visiting block is compared with the
local anchors in tiles of at most ``tile_size`` x ``tile_size`` pairs, accumulating R online.
Backward: the blocks travel again with their anchors' R and upstream gradients dLoss/dR. For
each visiting block and each local modality, one recomputed similarity tile (local features x
visiting features of the other modality) serves both roles of the local features: as anchors
against the visiting columns, and as columns for the visiting anchors. So each rank computes the
full gradient of its own features, and its share (its anchors' rows) of the scale and bias
gradients, without communicating any gradient. For a sum over one direction (SigLIP) the anchors'
part is taken in forward from the tiles computed there (dR_i/dv_ij = 1 needs no upstream
gradient), and the backward computes only the columns' part. A few tiles are alive at a time:
memory is O(b*d + tile_size^2), whatever the global batch (and within O(b*d + b*tile_size)).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuneclip_ds.losses.ring import GroupInfo, check_equal_local_batch, ring_blocks

# v(similarity [a, c], positive [a, 1] or [1, c], scale [], bias [] or None,
#   same_label [a, c] bool or None without labels) -> pair values [a, c]
PairValue = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                     torch.Tensor]


@dataclass(frozen=True)
class PairReduction:
    """How a loss reduces the pairs of one anchor to its row statistic R_i."""

    pair_value: PairValue
    logsumexp: bool  # R_i = log sum_j exp(v_ij); otherwise R_i = sum_j v_ij
    exclude_positive: bool  # leave out the anchor's own pair j == i
    both_directions: bool  # image and text anchors; otherwise image anchors only
    count_positive_values: bool = False  # count the pairs with v_ij > 0 (a pass over every tile)

    @property
    def num_directions(self) -> int:
        return 2 if self.both_directions else 1

    @property
    def anchor_grads_in_forward(self) -> bool:
        """For a sum over one direction (SigLIP), dR_i/dv_ij = 1 needs no upstream gradient: the
        forward can take the anchors' gradient from the tiles it computes anyway, up to a factor per
        row, and the backward then skips recomputing them (these rows have no other role)."""
        return not self.logsumexp and self.num_directions == 1

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
    reduction: PairReduction, inputs: LossInputs, tile_size: int, info: GroupInfo, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics ``R`` [directions, b] of this rank's anchors, differentiable w.r.t. the
    features, positives, scale and bias of ``inputs``, and the number of pairs per direction with
    ``v_ij > 0`` among this rank's anchors (not differentiable; zero unless
    ``reduction.count_positive_values``). ``labels`` ([b] integers, or None): the class of each of
    this rank's samples, for pair values that depend on which pairs share a class.

    All ranks must call it, with the same ``b`` (checked: ``ValueError`` otherwise), all with
    labels or all without, and, in backward, call backward together.
    """
    check_equal_local_batch(inputs.local_batch, info, inputs.image.device)
    return _PairStatistics.apply(
        reduction, tile_size, info, inputs.wire_dtype,
        inputs.image, inputs.text, inputs.positive, inputs.scale, inputs.bias, labels,
    )


def same_label_counts(labels: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """For each of this rank's samples, how many samples of the global batch share its label (itself
    included). The label blocks travel around the ring; each is sorted once and searched, so nothing
    larger than a block is made."""
    counts = torch.zeros_like(labels)
    for _, (visiting,) in ring_blocks((labels,), info):
        ordered = visiting.sort().values
        counts += torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    return counts


class _PairStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reduction, tile_size, info, wire_dtype, image, text, positive, scale, bias, labels):
        scalars = _Scalars(positive, scale, bias)
        directions = range(reduction.num_directions)
        stats = image.new_full((len(directions), image.shape[0]), reduction.empty_value)
        active = torch.zeros(len(directions), dtype=torch.int64, device=image.device)
        features = (image, text)
        anchor_grads = _AnchorGrads.zeros(image, scalars) if reduction.anchor_grads_in_forward else None
        column_blocks = tuple(features[1 - d].to(wire_dtype) for d in directions)
        for source, visiting in ring_blocks(_with_labels(column_blocks, labels), info):
            layout = _BlockLayout(source == info.rank, labels, _labels_of(visiting, labels))
            for d in directions:
                _add_block_statistics(reduction, features[d], visiting[d].to(image.dtype), scalars,
                                      layout, tile_size, stats[d], active[d], anchor_grads)
        ctx.reduction, ctx.tile_size, ctx.info, ctx.wire_dtype = reduction, tile_size, info, wire_dtype
        ctx.anchor_grads = anchor_grads
        ctx.save_for_backward(image, text, positive, scale, bias, stats, labels)
        ctx.mark_non_differentiable(active)
        return stats, active

    @staticmethod
    def backward(ctx, grad_stats, _grad_active):
        image, text, positive, scale, bias, stats, labels = ctx.saved_tensors
        # Detached for the visiting anchors, whose scalars are not differentiated here: autograd then
        # keeps no tile for their gradient. Leaves for this rank's anchors.
        scalars = _Scalars(*(None if t is None else t.detach() for t in (positive, scale, bias)))
        leaves = scalars.leaves()
        local = _AnchorRows(leaves.positive, stats, grad_stats)
        features = (image.detach(), text.detach())
        grad_features = [torch.zeros_like(f) for f in features]
        grad_scalars = [torch.zeros_like(x) for x in leaves.tensors()]
        sides = (0, 1)
        if ctx.anchor_grads is not None:  # side 0's tiles were differentiated in forward
            ctx.anchor_grads.apply(grad_stats[0], grad_features[0], grad_scalars)
            sides = (1,)
        payload = (image.to(ctx.wire_dtype), text.to(ctx.wire_dtype), positive, stats, grad_stats.contiguous())
        for source, block in ring_blocks(_with_labels(payload, labels), ctx.info):
            v_image, v_text, v_positive, v_stats, v_grad_stats = block[:5]
            pair = _BlockPair(ctx.reduction, local, _AnchorRows(v_positive, v_stats, v_grad_stats), scalars, leaves,
                              _BlockLayout(source == ctx.info.rank, labels, _labels_of(block, labels)))
            visiting_features = (v_image.detach().to(image.dtype), v_text.detach().to(image.dtype))
            for side in sides:
                _add_block_grads(pair, side, features[side], visiting_features[1 - side], ctx.tile_size,
                                 grad_features[side], grad_scalars)
        grad_positive, grad_scale, *grad_bias = grad_scalars
        return (None, None, None, None, *grad_features, grad_positive, grad_scale, *(grad_bias or [None]), None)


def _with_labels(block: tuple, labels: torch.Tensor | None) -> tuple:
    """A ring block with this rank's labels, if any, as its last tensor: they travel with the features."""
    return block if labels is None else (*block, labels)


def _labels_of(block: tuple, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The labels of a visiting block made by ``_with_labels``."""
    return None if labels is None else block[-1]


def _add_block_statistics(reduction, anchors, columns, scalars, layout, tile_size, stats, active, anchor_grads):
    """Combine the tiles of ``anchors`` against one visiting block's ``columns`` into the row
    statistics ``stats`` [b] and the count ``active`` (in place), and into ``anchor_grads`` if any."""
    for rows, tile in _tiles(len(anchors), len(columns), tile_size):
        pairs = layout.tile_pairs(rows, tile)
        if anchor_grads is None:
            tile_stats, tile_active = _tile_statistics(
                reduction, anchors[rows], columns[tile], scalars.positive[rows, None], scalars, pairs
            )
        else:
            tile_stats, tile_active = anchor_grads.add_tile(reduction, anchors, columns[tile], rows, scalars, pairs)
        stats[rows] = _combine(reduction, stats[rows], tile_stats)
        active += tile_active


def _add_block_grads(pair, side, features, columns, tile_size, grad_features, grad_scalars):
    """Add the gradients from the tiles of this rank's ``features`` of modality ``side`` against the
    visiting block's ``columns`` (the other modality) to ``grad_features`` and ``grad_scalars``."""
    for rows, tile in _tiles(len(features), len(columns), tile_size):
        # one product per tile turns the tile's gradient into the features' gradient
        grad_features[rows].addmm_(
            _tile_grad(pair, side, features[rows] @ columns[tile].T, rows, tile, grad_scalars), columns[tile]
        )


def _tiles(num_rows: int, num_columns: int, tile_size: int):
    """``(rows, columns)`` slices of the tiles that cover a ``num_rows`` x ``num_columns`` matrix."""
    for row in range(0, num_rows, tile_size):
        for column in range(0, num_columns, tile_size):
            yield slice(row, row + tile_size), slice(column, column + tile_size)


def _diagonal(rows: slice, columns: slice, is_local_block: bool) -> tuple[int, int] | None:
    """Where a tile's positive pairs lie: the offsets of its first row and column in the block, or
    None for a tile without any (every tile of a visiting block, most tiles of the local one)."""
    if is_local_block and max(rows.start, columns.start) < min(rows.stop, columns.stop):
        return rows.start, columns.start
    return None


@dataclass(frozen=True)
class _TilePairs:
    """The pairs of a tile that a loss treats apart: its positive pairs (``diagonal``, see ``_diagonal``)
    and those whose samples share a label (``same_label`` [a, c] bool; None without labels)."""

    diagonal: tuple[int, int] | None
    same_label: torch.Tensor | None


@dataclass(frozen=True)
class _BlockLayout:
    """How this rank's samples (a tile's rows) meet a block's samples (its columns): whether the block is
    this rank's own, and the labels of both (None without labels)."""

    is_local_block: bool
    row_labels: torch.Tensor | None
    column_labels: torch.Tensor | None

    def tile_pairs(self, rows: slice, columns: slice) -> _TilePairs:
        same_label = None
        if self.row_labels is not None:
            same_label = self.row_labels[rows, None] == self.column_labels[None, columns]
        return _TilePairs(_diagonal(rows, columns, self.is_local_block), same_label)


@dataclass
class _Scalars:
    """Per-anchor positives [a] and the scale and bias (0-dim; bias may be None)."""

    positive: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.positive, self.scale] + ([] if self.bias is None else [self.bias])

    def leaves(self) -> "_Scalars":
        """Copies that a tile can be differentiated with respect to."""
        return _Scalars(*(None if t is None else t.detach().requires_grad_()
                          for t in (self.positive, self.scale, self.bias)))

    def row_leaves(self, rows: slice) -> "_Scalars":
        """Leaves shaped [a, 1] for the anchors in ``rows``, the scale and bias repeated per row so
        that their gradient comes out per row."""
        positive = self.positive[rows, None]
        return _Scalars(*(None if t is None else t.detach().expand_as(positive).clone().requires_grad_()
                          for t in (positive, self.scale, self.bias)))


@dataclass
class _AnchorGrads:
    """dR_i/d(features, positive, scale, bias) of each anchor row of a sum reduction, gathered in
    forward (see ``PairReduction.anchor_grads_in_forward``)."""

    features: torch.Tensor  # [b, d]
    scalars: list[torch.Tensor]  # [b] each: positive, scale, bias (if any)

    @classmethod
    def zeros(cls, anchors: torch.Tensor, scalars: _Scalars) -> "_AnchorGrads":
        return cls(torch.zeros_like(anchors), [anchors.new_zeros(len(anchors)) for _ in scalars.tensors()])

    def add_tile(self, reduction, anchors, columns, rows, scalars, pairs):
        """``_reduce_tile`` of the tile ``anchors[rows]`` x ``columns``, adding the tile's part of the
        anchors' gradients."""
        leaves = scalars.row_leaves(rows)
        similarity = (anchors[rows] @ columns.T).requires_grad_()
        with torch.enable_grad():
            values, (grad, *scalar_grads) = _role_grads(
                reduction, similarity, pairs, leaves, (leaves.positive, None, similarity.new_ones(1, 1)),
                leaves.tensors(),
            )
        self.features[rows].addmm_(grad, columns)
        for total, scalar_grad in zip(self.scalars, scalar_grads):
            if scalar_grad is not None:
                total[rows] += scalar_grad.squeeze(1)
        return _reduce_tile(reduction, values)

    def apply(self, grad_rows, grad_features, grad_scalars) -> None:
        """Add the gradients for the upstream dLoss/dR ``grad_rows`` [b]: per-row factors."""
        grad_features.addcmul_(grad_rows[:, None], self.features)
        grad_positive, *grad_replicated = grad_scalars
        grad_positive += grad_rows * self.scalars[0]
        for total, partial in zip(grad_replicated, self.scalars[1:]):
            total += (grad_rows * partial).sum()


@dataclass
class _AnchorRows:
    """What the backward needs about a block's anchors: positives [b], R and dLoss/dR [directions, b]."""

    positive: torch.Tensor
    stats: torch.Tensor
    grads: torch.Tensor

    def as_rows(self, direction: int, rows: slice) -> tuple[torch.Tensor, ...]:
        """Positives, R and dLoss/dR of the anchors in ``rows``, shaped [a, 1] to broadcast over a
        tile's columns."""
        return self.positive[rows, None], self.stats[direction, rows, None], self.grads[direction, rows, None]

    def as_columns(self, direction: int, columns: slice) -> tuple[torch.Tensor, ...]:
        """The same of the anchors in ``columns``, shaped [1, c] to broadcast over a tile's rows."""
        return self.positive[None, columns], self.stats[direction, None, columns], self.grads[direction, None, columns]


@dataclass
class _BlockPair:
    """This rank's anchors and a visiting block in the backward ring."""

    reduction: PairReduction
    local: _AnchorRows  # positives are leaves: their gradient is this rank's
    visiting: _AnchorRows
    scalars: _Scalars  # the scale and bias as the visiting anchors use them
    leaves: _Scalars  # the scale and bias to differentiate, for this rank's anchors
    layout: _BlockLayout


def _pair_values(reduction, similarity, positive, scalars, pairs):
    """Pair values of a similarity tile; ``positive`` broadcasts over the tile (a column [a, 1] for
    row anchors, a row [1, c] for column anchors). The tile's positive pairs (``pairs.diagonal``)
    are set to the reduction's empty value when the loss excludes them. Same-label pairs are the
    pair value's business (a symmetric mask: the same for both roles of a tile)."""
    values = reduction.pair_value(similarity, positive, scalars.scale, scalars.bias, pairs.same_label)
    if reduction.exclude_positive and pairs.diagonal is not None:
        values = values.masked_fill(_positive_mask(values.shape, *pairs.diagonal, values.device),
                                    reduction.empty_value)
    return values


def _positive_mask(shape, row_start, column_start, device):
    """True where a row sample meets its own column: equal positions in the block."""
    rows = torch.arange(row_start, row_start + shape[0], device=device)[:, None]
    columns = torch.arange(column_start, column_start + shape[1], device=device)[None, :]
    return rows == columns


def _tile_statistics(reduction, anchors, columns, positive, scalars, pairs):
    """``_reduce_tile`` of the tile ``anchors`` x ``columns``; a function of its own so that the
    tile is freed before the next one is allocated."""
    return _reduce_tile(reduction, _pair_values(reduction, anchors @ columns.T, positive, scalars, pairs))


def _reduce_tile(reduction, values):
    """The tile's part of its rows' statistics, and its number of pairs with ``v_ij > 0`` (0 unless
    counted)."""
    active = (values > 0).sum() if reduction.count_positive_values else 0
    return (torch.logsumexp(values, dim=1) if reduction.logsumexp else values.sum(dim=1)), active


def _combine(reduction, stats, tile_stats):
    return torch.logaddexp(stats, tile_stats) if reduction.logsumexp else stats + tile_stats


def _tile_grad(pair, side, similarity, rows, columns, grad_scalars):
    """dLoss/d``similarity`` for the tile ``rows`` x ``columns`` of this rank's features of modality
    ``side`` (rows) against the visiting features of the other modality (columns), and, added to
    ``grad_scalars``, the gradients of this rank's anchors' positives, scale and bias. The rows
    play two roles: anchors of direction ``side``, and columns for the visiting anchors of
    direction ``1 - side``. Each role is differentiated with respect to the tile alone, one after
    the other, so that only a few tiles are alive at a time."""
    reduction = pair.reduction
    pairs = pair.layout.tile_pairs(rows, columns)
    similarity.requires_grad_()
    grad = None
    with torch.enable_grad():  # backward runs without grad mode
        if side < reduction.num_directions:  # the scale and bias of these pairs are this rank's share
            _, (grad, *scalar_grads) = _role_grads(reduction, similarity, pairs, pair.leaves,
                                                   pair.local.as_rows(side, rows), pair.leaves.tensors())
            for total, scalar_grad in zip(grad_scalars, scalar_grads):
                if scalar_grad is not None:  # a loss whose pair values ignore the positive (InfoNCE) or the bias
                    total += scalar_grad
        if 1 - side < reduction.num_directions:  # the visiting anchors' scalars are another rank's share
            _, (column_grad,) = _role_grads(reduction, similarity, pairs, pair.scalars,
                                            pair.visiting.as_columns(1 - side, columns), [])
            grad = column_grad if grad is None else grad.add_(column_grad)
    return grad


def _role_grads(reduction, similarity, pairs, scalars, anchors, scalar_leaves):
    """One role's pair values of the tile (detached) and the gradients of the loss through them
    with respect to ``similarity`` and ``scalar_leaves`` (None for one the values ignore).
    ``anchors``: positives, R and dLoss/dR of the role's anchors, broadcasting over the tile."""
    positive, stats, grads = anchors
    values = _pair_values(reduction, similarity, positive, scalars, pairs)
    weights = _pair_weights(reduction, values.detach(), stats, grads)
    return values.detach(), torch.autograd.grad(values, [similarity, *scalar_leaves], weights, allow_unused=True)


def _pair_weights(reduction, values, stats, grads):
    """dLoss/dv = dLoss/dR * dR/dv (a softmax weight for log-sum-exp, 1 for a sum); ``stats`` and
    ``grads`` of the anchors broadcast over the tile like their positives."""
    if reduction.logsumexp:
        return (values - stats).exp_().mul_(grads)  # in place: one tile instead of three
    return grads.expand_as(values)
