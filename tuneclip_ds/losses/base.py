"""Interface shared by the gather-free losses."""

import torch
import torch.distributed as dist
from torch import nn

from tuneclip_ds.losses.ring import TOPOLOGIES, GroupInfo, check_equal_local_batch, resolve_group


class RingLoss(nn.Module):
    """Base of the gather-free contrastive losses.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, sample_ids=None, labels=None)``
    takes this rank's L2-normalised ``[b, d]`` features (every rank the same ``b``), the exponentiated
    logit scale (shape ``[]`` or ``[1]``), for the losses with per-sample state the dataset ids of
    this rank's samples, and their class labels, which count when the loss is built with
    ``same_label_positives`` (then pairs of one class are not negatives: each loss says how it treats
    them). It returns a scalar whose

    * value is the loss of the global batch (all ranks' samples), identical on every rank;
    * gradient with respect to this rank's features is ``W`` times the gradient of the global-batch
      loss with respect to them (``W`` ranks in the group), and with respect to the replicated
      ``logit_scale`` / ``logit_bias`` it is ``W`` times this rank's share of their global-batch
      gradient (the shares of all ranks sum to the global gradient).

    So the average over ranks that the DeepSpeed engine applies to parameter gradients yields
    exactly the gradient of the global-batch loss. Features are never all-gathered: blocks travel
    around a ring (see ``ring.py`` and ``pairs.py``); only scalars are all-reduced.
    """

    def __init__(self, tile_size: int = 1024, group: dist.ProcessGroup | None = None, topology: str = "ring",
                 same_label_positives: bool = False):
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
        self.tile_size = tile_size
        self.group = group
        self.topology = topology  # "ring", or "hierarchical": gathered in each node, a ring across nodes
        self.same_label_positives = same_label_positives
        self._checked_batches: set[tuple[int, int]] = set()  # (world size, local batch)

    def pair_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels that decide which pairs share a class: ``labels`` with ``same_label_positives``
        (then required), else None (every pair but a sample's own is a negative)."""
        if not self.same_label_positives:
            return None
        if labels is None:
            raise ValueError(f"{type(self).__name__} with same_label_positives needs the labels of the batch")
        return torch.as_tensor(labels, dtype=torch.int64)

    def group_info(self) -> GroupInfo:
        # Resolved per call: the loss may be built before torch.distributed is initialised.
        return resolve_group(self.group, self.topology)

    def checked_group_info(self, local_batch: int, device: torch.device) -> GroupInfo:
        """``group_info()``, after checking that every rank holds ``local_batch`` samples (``ValueError``
        on every rank otherwise): collectively, the first time this loss meets a local batch of this size,
        so that steps do not wait for the host. (Ranks whose sizes part later, one of them to a size met
        before, would fail in the ring instead; the data pipeline drops partial batches.)"""
        info = self.group_info()
        key = (info.world_size, local_batch)
        if key not in self._checked_batches:
            check_equal_local_batch(local_batch, info, device)
            self._checked_batches.add(key)
        return info

    def metrics(self) -> dict[str, float]:
        """Global-batch statistics of the last forward, for logging."""
        return {}


def global_value_with_local_gradient(global_value: torch.Tensor, local_share: torch.Tensor, world_size: int):
    """A scalar equal to ``global_value`` whose gradient is ``world_size`` times that of ``local_share``.

    ``local_share`` is this rank's part of the global objective (the parts of all ranks sum to it);
    the ring backward makes its gradient the full gradient of the global objective with respect to
    this rank's features.
    """
    return global_value + world_size * (local_share - local_share.detach())


def with_zero_bias_gradient(local_share: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
    """``local_share`` that also gives ``logit_bias`` a zero gradient. For losses that ignore the
    bias: every parameter of a model with a bias (SigLIP) then still gets a gradient."""
    return local_share if logit_bias is None else local_share + 0.0 * logit_bias.sum()
