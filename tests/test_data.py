"""Tests of tuneclip_ds.data: the synthetic corpus, shard writing and converters, the training pipeline."""

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import tuneclip_ds  # noqa: F401  (before open_clip: makes torchvision importable on CPU torch)
import open_clip
from tuneclip_ds.data import pipeline, shards, synthetic, workers
from tuneclip_ds.data.device_images import to_model_input
from tuneclip_ds.data.pipeline import build_train_loader, resolve_shards
from tuneclip_ds.data.shards import ImageTextSample, write_shards
from tuneclip_ds.data.stream import BatchStream
from tuneclip_ds.data.synthetic import write_synthetic_corpus

IMAGE_SIZE = 32


class ByteTokenizer:
    """Stand-in tokenizer whose output gives the caption back: its UTF-8 bytes, zero-padded."""

    context_length = 160

    def __call__(self, texts):
        return torch.tensor([list(text.encode().ljust(self.context_length, b"\0")) for text in texts])


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(tokens[tokens > 0].tolist()).decode()


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(IMAGE_SIZE, is_train=False)


@contextlib.contextmanager
def fails_after(seconds: int):
    """Turn a hang into a test failure (SIGALRM interrupts the main thread)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def corpus(out_dir, num_samples=64, samples_per_shard=8, **kwargs):
    return write_synthetic_corpus(out_dir, num_samples, samples_per_shard, IMAGE_SIZE, progress=False, **kwargs)


def read_shards(paths) -> dict:
    """{id: {extension: bytes}} read straight from the tar files."""
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                samples.setdefault((path, key), {})[extension] = tar.extractfile(member).read()
    return {json.loads(sample["json"])["id"]: sample for sample in samples.values()}


def one_epoch(loader) -> dict:
    """ids in order, caption per id, and the total of num_skipped, for one pass of a ByteTokenizer loader."""
    ids, captions, skipped = [], {}, 0
    for batch in loader:
        ids += batch["sample_id"].tolist()
        captions.update(zip(batch["sample_id"].tolist(), map(detokenize, batch["text"])))
        skipped += batch["num_skipped"]
    return {"ids": ids, "captions": captions, "skipped": skipped}


def loader_for(shard_spec, preprocess, batch_size=4, num_workers=0, rank=0, world_size=1, **kwargs):
    return build_train_loader(shard_spec, preprocess, ByteTokenizer(), batch_size, num_workers, rank, world_size,
                              seed=0, **kwargs)


def write_raw_tar(path, records):
    """A tar of (member name, bytes): for shards that write_shards would never produce."""
    with tarfile.open(path, "w") as tar:
        for name, data in records:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- synthetic corpus -----------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic(tmp_path):
    first = corpus(tmp_path / "a", difficulty=1.0, seed=3)
    second = corpus(tmp_path / "b", difficulty=1.0, seed=3)
    other_seed = corpus(tmp_path / "c", difficulty=1.0, seed=4)
    assert [os.path.basename(p) for p in first] == [f"train-{i:06d}.tar" for i in range(8)]
    for a, b, c in zip(first, second, other_seed):
        assert open(a, "rb").read() == open(b, "rb").read()
        assert open(a, "rb").read() != open(c, "rb").read()


def test_synthetic_ids_are_dense_and_captions_name_the_class(tmp_path):
    samples = read_shards(corpus(tmp_path, num_samples=60, difficulty="medium"))
    assert sorted(samples) == list(range(60))
    for sample in samples.values():
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        class_name = synthetic.CLASS_NAMES[meta["label"]]
        assert f"{meta['size']} {class_name}" in caption  # caption words map to the label
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).reshape(-1, 3)
        distance = np.abs(pixels.astype(int) - synthetic.COLORS[meta["color"]]).sum(axis=1)
        assert (distance < 60).mean() > 0.02  # the main shape's color is in the image, despite noise
    assert len({json.loads(s["json"])["label"] for s in samples.values()}) > 10


def test_held_out_split_has_its_own_names_ids_and_content(tmp_path):
    train = corpus(tmp_path / "train", num_samples=16)
    val = corpus(tmp_path / "val", num_samples=16, split="val")
    assert os.path.basename(val[0]) == "val-000000.tar"
    train_samples, val_samples = read_shards(train), read_shards(val)
    assert sorted(val_samples) == list(range(16))  # ids restart at 0 within a split
    assert all(train_samples[i]["png"] != val_samples[i]["png"] for i in range(16))


def test_paraphrased_captions_use_synonyms_and_leave_out_sizes(tmp_path):
    samples = read_shards(corpus(tmp_path, num_samples=200, paraphrase=0.5))
    captions = [s["txt"].decode() for s in samples.values()]
    synonyms = {word for options in synthetic.SYNONYMS.values() for word in options}
    with_synonym = [c for c in captions if any(word in c for word in synonyms)]
    assert 0.3 < len(with_synonym) / len(captions) < 0.95
    paraphrased = [c for c in captions if any(t.split("{")[0] and t.split("{")[0] in c
                                               for t in synthetic.PARAPHRASE_TEMPLATES)]
    assert paraphrased, "paraphrasing templates are drawn"
    for sample in samples.values():
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        names = {meta["shape"], *synthetic.SYNONYMS[meta["shape"]]}
        assert any(name in caption for name in names)  # the shape is always named, maybe by a synonym
    sized = sum(any(w in c.split() for w in ("small", "large", "little", "tiny", "big", "huge")) for c in captions)
    assert 0.2 < sized / len(captions) < 0.8  # with paraphrase 0.5, about half name the size
    plain = [s["txt"].decode() for s in read_shards(corpus(tmp_path / "plain", num_samples=50)).values()]
    assert not any(word in c.split() for c in plain for word in synonyms)


def test_shifted_domain_draws_the_same_classes_on_unseen_scenery(tmp_path):
    standard = read_shards(corpus(tmp_path / "a", num_samples=60, split="val"))
    shifted = read_shards(corpus(tmp_path / "b", num_samples=60, split="val", domain="shifted"))
    shifted_meta = [json.loads(s["json"]) for s in shifted.values()]
    assert {m["background"] for m in shifted_meta} <= set(synthetic.DOMAINS["shifted"].backgrounds)
    assert not {m["background"] for m in shifted_meta} & set(synthetic.BACKGROUNDS)
    assert {m["texture"] for m in shifted_meta} - {"plain"} <= {"dotted", "diagonal"}
    assert sum(m["texture"] != "plain" for m in shifted_meta) > 20  # textured at least half the time
    assert all(standard[i]["png"] != shifted[i]["png"] for i in range(60))
    for sample, meta in zip(shifted.values(), shifted_meta):  # the class is still the main shape's
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).reshape(-1, 3)
        assert (np.abs(pixels.astype(int) - synthetic.COLORS[meta["color"]]).sum(axis=1) < 60).mean() > 0.02
    with pytest.raises(ValueError, match="domain must be one of"):
        corpus(tmp_path / "c", domain="alien")


def test_split_names_give_disjoint_corpora_from_one_seed(tmp_path):
    pretrain = read_shards(corpus(tmp_path / "p", num_samples=16, split="pretrain"))
    train = read_shards(corpus(tmp_path / "t", num_samples=16))
    assert os.path.basename(corpus(tmp_path / "q", num_samples=4, split="pretrain")[0]) == "pretrain-000000.tar"
    assert all(pretrain[i]["png"] != train[i]["png"] for i in range(16))


def test_synthetic_cli_and_difficulty_levels(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num-samples", "10", "--samples-per-shard", "4",
                    "--image-size", "32", "--difficulty", "hard", "--split", "val"])
    assert sorted(os.listdir(tmp_path)) == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert "wrote 10 val samples in 3 shards" in capsys.readouterr().out
    assert synthetic.resolve_difficulty("0.5") == synthetic.resolve_difficulty("medium")
    with pytest.raises(ValueError, match="difficulty"):
        synthetic.resolve_difficulty("extreme")


# --- the training pipeline ------------------------------------------------------------------


def test_batches_with_open_clip_preprocess_and_tokenizer(tmp_path, preprocess):
    paths = corpus(tmp_path)
    loader = build_train_loader(str(tmp_path), preprocess, open_clip.get_tokenizer("ViT-B-32"), batch_size=16,
                                num_workers=0, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"image", "text", "sample_id", "num_skipped", "position", "normalization"}
    # the workers' uint8 pixels, normalised where the model is, equal open_clip's transform bit for bit
    assert batch["image"].shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.uint8
    stored = read_shards(paths)
    expected = torch.stack([preprocess(Image.open(io.BytesIO(stored[i]["png"]))) for i in batch["sample_id"].tolist()])
    assert torch.equal(to_model_input(batch, torch.device("cpu"), torch.float32), expected)
    assert to_model_input(batch, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16
    assert batch["text"].shape == (16, 77) and batch["text"].dtype == torch.int64
    assert batch["sample_id"].dtype == torch.int64 and batch["num_skipped"] == 0
    assert resolve_shards(str(tmp_path)) == paths


def test_ids_and_captions_are_stable_across_runs_and_epochs(tmp_path, preprocess):
    stored = read_shards(corpus(tmp_path))
    expected_captions = {i: sample["txt"].decode() for i, sample in stored.items()}
    first_run, second_run = loader_for(tmp_path, preprocess), loader_for(tmp_path, preprocess)
    epoch0, epoch0_again = one_epoch(first_run), one_epoch(second_run)
    assert epoch0["ids"] == epoch0_again["ids"]  # same seed: same order
    assert sorted(epoch0["ids"]) == list(range(64)) and epoch0["captions"] == expected_captions
    epoch1 = one_epoch(first_run)  # iterating again: the next epoch, in another order
    assert epoch1["ids"] != epoch0["ids"] and sorted(epoch1["ids"]) == list(range(64))
    first_run.set_epoch(0)
    assert one_epoch(first_run)["ids"] == epoch0["ids"]


def test_two_ranks_with_two_workers_read_disjoint_samples_covering_the_corpus(tmp_path, preprocess):
    corpus(tmp_path, num_samples=64, samples_per_shard=8)  # 8 shards: 2 per (rank, worker), 16 samples each
    per_rank = [
        one_epoch(loader_for(tmp_path, preprocess, batch_size=4, num_workers=2, rank=rank, world_size=2))["ids"]
        for rank in (0, 1)
    ]
    assert all(len(ids) == 32 == len(set(ids)) for ids in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(64))


def test_partial_batches_are_dropped(tmp_path, preprocess):
    corpus(tmp_path, num_samples=30, samples_per_shard=10)
    ids = one_epoch(loader_for(tmp_path, preprocess, batch_size=8))["ids"]
    assert len(ids) == 24 == len(set(ids))


def test_resampled_stream_keeps_going_and_differs_per_rank(tmp_path, preprocess):
    corpus(tmp_path, num_samples=16, samples_per_shard=8)  # 2 shards: too few for 2 ranks x 2 workers ...
    batches = [
        list(itertools.islice(loader_for(tmp_path, preprocess, num_workers=2, rank=rank, world_size=2,
                                         resampled=True), 12))  # ... but fine when resampled
        for rank in (0, 1)
    ]
    ids = [torch.cat([batch["sample_id"] for batch in rank_batches]).tolist() for rank_batches in batches]
    assert len(ids[0]) == 48 and ids[0] != ids[1]
    assert set(ids[0]) | set(ids[1]) <= set(range(16))


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path, preprocess):
    corpus(tmp_path, num_samples=24, samples_per_shard=8)
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 data workers.*resampled"):
        loader_for(tmp_path, preprocess, num_workers=2, rank=1, world_size=2)


def on_cpus(monkeypatch, node: int, affinity: int, ranks_per_node: int) -> None:
    """Fake a node of ``node`` CPUs, this process bound to ``affinity`` of them, ``ranks_per_node`` ranks on it."""
    monkeypatch.setattr(os, "cpu_count", lambda: node)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks_per_node))


@pytest.mark.parametrize("node,affinity,ranks_per_node,expected", [
    (96, 96, 8, 8),  # the whole node shared by 8 ranks: 12 each, less one, capped at 8
    (64, 64, 8, 7),  # 8 each, less one
    (64, 6, 8, 5),  # bound to 6 CPUs (srun --cpus-per-task 6): this rank's own, not divided again
    (2, 2, 2, 1),  # one CPU each: still one worker
    (4, 4, 1, 3),  # a single rank on a small machine
    (256, 256, 1, 8),  # the cap
])
def test_automatic_workers_are_the_ranks_cpus_less_one(monkeypatch, node, affinity, ranks_per_node, expected):
    on_cpus(monkeypatch, node, affinity, ranks_per_node)
    assert workers.automatic_workers() == expected


def test_automatic_workers_are_lowered_to_what_the_shards_allow(tmp_path, preprocess, monkeypatch, caplog):
    corpus(tmp_path, num_samples=56, samples_per_shard=8)  # 7 shards: 3 readers for each of 2 ranks
    on_cpus(monkeypatch, node=32, affinity=32, ranks_per_node=2)  # 15 workers by the CPUs, 8 by the cap
    with caplog.at_level(logging.INFO, logger="tuneclip_ds.data"):
        loader = loader_for(tmp_path, preprocess, num_workers=None, rank=0, world_size=2)
    assert loader.readers == loader.loader.num_workers == 3
    assert "data.num_workers: 3 data-loading workers per rank" in caplog.text
    assert "7 shards for 2 ranks: not 8" in caplog.text
    resampled = loader_for(tmp_path, preprocess, num_workers=None, rank=1, world_size=2, resampled=True)
    assert resampled.loader.num_workers == 8  # shards drawn with replacement: any number of readers
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuneclip_ds.data"):
        loader_for(tmp_path, preprocess, num_workers=None, rank=1, world_size=2)
    assert caplog.text == ""  # rank 0 alone logs it
    with pytest.raises(ValueError, match=r"7 shards for 8 ranks x 1 data workers"):  # fewer shards than ranks
        loader_for(tmp_path, preprocess, num_workers=None, rank=0, world_size=8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_explicit_workers_are_taken_as_they_are(tmp_path, preprocess, monkeypatch, num_workers):
    corpus(tmp_path, num_samples=56, samples_per_shard=8)
    on_cpus(monkeypatch, node=2, affinity=2, ranks_per_node=2)  # the automatic number would be 1
    loader = loader_for(tmp_path, preprocess, num_workers=num_workers, rank=0, world_size=2)
    assert loader.loader.num_workers == num_workers and loader.readers == max(1, num_workers)


def test_missing_shards_are_a_clear_error(tmp_path):
    missing = tmp_path / "train-{000000..000003}.tar"
    with pytest.raises(ValueError, match=r"train-000000.tar does not exist.*tuneclip_ds.data.synthetic"):
        resolve_shards(str(missing))
    with pytest.raises(ValueError, match=r"no \*.tar shards in directory .*tuneclip_ds.data.shards"):
        resolve_shards(str(tmp_path))
    paths = corpus(tmp_path / "a", num_samples=8, samples_per_shard=4)
    assert resolve_shards(f"{tmp_path}/a/train-{{000000..000001}}.tar::{tmp_path}/a") == paths + paths


def test_corrupt_samples_are_skipped_counted_and_named(tmp_path, preprocess, caplog):
    samples = [ImageTextSample(png_bytes(), "png", f"caption {i}") for i in range(18)]
    samples[5] = ImageTextSample(b"not an image", "png", "a broken image")
    write_shards(samples, tmp_path, samples_per_shard=9, progress=False)
    # A sample without a caption, as another tool might write it.
    write_raw_tar(tmp_path / "train-000002.tar", [("000000099.png", png_bytes()), ("000000099.json", b'{"id": 99}')])
    with caplog.at_level(logging.WARNING, logger="tuneclip_ds.data"):
        epoch = one_epoch(loader_for(tmp_path, preprocess, batch_size=1, shuffle_buffer=0))
    assert sorted(epoch["ids"]) == [i for i in range(18) if i != 5]
    assert epoch["skipped"] in (1, 2)  # a skip after this worker's last batch has no batch to report it
    assert "000000005" in caplog.text and "000000099" in caplog.text


def test_truncated_and_garbage_tar_files_are_skipped(tmp_path, preprocess, caplog):
    corpus(tmp_path, num_samples=32, samples_per_shard=8)
    truncated = tmp_path / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    (tmp_path / "train-000002.tar").write_bytes(b"this is not a tar file" * 100)
    with caplog.at_level(logging.WARNING, logger="tuneclip_ds.data"), fails_after(60):
        ids = one_epoch(loader_for(tmp_path, preprocess, batch_size=1))["ids"]
    assert set(range(0, 8)) | set(range(24, 32)) <= set(ids) < set(range(16)) | set(range(24, 32))
    assert "broken shard" in caplog.text


def test_an_epoch_without_batches_is_a_clear_error(tmp_path, preprocess):
    corpus(tmp_path, num_samples=8, samples_per_shard=4)
    with pytest.raises(ValueError, match="rank 0 got no full batch of 16"):
        one_epoch(loader_for(tmp_path, preprocess, batch_size=16))


def test_a_stream_of_undecodable_samples_fails_instead_of_spinning(tmp_path, preprocess, monkeypatch):
    monkeypatch.setattr(pipeline, "_MAX_FAILURES_IN_A_ROW", 5)
    write_raw_tar(tmp_path / "a.tar", [(f"{k:09d}.{ext}", b"?") for k in range(3) for ext in ("gif", "txt")])
    with pytest.raises(ValueError, match="5 samples in a row failed to decode"):
        next(iter(loader_for(tmp_path, preprocess, resampled=True)))


def test_sample_id_comes_from_a_numeric_key_without_json(tmp_path, preprocess):
    write_raw_tar(tmp_path / "a.tar", [(f"{k:09d}.{ext}", data) for k in (7, 42)
                                       for ext, data in (("jpg", png_bytes()), ("txt", b"x"))])
    assert sorted(one_epoch(loader_for(tmp_path, preprocess, batch_size=1))["ids"]) == [7, 42]


def test_sample_without_an_id_is_a_clear_error(tmp_path, preprocess):
    write_raw_tar(tmp_path / "a.tar", [("cat.png", png_bytes()), ("cat.txt", b"a cat")])
    with pytest.raises(pipeline.MissingSampleIdError, match=r"'cat'.*python -m tuneclip_ds.data.shards"):
        one_epoch(loader_for(tmp_path, preprocess, batch_size=1))


# --- resuming an epoch ----------------------------------------------------------------------


def unequal_readers_corpus(folder):
    """Shards of 16, 16 and 8 samples, one undecodable: with 2 workers, one reader has 2 shards, the
    other 1, and runs dry well before the end of the epoch."""
    items = [ImageTextSample(png_bytes((i, 255 - i, 7 * i % 256)), "png", f"caption {i}") for i in range(40)]
    items[13] = ImageTextSample(b"not an image", "png", "a broken image")
    write_shards(items, folder, samples_per_shard=16, progress=False)


def stream_for(folder, preprocess, num_workers, state=None, **loader_options):
    stream = BatchStream(loader_for(folder, preprocess, num_workers=num_workers, shuffle_buffer=6, **loader_options))
    if state is not None:
        stream.load_state_dict(state)
    return stream


def take(stream, count):
    """``count`` batches, and the stream's state after each."""
    batches, states = [], []
    for batch in itertools.islice(stream, count):
        batches.append(batch)
        states.append(stream.state_dict())
    return batches, states


def assert_same_batches(resumed, expected):
    assert len(resumed) == len(expected)
    for ours, theirs in zip(resumed, expected):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key], key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_resumed_at_any_batch_gives_the_batches_of_an_uninterrupted_one(tmp_path, preprocess, num_workers):
    unequal_readers_corpus(tmp_path)
    with fails_after(120):
        straight, states = take(stream_for(tmp_path, preprocess, num_workers), 20)  # 9 batches an epoch
        readers = [batch["position"][0] for batch in straight[:9]]
        assert num_workers == 0 or readers[-3:] == [0, 0, 0]  # reader 1 ran dry: reader 0 alone goes on
        assert any(batch["num_skipped"] for batch in straight)  # the undecodable sample, skipped and counted
        # either reader next, a reader run dry, at the end of an epoch (nothing left in it), in the next one
        for taken in (1, 2, 7, 8, 9, 13):
            resumed, _ = take(stream_for(tmp_path, preprocess, num_workers, states[taken - 1]), 20 - taken)
            assert_same_batches(resumed, straight[taken:])


def test_resuming_decodes_only_the_samples_after_the_position(tmp_path, preprocess, monkeypatch):
    unequal_readers_corpus(tmp_path)
    _, states = take(stream_for(tmp_path, preprocess, num_workers=0), 8)
    decoded = []
    decode = pipeline.RankBatches._decode
    monkeypatch.setattr(pipeline.RankBatches, "_decode", lambda self, sample: decoded.append(1) or decode(self, sample))
    next(stream_for(tmp_path, preprocess, num_workers=0, state=states[-1]))
    assert len(decoded) == 4  # one batch: the 32 samples read before are dropped undecoded


def test_a_state_without_reader_positions_resumes_by_decoding_again(tmp_path, preprocess, caplog):
    """Checkpoints written before reader positions were saved (or with another number of workers)."""
    unequal_readers_corpus(tmp_path)
    straight, states = take(stream_for(tmp_path, preprocess, num_workers=0), 10)
    old_state = {"epoch": 0, "batches_in_epoch": 6}
    with caplog.at_level(logging.WARNING):
        resumed_stream = stream_for(tmp_path, preprocess, num_workers=0, state=old_state)
        resumed, resumed_states = take(resumed_stream, 4)
    assert_same_batches(resumed, straight[6:])
    assert resumed_states == states[6:] and "reading and decoding the 6 batches of epoch 0" in caplog.text


# --- writing shards from the user's own data ------------------------------------------------


def make_images(folder, count, suffix=".png"):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"img{i}{suffix}"))
        Image.new("RGB", (40, 30), (10 * i, 100, 50)).save(paths[-1])
    return paths


@pytest.mark.parametrize("file_name", ["captions.tsv", "captions.csv"])
def test_csv_converter_writes_shards_the_pipeline_reads(tmp_path, preprocess, file_name):
    images = make_images(tmp_path / "images", 6, ".jpg")
    table = tmp_path / file_name
    with open(table, "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t" if file_name.endswith(".tsv") else ",")
        writer.writerow(["caption", "path"])
        for i, image in enumerate(images):  # relative, and one absolute, path
            writer.writerow([f"photo number {i}, a test", image if i == 0 else os.path.relpath(image, tmp_path)])
    result = shards.csv_to_shards(str(table), tmp_path / "out", samples_per_shard=2,
                                  image_column="path", caption_column="caption")
    assert (result.num_written, result.num_skipped, len(result.shards)) == (6, 0, 3)
    assert sorted(os.listdir(tmp_path / "out")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    epoch = one_epoch(loader_for(str(tmp_path / "out"), preprocess, batch_size=2))
    assert epoch["captions"] == {i: f"photo number {i}, a test" for i in range(6)}


def test_image_folder_converter_and_cli(tmp_path, preprocess, capsys):
    folder = tmp_path / "photos"
    images = make_images(folder, 2) + make_images(folder / "sub", 2, ".jpg")
    for image in images:
        with open(os.path.splitext(image)[0] + ".txt", "w") as file:
            file.write(f"  caption of {os.path.basename(image)}\n")
    shards.main(["--image-folder", str(folder), "--out", str(tmp_path / "out"), "--samples-per-shard", "2"])
    printed = capsys.readouterr()
    assert "wrote 4 samples in 2 shards" in printed.out
    assert "\r" not in printed.err  # no progress bar when stderr is not a terminal
    stored = read_shards(resolve_shards(str(tmp_path / "out")))
    assert sorted(stored) == [0, 1, 2, 3] and {"jpg", "png"} <= {ext for s in stored.values() for ext in s}
    captions = one_epoch(loader_for(str(tmp_path / "out"), preprocess, batch_size=1))["captions"]
    expected = {f"caption of {os.path.basename(image)}" for image in images}
    assert set(captions.values()) == expected


def test_bad_inputs_name_the_file_or_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "photos"
    good, no_caption, unreadable = make_images(folder, 3)
    for image in (good, unreadable):
        with open(os.path.splitext(image)[0] + ".txt", "w") as file:
            file.write("a caption")
    with open(unreadable, "r+b") as file:
        file.truncate(40)
    with pytest.raises(shards.BadInputError, match="img1.png.*img1.txt"):
        shards.image_folder_to_shards(folder, tmp_path / "out", samples_per_shard=1)
    assert not os.listdir(tmp_path / "out")  # no partial corpus left behind
    os.remove(no_caption)
    with pytest.raises(shards.BadInputError, match="cannot read image .*img2.png"):
        shards.image_folder_to_shards(folder, tmp_path / "out", samples_per_shard=1)
    result = shards.image_folder_to_shards(folder, tmp_path / "out", samples_per_shard=1, skip_bad=True)
    assert (result.num_written, result.num_skipped) == (1, 1)


def test_writing_over_existing_shards_is_refused(tmp_path):
    corpus(tmp_path, num_samples=4, samples_per_shard=4)
    with pytest.raises(ValueError, match="already holds 1 'train-\\*.tar' shards"):
        corpus(tmp_path, num_samples=4, samples_per_shard=4)


# --- several sources mixed by weight -------------------------------------------------------


def two_sources(folder, sizes=(64, 192), samples_per_shard=16):
    """Sources "a" and "b" of ``sizes`` samples (ids 0..n-1 each), captions naming their source."""
    sources, offset = [], 0
    for name, size in zip("ab", sizes):
        items = [ImageTextSample(png_bytes((i % 256, 0, 0)), "png", f"{name} {i}") for i in range(size)]
        write_shards(items, folder / name, samples_per_shard=samples_per_shard, progress=False)
        sources.append(pipeline.Source(resolve_shards(folder / name), weight=1.0 if name == "a" else 3.0,
                                       id_offset=offset, num_samples=size))
        offset += size
    return sources


def test_sources_are_drawn_by_weight_with_distinct_ids(tmp_path, preprocess):
    sources = two_sources(tmp_path)
    loader = loader_for(None, preprocess, batch_size=8, sources=sources, resampled=True)
    counts, captions = [0, 0], {}
    for batch in itertools.islice(iter(loader), 150):
        counts = [a + b for a, b in zip(counts, batch["source_counts"])]
        captions.update(zip(batch["sample_id"].tolist(), map(detokenize, batch["text"])))
    assert 0.72 < counts[1] / sum(counts) < 0.78  # weights 1 and 3; 1200 samples drawn
    # source b's ids come after source a's 64: every id names its own sample
    assert all(caption == (f"a {i}" if i < 64 else f"b {i - 64}") for i, caption in captions.items())


def test_mixed_sources_split_over_ranks_and_workers_and_resume_exactly(tmp_path, preprocess):
    sources = two_sources(tmp_path, sizes=(128, 256))
    ids_by_rank = [one_epoch(loader_for(None, preprocess, num_workers=2, rank=rank, world_size=2,
                                        sources=sources))["ids"] for rank in (0, 1)]
    assert ids_by_rank[0] and ids_by_rank[1] and not set(ids_by_rank[0]) & set(ids_by_rank[1])
    with fails_after(120):
        straight, states = take(stream_for(None, preprocess, 0, sources=sources), 12)
        for taken in (3, 7):
            resumed, _ = take(stream_for(None, preprocess, 0, state=states[taken - 1], sources=sources), 12 - taken)
            assert_same_batches(resumed, straight[taken:])


def test_an_id_outside_its_sources_range_stops_with_a_message(tmp_path, preprocess):
    sources = two_sources(tmp_path)
    short = [sources[0], dataclasses.replace(sources[1], num_samples=100)]  # b holds ids up to 191
    batches = iter(loader_for(None, preprocess, batch_size=8, sources=short, resampled=True))
    with pytest.raises(shards.ShardFormatError, match=r"id 1\d\d, outside its source's \[0, 100\)"):
        for _ in range(100):
            next(batches)


def test_training_split_of_shifted_scenery(tmp_path):
    """data.synthetic.domain=shifted writes the training split from the shifted scenery (and the held-out
    splits as before): the same bytes as the writer asked for that domain, none of the standard split's."""
    from tuneclip_ds.builders import ensure_synthetic_corpus
    from tuneclip_ds.config import load_config

    common = ["train.steps=1", "data.synthetic.num_samples=8", "data.synthetic.samples_per_shard=8",
              "data.synthetic.image_size=16", f"data.synthetic.val_shards={tmp_path / 'val'}",
              "data.synthetic.val_samples=8"]
    for domain in ("standard", "shifted"):
        ensure_synthetic_corpus(load_config(None, [*common, f"data.train_shards={tmp_path / domain}",
                                                   f"data.synthetic.domain={domain}"]).data)
    shifted, standard, val = (tmp_path / name / f"{split}-000000.tar"
                              for name, split in (("shifted", "train"), ("standard", "train"), ("val", "val")))
    [expected] = write_synthetic_corpus(str(tmp_path / "expected"), 8, 8, 16, difficulty=0.3, domain="shifted",
                                        progress=False)  # the config's default difficulty
    assert shifted.read_bytes() == open(expected, "rb").read() != standard.read_bytes()
    assert val.read_bytes() != shifted.read_bytes()
    backgrounds = {json.loads(sample["json"])["background"] for sample in read_shards([shifted]).values()}
    assert backgrounds <= set(synthetic.DOMAINS["shifted"].backgrounds)
