"""tuneclip_ds: DeepSpeed fine-tuning of open-weight CLIP models with TuneCLIP."""

import os

from tuneclip_ds._torchvision_compat import ensure_torchvision_importable

# Weights, tokenizers and Hugging Face text towers' configs come from local files only: with the hub offline,
# huggingface_hub and transformers read their cache and fail at once instead of downloading (or waiting on a
# network that is not there). Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ensure_torchvision_importable()

__version__ = "0.1.0"
