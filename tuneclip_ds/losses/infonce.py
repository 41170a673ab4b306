"""InfoNCE / CLIP loss, gather-free; equal to open_clip ``ClipLoss`` on the global batch."""

from tuneclip_ds.losses.base import RingLoss, global_value_with_local_gradient, with_zero_bias_gradient
from tuneclip_ds.losses.pairs import LossInputs, PairReduction, pair_statistics
from tuneclip_ds.losses.ring import all_reduce_sum


def _logits(similarity, positive, scale, bias):
    return scale * similarity


# R_i = logsumexp_j(t * s_ij) over all columns, the positive included.
_INFONCE = PairReduction(pair_value=_logits, logsumexp=True, exclude_positive=False, both_directions=True)


class InfoNCELoss(RingLoss):
    """Mean over the global batch and over both directions of ``logsumexp_j(t s_ij) - t s_ii``.

    ``logit_bias`` cancels in the softmax; it is accepted (and gets a zero gradient) so that models
    with a bias can be trained with this loss. See ``RingLoss`` for the value/gradient contract.
    """

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, sample_ids=None):
        info = self.group_info()
        inputs = LossInputs.prepare(image_features, text_features, logit_scale)
        stats, _ = pair_statistics(_INFONCE, inputs, self.tile_size, info)
        global_batch = inputs.local_batch * info.world_size
        local_share = (stats - inputs.scale * inputs.positive).sum() / (2 * global_batch)
        local_share = with_zero_bias_gradient(local_share, logit_bias)
        global_value = all_reduce_sum(local_share.detach().clone(), info)
        return global_value_with_local_gradient(global_value, local_share, info.world_size)
