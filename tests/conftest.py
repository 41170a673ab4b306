"""Shared fixtures: a small synthetic corpus written once per test session."""

import pytest

import tuneclip_ds  # noqa: F401  (makes torchvision, hence open_clip, importable on CPU torch)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> str:
    """1024 learnable 32x32 image-caption samples in 8 shards (ids 0..1023)."""
    from tuneclip_ds.data.synthetic import write_synthetic_corpus

    folder = tmp_path_factory.mktemp("synthetic") / "train"
    write_synthetic_corpus(str(folder), num_samples=1024, samples_per_shard=128, image_size=32,
                           difficulty=0.3, seed=0, progress=False)
    return str(folder)
