"""SigLIP sigmoid loss, gather-free; equal to open_clip ``SigLipLoss`` on the global batch.

``-1/B * sum_ij log sigmoid(z_ij (t s_ij + bias))`` with ``z_ii = 1`` and ``z_ij = -1``: since
``-log sigmoid(-x) = softplus(x)``, each image anchor contributes ``sum_{j != i} softplus(t s_ij + bias)``
over the negatives (the ring statistic) plus ``softplus(-(t s_ii + bias))`` for its positive.
With ``same_label_positives``, ``z_ij = 1`` also for the pairs of one class (SigLIP's own
multi-positive form: each pair is an independent binary label), ``softplus(-(t s_ij + bias))``.

The ring gets the image features scaled by ``t``: its tiles' similarities are then the logits less the
bias, and the scale's gradient follows by autograd from the image features' (one product per call instead
of two operations per tile). For 16-bit features the scaled images are rounded to 16 bits for the tiles'
products, as open_clip's logits are under autocast.
"""

from dataclasses import replace
from functools import cached_property

import torch
import torch.nn.functional as F

from tuneclip_ds.losses.base import RingLoss, global_value_with_local_gradient
from tuneclip_ds.losses.pairs import LossInputs, PairReduction, PairTerms, pair_statistics
from tuneclip_ds.losses.ring import all_reduce_sum


class _PairLossTerms(PairTerms):
    """``softplus(-z_ij logit_ij)``, ``logit = similarity + bias`` (the images come scaled by ``t``): ``z = -1``
    for a negative, ``+1`` for a pair of one class; 0 for an anchor's own pair, which the ring leaves out (it
    is added in forward)."""

    @cached_property
    def _signed_logits(self):
        logits = self.similarity if self.bias is None else self.similarity + self.bias
        return logits if self.same_label is None else torch.where(self.same_label, -logits, logits)

    @cached_property
    def value(self):
        return self._without_excluded(F.softplus(self._signed_logits))

    @cached_property
    def _slope(self):
        """dv/dlogit = -z sigmoid(-z logit)."""
        slope = self._signed_logits.sigmoid()
        return self._without_excluded(slope if self.same_label is None else torch.where(self.same_label, -slope, slope))

    def _without_excluded(self, tile):
        return tile if self.excluded is None else tile.masked_fill_(self.excluded, 0.0)

    @property
    def by_similarity(self):
        return self._slope

    @property
    def by_bias(self):
        return None if self.bias is None else self._slope


_SIGLIP = PairReduction(pair_terms=_PairLossTerms, logsumexp=False, exclude_positive=True, both_directions=False)


class SigLipLoss(RingLoss):
    """Sigmoid loss over all pairs of the global batch, divided by the global batch size (the
    normalisation of open_clip ``SigLipLoss`` with ``world_size=1``; its distributed form, averaged
    over ranks, is the same). A missing ``logit_bias`` counts as 0. See ``RingLoss`` for the
    value/gradient contract."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, sample_ids=None, labels=None):
        inputs = LossInputs.prepare(image_features, text_features, logit_scale, logit_bias)
        info = self.checked_group_info(inputs.local_batch, inputs.image.device)
        scaled = replace(inputs, image=inputs.image * inputs.scale)
        other_pairs, _ = pair_statistics(_SIGLIP, scaled, self.tile_size, info, self.pair_labels(labels))
        positive_logits = inputs.scale * inputs.positive
        if inputs.bias is not None:
            positive_logits = positive_logits + inputs.bias
        global_batch = inputs.local_batch * info.world_size
        local_share = (other_pairs.sum() + F.softplus(-positive_logits).sum()) / global_batch
        global_value = all_reduce_sum(local_share.detach().clone(), info)
        return global_value_with_local_gradient(global_value, local_share, info.world_size)
