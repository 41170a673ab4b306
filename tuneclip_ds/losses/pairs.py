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

Few operations per hop (on GPUs each is a kernel launch, and at hundreds of ranks the launches, not
the arithmetic, bound the loss): everything a hop carries travels in one buffer (``ring_blocks``),
both directions' tiles are computed together, stacked as ``[2, a, c]``, and each loss writes out the
derivatives of its pair value (``PairTerms``) instead of differentiating the tile with autograd.
Sums over a tile's columns are accumulated by a matrix product with a column of ones, in place.
``profile.ops_per_hop`` counts the operations.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from tuneclip_ds.losses.ring import GroupInfo, ring_blocks


class PairTerms:
    """The pair values ``v_ij`` of a similarity tile and their derivatives, each computed when first
    asked for. A subclass per loss defines the tiles ``value``, ``by_scale`` (dv/dscale; None if v
    ignores it) and ``by_bias`` (dv/dbias; None if v ignores it), and ``by_similarity`` (dv/ds_ij), a
    tile or a tensor that broadcasts over it. ``positive`` broadcasts over the tile (a column [a, 1] for
    row anchors, a row [1, c] for column anchors); ``same_label`` [a, c] bool (None without labels);
    ``excluded`` [a, c] bool: the anchors' own pairs, which a loss that excludes them must give the
    reduction's empty value and zero derivatives (None: none in this tile)."""

    by_scale = None
    by_bias = None

    def __init__(self, similarity, positive, scale, bias, same_label, excluded):
        self.similarity, self.positive, self.scale, self.bias = similarity, positive, scale, bias
        self.same_label, self.excluded = same_label, excluded


@dataclass(frozen=True)
class PairReduction:
    """How a loss reduces the pairs of one anchor to its row statistic R_i."""

    pair_terms: Callable[..., PairTerms]  # (similarity, positive, scale, bias, same_label, excluded)
    logsumexp: bool  # R_i = log sum_j exp(v_ij); otherwise R_i = sum_j v_ij
    exclude_positive: bool  # leave out the anchor's own pair j == i
    both_directions: bool  # image and text anchors; otherwise image anchors only
    count_positive_values: bool = False  # count the pairs with v_ij > 0 (a pass over every tile)
    subtracts_positive: bool = False  # v depends on s_ii, through s_ij - s_ii: dv/ds_ii = -dv/ds_ij
    # The pair values get s_ii - positive_shift as the positive: HGCL's margin, taken once per call
    # rather than once per tile.
    positive_shift: float = 0.0

    def __post_init__(self):
        if not self.both_directions and (self.logsumexp or self.subtracts_positive):
            raise ValueError("one direction is supported for a sum of pair values that ignore the positive")

    @property
    def num_directions(self) -> int:
        return 2 if self.both_directions else 1

    @property
    def anchor_grads_in_forward(self) -> bool:
        """For a sum over one direction (SigLIP), dR_i/dv_ij = 1 needs no upstream gradient: the
        forward can take the anchors' gradient from the tiles it computes anyway, up to a factor per
        row, and the backward then skips recomputing them (these rows have no other role)."""
        return not self.both_directions

    @property
    def empty_value(self) -> float:
        """The value that contributes nothing to the reduction."""
        return -math.inf if self.logsumexp else 0.0

    @property
    def backward_sides(self) -> tuple[int, ...]:
        """The modalities whose tiles the backward recomputes (0: this rank's images against the visiting
        texts, 1: its texts against the visiting images); side 0 is done in forward for a sum over one
        direction."""
        return (0, 1) if self.both_directions else (1,)


@dataclass(frozen=True)
class LossInputs:
    """One rank's loss inputs in the compute dtype (float32, or float64 for float64 features).

    Casting once here makes autograd sum every gradient of a feature in the compute dtype and round
    to the input dtype once. Ring blocks travel in ``wire_dtype``, the features' own dtype, which
    is lossless since they were cast up from it, and the tiles' products run in it: for 16-bit
    features 16-bit products, as open_clip's logits under autocast, with everything element-wise
    (exp, log-sum-exp, hinge, statistics, accumulators) in the compute dtype.
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

    All ranks must call it, with the same ``b`` (``RingLoss.checked_group_info`` checks it), all
    with labels or all without, and, in backward, call backward together.
    """
    return _PairStatistics.apply(
        reduction, tile_size, info, inputs.wire_dtype,
        inputs.image, inputs.text, inputs.positive - reduction.positive_shift if reduction.positive_shift else
        inputs.positive, inputs.scale, inputs.bias, labels,
    )


def same_label_counts(labels: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """For each of this rank's samples, how many samples of the global batch share its label (itself
    included). The label blocks travel around the ring; each is sorted once and searched, so nothing
    larger than a block is made: the count of labels up to y, minus the count up to y - 1."""
    bounds = torch.stack([labels, labels - 1])
    positions = torch.zeros_like(bounds)
    for _, (visiting,) in ring_blocks((labels,), info):
        positions += torch.searchsorted(visiting.sort().values, bounds, right=True)
    return positions[0] - positions[1]


class _PairStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reduction, tile_size, info, wire_dtype, image, text, positive, scale, bias, labels):
        directions = range(reduction.num_directions)
        features = (image, text)
        anchors = torch.stack([features[d] for d in directions])  # [directions, b, d]
        stats = image.new_full((len(directions), image.shape[0]), reduction.empty_value)
        active = torch.zeros(len(directions), dtype=torch.int64, device=image.device)
        anchor_grads = _AnchorGrads.zeros(anchors, bias) if reduction.anchor_grads_in_forward else None
        rows = _row_tiles(_in_dtype(anchors, wire_dtype), positive, stats[..., None], labels, tile_size, anchor_grads)
        context = _TileContext(reduction, scale, bias)
        column_blocks = torch.stack([features[1 - d] for d in directions]).to(wire_dtype)
        ring = ring_blocks(_with_labels(column_blocks, labels), info)
        del column_blocks  # the ring alone holds the blocks: freed once packed
        for source, (columns, *column_labels) in ring:
            for row in rows:
                for tile in _column_tiles(row, columns, column_labels, tile_size, source == info.rank):
                    context.add_tile_statistics(row, tile, active)
        ctx.reduction, ctx.tile_size, ctx.info, ctx.wire_dtype = reduction, tile_size, info, wire_dtype
        ctx.anchor_grads = anchor_grads
        ctx.save_for_backward(image, text, positive, scale, bias, stats, labels)
        ctx.mark_non_differentiable(active)
        return stats, active

    @staticmethod
    def backward(ctx, grad_stats, _grad_active):
        image, text, positive, scale, bias, stats, labels = ctx.saved_tensors
        sides = ctx.reduction.backward_sides
        features = (image.detach(), text.detach())
        grads = _ScalarGrads.zeros(positive, scale, bias)
        grad_features = [torch.zeros_like(f) for f in features]
        if ctx.anchor_grads is not None:  # side 0's tiles were differentiated in forward
            ctx.anchor_grads.apply(grad_stats[0], grad_features[0], grads)
        local = torch.stack([features[s] for s in sides])  # [sides, b, d]
        grad_local = torch.zeros_like(local)
        rows = _row_tiles(_in_dtype(local, ctx.wire_dtype), positive.detach(), stats[..., None], labels, ctx.tile_size,
                          grads=(grad_stats[..., None], grad_local, grads))
        context = _TileContext(ctx.reduction, scale.detach(), None if bias is None else bias.detach())
        payload = _with_labels(_column_payload(features, positive, stats, grad_stats, sides, ctx.wire_dtype), labels)
        ring = ring_blocks(payload, ctx.info)
        del payload  # the ring alone holds the blocks: freed once packed
        for source, (columns, *anchors_and_labels) in ring:
            column_anchors, column_labels = anchors_and_labels[:3], anchors_and_labels[3:]
            for row in rows:
                for tile in _column_tiles(row, columns, column_labels, ctx.tile_size, source == ctx.info.rank,
                                          column_anchors):
                    context.add_tile_grads(row, tile, grads)
        for index, side in enumerate(sides):
            grad_features[side] += grad_local[index]
        return (None, None, None, None, *grad_features, *grads.result(bias))


def _with_labels(block, labels: torch.Tensor | None) -> tuple:
    """A ring block (a tensor or a tuple of them) with this rank's labels, if any, as its last tensor,
    shaped [1, b] for the columns of a tile: they travel with the features."""
    block = block if isinstance(block, tuple) else (block,)
    return block if labels is None else (*block, labels[None])


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _add_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``total += left @ right`` (batched), the product in the dtype of ``right`` (features): in place in one
    operation when ``total`` has it too; else (16-bit features, a float32 total, which ``baddbmm_`` does not
    mix) a 16-bit product of ``left`` rounded to it, then added."""
    if total.dtype == right.dtype:
        total.baddbmm_(left, right)
    else:
        total += torch.bmm(left.to(right.dtype), right)


def _column_payload(features, positive, stats, grad_stats, sides, wire_dtype) -> tuple[torch.Tensor, ...]:
    """What the backward ring carries, in the layout the receiving rank's tiles need for its columns:
    the features each of its sides meets [sides, b, d] (wire dtype), and of the anchors among these
    columns (direction ``1 - side``) the positives [1, 1, b], R and dLoss/dR [sides, 1, b]."""
    directions = [1 - side for side in sides]
    return (
        torch.stack([features[d] for d in directions]).to(wire_dtype),
        positive.detach()[None, None],
        stats[directions, None],
        grad_stats[directions, None],
    )


@dataclass(frozen=True)
class _RowTile:
    """One tile's worth of this rank's anchors (its rows), for every direction or side at once, and the
    accumulators the tiles of its rows add to."""

    span: slice  # the rows in the local batch
    features: torch.Tensor  # [n, a, d], in the features' own dtype (the products')
    positive: torch.Tensor  # [1, a, 1]
    stats: torch.Tensor  # [n, a, 1]: in forward, updated in place; in backward R of these anchors
    labels: torch.Tensor | None  # [a, 1]
    anchor_grads: "_AnchorGrads | None" = None  # forward: updated in place
    grad_stats: torch.Tensor | None = None  # [n, a, 1], backward: dLoss/dR of these anchors
    grad_features: torch.Tensor | None = None  # [n, a, d], backward: updated in place
    grad_positive: torch.Tensor | None = None  # [2, a, 1], backward: updated in place


def _row_tiles(features, positive, stats, labels, tile_size, anchor_grads=None, grads=None) -> list[_RowTile]:
    """The row tiles of ``features`` [n, b, d] and the views of the per-anchor tensors that go with
    them, made once per call. ``grads``: in backward, dLoss/dR [n, b, 1], the features' gradient
    [n, b, d] and the ``_ScalarGrads``."""
    tiles = []
    for start in range(0, features.shape[1], tile_size):
        span = slice(start, min(start + tile_size, features.shape[1]))
        backward = () if grads is None else (grads[0][:, span], grads[1][:, span], grads[2].positive_rows[:, span])
        tiles.append(_RowTile(
            span, features[:, span], positive[None, span, None], stats[:, span],
            None if labels is None else labels[span, None],
            None if anchor_grads is None else anchor_grads.rows(span), *backward,
        ))
    return tiles


@dataclass(frozen=True)
class _ColumnTile:
    """One tile's worth of a visiting block's samples (its columns)."""

    features: torch.Tensor  # [n, c, d]
    labels: torch.Tensor | None  # [1, c]
    excluded: torch.Tensor | None  # [a, c] bool: the rows' own pairs, if the tile has any
    anchors: tuple | None  # backward: positives [1, 1, c], R and dLoss/dR [n, 1, c] of the column anchors


def _column_tiles(row: _RowTile, columns, column_labels, tile_size, is_local_block, anchors=()):
    """The column tiles of a visiting block against ``row``; the whole block, without any operation,
    when it is no wider than ``tile_size``."""
    labels = column_labels[0] if column_labels else None
    width = columns.shape[1]
    if width <= tile_size:
        pieces = [(slice(0, width), columns, labels, anchors)]
    else:
        spans = [slice(start, min(start + tile_size, width)) for start in range(0, width, tile_size)]
        label_pieces = [None] * len(spans) if labels is None else labels.split(tile_size, dim=1)
        anchor_pieces = list(zip(*(t.split(tile_size, dim=2) for t in anchors))) or [()] * len(spans)
        pieces = zip(spans, columns.split(tile_size, dim=1), label_pieces, anchor_pieces)
    for span, features, tile_labels, tile_anchors in pieces:
        excluded = _positive_mask(row.span, span, columns.device) if is_local_block else None
        yield _ColumnTile(features, tile_labels, excluded, tile_anchors)


def _positive_mask(rows: slice, columns: slice, device) -> torch.Tensor | None:
    """True where a row sample meets its own column (equal positions in the block); None for a tile
    without any."""
    if max(rows.start, columns.start) >= min(rows.stop, columns.stop):
        return None
    row_positions = torch.arange(rows.start, rows.stop, device=device)[:, None]
    return row_positions == torch.arange(columns.start, columns.stop, device=device)[None, :]


class _TileContext:
    """What every tile of one call shares: the reduction, the scale and bias, and columns of ones."""

    def __init__(self, reduction: PairReduction, scale, bias):
        self.reduction, self.scale, self.bias = reduction, scale, bias
        self._ones = {}

    def ones_column(self, tile: torch.Tensor) -> torch.Tensor:
        """[n, c, 1] ones for a tile [n, a, c]: the tile times it is the sum over its columns, which
        ``baddbmm_`` adds in place in one operation. Made once per shape."""
        shape = (tile.shape[0], tile.shape[2], 1)
        if shape not in self._ones:
            self._ones[shape] = tile.new_ones(shape)
        return self._ones[shape]

    def similarity(self, row: _RowTile, tile: _ColumnTile) -> torch.Tensor:
        """The tile's similarities [n, a, c] in the compute dtype, from a product in the features' dtype."""
        return _in_dtype(torch.bmm(row.features, tile.features.mT), self.scale.dtype)

    def terms(self, row: _RowTile, tile: _ColumnTile, similarity, positive) -> PairTerms:
        same_label = None if row.labels is None else row.labels == tile.labels
        excluded = tile.excluded if self.reduction.exclude_positive else None
        return self.reduction.pair_terms(similarity, positive, self.scale, self.bias, same_label, excluded)

    def add_tile_statistics(self, row: _RowTile, tile: _ColumnTile, active) -> None:
        """Combine the tile of ``row``'s anchors against ``tile``'s columns into the row statistics (in
        place), the count ``active`` and the row's anchor gradients if any."""
        terms = self.terms(row, tile, self.similarity(row, tile), row.positive)
        values = terms.value
        if self.reduction.count_positive_values:
            active += (values > 0).sum((1, 2))
        if self.reduction.logsumexp:
            torch.logaddexp(row.stats, values.logsumexp(dim=2, keepdim=True), out=row.stats)
        else:
            row.stats.baddbmm_(values, self.ones_column(values))
        if row.anchor_grads is not None:
            row.anchor_grads.add_tile(terms, tile.features, self.ones_column(values))

    def add_tile_grads(self, row: _RowTile, tile: _ColumnTile, grads: "_ScalarGrads") -> None:
        """Add the gradients of the tile of this rank's features ``row`` against the visiting ``tile`` to
        ``row.grad_features`` and ``grads``. The rows play two roles: anchors of direction ``side`` (with
        both directions), and columns for the visiting anchors of direction ``1 - side``; one recomputed
        similarity tile serves both."""
        reduction = self.reduction
        similarity = self.similarity(row, tile)
        column_positive, column_stats, column_grads = tile.anchors
        column_terms = self.terms(row, tile, similarity, column_positive)
        grad_similarity = None
        if reduction.both_directions:  # the scale and bias of these anchors' pairs are this rank's share
            row_terms = column_terms
            if reduction.subtracts_positive:
                row_terms = self.terms(row, tile, similarity, row.positive)
            grad_similarity = self._row_grad(row_terms, row.stats, row.grad_stats, grads)
            del row_terms  # its tiles are freed before the column role makes its own
            if reduction.subtracts_positive:  # dv/ds_ii = -dv/ds_ij: summed here, negated at the end
                row.grad_positive.baddbmm_(grad_similarity, self.ones_column(grad_similarity))
        weights = _pair_weights(reduction, column_terms, column_stats, column_grads)
        if grad_similarity is None:
            grad_similarity = weights * column_terms.by_similarity
        else:
            grad_similarity.addcmul_(weights, column_terms.by_similarity)
        _add_product(row.grad_features, grad_similarity, tile.features)

    def _row_grad(self, terms: PairTerms, stats, grad_stats, grads: "_ScalarGrads") -> torch.Tensor:
        """dLoss/d``similarity`` through the row anchors' statistics, adding their share of the scale and
        bias gradients to ``grads``."""
        weights = _pair_weights(self.reduction, terms, stats, grad_stats)
        if not self.reduction.logsumexp:
            weights = weights.expand_as(terms.value)
        for total, slope in ((grads.scale, terms.by_scale), (grads.bias, terms.by_bias)):
            if slope is not None:
                total += torch.tensordot(weights, slope, dims=weights.dim())
        if self.reduction.logsumexp:
            return weights.mul_(terms.by_similarity)  # the weights are a tile of their own
        return weights * terms.by_similarity


def _pair_weights(reduction, terms: PairTerms, stats, grad_stats):
    """dLoss/dv = dLoss/dR * dR/dv (a softmax weight for log-sum-exp, 1 for a sum: then the values are
    not computed); ``stats`` and ``grad_stats`` of the anchors broadcast over the tile like their
    positives."""
    if reduction.logsumexp:
        return (terms.value - stats).exp_().mul_(grad_stats)  # in place: one tile instead of three
    return grad_stats


@dataclass
class _ScalarGrads:
    """The gradients of this rank's positives (by side, summed at the end), scale and bias."""

    positive_rows: torch.Tensor  # [2, b, 1]: sum_j dLoss/ds_ij of the rows' anchors
    scale: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, positive, scale, bias) -> "_ScalarGrads":
        return cls(positive.new_zeros(2, len(positive), 1), torch.zeros_like(scale),
                   None if bias is None else torch.zeros_like(bias))

    def result(self, bias) -> tuple:
        """The gradients of (positive, scale, bias, labels) for ``_PairStatistics.backward``."""
        return -self.positive_rows.sum(dim=(0, 2)), self.scale, None if bias is None else self.bias, None


@dataclass
class _AnchorGrads:
    """dR_i/d(features, scale, bias) of each anchor row of a sum reduction over one direction, gathered
    in forward (see ``PairReduction.anchor_grads_in_forward``)."""

    features: torch.Tensor  # [1, b, d]
    scale: torch.Tensor  # [1, b, 1]
    bias: torch.Tensor | None  # [1, b, 1]

    @classmethod
    def zeros(cls, anchors: torch.Tensor, bias) -> "_AnchorGrads":
        per_row = anchors.new_zeros(1, anchors.shape[1], 1)
        return cls(torch.zeros_like(anchors), per_row, None if bias is None else torch.zeros_like(per_row))

    def rows(self, span: slice) -> "_AnchorGrads":
        """Views of the rows ``span``."""
        return _AnchorGrads(*(None if t is None else t[:, span] for t in (self.features, self.scale, self.bias)))

    def add_tile(self, terms: PairTerms, columns: torch.Tensor, ones_column: torch.Tensor) -> None:
        _add_product(self.features, terms.by_similarity, columns)
        for total, slope in ((self.scale, terms.by_scale), (self.bias, terms.by_bias)):
            if total is not None and slope is not None:
                total.baddbmm_(slope, ones_column)

    def apply(self, grad_rows, grad_features, grads: _ScalarGrads) -> None:
        """Add the gradients for the upstream dLoss/dR ``grad_rows`` [b]: per-row factors."""
        grad_features.addcmul_(grad_rows[:, None], self.features[0])
        grads.scale += grad_rows @ self.scale[0, :, 0]
        if self.bias is not None:
            grads.bias += grad_rows @ self.bias[0, :, 0]
