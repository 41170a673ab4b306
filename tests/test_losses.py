"""Gather-free losses against single-process references on the concatenated global batch.

Distributed cases run on a pool of 4 gloo processes (tests/gloo_pool.py); world sizes 2 and 3 use
sub-groups of it, which also exercises the ``group`` argument. ``import open_clip`` happens only
in the parent (references): the children import this module to find the worker functions.
"""

import contextlib
import logging
import math
import os

import tuneclip_ds  # noqa: F401  (before open_clip: patches the torchvision import on CPU)
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gloo_pool import GlooPool
from tuneclip_ds.losses import build_loss, gamma_schedule
from tuneclip_ds.losses.estimators import EstimatorTable, slots_for_corpus
from tuneclip_ds.losses.ring import GroupInfo, resolve_group, ring_blocks

POOL_SIZE = 4
WORLD_SIZES = [1, 2, 3, 4]


# ---------------------------------------------------------------- inputs and helpers


def make_batch(global_batch, dim=8, dtype=torch.float64, seed=0, scale=10.0, bias=None, pull=1.5, id_range=None,
               nan_rows=(), num_classes=None):
    """Deterministic global batch: normalised features, logit scale [1], optional bias [1], distinct
    ids drawn from ``range(id_range)``, NaN image features in the rows ``nan_rows``, and with
    ``num_classes`` labels, each class about as frequent (so no batch of 2 classes or more is of one)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    # pull pairs together so that positives are more similar than most negatives, as in training
    text = F.normalize(text + pull * image, dim=-1)
    image[list(nan_rows)] = torch.nan
    batch = {
        "image": image.to(dtype),
        "text": text.to(dtype),
        "scale": torch.tensor([scale], dtype=dtype),
        "ids": torch.randperm(id_range or 10 * global_batch, generator=generator)[:global_batch],
    }
    if bias is not None:
        batch["bias"] = torch.tensor([bias], dtype=dtype)
    if num_classes is not None:
        batch["labels"] = torch.randperm(global_batch, generator=generator) % num_classes
    return batch


def rows(tensor, rank, world_size):
    local = tensor.shape[0] // world_size
    return tensor[rank * local:(rank + 1) * local]


def loss_and_grads(loss_fn, batch, rank=0, world_size=1):
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
    labels = {"labels": rows(batch["labels"], rank, world_size)} if "labels" in batch else {}
    loss = loss_fn(image, text, scale, bias, sample_ids=ids, **labels)
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
def only_scalar_collectives(all_reduce_sizes=()):
    """Make every feature-sized collective raise: gathers of features (but inside a node: the hierarchical
    ring's), broadcasts, scatters, all_to_all, all_reduce of more than a few numbers (or of another size than
    ``all_reduce_sizes``). Point-to-point ring exchanges, scalar all_reduces and the estimators' per-sample
    collectives (an all-gather and an all-reduce of at most 2 numbers per sample) pass."""
    forbidden = ["all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object", "gather",
                 "broadcast", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single"]
    saved = {name: getattr(dist, name) for name in forbidden + ["all_reduce"]}

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called on the gather-free path")
        return call

    def per_sample(tensor):
        return tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[1] <= 2)

    def small_all_reduce(tensor, *args, **kwargs):
        assert tensor.numel() <= 8 or tensor.numel() in all_reduce_sizes or per_sample(tensor), \
            f"all_reduce of shape {tuple(tensor.shape)}"
        return saved["all_reduce"](tensor, *args, **kwargs)

    def node_all_gather(tensors, tensor, group=None, **kwargs):
        assert group is not None and dist.get_world_size(group) == int(os.environ["LOCAL_WORLD_SIZE"]), \
            "all_gather beyond a node"
        return saved["all_gather"](tensors, tensor, group=group, **kwargs)

    def per_sample_all_gather(output, tensor, *args, **kwargs):
        assert per_sample(tensor), f"all_gather_into_tensor of shape {tuple(tensor.shape)}"
        return saved["all_gather_into_tensor"](output, tensor, *args, **kwargs)

    try:
        for name in forbidden:
            setattr(dist, name, refuse(name))
        dist.all_reduce = small_all_reduce
        dist.all_gather = node_all_gather
        dist.all_gather_into_tensor = per_sample_all_gather
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def run_on_ranks(pool, world_size, worker, *args, all_reduce_sizes=()):
    """Results of ``worker(rank, world_size, group, *args)`` for ranks 0..world_size-1, with only scalar
    collectives (and all_reduces of ``all_reduce_sizes`` elements)."""
    if world_size == 1:
        return [worker(0, 1, None, *args)]
    return pool.run(_in_subgroup, world_size, worker, args, all_reduce_sizes)[:world_size]


def _in_subgroup(rank, pool_size, world_size, worker, args, all_reduce_sizes):
    group = subgroup(world_size, pool_size)
    if rank >= world_size:
        return None
    with only_scalar_collectives(all_reduce_sizes):
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
    """Every rank: the same value = global loss, feature grads = W x reference rows; the mean over
    ranks of the scale/bias grads (what the engine's averaging applies) = reference."""
    for rank, result in enumerate(results):
        assert result["loss"].item() == results[0]["loss"].item()
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
    batch_kwargs = dict(global_batch=8 * world_size, dim=16, dtype=torch.float32, scale=14.0, bias=-3.0, pull=0.3)
    reference = loss_and_grads(open_clip_infonce, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "infonce", dict(tile_size=3), batch_kwargs)
    # the bias cancels in the softmax: its gradient is zero (up to rounding in open_clip)
    assert abs(reference.pop("bias").item()) < 1e-6
    assert all(result.pop("bias").item() == 0.0 for result in results)
    assert_matches_reference(results, reference | {"bias": None}, world_size, rtol=1e-5, atol=1e-5)


def smoothed_infonce(smoothing):
    """Cross-entropy with label smoothing on the full similarity matrix, both directions."""
    def loss(image, text, scale, bias, sample_ids=None):
        logits = scale * image @ text.T
        labels = torch.arange(len(image))
        return (F.cross_entropy(logits, labels, label_smoothing=smoothing)
                + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2
    return loss


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_infonce_label_smoothing_matches_cross_entropy(pool, world_size, smoothing):
    dim = 24  # the feature sums all-reduced are 2 x 24 numbers, whatever the batch
    batch_kwargs = dict(global_batch=5 * world_size, dim=dim, dtype=torch.float64, seed=world_size)
    reference = loss_and_grads(smoothed_infonce(smoothing), make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "infonce", dict(tile_size=3, label_smoothing=smoothing),
                           batch_kwargs, all_reduce_sizes=(2 * dim,))
    assert_matches_reference(results, reference, world_size, rtol=1e-10, atol=1e-12)


def test_infonce_label_smoothing_zero_is_the_plain_loss():
    batch = make_batch(global_batch=6)
    plain = loss_and_grads(build_loss("infonce", tile_size=4), batch)
    smoothed = loss_and_grads(build_loss("infonce", tile_size=4, label_smoothing=0.0), batch)
    assert all(torch.equal(plain[key], smoothed[key]) for key in ("loss", "image", "text", "scale"))
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("infonce", label_smoothing=1.0)


# ---------------------------------------------------------------- SigLIP


def open_clip_siglip(image, text, scale, bias, sample_ids=None):
    from open_clip.loss import SigLipLoss

    return SigLipLoss()(image, text, scale, bias)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("tile_size", [1, 5, 64])
def test_siglip_matches_open_clip_float64(pool, world_size, tile_size):
    batch_kwargs = dict(global_batch=5 * world_size, dtype=torch.float64, seed=world_size, bias=-8.0)
    reference = loss_and_grads(open_clip_siglip, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "siglip", dict(tile_size=tile_size), batch_kwargs)
    assert_matches_reference(results, reference, world_size, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_siglip_matches_open_clip_float32(pool, world_size):
    batch_kwargs = dict(global_batch=8 * world_size, dim=16, dtype=torch.float32, bias=-10.0, pull=0.3)
    reference = loss_and_grads(open_clip_siglip, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "siglip", dict(tile_size=3), batch_kwargs)
    assert_matches_reference(results, reference, world_size, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GCL / HGCL


class ReferenceGCL:
    """Plain GCL/HGCL on the global batch: full B x B matrices, ``u`` in linear space in a dict."""

    def __init__(self, pairwise="linear", margin=0.1, eps=1e-14):
        self.pairwise = {"linear": lambda x: x, "hinge_sq": lambda x: torch.clamp(x + margin, min=0) ** 2}[pairwise]
        self.eps = eps
        self.gamma = 1.0
        self.u = {}

    def g(self, similarity, tau, negative):
        """g_i = mean over the negatives j of i of exp(h(s_ij - s_ii) / tau), for the rows of ``similarity``."""
        terms = torch.exp(self.pairwise(similarity - similarity.diag()[:, None]) / tau)
        return (terms * negative).sum(dim=1) / negative.sum(dim=1)

    def __call__(self, image, text, scale, bias=None, sample_ids=None, labels=None):
        """Negatives: every j != i, or with ``labels`` every j of another class (a symmetric mask)."""
        tau = 1 / scale.reshape(())
        similarity = image @ text.T
        size = similarity.shape[0]
        negative = ~torch.eye(size, dtype=torch.bool) if labels is None else labels[:, None] != labels[None, :]
        g = torch.stack([self.g(similarity, tau, negative), self.g(similarity.T, tau, negative)], dim=1)  # [B, 2]
        for row, sample in enumerate(sample_ids.tolist()):
            old = self.u.get(sample)
            fresh = g[row].detach()
            self.u[sample] = fresh if old is None else (1 - self.gamma) * old + self.gamma * fresh
        u = torch.stack([self.u[sample] for sample in sample_ids.tolist()])
        surrogate = tau * (g / (self.eps + u)).mean(dim=1).sum() / size
        reported = tau * torch.log(self.eps + u).mean(dim=1).sum() / size
        self.last_metrics = {
            "batch_log_u_mean": torch.log(u).mean().item(),
            "batch_log_u_min": torch.log(u).min().item(),
            "batch_log_u_max": torch.log(u).max().item(),
            "inside_margin_fraction": self.inside_margin_fraction(similarity, negative),
        }
        return reported.detach() + surrogate - surrogate.detach()

    def inside_margin_fraction(self, similarity, negative):
        active = 0
        for s in (similarity, similarity.T):
            h = self.pairwise(s - s.diag()[:, None])
            active += ((h > 0) & negative).sum().item()
        return active / (2 * negative.sum().item())


GCL_STEPS = [(1.0, 0), (0.9, 1), (0.8, 2)]  # (gamma, seed): ids overlap across steps


def gcl_step_batches(world_size, dtype=torch.float64):
    return [
        (gamma, dict(global_batch=4 * world_size, dtype=dtype, seed=seed, pull=0.3, id_range=8 * world_size))
        for gamma, seed in GCL_STEPS
    ]


def _gcl_steps_worker(rank, world_size, group, loss_kwargs, steps, initial_states=None, reserve_for=None):
    """The steps' results (with the estimator table's address and size after each) and the final state; with
    ``reserve_for``, the table is allocated for the ids [0, reserve_for) first, and after each step makes room
    for ids beyond it, as the trainer does."""
    loss_fn = build_loss(group=group, **loss_kwargs)
    if reserve_for is not None:
        loss_fn.estimators.reserve(reserve_for, loss_fn.group_info(), torch.device("cpu"), torch.float64)
    if initial_states is not None:
        loss_fn.load_state_dict(initial_states)
    results = []
    for gamma, batch_kwargs in steps:
        loss_fn.gamma = gamma
        result = loss_and_grads(loss_fn, make_batch(**batch_kwargs), rank, world_size)
        if reserve_for is not None:
            loss_fn.estimators.make_room()
        table = loss_fn.estimators.log_u if hasattr(loss_fn, "estimators") else None  # GCL/HGCL
        results.append(result | {"metrics": loss_fn.metrics(),
                                 "table": None if table is None else (table.data_ptr(), len(table))})
    return results, loss_fn.state_dict()


def reference_gcl_steps(reference, steps):
    results = []
    for gamma, batch_kwargs in steps:
        reference.gamma = gamma
        results.append(loss_and_grads(reference, make_batch(**batch_kwargs)) | {"metrics": reference.last_metrics})
    return results


def assert_steps_match(per_rank, reference_steps, world_size, rtol=1e-10, atol=1e-12):
    for step, reference in enumerate(reference_steps):
        results = [steps[step] for steps, _ in per_rank]
        assert_matches_reference(results, reference, world_size, rtol, atol)
        for result in results:
            assert result["metrics"] == pytest.approx(reference["metrics"], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name,loss_kwargs", [
    ("gcl", dict(tile_size=3)),
    ("hgcl", dict(tile_size=3)),
    ("hgcl", dict(tile_size=64, margin=0.5)),
])
def test_gcl_matches_reference_over_steps(pool, world_size, name, loss_kwargs):
    pairwise = "linear" if name == "gcl" else "hinge_sq"
    reference = ReferenceGCL(pairwise, margin=loss_kwargs.get("margin", 0.1))
    steps = gcl_step_batches(world_size)
    reference_steps = reference_gcl_steps(reference, steps)
    per_rank = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name=name, **loss_kwargs), steps)
    assert_steps_match(per_rank, reference_steps, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_gcl_estimators_are_owned_by_id_modulo_world_size(pool, world_size):
    reference = ReferenceGCL("hinge_sq")
    steps = gcl_step_batches(world_size)
    reference_gcl_steps(reference, steps)
    states = [state for _, state in run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name="hgcl"), steps)]
    for rank, state in enumerate(states):
        assert torch.all(state["ids"] % world_size == rank)
    ids = torch.cat([state["ids"] for state in states])
    log_u = torch.cat([state["log_u"] for state in states])
    assert sorted(ids.tolist()) == sorted(reference.u)
    expected = torch.stack([reference.u[sample] for sample in ids.tolist()]).log()
    assert_close(log_u, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("new_world_size", [1, 3])
@pytest.mark.parametrize("reserve_for", [None, 20])
def test_gcl_state_dict_resumes_on_another_world_size(pool, new_world_size, reserve_for):
    """Two steps on 2 ranks, then the states of both ranks are loaded on ``new_world_size`` ranks
    (each keeps the ids it owns), into tables allocated for the corpus or not: the third step equals an
    uninterrupted single-process run."""
    steps = [(gamma, dict(global_batch=12, seed=seed, pull=0.3, id_range=20)) for gamma, seed in GCL_STEPS]
    reference = ReferenceGCL("hinge_sq")
    reference_steps = reference_gcl_steps(reference, steps)
    saved = [state for _, state in run_on_ranks(pool, 2, _gcl_steps_worker, dict(name="hgcl"), steps[:2],
                                                None, reserve_for)]
    resumed = run_on_ranks(pool, new_world_size, _gcl_steps_worker, dict(name="hgcl"), steps[2:], saved, reserve_for)
    assert_steps_match(resumed, reference_steps[2:], new_world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_table_allocated_for_the_corpus_is_never_reallocated_and_gives_the_same_results(pool, world_size):
    """Allocated for the ids [0, 8W) the batches draw from: each rank's table has its 8 slots and the spare one
    from the start and keeps them, and every step's results and the estimators equal those of a table that
    grows as ids arrive, bit for bit."""
    steps = gcl_step_batches(world_size)
    grown = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name="hgcl"), steps)
    allocated = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name="hgcl"), steps, None, 8 * world_size)
    for (grown_steps, grown_state), (allocated_steps, allocated_state) in zip(grown, allocated):
        assert {step["table"] for step in allocated_steps} == {allocated_steps[0]["table"]}
        assert allocated_steps[0]["table"][1] == 9
        for grown_step, allocated_step in zip(grown_steps, allocated_steps):
            assert grown_step["metrics"] == allocated_step["metrics"]
            for key in ("loss", "image", "text", "scale"):
                assert torch.equal(grown_step[key], allocated_step[key]), key
        assert all(torch.equal(grown_state[key], allocated_state[key]) for key in grown_state)


@pytest.mark.parametrize("num_samples,world_size", [(10, 1), (10, 3), (1, 4), (12, 4)])
def test_the_table_is_allocated_for_the_largest_id_a_rank_owns(num_samples, world_size):
    """Each rank's size is that of the largest slot ``id // W`` of any id below ``num_samples`` (every rank
    makes room for every rank's ids: the global batch's), plus the spare last slot."""
    for rank in range(world_size):
        table = EstimatorTable(num_directions=2)
        table.reserve(num_samples, GroupInfo(None, rank, world_size), torch.device("cpu"))
        largest_slot = max(sample // world_size for sample in range(num_samples))
        assert table.log_u.shape == (largest_slot + 2, 2) and table.log_u.dtype == torch.float32
        assert table.seen.shape == (len(table.log_u),) and not table.seen.any()


def test_growing_past_the_allocation_warns_once_on_rank_0_naming_the_key(caplog):
    """Ids at or beyond the corpus size (a data.num_samples too small, sparse keys) still find room."""
    with caplog.at_level(logging.WARNING, logger="tuneclip_ds.losses.estimators"):
        for rank in (0, 1):
            info, table = GroupInfo(None, rank, 2), EstimatorTable(num_directions=1)
            table.reserve(4, info, torch.device("cpu"))  # 3 slots: the 2 owned ids and the spare
            for ids in ([0, 1, 9, 30], [100, 101]):  # each grows the table
                table.load_state_dict({"ids": torch.tensor(ids), "log_u": torch.ones(len(ids), 1)}, info)
            assert table.state_dict(info)["ids"].tolist() == [100 + rank]
    assert caplog.text.count("WARNING") == 1
    assert "corpus size 4 (data.num_samples" in caplog.text and "past the 3 slots" in caplog.text


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ids_beyond_a_reserved_table_count_as_new_until_it_grows_after_the_step(pool, world_size):
    """Reserved for [0, 4W), the first step meets ids up to 8W: their estimates are not kept (no other sample's
    either lost or changed) and the table grows after the step; the later steps equal the reference's with the
    first step's estimates of those ids forgotten."""
    steps, reserve_for = gcl_step_batches(world_size), 4 * world_size
    reference = ReferenceGCL("hinge_sq")
    expected = reference_gcl_steps(reference, steps[:1])
    beyond = {sample for sample in reference.u if sample >= reserve_for}
    later_ids = {i for _, kwargs in steps[1:] for i in make_batch(**kwargs)["ids"].tolist()}
    assert beyond & later_ids and set(reference.u) - beyond  # they recur, and some ids fit
    reference.u = {sample: u for sample, u in reference.u.items() if sample not in beyond}
    expected += reference_gcl_steps(reference, steps[1:])
    per_rank = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name="hgcl"), steps, None, reserve_for)
    assert_steps_match(per_rank, expected, world_size)
    for steps_of_rank, _ in per_rank:
        assert steps_of_rank[0]["table"][1] > slots_for_corpus(reserve_for, world_size)
    ids = torch.cat([state["ids"] for _, state in per_rank])
    assert sorted(ids.tolist()) == sorted(reference.u)


def test_a_reserved_table_grows_for_an_id_beyond_it_at_make_room_with_a_warning(caplog):
    table, single = EstimatorTable(num_directions=1), resolve_group(None)
    table.reserve(4, single, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="tuneclip_ds.losses.estimators"):
        log_u = update_and_commit(table, [1, 9], torch.tensor([[1.0], [2.0]]), 0.5)
        assert log_u.tolist() == [[1.0], [2.0]] and table.state_dict(single)["ids"].tolist() == [1]
        assert len(table.log_u) == 5 and caplog.text == ""  # no host synchronisation in the step
        table.make_room()
        assert update_and_commit(table, [9], torch.tensor([[3.0]]), 0.5).tolist() == [[3.0]]  # 2.0 was not kept
        averaged = update_and_commit(table, [9], torch.tensor([[5.0]]), 0.5)
    assert averaged.item() == pytest.approx(math.log(0.5 * math.exp(3.0) + 0.5 * math.exp(5.0)))
    assert len(table.log_u) == 11 and table.state_dict(single)["ids"].tolist() == [1, 9]
    assert caplog.text.count("WARNING") == 1 and "corpus size 4 (data.num_samples" in caplog.text


def _on_nodes_of(rank, world_size, group, node_size, worker, *args):
    """``worker`` with the ranks laid out as nodes of ``node_size`` (what launchers say in LOCAL_WORLD_SIZE)."""
    pool_layout = os.environ["LOCAL_WORLD_SIZE"]
    os.environ["LOCAL_WORLD_SIZE"] = str(node_size)
    try:
        return worker(rank, world_size, group, *args)
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = pool_layout


@pytest.fixture(scope="module")
def pool6():
    gloo_pool = GlooPool(6)
    yield gloo_pool
    gloo_pool.close()


@pytest.mark.parametrize("world_size,node_size", [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("name", ["infonce", "siglip", "gcl", "hgcl"])
def test_the_hierarchical_ring_gives_the_flat_rings_results_bit_for_bit(pool, pool6, world_size, node_size, name):
    """Blocks gathered in each node and node blocks passed between nodes reach every rank in the flat
    ring's order: values, gradients, metrics and estimators over three steps are identical (and the flat
    ring's equal the full-matrix reference, see the tests above)."""
    ranks = pool if world_size == POOL_SIZE else pool6
    steps = [(gamma, kwargs | dict(bias=-2.0)) for gamma, kwargs in gcl_step_batches(world_size)]
    results = {}
    for topology in ("ring", "hierarchical"):
        loss_kwargs = dict(name=name, tile_size=3, topology=topology)
        results[topology] = run_on_ranks(ranks, world_size, _on_nodes_of, node_size, _gcl_steps_worker, loss_kwargs,
                                         steps)
    for (flat_steps, flat_state), (steps_by_node, state_by_node) in zip(results["ring"], results["hierarchical"]):
        for flat, by_node in zip(flat_steps, steps_by_node):
            assert flat["metrics"] == by_node["metrics"]
            for key in ("loss", "image", "text", "scale", "bias"):
                assert torch.equal(flat[key], by_node[key]), key
        assert all(torch.equal(flat_state[key], state_by_node[key]) for key in flat_state)


def _refusal_worker(rank, world_size, group, *args):
    """The message of the error that ``_loss_worker`` raises (on every rank, before any communication)."""
    try:
        _loss_worker(rank, world_size, group, *args)
    except ValueError as error:
        return str(error)


def test_a_topology_that_does_not_split_into_nodes_is_refused(pool):
    messages = run_on_ranks(pool, 4, _on_nodes_of, 3, _refusal_worker, "infonce", dict(topology="hierarchical"),
                            dict(global_batch=8))
    assert all("4 ranks do not split into nodes of LOCAL_WORLD_SIZE=3" in message for message in messages)
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        build_loss("infonce", topology="star")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", ["gcl", "hgcl"])
def test_a_nonfinite_batch_leaves_the_estimators_as_they_were(pool, world_size, name):
    """One NaN image row on the last rank (it reaches every anchor through the ring), among samples
    seen before, later and never: the loss is NaN, and the table and every later step (loss and
    gradients) are exactly those of a run that never saw that batch."""
    steps = gcl_step_batches(world_size)
    gamma, batch_kwargs = steps[1]
    nan_batch = (gamma, batch_kwargs | dict(seed=7, nan_rows=[4 * world_size - 1]))
    clean = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name=name), steps)
    poisoned = run_on_ranks(pool, world_size, _gcl_steps_worker, dict(name=name), steps[:1] + [nan_batch] + steps[1:])
    seen_ids = {i for _, kwargs in steps + [nan_batch] for i in make_batch(**kwargs)["ids"].tolist()}
    assert len(seen_ids) < sum(len(make_batch(**kwargs)["ids"]) for _, kwargs in steps + [nan_batch])  # ids recur
    for (clean_steps, clean_state), (poisoned_steps, poisoned_state) in zip(clean, poisoned):
        assert torch.isnan(poisoned_steps[1]["loss"])
        assert torch.isfinite(poisoned_state["log_u"]).all()
        assert poisoned_state["ids"].tolist() == clean_state["ids"].tolist()
        assert torch.equal(poisoned_state["log_u"], clean_state["log_u"])
        for clean_step, poisoned_step in zip(clean_steps, poisoned_steps[:1] + poisoned_steps[2:]):
            for key in ("loss", "image", "text", "scale"):
                assert torch.equal(poisoned_step[key], clean_step[key]), key


def update_and_commit(table, ids, log_g, gamma, accept=True):
    log_u, pending = table.update(torch.tensor(ids), log_g, gamma, resolve_group(None))
    table.commit(pending, torch.tensor(accept))
    return log_u


def test_estimator_update_follows_the_moving_average_formula():
    table, single = EstimatorTable(num_directions=2), resolve_group(None)
    first_log_g = torch.tensor([[0.5, -2.0], [1.5, 0.25]], dtype=torch.float64)
    assert torch.equal(update_and_commit(table, [3, 7], first_log_g, 0.7), first_log_g)  # u = g
    second_log_g = torch.tensor([[-1.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    updated = update_and_commit(table, [7, 5], second_log_g, 0.7)
    expected_u7 = 0.3 * first_log_g[1].exp() + 0.7 * second_log_g[0].exp()
    assert_close(updated[0], expected_u7.log(), rtol=1e-14)
    assert torch.equal(updated[1], second_log_g[1])  # id 5 is new
    state = table.state_dict(single)
    assert state["ids"].tolist() == [3, 5, 7]
    assert torch.equal(state["log_u"], torch.stack([first_log_g[0], second_log_g[1], updated[0]]))


def test_estimators_store_an_update_only_when_committed_with_accept():
    table, single = EstimatorTable(num_directions=1), resolve_group(None)
    update_and_commit(table, [2], torch.tensor([[1.0]]), 1.0)
    table.update(torch.tensor([2, 9]), torch.tensor([[5.0], [6.0]]), 0.5, single)  # never committed
    update_and_commit(table, [2, 4], torch.tensor([[7.0], [8.0]]), 0.5, accept=False)
    state = table.state_dict(single)
    assert state["ids"].tolist() == [2] and state["log_u"].tolist() == [[1.0]]


def test_estimator_update_stays_finite_for_huge_g():
    """log g = 700 (exp overflows even float64): the log-space average is exact."""
    table = EstimatorTable(num_directions=1)
    for gamma in (1.0, 0.8, 0.1):
        log_u = update_and_commit(table, [0], torch.tensor([[700.0]]), gamma)
        assert log_u.item() == pytest.approx(700.0, rel=1e-7)


def test_log_mean_u_of_a_large_float32_table_matches_float64():
    """3M float32 values (three chunks of 1M, the last one short), log u spread over about e^-40..e^40 and 30%
    unseen: the chunked float32 log-sum-exp is within 1e-5 of the float64 log mean of the seen values."""
    table, single, cpu = EstimatorTable(num_directions=2), resolve_group(None), torch.device("cpu")
    assert table.log_mean_u(single, cpu) == -math.inf  # no table yet
    table.reserve(1_500_001, single, cpu)
    assert table.log_mean_u(single, cpu) == -math.inf  # nothing seen yet
    generator = torch.Generator().manual_seed(0)
    table.log_u.copy_(10 * torch.randn(table.log_u.shape, generator=generator))
    table.seen.copy_(torch.rand(table.seen.shape, generator=generator) < 0.7)
    seen = table.log_u[table.seen].double()
    expected = (torch.logsumexp(seen.flatten(), dim=0) - math.log(seen.numel())).item()
    assert table.log_mean_u(single, cpu) == pytest.approx(expected, abs=1e-5)


def test_gamma_schedule_decays_from_one_to_gamma_min_and_stays():
    assert gamma_schedule(0, gamma_min=0.8, decay_epochs=4) == 1.0
    assert gamma_schedule(2, gamma_min=0.8, decay_epochs=4) == pytest.approx(0.9)
    assert gamma_schedule(4, gamma_min=0.8, decay_epochs=4) == pytest.approx(0.8)
    assert gamma_schedule(9.5, gamma_min=0.8, decay_epochs=4) == 0.8
    values = [gamma_schedule(e / 10, 0.2, 3) for e in range(40)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_build_loss_names_and_errors():
    assert type(build_loss("clip")).__name__ == "InfoNCELoss"
    assert build_loss("hgcl", margin=0.3, gamma=0.5).gamma == 0.5
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope")
    with pytest.raises(ValueError, match="sample_ids"):
        build_loss("gcl")(torch.eye(2), torch.eye(2), torch.tensor(10.0))


# ---------------------------------------------------------------- same-label positives (labelled data)


def same_label_mask(labels):
    return labels[:, None] == labels[None, :]


def multi_positive_infonce(smoothing):
    """Cross-entropy on the full matrix against targets spread evenly over each anchor's class, both directions."""
    def loss(image, text, scale, bias, sample_ids=None, labels=None):
        logits = scale * image @ text.T
        mask = same_label_mask(labels).to(logits.dtype)
        targets = mask / mask.sum(dim=1, keepdim=True)  # symmetric: the same for text anchors
        return (F.cross_entropy(logits, targets, label_smoothing=smoothing)
                + F.cross_entropy(logits.T, targets, label_smoothing=smoothing)) / 2
    return loss


def multi_positive_siglip(image, text, scale, bias, sample_ids=None, labels=None):
    """Sigmoid loss on the full matrix, label +1 for every pair of one class."""
    signs = 2 * same_label_mask(labels).to(image.dtype) - 1
    return -F.logsigmoid(signs * (scale * image @ text.T + bias)).sum() / len(image)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_same_label_infonce_matches_multi_positive_cross_entropy(pool, world_size, smoothing):
    dim = 8
    batch_kwargs = dict(global_batch=5 * world_size, dim=dim, seed=world_size, num_classes=3)
    reference = loss_and_grads(multi_positive_infonce(smoothing), make_batch(**batch_kwargs))
    loss_kwargs = dict(tile_size=3, label_smoothing=smoothing, same_label_positives=True)
    results = run_on_ranks(pool, world_size, _loss_worker, "infonce", loss_kwargs, batch_kwargs,
                           all_reduce_sizes=(2 * dim,))
    assert_matches_reference(results, reference, world_size, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_same_label_siglip_matches_the_full_matrix(pool, world_size):
    batch_kwargs = dict(global_batch=5 * world_size, seed=world_size, bias=-4.0, num_classes=3)
    reference = loss_and_grads(multi_positive_siglip, make_batch(**batch_kwargs))
    results = run_on_ranks(pool, world_size, _loss_worker, "siglip", dict(tile_size=3, same_label_positives=True),
                           batch_kwargs)
    assert_matches_reference(results, reference, world_size, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", ["gcl", "hgcl"])
def test_same_label_gcl_excludes_the_class_from_the_negatives(pool, world_size, name):
    reference = ReferenceGCL("linear" if name == "gcl" else "hinge_sq")
    steps = [(gamma, kwargs | dict(num_classes=3)) for gamma, kwargs in gcl_step_batches(world_size)]
    reference_steps = reference_gcl_steps(reference, steps)
    loss_kwargs = dict(name=name, tile_size=3, same_label_positives=True)
    assert_steps_match(run_on_ranks(pool, world_size, _gcl_steps_worker, loss_kwargs, steps), reference_steps,
                       world_size)


@pytest.mark.parametrize("name", ["infonce", "siglip", "gcl", "hgcl"])
def test_same_label_positives_with_distinct_labels_is_the_plain_loss(name):
    batch = make_batch(global_batch=7, bias=-4.0)
    plain = loss_and_grads(build_loss(name, tile_size=3), batch)
    labelled = loss_and_grads(build_loss(name, tile_size=3, same_label_positives=True),
                              batch | {"labels": torch.arange(7) * 5})
    for key in ("loss", "image", "text", "scale", "bias"):
        assert_close(labelled[key], plain[key], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="same_label_positives needs the labels"):
        loss_and_grads(build_loss(name, same_label_positives=True), batch)


def test_labels_count_only_with_same_label_positives():
    batch = make_batch(global_batch=6, num_classes=2)
    plain = loss_and_grads(build_loss("hgcl", tile_size=4), batch)
    unlabelled = loss_and_grads(build_loss("hgcl", tile_size=4), {k: v for k, v in batch.items() if k != "labels"})
    assert all(torch.equal(plain[key], unlabelled[key]) for key in ("loss", "image", "text", "scale"))


def test_a_one_class_batch_has_no_negatives_for_gcl(caplog):
    """Its loss is NaN (the trainer skips or stops on it) and the estimators stay as they were. ``metrics`` warns
    of such batches once each, also after later batches (the trainer reads it after a step's finite batches);
    the forward does not, since it would wait for the device."""
    loss_fn = build_loss("hgcl", tile_size=4, same_label_positives=True)
    loss_and_grads(loss_fn, make_batch(global_batch=6, num_classes=2))
    before = loss_fn.state_dict()
    one_class = make_batch(global_batch=6, seed=1) | {"labels": torch.full((6,), 4)}
    with caplog.at_level("WARNING"):
        for _ in range(2):
            loss = loss_fn(one_class["image"], one_class["text"], one_class["scale"], sample_ids=one_class["ids"],
                           labels=one_class["labels"])
            assert torch.isnan(loss) and caplog.text == ""
        assert math.isnan(loss_fn.metrics()["inside_margin_fraction"])  # of no negative pairs
        assert caplog.text.count("WARNING") == 1 and "2 global batch(es) of one class" in caplog.text
        after = loss_fn.state_dict()
        assert torch.equal(after["ids"], before["ids"]) and torch.equal(after["log_u"], before["log_u"])
        caplog.clear()
        loss_fn(one_class["image"], one_class["text"], one_class["scale"], sample_ids=one_class["ids"],
                labels=one_class["labels"])
        loss_and_grads(loss_fn, make_batch(global_batch=6, num_classes=2, seed=2))
        loss_fn.metrics()
        loss_fn.metrics()
    assert caplog.text.count("WARNING") == 1 and "1 global batch(es) of one class" in caplog.text


# ---------------------------------------------------------------- numerics


def extreme_batch(global_batch, dtype, seed=0):
    """Features on +-axes: every similarity (positives included) is -1, 0 or +1; logit scale 100."""
    generator = torch.Generator().manual_seed(seed)

    def signed_axes():
        axes = torch.randint(0, 3, (global_batch,), generator=generator)
        signs = torch.randint(0, 2, (global_batch, 1), generator=generator) * 2.0 - 1.0
        return (F.one_hot(axes, 4).double() * signs).to(dtype)

    return {
        "image": signed_axes(),
        "text": signed_axes(),
        "scale": torch.tensor([100.0], dtype=dtype),
        "bias": torch.tensor([-10.0], dtype=dtype),
        "ids": torch.arange(global_batch),
    }


NUMERICS_CASES = [
    ("infonce", {}),
    ("siglip", {}),
    ("gcl", {}),
    ("hgcl", dict(margin=0.1)),
    ("hgcl", dict(margin=0.5)),
]


def _numerics_worker(rank, world_size, group, name, loss_kwargs, dtype):
    loss_fn = build_loss(name, group=group, tile_size=3, **loss_kwargs)
    results = []
    for gamma in (1.0, 0.5):  # the second step averages into the estimators
        loss_fn.gamma = gamma
        results.append(loss_and_grads(loss_fn, extreme_batch(4 * world_size, dtype), rank, world_size))
    return results


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name,loss_kwargs", NUMERICS_CASES)
def test_extreme_inputs_give_finite_loss_and_grads_in_input_dtype(pool, world_size, name, loss_kwargs):
    per_rank = {
        dtype: run_on_ranks(pool, world_size, _numerics_worker, name, loss_kwargs, dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }
    for dtype, ranks in per_rank.items():
        for steps in ranks:
            for result in steps:
                assert torch.isfinite(result["loss"])
                for key in ("image", "text", "scale", "bias"):
                    if result[key] is not None:
                        assert result[key].dtype == dtype
                        assert torch.all(torch.isfinite(result[key])), key
    # The similarities of these axis-aligned features are exact in bf16 products: the same loss. The features'
    # gradients come from bf16 products too, of pair gradients rounded to bf16 (2^-8): a few roundings of terms
    # no larger than the largest gradient.
    for steps32, steps16 in zip(per_rank[torch.float32], per_rank[torch.bfloat16]):
        for result32, result16 in zip(steps32, steps16):
            assert result16["loss"].item() == result32["loss"].item()
            for key in ("image", "text"):
                assert_close(result16[key].float(), result32[key], rtol=2**-6, atol=2**-6)


def test_hgcl_negatives_beyond_the_margin_get_no_gradient():
    """Sample 0 is more than the margin away from samples 1 and 2 (similarity <= 0.1 against a
    positive of 1), which are within the margin of each other: only pairs of 1 and 2 are active."""
    loss_fn = build_loss("hgcl", margin=0.1)
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    image, text = features.clone().requires_grad_(), features.clone().requires_grad_()
    loss = loss_fn(image, text, torch.tensor(10.0), sample_ids=torch.arange(3))
    image_grad, text_grad = torch.autograd.grad(loss, [image, text])
    assert torch.all(image_grad[0] == 0) and torch.all(text_grad[0] == 0)
    assert torch.all(image_grad[1:].abs().sum(dim=1) > 0) and torch.all(text_grad[1:].abs().sum(dim=1) > 0)
    assert loss_fn.metrics()["inside_margin_fraction"] == pytest.approx(4 / 12)


BFLOAT16_ROUNDOFF = 2**-8  # u: bfloat16 keeps 8 significant bits


def _bfloat16_worker(rank, world_size, group, name, batch_kwargs):
    loss_fn = build_loss(name, group=group, tile_size=5)
    return loss_and_grads(loss_fn, make_batch(dtype=torch.bfloat16, **batch_kwargs), rank, world_size)


@pytest.mark.parametrize("name", ["infonce", "siglip", "gcl", "hgcl"])
def test_bfloat16_features_are_within_bfloat16_rounding_of_the_float64_reference(pool, name):
    """bfloat16 features meet in 16-bit products, as open_clip's logits under autocast, which round each
    similarity (|s| <= 1) by up to u/2; the rest is float32. Against the float64 loss of the same features, on 1
    and 2 ranks: the loss within 1% (and the same on both), the features' gradients within 4u of the largest
    (seen: about u; each tile's product is rounded), the scale's within u (absolute: dLoss/dt is a mean of
    similarities, InfoNCE's a small difference of them)."""
    batch_kwargs = dict(global_batch=16, dim=32, seed=3, pull=0.3, bias=-10.0 if name == "siglip" else None)
    exact = {key: value.double() if value.is_floating_point() else value
             for key, value in make_batch(dtype=torch.bfloat16, **batch_kwargs).items()}
    references = {"infonce": open_clip_infonce, "siglip": open_clip_siglip}
    reference = loss_and_grads(references.get(name) or ReferenceGCL("linear" if name == "gcl" else "hinge_sq"), exact)
    one, two = (run_on_ranks(pool, world_size, _bfloat16_worker, name, batch_kwargs) for world_size in (1, 2))
    assert one[0]["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-2)
    for results in (one, two):
        world_size = len(results)
        for rank, result in enumerate(results):
            assert result["loss"].item() == pytest.approx(one[0]["loss"].item(), rel=1e-6)
            for key in ("image", "text"):
                assert_close(result[key].double() / world_size, rows(reference[key], rank, world_size),
                             rtol=4 * BFLOAT16_ROUNDOFF, atol=4 * BFLOAT16_ROUNDOFF)
        scale = torch.stack([result["scale"] for result in results]).double().mean()
        assert scale.item() == pytest.approx(reference["scale"].item(), abs=BFLOAT16_ROUNDOFF)


# ---------------------------------------------------------------- gather-free guarantees


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def _largest_tensor_worker(rank, world_size, group, name, tile_size, same_label_positives):
    batch = make_batch(24, dim=4, bias=-5.0, num_classes=3) | {"ids": torch.arange(24)}
    loss_fn = build_loss(name, group=group, tile_size=tile_size, same_label_positives=same_label_positives)
    with LargestTensor() as largest:
        loss_and_grads(loss_fn, batch, rank, world_size)
    return largest.numel


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", ["infonce", "siglip", "gcl", "hgcl"])
@pytest.mark.parametrize("same_label_positives", [False, True])
def test_no_tensor_is_larger_than_a_ring_block(pool, world_size, name, same_label_positives):
    """Global batch 24, dim 4, tile 3: nothing larger than the block a hop carries, both modalities'
    features and 6 numbers per sample (positive, R and dLoss/dR of both directions, label), b x (2d + 6)
    (never b x B)."""
    local_batch = 24 // world_size
    for largest in run_on_ranks(pool, world_size, _largest_tensor_worker, name, 3, same_label_positives):
        assert largest <= local_batch * (2 * 4 + 6) < local_batch * 24


def _unequal_batch_worker(rank, world_size, group, name):
    """Rank 0 holds one sample more than the others: the error message of each rank, then the loss
    of an equal split of one batch (the group still works)."""
    loss_fn = build_loss(name, group=group)
    try:
        loss_and_grads(loss_fn, make_batch(5 if rank == 0 else 4, bias=-5.0))
    except ValueError as error:
        message = str(error)
    else:
        message = None
    return message, loss_and_grads(loss_fn, make_batch(8, bias=-5.0), rank, world_size)["loss"]


@pytest.mark.parametrize("name", ["infonce", "siglip", "hgcl"])
def test_unequal_local_batches_raise_the_same_error_on_every_rank(pool, name):
    (message_0, loss_0), (message_1, loss_1) = run_on_ranks(pool, 2, _unequal_batch_worker, name)
    assert message_0 is not None and "per-rank batch sizes differ: between 4 and 5 samples" in message_0
    assert "drop_last" in message_0
    assert message_1 == message_0.replace("5 on rank 0", "4 on rank 1")
    assert loss_0 == loss_1 and torch.isfinite(loss_0)


def _all_gather_worker(rank, world_size, group):
    tensor = torch.ones(2)
    dist.all_gather([torch.empty(2) for _ in range(world_size)], tensor, group=group)


def test_the_collective_guard_rejects_all_gather(pool):
    with pytest.raises(RuntimeError, match="all_gather beyond a node"):
        run_on_ranks(pool, 2, _all_gather_worker)
