"""Make ``import torchvision`` (and so ``import open_clip``) work on a CPU-only torch.

The registry's torchvision 0.28.0 is a CUDA build. With the CPU torch wheel its
compiled ``_C`` extension does not load, yet its ``_meta_registrations`` module
registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms`` without
checking, and the import fails with "operator torchvision::nms does not exist".
Declaring those two operator schemas first lets the import succeed; transforms
work, the compiled ops (``torchvision.ops.nms``, JPEG codecs) do not, which the
trainer never uses (images are decoded with PIL).

Nothing changes on a machine where torchvision's extension loads.
"""

import importlib.util
import os
import sys

import torch

_OPS_WITH_META_KERNELS = ("nms", "qnms")
_library = None  # kept alive: dropping the Library object would unregister the schemas


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision not installed: nothing to patch
    folder = os.path.dirname(spec.origin)
    candidates = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Declare the missing torchvision op schemas, once, when its extension cannot load."""
    global _library
    if _library is not None or "torchvision" in sys.modules or _extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for name in _OPS_WITH_META_KERNELS:
        _library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
