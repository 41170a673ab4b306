"""Zero-shot evaluation against independent computations on a small synthetic held-out set.

References: open_clip's ``build_zero_shot_classifier`` with a plain top-k loop, a plain-loop
recall@k, and one process against two gloo ranks. open_clip is imported inside functions: the
pool's children import this module to find the worker function (they build the model
themselves, as the trainer's ranks do).
"""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import tuneclip_ds  # noqa: F401  (before open_clip: makes torchvision importable on CPU torch)
from gloo_pool import GlooPool
from tuneclip_ds.config import ConfigError, ModelConfig
from tuneclip_ds.data.shards import DataError, ImageTextSample, write_shards
from tuneclip_ds.data.synthetic import CLASS_NAMES, ZEROSHOT_TEMPLATES, write_synthetic_corpus
from tuneclip_ds.errors import InputError
from tuneclip_ds.eval import BestTracker, EvalTask, ForwardEncoder, Suite, check_suite, evaluate, load_suite
from tuneclip_ds.eval.cli import main as eval_main
from tuneclip_ds.eval.tasks import classnames_of, fill_template, templates_of

REPO = Path(__file__).resolve().parent.parent
NUM_SAMPLES = 45  # 3 shards of 16, 16, 13
BATCH_SIZE = 11  # uneven: on 2 ranks, rank 0 gets 3 batches and rank 1 two


# ---------------------------------------------------------------- data and model


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("heldout") / "val"
    write_synthetic_corpus(str(folder), NUM_SAMPLES, samples_per_shard=16, image_size=32, difficulty=0.3,
                           seed=0, split="val", progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def samples(heldout) -> list[dict]:
    """The held-out samples in shard order, read with tarfile: ``png`` bytes, ``txt`` caption, json ``label``."""
    found = []
    for shard in sorted(Path(heldout).glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for member in tar:
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        for key in sorted(members):
            metadata = json.loads(members[key]["json"])
            found.append({"png": members[key]["png"], "txt": members[key]["txt"].decode(),
                          "label": metadata["label"], "class_name": metadata["class_name"]})
    return found


@pytest.fixture(scope="module")
def image_folder(samples, tmp_path_factory) -> str:
    """The held-out images as an image folder: one sub-folder per class name present."""
    root = tmp_path_factory.mktemp("folder")
    for number, sample in enumerate(samples):
        (root / sample["class_name"]).mkdir(exist_ok=True)
        (root / sample["class_name"] / f"{number:03d}.png").write_bytes(sample["png"])
    return str(root)


@pytest.fixture(scope="module")
def two_caption_shards(samples, tmp_path_factory) -> str:
    """Retrieval shards with two captions per image; the second is shared by all images of a class (ties)."""
    folder = tmp_path_factory.mktemp("two_captions")
    pairs = [ImageTextSample(s["png"], "png", f"{s['txt']}\na photo of the {s['class_name']}.") for s in samples]
    write_shards(pairs, str(folder), samples_per_shard=20, prefix="val", progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def cls_shards(samples, tmp_path_factory) -> str:
    """The held-out set as DataComp / clip_benchmark classification shards: ``webp`` image, ``cls`` label, no json."""
    import webdataset

    folder = tmp_path_factory.mktemp("cls_shards")
    for shard, start in enumerate(range(0, len(samples), 20)):
        with webdataset.TarWriter(str(folder / f"{shard}.tar"), encoder=False) as writer:
            for number, sample in enumerate(samples[start : start + 20], start):
                webp = io.BytesIO()
                Image.open(io.BytesIO(sample["png"])).save(webp, format="webp", lossless=True)
                writer.write({"__key__": f"s{number:07d}", "webp": webp.getvalue(),
                              "cls": str(sample["label"]).encode()})
    return str(folder)


@pytest.fixture(scope="module")
def bundle():
    from tuneclip_ds.models import build_model

    torch.manual_seed(0)
    tiny = build_model(ModelConfig(name="tiny-ViT"))
    tiny.model.eval()
    return tiny


@pytest.fixture(scope="module")
def weights(bundle, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(bundle.model.state_dict(), path)
    return str(path)


def classification(data, classnames="synthetic", templates="synthetic", batch_size=BATCH_SIZE, num_workers=0,
                   label_field="label") -> EvalTask:
    return EvalTask("cls", "classification", data, classnames=classnames, templates=templates,
                    label_field=label_field, batch_size=batch_size, num_workers=num_workers)


def retrieval(data, name="ret", num_workers=0) -> EvalTask:
    return EvalTask(name, "retrieval", data, batch_size=BATCH_SIZE, num_workers=num_workers)


def image_features(bundle, encoded_images: list[bytes]) -> torch.Tensor:
    """All images in one batch, straight through open_clip's encode_image."""
    images = [bundle.preprocess_val(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded_images]
    with torch.no_grad():
        return bundle.model.encode_image(torch.stack(images), normalize=True)


# ---------------------------------------------------------------- classification


def reference_top_k(bundle, samples, classnames, templates, labels) -> dict[str, float]:
    """open_clip's zero-shot classifier, then top-k counted sample by sample."""
    import open_clip

    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(bundle.model, bundle.tokenizer, classnames, templates,
                                                          num_classes_per_batch=10)
    logits = image_features(bundle, [s["png"] for s in samples]) @ classifier
    hits = {1: 0, 5: 0}
    for sample_logits, label in zip(logits, labels):
        predictions = sample_logits.topk(5).indices.tolist()
        for k in hits:
            hits[k] += label in predictions[:k]
    return {f"cls/top{k}": count / len(labels) for k, count in hits.items()}


@pytest.mark.parametrize("source, classnames, templates", [
    ("shards", "synthetic", "synthetic"),
    ("shards", "synthetic", "openai"),
    ("cls_shards", "synthetic", "synthetic"),  # the label in a `cls` member
    ("folder", None, "synthetic"),  # class names from the sorted folder names
])
def test_classification_equals_open_clip_zero_shot(bundle, samples, heldout, cls_shards, image_folder, source,
                                                   classnames, templates):
    import open_clip.zero_shot_metadata as metadata

    data, label_field = {"shards": (heldout, "label"), "cls_shards": (cls_shards, "cls"),
                         "folder": (image_folder, "label")}[source]
    # 2400 prompts with the 80 OpenAI templates: large batches keep it quick
    task = classification(data, classnames, templates, batch_size=256, label_field=label_field)
    results = evaluate(bundle.model, [task], bundle.preprocess_val, bundle.tokenizer, "cpu")

    if source == "folder":
        names = sorted({s["class_name"] for s in samples})
        ordered = sorted(samples, key=lambda s: s["class_name"])  # the folder's order; files keep theirs
        labels = [names.index(s["class_name"]) for s in ordered]
    else:
        names, ordered, labels = CLASS_NAMES, samples, [s["label"] for s in samples]
    template_list = {"synthetic": ZEROSHOT_TEMPLATES, "openai": metadata.OPENAI_IMAGENET_TEMPLATES}[templates]
    assert results == reference_top_k(bundle, ordered, names, template_list, labels)


def test_class_name_and_template_sources(tmp_path):
    import open_clip.zero_shot_metadata as metadata

    imagenet = EvalTask("in", "classification", "unused", classnames="imagenet", templates="simple")
    assert classnames_of(imagenet) == list(metadata.IMAGENET_CLASSNAMES)
    assert templates_of(imagenet) == list(metadata.SIMPLE_IMAGENET_TEMPLATES)
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("cat\n\ndog\n")
    templates.write_text("a photo of a {c}.\nart of the {}.\n")  # clip_benchmark's and format's slots
    from_files = EvalTask("f", "classification", "unused", classnames=str(names), templates=str(templates))
    assert classnames_of(from_files) == ["cat", "dog"]
    assert [fill_template(t, "dog") for t in templates_of(from_files)] == ["a photo of a dog.", "art of the dog."]


# ---------------------------------------------------------------- retrieval


def reference_hits(scores: torch.Tensor, correct: torch.Tensor) -> list[int]:
    """Hits at 1, 5, 10 as open_clip's get_clip_metrics counts them (the rank of a query is where its answer
    lands when its candidates are sorted by descending score), with ties in candidate order (a stable sort)
    and, for several answers, the first of them."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = [int(answers[candidates].nonzero()[0, 0]) for answers, candidates in zip(correct, order)]
    return [sum(rank < k for rank in ranks) for k in (1, 5, 10)]


def reference_recalls(image_embeddings, text_embeddings, text_image) -> dict[str, float]:
    scores = image_embeddings @ text_embeddings.T
    correct = torch.tensor(text_image)[None, :] == torch.arange(len(scores))[:, None]
    recalls = {}
    for direction, scores_, correct_ in (("image_to_text", scores, correct), ("text_to_image", scores.T, correct.T)):
        for k, hits in zip((1, 5, 10), reference_hits(scores_, correct_)):
            recalls[f"ret/{direction}_R@{k}"] = hits / len(scores_)
    recalls["ret/mean_R@1"] = (recalls["ret/image_to_text_R@1"] + recalls["ret/text_to_image_R@1"]) / 2
    return recalls


def test_recall_ranks_ties_in_candidate_order_at_any_world_size():
    from tuneclip_ds.eval.metrics import retrieval_hits

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2, (13, 3), generator=generator).float()  # few distinct rows: many exact ties
    text_image = torch.cat([torch.arange(13), torch.randint(0, 13, (16,), generator=generator)]).sort().values
    texts = torch.randint(0, 2, (29, 3), generator=generator).float()
    scores = images @ texts.T
    correct = text_image[None, :] == torch.arange(13)[:, None]
    expected = reference_hits(scores, correct) + reference_hits(scores.T, correct.T)
    for world_size in (1, 2, 3):
        shares = [retrieval_hits(images, texts, text_image, 4, rank, world_size) for rank in range(world_size)]
        assert torch.stack(shares).sum(0).tolist() == expected, world_size
    best_answer = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    optimistic = ((scores > best_answer).sum(1) < 1).sum()  # a tie with a wrong caption counted as a hit
    assert optimistic > expected[0]  # the data has ties that decide R@1


@pytest.mark.parametrize("captions_per_image", [1, 2])
def test_retrieval_equals_plain_loop(bundle, samples, heldout, two_caption_shards, captions_per_image):
    # two data-loading workers interleave their batches: results must not depend on that order
    task = retrieval(heldout) if captions_per_image == 1 else retrieval(two_caption_shards, num_workers=2)
    results = evaluate(bundle.model, [task], bundle.preprocess_val, bundle.tokenizer, "cpu")

    captions, text_image = [], []
    for index, sample in enumerate(samples):
        texts = [sample["txt"], f"a photo of the {sample['class_name']}."][:captions_per_image]
        captions += texts
        text_image += [index] * len(texts)
    with torch.no_grad():
        text_embeddings = bundle.model.encode_text(bundle.tokenizer(captions), normalize=True)
    expected = reference_recalls(image_features(bundle, [s["png"] for s in samples]), text_embeddings, text_image)
    assert results == expected


def test_suite_average_of_main_metrics(bundle, heldout):
    suite = Suite([classification(heldout), retrieval(heldout)], averages={"average": ["cls", "ret"], "only": ["ret"]})
    results = evaluate(bundle.model, suite, bundle.preprocess_val, bundle.tokenizer, "cpu")
    assert results["average"] == (results["cls/top1"] + results["ret/mean_R@1"]) / 2
    assert results["only"] == results["ret/mean_R@1"]


# ---------------------------------------------------------------- two ranks


class RecordingModule(torch.nn.Module):
    """Records which encoder each forward ran: under ZeRO-3 every rank must make the same calls."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.calls = []

    def forward(self, image=None, text=None):
        self.calls.append("image" if image is not None else "text")
        return self.clip(image=image, text=text)


def _two_rank_worker(rank, world_size, weights, tasks):
    from tuneclip_ds.models import build_model

    tiny = build_model(ModelConfig(name="tiny-ViT", pretrained=weights))
    alone = evaluate(tiny.model, tasks, tiny.preprocess_val, tiny.tokenizer, "cpu")
    recording = RecordingModule(tiny.model)
    together = evaluate(ForwardEncoder(recording), tasks, tiny.preprocess_val, tiny.tokenizer, "cpu",
                        rank=rank, world_size=world_size)
    return alone, together, recording.calls


@pytest.fixture(scope="module")
def pool():
    gloo_pool = GlooPool(2)
    yield gloo_pool
    gloo_pool.close()


def test_two_ranks_equal_one_process(pool, heldout, two_caption_shards, samples, weights, tmp_path):
    one_sample = tmp_path / "one"  # rank 1 gets no sample at all
    write_shards([ImageTextSample(samples[0]["png"], "png", "a\nb\nc")], str(one_sample), 4, progress=False)
    tasks = [classification(heldout), retrieval(two_caption_shards),
             retrieval(str(one_sample), name="tiny")]

    (alone, together_0, calls_0), (_, together_1, calls_1) = pool.run(_two_rank_worker, weights, tasks)

    assert together_0 == together_1 == alone
    assert calls_0 == calls_1  # same forwards, in the same order, although ranks hold different amounts


# ---------------------------------------------------------------- best checkpoint


def test_best_tracker_keeps_the_best_step():
    evaluations = {100: 0.20, 200: 0.35, 300: 0.30, 400: 0.35, 500: math.nan, 600: 0.34}
    tracker = BestTracker("imagenet/top1")
    saved = [step for step, top1 in evaluations.items() if tracker.update({"imagenet/top1": top1, "x": 1.0}, step)]
    assert saved == [100, 200]  # a tie keeps the earlier checkpoint, NaN never wins
    assert (tracker.best, tracker.best_step) == (0.35, 200)

    resumed = BestTracker("imagenet/top1")
    resumed.load_state_dict(tracker.state_dict())
    assert not resumed.update({"imagenet/top1": 0.3}, 700)
    assert resumed.update({"imagenet/top1": 0.4}, 800) and resumed.best_step == 800

    lowest = BestTracker("val/loss", mode="min")
    assert [lowest.update({"val/loss": v}, s) for s, v in enumerate([3.0, 2.0, 2.5])] == [True, True, False]

    other_metric = BestTracker("retrieval/mean_R@1")
    other_metric.load_state_dict(tracker.state_dict())  # chosen by another metric: starts over
    assert other_metric.best is None


def test_best_tracker_names_the_available_metrics():
    with pytest.raises(InputError, match="'imagenet/top1'.*cls/top1, cls/top5"):
        BestTracker("imagenet/top1").update({"cls/top1": 0.5, "cls/top5": 0.9}, 1)


# ---------------------------------------------------------------- bad input


def write_suite(tmp_path, tasks, **top_level) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks, **top_level}))
    return path


def test_missing_data_path(tmp_path, monkeypatch):
    monkeypatch.delenv("EVAL_DATA", raising=False)
    suite = load_suite(write_suite(tmp_path, [
        {"name": "a", "kind": "retrieval", "data": str(tmp_path / "nowhere")},
        {"name": "b", "kind": "retrieval", "data": "${EVAL_DATA}/coco"},
    ]))
    with pytest.raises(DataError, match=f"task a: data path {tmp_path / 'nowhere'} does not exist"):
        check_suite(suite)
    with pytest.raises(DataError, match="environment variable in it is not set"):
        check_suite(Suite(suite.tasks[1:]))


def test_empty_class_folder(tmp_path, samples):
    (tmp_path / "red circle").mkdir()
    (tmp_path / "red circle" / "0.png").write_bytes(samples[0]["png"])
    (tmp_path / "blue star").mkdir()
    with pytest.raises(DataError, match="class folder .*blue star has no images"):
        check_suite(Suite([classification(str(tmp_path), classnames=None)]))


def test_class_names_that_do_not_match_the_labels(tmp_path, bundle, heldout, image_folder):
    three_names = tmp_path / "names.txt"
    three_names.write_text("red circle\nblue star\ngreen cross\n")
    with pytest.raises(DataError, match="has label .* gives 3 class names: the class names do not match the labels"):
        evaluate(bundle.model, [classification(heldout, str(three_names))], bundle.preprocess_val,
                 bundle.tokenizer, "cpu")
    with pytest.raises(DataError, match="class folders but .* has 3 names: the class names do not match"):
        check_suite(Suite([classification(image_folder, str(three_names))]))


def test_shards_need_class_names(heldout):
    with pytest.raises(ConfigError, match="shards do not name their classes: set classnames"):
        check_suite(Suite([classification(heldout, classnames=None)]))


@pytest.mark.parametrize("suite, message", [
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d", "batchsize": 8}]},
     "unknown key tasks\\[0\\].batchsize"),
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d"}], "average": "all"}, "unknown key average"),
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d", "batch_size": "8"}]},
     "tasks\\[0\\].batch_size must be of type int"),
    ({"tasks": [{"name": "a", "kind": "detection", "data": "d"}]}, "tasks\\[0\\].kind must be one of"),
    ({"tasks": [{"name": "a", "kind": "retrieval"}]}, "tasks\\[0\\].data is missing"),
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d"}], "defaults": {"workers": 2}},
     "unknown key defaults.workers"),
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d"}], "averages": {"mean": ["a", "b"]}},
     "averages.mean names unknown task b"),
    ({"tasks": [{"name": "a", "kind": "retrieval", "data": "d"}] * 2}, "repeated: a"),
])
def test_bad_suite_file_names_key_and_file(tmp_path, suite, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
        load_suite(path)


def test_bad_class_names_and_templates_sources(tmp_path, heldout):
    with pytest.raises(ConfigError, match="classnames='imagenet21k' is neither a built-in"):
        check_suite(Suite([classification(heldout, classnames="imagenet21k")]))
    no_slot = tmp_path / "templates.txt"
    no_slot.write_text("a photo of {c}.\na photo.\n")
    with pytest.raises(ConfigError, match="template 'a photo.' .* has no {} or {c}"):
        check_suite(Suite([classification(heldout, templates=str(no_slot))]))


def test_shipped_suites_load():
    assert [t.name for t in load_suite(REPO / "configs/eval/synthetic.yaml").tasks] == ["synthetic_cls",
                                                                                        "synthetic_ret"]
    datacomp = load_suite(REPO / "configs/eval/datacomp_example.yaml")
    assert datacomp.averages["average"] == [t.name for t in datacomp.tasks]


# ---------------------------------------------------------------- command line


def cli_suite(tmp_path, heldout) -> Path:
    return write_suite(tmp_path, [
        {"name": "cls", "kind": "classification", "data": heldout, "classnames": "synthetic",
         "templates": "synthetic", "label_field": "label"},
        {"name": "ret", "kind": "retrieval", "data": heldout},
    ], defaults={"batch_size": 64, "num_workers": 1}, averages={"average": "all"})


def run_cli(launcher: list[str], tmp_path, suite, weights, threads: int, name: str) -> tuple[dict, str]:
    output = tmp_path / f"{name}.json"
    command = launcher + ["--model", "tiny-ViT", "--pretrained", weights, "--tasks", str(suite),
                          "--output", str(output), "--batch-size", str(BATCH_SIZE)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result


def test_command_line_writes_the_metrics(tmp_path, bundle, heldout, weights):
    suite = cli_suite(tmp_path, heldout)
    report, result = run_cli([sys.executable, "-m", "tuneclip_ds.eval"], tmp_path, suite, weights,
                             threads=torch.get_num_threads(), name="one")

    expected = evaluate(bundle.model, load_suite(suite), bundle.preprocess_val, bundle.tokenizer, "cpu")
    assert report["metrics"] == expected  # the suite's batch size was overridden: same as in-process at 11
    assert report["model"] == "tiny-ViT" and report["world_size"] == 1
    assert ["average", f"{expected['average']:.4f}"] in [line.split() for line in result.stdout.splitlines()]
    # stderr is a pipe, no terminal: one plain line per task, no progress bar ("256img [00:00, 291.89img/s]")
    assert "img/s" not in result.stderr
    for task_result in ("runner: cls: top1 ", "runner: ret: image_to_text_R@1 "):
        assert sum(task_result in line for line in result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_command_line_with_torchrun_equals_one_process(tmp_path, heldout, weights):
    suite = cli_suite(tmp_path, heldout)
    alone, _ = run_cli([sys.executable, "-m", "tuneclip_ds.eval"], tmp_path, suite, weights, threads=1, name="one")
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "tuneclip_ds.eval"]
    together, result = run_cli(torchrun, tmp_path, suite, weights, threads=1, name="two")
    assert together["world_size"] == 2 and together["metrics"] == alone["metrics"]
    assert result.stdout.count("wrote ") == 1  # rank 0 reports


def test_command_line_names_an_incomplete_training_checkpoint(tmp_path, heldout, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000100").mkdir(parents=True)  # a save that never completed
    suite = write_suite(tmp_path, [{"name": "ret", "kind": "retrieval", "data": heldout}])
    assert eval_main(["--model", "tiny-ViT", "--pretrained", str(tmp_path / "run"), "--tasks", str(suite)]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_command_line_bad_input_is_one_message(tmp_path, capsys):
    suite = write_suite(tmp_path, [{"name": "ret", "kind": "retrieval", "data": str(tmp_path / "missing")}])
    assert eval_main(["--model", "tiny-ViT", "--tasks", str(suite)]) == 2
    assert capsys.readouterr().err.strip() == f"error: task ret: data path {tmp_path / 'missing'} does not exist"
