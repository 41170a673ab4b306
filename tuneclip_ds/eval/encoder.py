"""How evaluation runs the model: one adapter for model access, fixed-size batches, lockstep over ranks."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from tuneclip_ds.eval.collectives import in_lockstep


def encode(model, images: torch.Tensor | None = None, texts: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised embeddings of a batch of images or of tokenized texts: the one place evaluation calls the model.

    ``model`` needs open_clip's ``encode_image(images, normalize=True)`` and
    ``encode_text(texts, normalize=True)``: an open_clip model, or a :class:`ForwardEncoder`
    around a DeepSpeed engine.
    """
    if images is not None:
        return model.encode_image(images, normalize=True)
    return model.encode_text(texts, normalize=True)


class ForwardEncoder:
    """``encode_image`` / ``encode_text`` through the module's forward: ``module(image=...)``, ``module(text=...)``.

    A DeepSpeed engine at ZeRO-3 gathers its module's parameters only inside forward, while
    open_clip's ``encode_*`` methods read top-level parameters (``positional_embedding``,
    ``text_projection``) directly. open_clip's forward encodes the input it is given, normalised,
    and returns None for the other one. ``image_dtype`` is the engine's input dtype (bf16/fp16
    engines take half-precision images).
    """

    def __init__(self, module, image_dtype: torch.dtype = torch.float32):
        self.module = module
        self.image_dtype = image_dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        _check_normalize(normalize)
        return _features(self.module(image=images.to(self.image_dtype)), "image_features", 0)

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        _check_normalize(normalize)
        return _features(self.module(text=texts), "text_features", 1)


def _check_normalize(normalize: bool) -> None:
    if not normalize:
        raise ValueError("ForwardEncoder gives normalised features only (open_clip's forward normalises)")


def _features(output, key: str, position: int) -> torch.Tensor:
    return output[key] if isinstance(output, dict) else output[position]


def pad_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` (at most ``size``, at least one) followed by copies of the last row, ``size`` in all."""
    return torch.cat([rows, rows[-1:].expand(size - len(rows), *rows.shape[1:])])


class BatchEncoder:
    """Runs :func:`encode` on batches padded to one size, in lockstep over the ranks.

    One batch shape for every forward: CPU kernels choose their blocking by shape, so without
    padding a sample's embedding could depend on how many samples share its batch, and so on the
    number of ranks. With it, a sample's embedding is the same whatever the world size.
    """

    def __init__(self, model, batch_size: int, device: torch.device, world_size: int,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.world_size = world_size
        self.autocast_dtype = autocast_dtype

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode("images", images)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._encode("texts", tokens)

    def _encode(self, kind: str, inputs: torch.Tensor) -> torch.Tensor:
        """Float32 embeddings of at most ``batch_size`` inputs, computed on a batch padded to ``batch_size``."""
        padded = pad_rows(inputs.to(self.device), self.batch_size)
        with self._autocast():
            embeddings = encode(self.model, **{kind: padded})
        return embeddings[: len(inputs)].float()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def image_batches(self, batches: Iterable[tuple], dummy_images: torch.Tensor) -> Iterator[tuple]:
        """``(indices, embeddings, targets)`` for the loader's ``(indices, images, targets)``, in lockstep."""
        for batch in in_lockstep(batches, self.world_size, self.device):
            if batch is None:
                self.images(dummy_images)
                continue
            indices, images, targets = batch
            yield indices, self.images(images), targets

    def all_texts(self, tokens: torch.Tensor, dummy_tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of any number of tokenized texts, ``batch_size`` at a time, in lockstep."""
        chunks = tokens.split(self.batch_size) if len(tokens) else ()
        parts = []
        for chunk in in_lockstep(chunks, self.world_size, self.device):
            embeddings = self.texts(dummy_tokens if chunk is None else chunk)
            if chunk is not None:
                parts.append(embeddings)
        return torch.cat(parts) if parts else torch.zeros(0, 0, device=self.device)
