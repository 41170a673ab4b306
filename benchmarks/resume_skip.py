"""How fast a resumed epoch passes over the samples it had already taken: skipping them undecoded
against taking them again through the decoding path.

    .venv/bin/python benchmarks/resume_skip.py                       # the default synthetic corpus, tiny-ViT
    .venv/bin/python benchmarks/resume_skip.py --model ViT-B-16      # 224-pixel crops of the same images
    .venv/bin/python benchmarks/resume_skip.py --shards DIR          # your own shards

One reader (what each DataLoader worker of a rank does), one thread, over the same samples: the
corpus's first ``--samples`` samples out of the shuffle buffer (``data.shuffle_buffer``, default
1000), with the run's preprocess (random crop etc. at the model's image size) and tokenizer.

* ``decoding (before)``: what a resume did before: take the batches again, every sample read by
  webdataset's ``tarfile_to_samples``, shuffled, decoded, augmented, tokenized and batched.
* ``skipping, webdataset's tar reader``: dropping the samples right after the shuffle buffer, read
  by webdataset's reader, which decodes every tar header with ``tarfile`` (for comparison).
* ``skipping (now)``: what a resume does now: the same with the pipeline's own member reader
  (``RankBatches.shuffled_samples``, then ``islice``).

Each is timed ``--repeats`` times, interleaved; the table gives the median rate (samples per second
of processor time, steadier than the wall clock on a shared machine; the wall-clock rate beside it)
and the ratio to decoding.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

import tuneclip_ds  # noqa: F401  (torchvision on a CPU-only torch, before open_clip)
from tuneclip_ds.config import DataConfig, ModelConfig, SyntheticConfig
from tuneclip_ds.data.pipeline import _skip_broken_shard, build_train_loader, resolve_shards
from tuneclip_ds.data.synthetic import write_synthetic_corpus
from tuneclip_ds.models import build_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="a shard spec (default: write the default synthetic corpus to a temp dir)")
    parser.add_argument("--model", default="tiny-ViT", help="whose preprocess and tokenizer decode the samples")
    parser.add_argument("--samples", type=int, default=4096, help="samples skipped or decoded per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=DataConfig.shuffle_buffer)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def synthetic_shards(folder: Path) -> str:
    spec = SyntheticConfig()
    write_synthetic_corpus(str(folder), spec.num_samples, spec.samples_per_shard, spec.image_size,
                           difficulty=spec.difficulty, seed=spec.seed, progress=False)
    return str(folder)


def webdataset_samples(batches):
    """Reader 0's raw samples out of its shuffle buffer, read by webdataset's ``tarfile_to_samples``
    (the pipeline before the fast member reader)."""
    raw = wds.tarfile_to_samples(handler=_skip_broken_shard)(batches._epoch_shards(batches.shards, reader=0))
    rng = random.Random(f"samples/{batches.seed}/{batches.epoch}/{batches.rank}/0")
    return wds.shuffle(batches.shuffle_buffer, initial=batches.shuffle_buffer, rng=rng)(raw)


def decoding(batches, samples: int) -> int:
    """The batches of the first ``samples`` samples, made again; the samples read."""
    taken = itertools.islice(batches._batches(webdataset_samples(batches), 0, 0), samples // batches.batch_size)
    return max(batch["position"][1] for batch in taken)


def skipping_with_webdataset_reader(batches, samples: int) -> int:
    return sum(1 for _ in itertools.islice(webdataset_samples(batches), samples))


def skipping(batches, samples: int) -> int:
    return sum(1 for _ in itertools.islice(batches.shuffled_samples(reader=0), samples))


WAYS = {"decoding (before)": decoding, "skipping, webdataset's tar reader": skipping_with_webdataset_reader,
        "skipping (now)": skipping}


def rates(batches, samples: int, repeats: int) -> dict[str, tuple[float, float, int]]:
    """Median samples per second of processor time and of wall clock per way, and the samples it read."""
    timings = {name: [] for name in WAYS}
    for _ in range(repeats):
        for name, way in WAYS.items():
            wall, cpu = time.perf_counter(), time.process_time()
            count = way(batches, samples)
            timings[name].append((count / (time.process_time() - cpu), count / (time.perf_counter() - wall), count))
    return {name: tuple(statistics.median(column) for column in zip(*runs)) for name, runs in timings.items()}


def markdown_table(results: dict[str, tuple[float, float, int]]) -> str:
    baseline = results["decoding (before)"][0]
    lines = ["| way | samples | samples/s (processor) | samples/s (wall) | x decoding |", "|---|---|---|---|---|"]
    for name, (cpu_rate, wall_rate, count) in results.items():
        lines.append(f"| {name} | {count:.0f} | {cpu_rate:,.0f} | {wall_rate:,.0f} | {cpu_rate / baseline:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    options = parse_args(argv)
    torch.set_num_threads(1)  # one data worker's share
    bundle = build_model(ModelConfig(name=options.model), load_weights=False)
    with tempfile.TemporaryDirectory() as folder:
        shards = options.shards or synthetic_shards(Path(folder))
        loader = build_train_loader(resolve_shards(shards), bundle.preprocess_train, bundle.tokenizer,
                                    options.batch_size, num_workers=0, rank=0, world_size=1, seed=0,
                                    shuffle_buffer=options.shuffle_buffer)
        results = rates(loader.batches, options.samples, options.repeats)
    print(f"{options.model}, {options.samples} samples of {shards if options.shards else 'the synthetic corpus'}, "
          f"shuffle buffer {options.shuffle_buffer}, median of {options.repeats}:\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
