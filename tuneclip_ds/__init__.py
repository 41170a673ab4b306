"""tuneclip_ds: DeepSpeed fine-tuning of open-weight CLIP models with TuneCLIP."""

from tuneclip_ds._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
