"""Images per second per rank of our training input pipeline beside open_clip_train's webdataset pipeline.

    .venv/bin/python benchmarks/input_speed.py --peer-site /tmp/peer-site          # both corpora, 1 and 2 workers
    .venv/bin/python benchmarks/input_speed.py --peer-site /tmp/peer-site --corpora photo --workers 2 --repeats 1

Both read the same shards, one rank (world size 1), with the same preprocess (open_clip's training transform of
the corpus's model, as ``build_model`` gets it), tokenizer, batch size and DataLoader workers:

* ours: ``tuneclip_ds.data.pipeline.build_train_loader`` as the trainer builds it (``builders.build_batches``):
  the workers return uint8 pixels, pinned when there is a GPU, converted and normalised on ``--device``
  (``device_images.to_model_input``);
* open_clip_train 3.3.0: ``open_clip_train.data.get_wds_dataset`` (webdataset 0.2.86 from ``--peer-site``,
  see open_clip_peer.py): float tensors normalised in the workers, copied to ``--device`` as its training
  loop does.

The corpora are written with the project's synthetic samples and shard writer:

* ``photo``: 256-px JPEGs (quality 90, about 15 kB each) through
  ViT-B-16's 224-px transform (RandomResizedCrop, bicubic);
* ``demo``: the demo's 32-px PNGs (configs/demo.yaml) through tiny-ViT's 32-px transform.

Each measurement is a fresh process (ours and theirs alike) that times ``--batches`` batches after the first
``--warmup`` (workers starting, shuffle buffers filling), the device synchronised at both ends: images per second
of wall-clock, and per second of processor time of the process and its data workers (user and system), which
a machine shared with other jobs disturbs less. The process runs one torch thread (OMP_NUM_THREADS=1), as data
workers do: with more, OpenMP's threads spin after each of our normalisations on the CPU, and the spinning
counts as processor time (most of ours on the demo corpus). The two pipelines alternate, the first of them
swapping from one repeat to the next; the table gives the medians over ``--repeats`` and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from open_clip_peer import REPO, peer_environment

PIPELINES = ["ours", "open_clip_train"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    model: str  # whose training transform and tokenizer
    image_size: int  # of the stored images
    image_format: str  # "jpg" (re-encoded) or "png" (as the synthetic corpus writes them)


CORPORA = {"photo": Corpus("ViT-B-16", 256, "jpg"), "demo": Corpus("tiny-ViT", 32, "png")}
JPEG_QUALITY = 90


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-site", required=True, help="a folder with webdataset 0.2.86 and pandas")
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2560, help="samples in each corpus: one epoch is read")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4, help="first batches left out of the rates")
    parser.add_argument("--batches", type=int, default=24, help="batches timed after the warm-up ones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="where images are normalised (default: cuda if available)")
    parser.add_argument("--measure", choices=PIPELINES, help=argparse.SUPPRESS)  # in the child process
    parser.add_argument("--corpus", choices=list(CORPORA), help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the corpora


def write_corpus(folder: str, corpus: Corpus, options: argparse.Namespace) -> None:
    from tuneclip_ds.config import SyntheticConfig
    from tuneclip_ds.data.shards import write_shards
    from tuneclip_ds.data.synthetic import resolve_difficulty, synthetic_sample

    spec = SyntheticConfig()
    difficulty = resolve_difficulty(spec.difficulty)
    samples = (synthetic_sample(index, corpus.image_size, difficulty, spec.seed, spec.split)
               for index in range(options.samples))
    if corpus.image_format == "jpg":
        samples = map(as_jpeg, samples)
    write_shards(samples, folder, options.samples_per_shard, total=options.samples, progress=False)


def as_jpeg(sample):
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(sample.image)).convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return dataclasses.replace(sample, image=buffer.getvalue(), image_format="jpg")


# ---------------------------------------------------------------- one measurement (a child process)


def training_transform(model: str):
    """open_clip's training transform for ``model`` without pretrained weights (OpenAI's mean and std), what
    ``create_model_and_transforms`` returns, without building the model."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(size=size), is_train=True)


def our_batches(shards: str, corpus: Corpus, options: argparse.Namespace, device):
    """(images, texts) on ``device``, as the trainer takes them from builders.build_batches."""
    import open_clip
    import torch
    from tuneclip_ds.data.device_images import to_model_input
    from tuneclip_ds.data.pipeline import build_train_loader

    loader = build_train_loader(shards, training_transform(corpus.model), open_clip.get_tokenizer(corpus.model),
                                options.batch_size, num_workers=options.workers[0], rank=0, world_size=1, seed=0,
                                pin_memory=torch.cuda.is_available())
    for batch in loader:
        yield to_model_input(batch, device, torch.float32), batch["text"].to(device)


def their_batches(shards: str, corpus: Corpus, options: argparse.Namespace, device):
    """(images, texts) on ``device``, as open_clip_train's training loop takes them."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    last_shard = len(list(Path(shards).glob("*.tar"))) - 1
    args = argparse.Namespace(train_data=f"{shards}/train-{{000000..{last_shard:06d}}}.tar", val_data=None,
                              train_num_samples=options.samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=options.batch_size,
                              world_size=1, workers=options.workers[0])
    data = get_wds_dataset(args, training_transform(corpus.model), is_train=True,
                           tokenizer=open_clip.get_tokenizer(corpus.model))
    for images, texts in data.dataloader:
        yield images.to(device, non_blocking=True), texts.to(device, non_blocking=True)


def measure(options: argparse.Namespace) -> dict:
    """Images per second of wall-clock and of processor time (this process and its data workers) over
    ``--batches`` batches after the warm-up ones, and the seconds to the first batch."""
    import torch

    import tuneclip_ds.models  # noqa: F401  (torchvision on a CPU-only torch; our model configs for open_clip)

    device = torch.device(options.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    make_batches = our_batches if options.measure == "ours" else their_batches
    began, marks, images = time.perf_counter(), [], 0
    for index, (pixels, _) in enumerate(make_batches(options.shards, CORPORA[options.corpus], options, device)):
        if index == 0:
            first_batch_s = time.perf_counter() - began
        if index in (options.warmup, options.warmup + options.batches):
            synchronize()
            marks.append((time.perf_counter(), processor_seconds()))  # the workers are still there
        if len(marks) == 2:
            break
        images += len(pixels) if marks else 0
    if len(marks) < 2:
        raise SystemExit(f"an epoch has fewer than {options.warmup + options.batches} batches: write more --samples")
    (wall_start, cpu_start), (wall_end, cpu_end) = marks
    return {"images_per_s": images / (wall_end - wall_start), "images_per_cpu_s": images / (cpu_end - cpu_start),
            "first_batch_s": first_batch_s}


def processor_seconds() -> float:
    """User and system seconds of this process and its live descendants (the DataLoader workers)."""
    import psutil

    me = psutil.Process()
    return sum(sum(process.cpu_times()[:2]) for process in [me, *me.children(recursive=True)])


# ---------------------------------------------------------------- the comparison


def run_child(pipeline: str, corpus: str, workers: int, shards: str, options: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--peer-site", options.peer_site, "--measure", pipeline, "--corpus", corpus,
               "--shards", shards, "--workers", str(workers), "--batch-size", str(options.batch_size),
               "--samples", str(options.samples), "--warmup", str(options.warmup), "--batches", str(options.batches),
               "--device", options.device]
    environment = (peer_environment(options.peer_site) if pipeline == "open_clip_train"
                   else {**os.environ, "PYTHONPATH": str(REPO)})
    environment["OMP_NUM_THREADS"] = "1"  # see the module's docstring
    done = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{pipeline} on {corpus} with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def compare(options: argparse.Namespace) -> dict:
    """{(corpus, workers): {pipeline: [measurements]}}, the pipelines alternating."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for corpus in options.corpora:
            shards = str(Path(folder, corpus))
            print(f"writing the {corpus} corpus", file=sys.stderr, flush=True)
            write_corpus(shards, CORPORA[corpus], options)
            for repeat in range(options.repeats):
                for workers in options.workers:
                    order = PIPELINES if repeat % 2 == 0 else PIPELINES[::-1]
                    for pipeline in order:
                        print(f"{corpus}, {workers} workers, repeat {repeat + 1}/{options.repeats}: {pipeline}",
                              file=sys.stderr, flush=True)
                        found = run_child(pipeline, corpus, workers, shards, options)
                        print(f"  {found['images_per_s']:.0f} images/s, {found['images_per_cpu_s']:.0f} per "
                              "processor second", file=sys.stderr, flush=True)
                        results.setdefault((corpus, workers), {}).setdefault(pipeline, []).append(found)
    return results


def markdown(results: dict, options: argparse.Namespace) -> str:
    lines = [f"batch {options.batch_size}, {options.batches} batches timed after {options.warmup}, device "
             f"{options.device}, median of {options.repeats}; images/s of wall-clock | of processor time", "",
             "| corpus | workers | ours | open_clip_train | ours / theirs | ours, CPU | open_clip_train, CPU "
             "| ours / theirs, CPU | first batch (s), ours / theirs |",
             "|---" * 9 + "|"]
    for (corpus, workers), runs in results.items():
        median = {(pipeline, key): statistics.median(run[key] for run in runs[pipeline])
                  for pipeline in PIPELINES for key in runs[pipeline][0]}
        cells = []
        for key in ("images_per_s", "images_per_cpu_s"):
            ours, theirs = median["ours", key], median["open_clip_train", key]
            cells += [f"{ours:.0f}", f"{theirs:.0f}", f"{ours / theirs:.2f}"]
        spec = CORPORA[corpus]
        first = f"{median['ours', 'first_batch_s']:.1f} / {median['open_clip_train', 'first_batch_s']:.1f}"
        lines.append(f"| {corpus} ({spec.image_size}-px {spec.image_format}, {spec.model}) | {workers} | "
                     + " | ".join(cells) + f" | {first} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    options = parse_args(argv)
    if options.device is None:
        import torch

        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    if options.measure:
        print(json.dumps(measure(options)))
        return
    print(markdown(compare(options), options))


if __name__ == "__main__":
    main()
