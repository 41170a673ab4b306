"""The shipped pretrained shapes CLIP, its pretraining script, the reproduction's runner and `make demo`."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "tuneclip_ds" / "pretrained" / "shapes-tiny-ViT.safetensors"


def benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "reproduce" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_corpus(tmp_path: Path) -> list[str]:
    """Overrides that put a small corpus, its held-out splits and the shapes suite in ``tmp_path``."""
    data = tmp_path / "data"
    suite = yaml.safe_load((REPO / "configs" / "eval" / "shapes.yaml").read_text())
    for task in suite["tasks"]:
        task["data"] = str(data / Path(task["data"]).name)
    suite["defaults"]["batch_size"] = 16
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    return [f"output_dir={tmp_path / 'runs'}", f"data.train_shards={data / 'train'}",
            "data.synthetic.num_samples=256", "data.synthetic.samples_per_shard=64",
            f"data.synthetic.val_shards={data / 'val'}", f"data.synthetic.shifted_val_shards={data / 'shifted'}",
            "data.synthetic.val_samples=32", "data.shuffle_buffer=64", "train.batch_size=8",
            f"eval.tasks={tmp_path / 'suite.yaml'}"]


def test_shipped_model_loads_in_open_clip_and_reaches_its_documented_accuracy(tmp_path):
    import open_clip
    import torch

    import tuneclip_ds.models  # noqa: F401  (adds tiny-ViT's config to open_clip's)

    from tuneclip_ds.config import load_config
    from tuneclip_ds.data.synthetic import write_synthetic_corpus
    from tuneclip_ds.eval import evaluate, load_suite

    card = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == card["sha256"]
    model, _, preprocess = open_clip.create_model_and_transforms(card["model"], pretrained=str(SHIPPED))
    # the held-out splits the card was measured on, written again (a function of seed, split and index)
    spec = load_config(REPO / "configs" / "demo.yaml").data.synthetic
    small_corpus(tmp_path)
    for folder, domain in (("val", "standard"), ("shifted", "shifted")):
        write_synthetic_corpus(str(tmp_path / "data" / folder), spec.val_samples, 256, spec.image_size,
                               spec.difficulty, spec.seed, "val", progress=False, paraphrase=spec.paraphrase,
                               domain=domain)
    suite = load_suite(tmp_path / "suite.yaml")  # small_corpus wrote it
    results = evaluate(model, suite, preprocess, open_clip.get_tokenizer(card["model"]), torch.device("cpu"))
    documented = card["evaluation"]["metrics"]
    for name in ("heldout/top1", "shifted/top1", "retrieval/mean_R@1"):
        assert results[name] == pytest.approx(documented[name], abs=2 / spec.val_samples), name
    assert documented["heldout/top1"] > 0.5  # a well-trained model, not a random one (1/30)


def test_pretraining_script_writes_a_loadable_fp16_model_and_its_card(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    pretrain = benchmark_module("pretrain")
    output = tmp_path / "model.safetensors"
    overrides = small_corpus(tmp_path) + ["train.steps=3", "eval.every=2"]
    assert pretrain.main(["--output", str(output), *overrides]) == 0
    weights = load_file(output)
    assert {tensor.dtype for tensor in weights.values()} == {__import__("torch").float16}
    open_clip.create_model("tiny-ViT", pretrained=str(output))
    card = json.loads(output.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    assert {"heldout/top1", "shifted/top1", "retrieval/mean_R@1", "average"} <= card["evaluation"]["metrics"].keys()
    assert sorted(card["pretraining"]["curve"]["average"]) == ["0", "2", "3"]  # JSON keys: every 2 steps, the end


def test_reproduction_runner_writes_results_tables_and_plots(tmp_path):
    run = benchmark_module("run")
    out = tmp_path / "out"
    overrides = small_corpus(tmp_path) + ["train.steps=2", "osr.steps=2", "eval.at_steps=[1]", "model.pretrained=''"]
    assert run.main([*overrides, "--seeds", "1", "--nproc", "1", "--out", str(out), "--arms", "naive", "TuneCLIP",
                     "--sweep-lrs", "1e-3", "--sweep-steps", "2", "--averaged"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["naive (InfoNCE)", "OSR(m,v,u) + HGCL (TuneCLIP)"]
    naive, tuneclip = (results["arms"][name]["runs"][0] for name in results["arms"])
    assert sorted(naive["average"]) == sorted(tuneclip["average"]) == ["0", "1", "2"]
    assert naive["average"]["0"] == tuneclip["average"]["0"]  # both start from the same weights
    assert list(results["lr_sweep"]) == ["0.001"]
    report = (out / "results.md").read_text()
    assert "| naive (InfoNCE) | 1 |" in report and "Learning-rate sweep" in report
    for plot in ("average-paper.png", "average-osr.png", "average-loss.png", "heldout-top1-paper.png", "lr-sweep.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_reproduction_runner_averages_weights_and_keeps_earlier_results(tmp_path):
    """The EMA starts at the weights; WiSE-FT's alpha 0 is the starting model and alpha 1 the run's final
    weights, as the training run evaluated them; the arms and rates of an earlier invocation stay."""
    run = benchmark_module("run")
    out = tmp_path / "out"
    out.mkdir()
    earlier_curve = {"0": 0.5, "1": 0.4, "2": 0.45}
    earlier = {"commands": [{"command": "earlier", "minutes": 1.0}], "run_minutes": {"earlier-run": 1.0},
               "lr_sweep": {"0.001": {"naive (InfoNCE)": {"average": earlier_curve}}},
               "arms": {"HGCL cold": {"overrides": ["osr.steps=null"], "runs": [
                   {metric: earlier_curve for metric in run.METRICS}]}}}
    (out / "results.json").write_text(json.dumps(earlier))
    overrides = small_corpus(tmp_path) + ["train.steps=2", "osr.steps=2", "eval.at_steps=[1]",
                                          f"model.pretrained={SHIPPED}"]
    assert run.main([*overrides, "--seeds", "1", "--nproc", "1", "--out", str(out), "--arms", "--sweep-lrs",
                     "--averaged", "naive", "--wise-ft", "0,1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [entry["command"] for entry in results["commands"]][0] == "earlier"
    assert results["arms"] == earlier["arms"] and results["lr_sweep"] == earlier["lr_sweep"]
    assert list(results["averaged"]) == ["naive (InfoNCE)"]
    [averaged] = results["averaged"]["naive (InfoNCE)"]["runs"]
    curves, (start, final) = averaged["curves"], averaged["wise_ft"]
    assert curves["ema/average"]["0"] == curves["average"]["0"]
    assert curves["ema/average"]["2"] != curves["average"]["2"]
    assert (start["alpha"], final["alpha"]) == (0, 1)
    for metric in run.METRICS:
        assert start["metrics"][metric] == pytest.approx(curves[metric]["0"], abs=1e-6), metric
        assert final["metrics"][metric] == pytest.approx(curves[metric]["2"], abs=1e-6), metric
    report = (out / "results.md").read_text()
    assert "| HGCL cold | 1 |" in report and "| naive (InfoNCE): EMA | 1 |" in report and "| 0 (" not in report
    for plot in ("average-averaged.png", "average-wise-ft.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_demo_runs_both_arms_and_compares_them(tmp_path, capsys):
    from tuneclip_ds.demo import main

    overrides = small_corpus(tmp_path) + ["train.steps=2", "osr.steps=2", "eval.at_steps=[1]",
                                          f"model.pretrained={SHIPPED}"]
    assert main(["--config", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "| naive fine-tuning | 1 |" in printed and "| TuneCLIP | 1 |" in printed
    comparison = json.loads((tmp_path / "runs" / "comparison.json").read_text())
    assert comparison["TuneCLIP"]["average"]["0"] == comparison["naive fine-tuning"]["average"]["0"]
    assert (tmp_path / "runs" / "comparison.png").is_file()
    assert (tmp_path / "runs" / "tuneclip" / "eval.jsonl").is_file()  # TensorBoard and results per arm
