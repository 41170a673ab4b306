"""Evaluation during training: the suite on every rank through the engine, and the best result so far."""

from __future__ import annotations

from typing import Callable

import torch

from tuneclip_ds.config import EMA_RESULTS, EvalConfig
from tuneclip_ds.eval.best import BestTracker
from tuneclip_ds.eval.encoder import ForwardEncoder
from tuneclip_ds.eval.runner import check_suite, evaluate
from tuneclip_ds.eval.tasks import load_suite


class TrainingEvaluator:
    """``evaluator(engine, input_dtype, step, ema) -> (results, is_best)``; a collective over all ranks.

    The suite's inputs are checked when it is built, so a bad dataset path stops
    the run before training. ``eval.weights`` says which weights are evaluated:
    the model's, or their EMA (``ema``, swapped into the engine's module for the
    while), whose results are named ``ema/...``, or both. ``is_best`` says whether
    ``eval.select`` improved.
    """

    def __init__(self, config: EvalConfig, preprocess: Callable, tokenizer: Callable):
        self.suite = load_suite(config.tasks)
        check_suite(self.suite)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.tracker = BestTracker(config.select, config.mode) if config.select else None
        self.weights = config.weights

    def __call__(self, engine, input_dtype: torch.dtype, step: int, ema=None) -> tuple[dict[str, float], bool]:
        results = {}
        if self.weights != "ema":
            results.update(self._evaluate(engine, input_dtype))
        if self.weights != "model":
            with ema.swapped_in():
                averaged = self._evaluate(engine, input_dtype)
            results.update({EMA_RESULTS + name: value for name, value in averaged.items()})
        is_best = self.tracker is not None and self.tracker.update(results, step)
        return results, is_best

    def _evaluate(self, engine, input_dtype: torch.dtype) -> dict[str, float]:
        # Through the module's forward: under ZeRO-3 parameters are gathered only there.
        model = ForwardEncoder(engine.module, input_dtype)
        return evaluate(model, self.suite, self.preprocess, self.tokenizer, engine.device, engine.global_rank,
                        engine.dp_world_size)

    def state_dict(self) -> dict:
        return {"best": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("best") is not None:
            self.tracker.load_state_dict(state["best"])
