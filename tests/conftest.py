"""Shared fixtures: a small synthetic corpus and pools of gloo ranks, made once per test session."""

import pytest

import tuneclip_ds  # noqa: F401  (makes torchvision, hence open_clip, importable on CPU torch)
from gloo_pool import GlooPool


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> str:
    """1024 learnable 32x32 image-caption samples in 8 shards (ids 0..1023)."""
    from tuneclip_ds.data.synthetic import write_synthetic_corpus

    folder = tmp_path_factory.mktemp("synthetic") / "train"
    write_synthetic_corpus(str(folder), num_samples=1024, samples_per_shard=128, image_size=32,
                           difficulty=0.3, seed=0, progress=False)
    return str(folder)


@pytest.fixture(scope="session")
def gloo_pools():
    """``gloo_pools(world_size)``: a pool of that many ranks, started once (again if a failure closed it)."""
    pools: dict[int, GlooPool] = {}

    def get(world_size: int) -> GlooPool:
        if world_size not in pools or not pools[world_size].alive():
            pools[world_size] = GlooPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture
def pool(gloo_pools) -> GlooPool:
    return gloo_pools(2)


@pytest.fixture
def pools(gloo_pools) -> dict[int, GlooPool]:
    return {1: gloo_pools(1), 2: gloo_pools(2)}
