"""Gather-free losses against single-process references on the concatenated global batch.

Distributed cases run on a pool of 4 gloo processes (tests/gloo_pool.py); world sizes 2 and 3 use
sub-groups of it, which also exercises the ``group`` argument. ``import open_clip`` happens only
in the parent (references): the children import this module to find the worker functions.
"""

import contextlib

import tuneclip_ds  # noqa: F401  (before open_clip: patches the torchvision import on CPU)
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_pool import GlooPool
from tuneclip_ds.losses import build_loss
from tuneclip_ds.losses.ring import resolve_group, ring_blocks

POOL_SIZE = 4
WORLD_SIZES = [1, 2, 3, 4]


# ---------------------------------------------------------------- inputs and helpers


def make_batch(global_batch, dim=8, dtype=torch.float64, seed=0, scale=10.0, bias=None):
    """Deterministic global batch: normalised features, logit scale [1], optional bias [1], ids."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    # pull pairs together so that positives are more similar than most negatives, as in training
    text = F.normalize(text + 1.5 * image, dim=-1)
    batch = {
        "image": image.to(dtype),
        "text": text.to(dtype),
        "scale": torch.tensor([scale], dtype=dtype),
        "ids": torch.randperm(10 * global_batch, generator=generator)[:global_batch],
    }
    if bias is not None:
        batch["bias"] = torch.tensor([bias], dtype=dtype)
    return batch


def rows(tensor, rank, world_size):
    local = tensor.shape[0] // world_size
    return tensor[rank * local:(rank + 1) * local]


def loss_and_grads(loss_fn, batch, rank=0, world_size=1, **forward_kwargs):
    """Run ``loss_fn`` on this rank's rows of ``batch``; value and gradients of all inputs."""
    image = rows(batch["image"], rank, world_size).clone().requires_grad_()
    text = rows(batch["text"], rank, world_size).clone().requires_grad_()
    scale = batch["scale"].clone().requires_grad_()
    inputs = [image, text, scale]
    bias = None
    if "bias" in batch:
        bias = batch["bias"].clone().requires_grad_()
        inputs.append(bias)
    ids = rows(batch["ids"], rank, world_size)
    loss = loss_fn(image, text, scale, bias, **forward_kwargs, sample_ids=ids)
    grads = torch.autograd.grad(loss, inputs)
    return {"loss": loss.detach(), "image": grads[0], "text": grads[1], "scale": grads[2],
            "bias": grads[3] if bias is not None else None}


_SUBGROUPS = {}


def subgroup(world_size, pool_size):
    """The process group of ranks 0..world_size-1 (collective: every pool rank must call it)."""
    if world_size == pool_size:
        return None  # default group: the world
    if world_size not in _SUBGROUPS:
        _SUBGROUPS[world_size] = dist.new_group(list(range(world_size)))
    return _SUBGROUPS[world_size]


@contextlib.contextmanager
def only_scalar_collectives():
    """Make every feature-sized collective raise: gathers, broadcasts, scatters; all_reduce of
    more than a few numbers. Point-to-point ring exchanges and small all_reduces pass."""
    forbidden = ["all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object",
                 "gather", "broadcast", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all"]
    saved = {name: getattr(dist, name) for name in forbidden + ["all_reduce"]}

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called on the gather-free path")
        return call

    def small_all_reduce(tensor, *args, **kwargs):
        assert tensor.numel() <= 8, f"all_reduce of {tensor.numel()} elements"
        return saved["all_reduce"](tensor, *args, **kwargs)

    try:
        for name in forbidden:
            setattr(dist, name, refuse(name))
        dist.all_reduce = small_all_reduce
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def run_on_ranks(pool, world_size, worker, *args):
    """Results of ``worker(rank, world_size, group, *args)`` for ranks 0..world_size-1."""
    if world_size == 1:
        return [worker(0, 1, None, *args)]
    return pool.run(_in_subgroup, world_size, worker, args)[:world_size]


def _in_subgroup(rank, pool_size, world_size, worker, args):
    group = subgroup(world_size, pool_size)
    if rank >= world_size:
        return None
    with only_scalar_collectives():
        return worker(rank, world_size, group, *args)


@pytest.fixture(scope="module")
def pool():
    gloo_pool = GlooPool(POOL_SIZE)
    yield gloo_pool
    gloo_pool.close()


def assert_close(actual, expected, rtol, atol=0.0):
    """Close up to ``rtol`` of each element plus ``atol`` relative to the largest element."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol * scale)


def assert_matches_reference(results, reference, world_size, rtol, atol=0.0):
    """Every rank: value = global loss, feature grads = W x reference rows; the mean over ranks of
    the scale/bias grads (what the engine's averaging applies) = reference."""
    for rank, result in enumerate(results):
        assert_close(result["loss"], reference["loss"], rtol, atol)
        for key in ("image", "text"):
            assert_close(result[key], world_size * rows(reference[key], rank, world_size), rtol, atol)
    for key in ("scale", "bias"):
        if reference[key] is not None:
            mean = torch.stack([r[key] for r in results]).mean(0)
            assert_close(mean, reference[key], rtol, atol)


# ---------------------------------------------------------------- ring


def _ring_worker(rank, world_size, group):
    block = (torch.full((3, 2), float(rank)), torch.tensor([rank], dtype=torch.int64))
    return [(source, b[0].clone(), b[1].clone()) for source, b in ring_blocks(block, resolve_group(group))]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ring_visits_every_block_once_in_order(pool, world_size):
    for rank, visits in enumerate(run_on_ranks(pool, world_size, _ring_worker)):
        expected_sources = [(rank - step) % world_size for step in range(world_size)]
        assert [source for source, _, _ in visits] == expected_sources
        for source, floats, ints in visits:
            assert torch.equal(floats, torch.full((3, 2), float(source)))
            assert ints.item() == source


# ---------------------------------------------------------------- InfoNCE


def open_clip_infonce(image, text, scale, bias, sample_ids=None):
    from open_clip.loss import ClipLoss

    return ClipLoss()(image, text, scale, bias)


def _loss_worker(rank, world_size, group, name, kwargs, batch_kwargs):
    loss_fn = build_loss(name, group=group, **kwargs)
    return loss_and_grads(loss_fn, make_batch(**batch_kwargs), rank, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("tile_size", [1, 4, 64])
def test_infonce_matches_open_clip_float64(pool, world_size, tile_size):
    batch_kwargs = dict(global_batch=6 * world_size, dtype=torch.float64, seed=world_size)
    reference = loss_and_grads(open_clip_infonce, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "infonce", dict(tile_size=tile_size), batch_kwargs)
    assert_matches_reference(results, reference, world_size, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_infonce_matches_open_clip_float32_with_bias(pool, world_size):
    batch_kwargs = dict(global_batch=8 * world_size, dim=16, dtype=torch.float32, scale=14.0, bias=-3.0)
    reference = loss_and_grads(open_clip_infonce, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "infonce", dict(tile_size=3), batch_kwargs)
    assert_matches_reference(results, reference, world_size, rtol=1e-5, atol=1e-5)
