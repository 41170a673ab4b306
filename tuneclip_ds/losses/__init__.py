"""Gather-free contrastive losses (see README.md, section "Losses": the ring and the estimators)."""

from functools import partial

from tuneclip_ds.losses.base import RingLoss
from tuneclip_ds.losses.gcl import GlobalContrastiveLoss, gamma_schedule, make_pairwise
from tuneclip_ds.losses.infonce import InfoNCELoss
from tuneclip_ds.losses.siglip import SigLipLoss

_LOSSES = {
    "infonce": InfoNCELoss,
    "clip": InfoNCELoss,
    "siglip": SigLipLoss,
    "gcl": partial(GlobalContrastiveLoss, pairwise="linear"),
    "hgcl": partial(GlobalContrastiveLoss, pairwise="hinge_sq"),
}


def build_loss(name: str, **kwargs) -> RingLoss:
    """The loss called ``name`` (one of ``available_losses()``), built with ``kwargs``."""
    try:
        factory = _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses())}") from None
    return factory(**kwargs)


def available_losses() -> list[str]:
    return sorted(_LOSSES)


__all__ = [
    "RingLoss",
    "InfoNCELoss",
    "SigLipLoss",
    "GlobalContrastiveLoss",
    "gamma_schedule",
    "make_pairwise",
    "build_loss",
    "available_losses",
]
