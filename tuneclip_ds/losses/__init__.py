"""Gather-free contrastive losses (see /work/shared/docs/method.md, sections 3 and 4)."""

from tuneclip_ds.losses.base import RingLoss
from tuneclip_ds.losses.infonce import InfoNCELoss

_LOSSES = {
    "infonce": InfoNCELoss,
    "clip": InfoNCELoss,
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


__all__ = ["RingLoss", "InfoNCELoss", "build_loss", "available_losses"]
