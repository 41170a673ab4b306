"""SigLIP sigmoid loss, gather-free; equal to open_clip ``SigLipLoss`` on the global batch.

``-1/B * sum_ij log sigmoid(z_ij (t s_ij + bias))`` with ``z_ii = 1`` and ``z_ij = -1``: since
``-log sigmoid(-x) = softplus(x)``, each image anchor contributes ``sum_{j != i} softplus(t s_ij + bias)``
over the negatives (the ring statistic) plus ``softplus(-(t s_ii + bias))`` for its positive.
With ``same_label_positives``, ``z_ij = 1`` also for the pairs of one class (SigLIP's own
multi-positive form: each pair is an independent binary label), ``softplus(-(t s_ij + bias))``.
"""

import torch
import torch.nn.functional as F

from tuneclip_ds.losses.base import RingLoss, global_value_with_local_gradient
from tuneclip_ds.losses.pairs import LossInputs, PairReduction, pair_statistics
from tuneclip_ds.losses.ring import all_reduce_sum


def _pair_loss(similarity, positive, scale, bias, same_label):
    """``softplus(-z_ij logit_ij)``: ``z = -1`` for a negative, ``+1`` for a pair of one class."""
    logits = scale * similarity
    logits = logits if bias is None else logits + bias
    return F.softplus(logits if same_label is None else torch.where(same_label, -logits, logits))


_SIGLIP = PairReduction(pair_value=_pair_loss, logsumexp=False, exclude_positive=True, both_directions=False)


class SigLipLoss(RingLoss):
    """Sigmoid loss over all pairs of the global batch, divided by the global batch size (the
    normalisation of open_clip ``SigLipLoss`` with ``world_size=1``; its distributed form, averaged
    over ranks, is the same). A missing ``logit_bias`` counts as 0. See ``RingLoss`` for the
    value/gradient contract."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, sample_ids=None, labels=None):
        info = self.group_info()
        inputs = LossInputs.prepare(image_features, text_features, logit_scale, logit_bias)
        other_pairs, _ = pair_statistics(_SIGLIP, inputs, self.tile_size, info, self.pair_labels(labels))
        positive_logits = inputs.scale * inputs.positive
        if inputs.bias is not None:
            positive_logits = positive_logits + inputs.bias
        global_batch = inputs.local_batch * info.world_size
        local_share = (other_pairs.sum() + F.softplus(-positive_logits).sum()) / global_batch
        global_value = all_reduce_sum(local_share.detach().clone(), info)
        return global_value_with_local_gradient(global_value, local_share, info.world_size)
