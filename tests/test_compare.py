"""Comparing runs: evaluation at chosen stage-II steps (eval.jsonl), curves, summaries, tables and plots."""

import json

import pytest

from test_training import TINY_RUN
from test_eval_training import write_suite
from tuneclip_ds.compare import Summary, read_curves, summary_table


def train(rank, world_size, overrides):
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    build_run(load_config(None, overrides), rank, world_size).run()


def test_evaluation_at_stage2_steps_after_stage1(pools, tmp_path):
    data = tmp_path / "data"
    suite = write_suite(tmp_path, data / "val")
    overrides = TINY_RUN + [
        f"data.train_shards={data / 'train'}", "data.synthetic.num_samples=256", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=64", f"data.synthetic.val_shards={data / 'val'}",
        "data.synthetic.val_samples=32", "train.batch_size=8", "train.steps=4", "osr.steps=3",
        "checkpoint.save_at_end=false", f"output_dir={tmp_path}", "run_name=run", f"eval.tasks={suite}",
        "eval.at_steps=[1,2]",
    ]
    pools[1].run(train, overrides)
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    # stage II starts after the 3 steps of stage I: evaluated there, after its steps 1 and 2, and at its end
    assert [(r["step"], r["stage2_step"]) for r in records] == [(3, 0), (4, 1), (5, 2), (7, 4)]
    assert {"cls/top1", "ret/mean_R@1", "average"} <= records[0].keys()
    curves = read_curves(tmp_path / "run")
    assert sorted(curves["cls/top1"]) == [0, 1, 2, 4]
    assert curves["average"][4] == records[-1]["average"]


def test_read_curves_skips_stage1_and_keeps_the_last_record_of_a_step(tmp_path):
    lines = [{"step": 2, "stage2_step": None, "m": 0.1}, {"step": 3, "stage2_step": 0, "m": 0.5},
             {"step": 4, "stage2_step": 1, "m": 0.2}, {"step": 4, "stage2_step": 1, "m": 0.3}]  # a resumed run
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_curves(tmp_path) == {"m": {0: 0.5, 1: 0.3}}
    with pytest.raises(FileNotFoundError, match="set eval.tasks"):
        read_curves(tmp_path / "nothing")


def test_summary_and_table():
    dipping = {0: 0.9, 1: 0.6, 5: 0.7, 20: 0.8, 50: 0.95, 100: 0.92}
    assert Summary.of(dipping) == Summary(start=0.9, first=0.6, worst=0.6, final=0.92, best=0.95)
    assert Summary.of(dipping, window=0) == Summary(start=0.9, first=0.6, worst=0.92, final=0.92, best=0.95)
    steady = {0: 0.9, 1: 0.9, 5: 0.9, 20: 0.9, 50: 0.9, 100: 0.9}
    table = summary_table({"a": [dipping, steady], "b": [steady]}).splitlines()
    assert table[0] == "| arm | runs | start | first step | worst (steps 1-20) | final | best |"
    assert table[2] == "| a | 2 | 90.0 ± 0.0 | 75.0 ± 21.2 | 75.0 ± 21.2 | 91.0 ± 1.4 | 92.5 ± 3.5 |"
    assert table[3] == "| b | 1 | 90.0 | 90.0 | 90.0 | 90.0 | 90.0 |"


def test_plot_is_a_png(tmp_path):
    from tuneclip_ds.compare import plot_curves

    curves = {"a": [{0: 0.9, 1: 0.6, 10: 0.8}, {0: 0.9, 1: 0.7, 10: 0.85}], "b": [{0: 0.9, 1: 0.9, 10: 0.9}]}
    plot_curves(curves, 0.9, tmp_path / "plot.png", "title", "metric (%)")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
