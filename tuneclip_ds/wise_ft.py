"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022): a fine-tuned model's weights
interpolated toward the weights its fine-tuning started from, with no further training::

    theta = (1 - alpha) * theta_start + alpha * theta_finetuned

alpha 1 is the fine-tuned model, alpha 0 the starting one; in between, the gains of fine-tuning are traded
against the robustness of the start (under distribution shift, on tasks fine-tuning did not see). A run's
starting weights are its ``model.pretrained`` (read from RUN_DIR/config.yaml), loaded as training loaded
them (``force_image_size`` included), so that alpha 0 gives them back bit for bit.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from tuneclip_ds.config import ModelConfig, load_model_config
from tuneclip_ds.errors import InputError, ModelLoadError

RUN_CONFIG = "config.yaml"  # written by the training command into the run directory
MAX_ALPHAS = 101  # each alpha is a full evaluation: more than 0:1:0.01 is surely a typo
SWEEP_FORMS = "give START:STOP:STEP (e.g. 0:1:0.1, STOP included) or a comma list (e.g. 0,0.5,1)"


def wise_ft(start: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
            alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * finetuned`` for every floating-point tensor; other tensors (integer
    buffers: token ids, counters) are the fine-tuned model's. The two state dicts must have the same keys and
    shapes. The result may share tensors with the inputs."""
    _check_matching(start, finetuned)
    return {name: _interpolate(start[name], tensor, alpha) for name, tensor in finetuned.items()}


def _interpolate(start: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    if not finetuned.is_floating_point():
        return finetuned
    if alpha in (0, 1):  # the models themselves: arithmetic would turn -0.0 into 0.0 and infinities into NaN
        return finetuned if alpha == 1 else start
    return torch.lerp(start.float(), finetuned.float(), alpha)  # a frozen parameter may be kept in bf16


def _check_matching(start: dict, finetuned: dict) -> None:
    problems = []
    for label, names in (("only in the starting weights", start.keys() - finetuned.keys()),
                         ("only in the fine-tuned weights", finetuned.keys() - start.keys()),
                         ("of other shapes", {name for name in start.keys() & finetuned.keys()
                                              if start[name].shape != finetuned[name].shape})):
        if names:
            shown = sorted(names)[:5]
            problems.append(f"{len(names)} tensor(s) {label} ({', '.join(shown)}{', ...' if len(names) > 5 else ''})")
    if problems:
        raise InputError("WiSE-FT needs the starting and fine-tuned weights of one architecture, but "
                         f"{'; '.join(problems)}: the run's {RUN_CONFIG} must name the model.name, "
                         "model.pretrained and model.force_image_size it was trained with")


def run_model_config(checkpoint: Path) -> ModelConfig:
    """The model section of the run that wrote ``checkpoint`` (RUN_DIR/checkpoints/step_*), which must name
    the pretrained weights the run started from."""
    path = checkpoint.parent.parent / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"{path} does not exist: WiSE-FT reads the weights a run started from (model.pretrained) "
                         f"in its {RUN_CONFIG}; give a run directory made by `python -m tuneclip_ds.train`, or a "
                         "checkpoint inside one (RUN_DIR/checkpoints/step_*)")
    model = load_model_config(path)
    if not model.pretrained:
        raise InputError(f"the run of {checkpoint} started from random weights (no model.pretrained in {path}): "
                         "WiSE-FT interpolates toward pretrained starting weights, so it does not apply; "
                         "export or evaluate the run without --wise-ft")
    return model


def run_start_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict the run of ``checkpoint`` started from, built as training built it (logit_scale
    with shape [1], as in the checkpoints)."""
    from tuneclip_ds.models import build_model

    model = run_model_config(checkpoint)
    try:
        return build_model(model).model.state_dict()
    except ModelLoadError as error:
        raise ModelLoadError(f"the run's starting weights ({checkpoint.parent.parent / RUN_CONFIG}): {error}") from None


def parse_alpha(text: str) -> float:
    """One alpha in [0, 1]."""
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not 0 <= alpha <= 1:  # NaN included
        raise InputError(f"--wise-ft {text}: alpha must be a number in [0, 1] (0: the starting weights, "
                         "1: the fine-tuned ones)")
    return alpha


def parse_sweep(text: str) -> list[float]:
    """The alphas of ``START:STOP:STEP`` (STOP included when the steps reach it) or of ``A,B,...``, in
    increasing order, each in [0, 1]."""
    if ":" not in text:
        return sorted({parse_alpha(value) for value in text.split(",")})
    parts = [_decimal(part) for part in text.split(":")]  # decimal: steps of 0.1 land exactly on STOP
    if len(parts) != 3 or not all(part.is_finite() for part in parts):
        raise InputError(f"--wise-ft {text}: {SWEEP_FORMS}")
    start, stop, step = parts
    if not (0 <= start <= stop <= 1 and step > 0):
        raise InputError(f"--wise-ft {text}: START:STOP:STEP needs 0 <= START <= STOP <= 1 and a STEP above 0")
    count = int((stop - start) // step) + 1
    if count > MAX_ALPHAS:
        raise InputError(f"--wise-ft {text} makes {count} alphas, each a full evaluation: give at most "
                         f"{MAX_ALPHAS} (a larger STEP)")
    return [float(start + index * step) for index in range(count)]


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal("nan")
