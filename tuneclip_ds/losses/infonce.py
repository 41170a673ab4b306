"""InfoNCE / CLIP loss, gather-free; equal to open_clip ``ClipLoss`` on the global batch."""

from functools import cached_property

import torch

from tuneclip_ds.losses.base import RingLoss, global_value_with_local_gradient, with_zero_bias_gradient
from tuneclip_ds.losses.pairs import LossInputs, PairReduction, PairTerms, pair_statistics, same_label_counts
from tuneclip_ds.losses.ring import all_reduce_sum


class _LogitTerms(PairTerms):
    """v = t s_ij."""

    @cached_property
    def value(self):
        return self.similarity * self.scale

    @property
    def by_similarity(self):
        return self.scale

    @property
    def by_scale(self):
        return self.similarity


class _SameLabelTerms(PairTerms):
    """v = s_ij for the pairs of one class, 0 for the others."""

    @cached_property
    def value(self):
        return self.similarity * self.same_label

    @cached_property
    def by_similarity(self):
        return self.same_label.to(self.similarity.dtype).expand_as(self.similarity)


# R_i = logsumexp_j(t * s_ij) over all columns, the positive included.
_INFONCE = PairReduction(pair_terms=_LogitTerms, logsumexp=True, exclude_positive=False, both_directions=True)
# S_i = sum_{j: y_j = y_i} s_ij, image anchors: over the global batch, text anchors give the same sum (below).
_SAME_LABEL = PairReduction(pair_terms=_SameLabelTerms, logsumexp=False, exclude_positive=False,
                            both_directions=False)


class InfoNCELoss(RingLoss):
    """Mean over the global batch and over both directions of ``logsumexp_j(t s_ij) - t s_ii``.

    With ``label_smoothing`` e, the cross-entropy against (1 - e) on the positive plus e spread evenly
    over the N columns of the global batch, as ``torch.nn.functional.cross_entropy(label_smoothing=e)``:
    ``logsumexp_j(t s_ij) - (1 - e) t s_ii - e/N sum_j t s_ij``.

    With ``same_label_positives``, the target of an anchor is spread evenly over the columns of its
    class P(i) (its own pair included): ``logsumexp_j(t s_ij) - 1/|P(i)| sum_{p in P(i)} t s_ip``, the
    cross-entropy against soft targets of UniCL (image-text-label contrast) and SupCon's L_out; every
    column stays in the softmax. So an anchor is pulled towards the mean of its class's captions
    rather than pushed away from all but one of them. (With ``label_smoothing`` too, the targets are
    (1 - e) of that plus e/N each.) The sum over same-label pairs takes a second pass of the ring (over
    image anchors only: text anchors give the same total, since same-label pairs and their weights
    1/|P| are symmetric), and the class sizes |P(i)| a pass of the labels alone.

    ``logit_bias`` cancels in the softmax; it is accepted (and gets a zero gradient) so that models
    with a bias can be trained with this loss. See ``RingLoss`` for the value/gradient contract.
    """

    def __init__(self, tile_size: int = 1024, group=None, label_smoothing: float = 0.0, topology: str = "ring",
                 same_label_positives: bool = False):
        super().__init__(tile_size, group, topology, same_label_positives)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, sample_ids=None, labels=None):
        labels = self.pair_labels(labels)
        inputs = LossInputs.prepare(image_features, text_features, logit_scale)
        info = self.checked_group_info(inputs.local_batch, inputs.image.device)
        stats, _ = pair_statistics(_INFONCE, inputs, self.tile_size, info)
        global_batch = inputs.local_batch * info.world_size
        smoothing = self.label_smoothing
        matched = inputs.positive.sum() if labels is None else self._class_mean_similarities(inputs, labels, info)
        targets = (1 - smoothing) * 2 * matched  # both directions
        if smoothing:
            targets = targets + smoothing * _mean_similarity_share(inputs, info, global_batch)
        local_share = (stats.sum() - inputs.scale * targets) / (2 * global_batch)
        local_share = with_zero_bias_gradient(local_share, logit_bias)
        global_value = all_reduce_sum(local_share.detach().clone(), info)
        return global_value_with_local_gradient(global_value, local_share, info.world_size)

    def _class_mean_similarities(self, inputs: LossInputs, labels, info):
        """This rank's image anchors' mean similarity to the texts of their class, summed."""
        class_sums, _ = pair_statistics(_SAME_LABEL, inputs, self.tile_size, info, labels)
        return (class_sums[0] / same_label_counts(labels, info)).sum()


def _mean_similarity_share(inputs: LossInputs, info, global_batch: int):
    """This rank's anchors' ``1/N sum_j s_ij`` summed, both directions: the sums of all features (2 x d
    numbers, all-reduced; nothing that grows with the batch) against the local features. Its gradient is
    doubled (its value is not): each local feature is also a column of every anchor, whose share of the
    gradient, the same vector, is this."""
    local_sums = torch.stack([inputs.image.sum(0), inputs.text.sum(0)])
    image_sum, text_sum = all_reduce_sum(local_sums.detach().clone(), info)
    share = (local_sums[0] @ text_sum + local_sums[1] @ image_sum) / global_batch
    return 2 * share - share.detach()
