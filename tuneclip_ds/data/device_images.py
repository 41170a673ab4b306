"""Images leave the data workers as uint8 and are converted and normalised on the device.

A float32 image is four times the bytes of its uint8 pixels: converting in the workers quadruples what
they pass to the main process, what is pinned and what is copied to the GPU, and spends the workers'
CPU time on arithmetic the GPU does for free. So the training transform is split where open_clip's
ends, ``[..., ToTensor, Normalize(mean, std)]``: the workers run everything before it and return the
pixels (``pil_to_tensor``), and ``to_model_input`` does ``x / 255``, ``(x - mean) / std`` on the device, the
same float32 operations in the same order (bit for bit the workers' result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 ``(pixels / 255 - mean) / std`` of uint8 ``pixels`` [..., C, H, W], where they are. Every
        divisor is a tensor on the pixels' device: CUDA divides by a Python number as a multiplication by its
        reciprocal, which can differ from the CPU's division in the last bit."""
        full_scale, mean, std = (torch.tensor(values, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
                                 for values in ((255.0,), self.mean, self.std))
        return pixels.to(torch.float32).div_(full_scale).sub_(mean).div_(std)


def split_normalization(transform) -> tuple[object, Normalization | None]:
    """``transform`` without its final tensor conversion and normalisation, returning uint8 pixels, and that
    normalisation; ``(transform, None)`` for a transform that does not end so (e.g. timm's random erasing
    works on normalised tensors), which then keeps producing float images in the workers."""
    from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, Compose) or len(steps) < 2:
        return transform, None
    to_tensor, normalize = steps[-2:]
    if not (isinstance(to_tensor, ToTensor) and isinstance(normalize, Normalize)):
        return transform, None
    pixels = Compose([*steps[:-2], PILToTensor()])
    return pixels, Normalization(tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))


def to_model_input(batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The batch's images on ``device`` in ``dtype``; uint8 pixels are copied as they are (asynchronously
    from pinned memory) and normalised there."""
    images = batch["image"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = batch["normalization"].apply(images)
    return images.to(dtype)
