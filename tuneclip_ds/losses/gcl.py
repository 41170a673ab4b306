"""GCL (SogCLR / FastCLIP v1) and HGCL (TuneCLIP), gather-free, with sharded estimators.

For each anchor ``i`` (image anchors against texts and text anchors against images)

    g_i = 1/(B-1) * sum_{j != i} exp(h(s_ij - s_ii) / tau),   tau = 1 / logit_scale,

with the pairwise function ``h``: ``linear`` (GCL) or ``hinge_sq``, ``[x + margin]_+^2`` (HGCL).
With ``same_label_positives`` the pairs of one class are no negatives: the sum runs over the
samples of other classes and ``B - 1`` becomes their number (the mean over the anchor's negatives,
as SogCLR defines ``g``). A global batch of one class has none: its loss is NaN, and it is
skipped like any non-finite batch (``metrics`` warns of it: ``forward`` does not wait for the host).
``u_i`` tracks ``g_i`` across steps (``estimators.py``); everything is kept in log space so that
``exp(h / tau)`` never overflows. Reported loss: ``tau/B * sum_i log(eps + u_i)``; gradient: that
of the surrogate ``tau/B * sum_i g_i / stopgrad(eps + u_i)``, with ``u`` already updated with this
step's ``g``; both averaged over the two directions. The table keeps the new ``u`` only when the
whole global batch is finite; otherwise the loss is NaN and the table is left as it was.
"""

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property, partial

import torch

from tuneclip_ds.losses.base import RingLoss, global_value_with_local_gradient, with_zero_bias_gradient
from tuneclip_ds.losses.estimators import EstimatorTable
from tuneclip_ds.losses.pairs import LossInputs, PairReduction, PairTerms, pair_statistics, same_label_counts
from tuneclip_ds.losses.ring import all_reduce_max, all_reduce_sum

logger = logging.getLogger(__name__)

Pairwise = Callable[[torch.Tensor], torch.Tensor]


def linear(difference: torch.Tensor) -> torch.Tensor:
    return difference


def hinge_squared(difference: torch.Tensor, margin: float) -> torch.Tensor:
    """Zero (no gradient) for a negative already ``margin`` below its positive."""
    return (difference + margin).clamp_min_(0).square_()


def make_pairwise(name: str, margin: float = 0.1) -> Pairwise:
    """The pairwise function ``h(s_ij - s_ii)`` called ``name``: ``linear`` or ``hinge_sq``."""
    if name == "linear":
        return linear
    if name == "hinge_sq":
        return partial(hinge_squared, margin=margin)
    raise ValueError(f"unknown pairwise function {name!r}; available: linear, hinge_sq")


class _ScaledPairwiseTerms(PairTerms):
    """``v = t h(s_ij - s_ii)``, -inf for the pairs that are no negatives; a subclass per ``h`` gives
    ``by_scale`` (h) and ``by_similarity`` (t h')."""

    @cached_property
    def difference(self):
        return self.similarity - self.positive

    @cached_property
    def value(self):
        values = self.by_scale * self.scale
        for not_negative in (self.same_label, self.excluded):
            if not_negative is not None:
                values.masked_fill_(not_negative, -math.inf)
        return values


class _LinearTerms(_ScaledPairwiseTerms):
    @property
    def by_scale(self):
        return self.difference

    @property
    def by_similarity(self):
        return self.scale


class _HingeSquaredTerms(_ScaledPairwiseTerms):
    """``h = [x + margin]_+^2``; the positive comes shifted by the margin (``PairReduction.positive_shift``),
    so ``difference`` is ``x + margin``."""

    @cached_property
    def _hinge(self):
        return self.difference.clamp_min_(0)

    @cached_property
    def by_scale(self):
        return self._hinge.square()

    @cached_property
    def by_similarity(self):
        return self._hinge * (2 * self.scale)


class _CustomTerms(_ScaledPairwiseTerms):
    """For a pairwise function of the user's: its derivative by autograd (it must act element-wise)."""

    def __init__(self, pairwise: Pairwise, *tile):
        super().__init__(*tile)
        self.pairwise = pairwise

    @cached_property
    def _pairwise_and_slope(self):
        with torch.enable_grad():
            difference = self.difference.detach().requires_grad_()
            pairwise = self.pairwise(difference)
            slope, = torch.autograd.grad(pairwise.sum(), difference)
        return pairwise.detach(), slope

    @property
    def by_scale(self):
        return self._pairwise_and_slope[0]

    @cached_property
    def by_similarity(self):
        return self._pairwise_and_slope[1] * self.scale


def _pair_reduction(pairwise: str | Pairwise, margin: float) -> PairReduction:
    """The reduction of GCL's pairs with the pairwise function ``pairwise``."""
    if pairwise == "linear":
        terms, shift = _LinearTerms, 0.0
    elif pairwise == "hinge_sq":
        terms, shift = _HingeSquaredTerms, margin
    elif callable(pairwise):
        terms, shift = partial(_CustomTerms, pairwise), 0.0
    else:
        raise ValueError(f"unknown pairwise function {pairwise!r}; available: linear, hinge_sq, or a callable")
    return PairReduction(
        pair_terms=terms,
        logsumexp=True,
        exclude_positive=True,
        both_directions=True,
        count_positive_values=True,  # for the inside-margin fraction of metrics()
        subtracts_positive=True,
        positive_shift=shift,
    )


def gamma_schedule(epoch: float, gamma_min: float = 0.8, decay_epochs: float = 1.0) -> float:
    """FastCLIP's cosine decay of the moving-average rate from 1 at epoch 0 to ``gamma_min`` at
    ``decay_epochs``, constant afterwards. ``epoch`` (fractional allowed) counts from the start of
    the whole run, stage I included, so that the schedule does not restart at stage II."""
    if epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))


class GlobalContrastiveLoss(RingLoss):
    """GCL with a pluggable pairwise function (``pairwise="hinge_sq"``: HGCL).

    Args:
        pairwise: ``"linear"``, ``"hinge_sq"`` or a callable mapping ``s_ij - s_ii`` to ``h``.
        margin: margin of ``hinge_sq``.
        gamma: moving-average rate of ``u``; set ``loss.gamma`` every step, e.g. from
            ``gamma_schedule``.
        eps: added to ``u`` in the denominator and in the reported loss.
        tile_size, group: see ``RingLoss``.

    ``forward`` needs ``sample_ids`` (dataset ids, [b] integers) and a global batch of at least 2.
    ``logit_bias`` is not used (it gets a zero gradient). The gradient with respect to the logit
    scale is that of the surrogate, ``tau = 1/logit_scale`` included; freeze the scale for a fixed
    temperature. See ``RingLoss`` for the value/gradient contract. ``state_dict`` /
    ``load_state_dict`` hold the estimators keyed by sample id (see ``EstimatorTable``).
    """

    def __init__(
        self,
        pairwise: str | Pairwise = "linear",
        margin: float = 0.1,
        gamma: float = 1.0,
        eps: float = 1e-14,
        tile_size: int = 1024,
        group=None,
        topology: str = "ring",
        same_label_positives: bool = False,
    ):
        super().__init__(tile_size, group, topology, same_label_positives)
        self.reduction = _pair_reduction(pairwise, margin)
        self.gamma = gamma
        self.eps = eps
        self.estimators = EstimatorTable(num_directions=2)
        self._last_statistics = None
        self._one_class_batches = None  # [] on the device: labelled global batches without negatives
        self._one_class_batches_warned = 0

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, sample_ids=None, labels=None):
        if sample_ids is None:
            raise ValueError("GlobalContrastiveLoss needs the sample_ids of the batch")
        labels = self.pair_labels(labels)
        inputs = LossInputs.prepare(image_features, text_features, logit_scale)
        info = self.checked_group_info(inputs.local_batch, inputs.image.device)
        log_sum, active_pairs = pair_statistics(self.reduction, inputs, self.tile_size, info, labels)
        global_batch = inputs.local_batch * info.world_size  # the same on every rank: checked_group_info
        if global_batch < 2:
            raise ValueError("GlobalContrastiveLoss needs a global batch of at least 2 samples")
        negatives = self._negatives_per_anchor(labels, inputs, global_batch, info)
        log_g = log_sum - (math.log(global_batch - 1) if labels is None else negatives.to(log_sum).log())  # [2, b]
        ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=image_features.device)
        with torch.no_grad():
            log_u, pending = self.estimators.update(ids, log_g.detach().T, self.gamma, info)
            log_u = log_u.T
        log_denominator = torch.logaddexp(log_u, torch.full_like(log_u, math.log(self.eps)))  # log(eps + u)
        tau = 1.0 / inputs.scale
        surrogate = tau * torch.exp(log_g - log_denominator).mean(dim=0).sum() / global_batch
        surrogate = with_zero_bias_gradient(surrogate, logit_bias)
        reported = tau.detach() * log_denominator.mean(dim=0).sum() / global_batch
        global_value, finite = self._reduce_statistics(reported, log_u, log_g, active_pairs, negatives, global_batch,
                                                       info)
        if labels is not None:
            self._count_one_class_batches()
        self.estimators.commit(pending, finite)
        return global_value_with_local_gradient(global_value.to(reported.dtype), surrogate, info.world_size)

    def _negatives_per_anchor(self, labels, inputs: LossInputs, global_batch: int, info) -> torch.Tensor:
        """How many negatives each of this rank's anchors has in the global batch: ``B - 1``, or with labels
        the samples of other classes."""
        if labels is None:
            return torch.full((inputs.local_batch,), global_batch - 1, dtype=torch.int64, device=inputs.image.device)
        return global_batch - same_label_counts(labels, info)

    def _count_one_class_batches(self) -> None:
        """Count the last global batch if it has no negative pair (all-reduced: the same on every rank), for
        ``metrics`` to warn of: a warning here would wait for the device."""
        one_class = self._last_statistics[0][4] == 0
        if self._one_class_batches is None:
            self._one_class_batches = one_class.long()
        else:
            self._one_class_batches += one_class

    def _reduce_statistics(self, reported, log_u, log_g, active_pairs, negatives, global_batch, info):
        """Global reported loss, kept with the metrics' statistics: two small all_reduces, in float64
        so that pair counts stay exact. The sums also tell every rank whether the whole global batch
        is finite (the loss, every ``g`` and ``u``); if not, the loss is NaN, so the trainer's finite
        check and the estimators' commit always agree."""
        negative_pairs = 2 * negatives.sum()  # both directions
        sums = all_reduce_sum(
            torch.stack([x.double() for x in (reported, log_u.sum(), active_pairs.sum(), log_g.detach().sum(),
                                              negative_pairs)]), info
        )
        extremes = all_reduce_max(torch.stack([-log_u.min(), log_u.max()]).double(), info)
        self._last_statistics = (sums, extremes, global_batch)
        finite = torch.isfinite(sums).all()
        return torch.where(finite, sums[0], torch.nan), finite

    def metrics(self) -> dict[str, float]:
        """Statistics of the last forward's global batch (under gradient accumulation, the step's last
        micro-batch), not of the whole estimator table, which would cost a pass over it every step:

        * ``batch_log_u_mean/min/max``: of the batch samples' ``log u`` after this step's update,
          both directions;
        * ``inside_margin_fraction``: the fraction of the batch's negative pairs (``j != i``, of another
          class with ``same_label_positives``; both directions) with ``h(s_ij - s_ii) > 0``; for
          ``hinge_sq`` the negatives inside the margin, ``s_ij > s_ii - margin``, the only ones that get
          a gradient; for ``linear`` those more similar to the anchor than its positive.
        """
        if self._last_statistics is None:
            return {}
        self._warn_of_one_class_batches()
        sums, extremes, global_batch = self._last_statistics
        negative_pairs = sums[4].item()
        return {
            "batch_log_u_mean": sums[1].item() / (2 * global_batch),
            "batch_log_u_min": -extremes[0].item(),
            "batch_log_u_max": extremes[1].item(),
            "inside_margin_fraction": sums[2].item() / negative_pairs if negative_pairs else math.nan,
        }

    def _warn_of_one_class_batches(self) -> None:
        count = 0 if self._one_class_batches is None else int(self._one_class_batches)
        if count > self._one_class_batches_warned:
            logger.warning("%d global batch(es) of one class: with same_label_positives, %s has no negatives "
                           "and its loss is NaN", count - self._one_class_batches_warned, type(self).__name__)
            self._one_class_batches_warned = count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's estimators: ``ids`` [m] and ``log_u`` [m, 2] (image, text anchors), on CPU.
        Replaces ``nn.Module.state_dict``: the loss has no parameters."""
        return self.estimators.state_dict(self.group_info())

    def load_state_dict(self, state: Mapping | Iterable[Mapping]) -> None:
        """Load one state dict, or those of all ranks of a run with any world size; each rank keeps
        the ids it owns."""
        self.estimators.load_state_dict(state, self.group_info())
