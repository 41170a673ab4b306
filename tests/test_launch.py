"""The entry point as users start it: torchrun and the deepspeed launcher, 2 CPU ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def launch(launcher: list[str], tmp_path: Path, shards: str, *overrides: str) -> subprocess.CompletedProcess:
    command = launcher + [
        "--config", str(REPO / "configs" / "demo.yaml"),
        f"output_dir={tmp_path}", "run_name=launched", f"data.train_shards={shards}", "data.synthetic=null",
        "train.steps=6", "train.batch_size=8", "log.every=2", "eval.tasks=", "osr.steps=null",
        "loss.name=infonce", f"model.pretrained={REPO / 'tuneclip_ds' / 'pretrained' / 'shapes-tiny-ViT.safetensors'}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_torchrun_two_ranks_writes_tensorboard_and_config(tmp_path, synthetic_shards):
    result = launch([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "-m", "tuneclip_ds.train"],
                    tmp_path, synthetic_shards, "train.zero_stage=1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "launched"
    assert f"run directory: {run_dir}" in result.stdout
    assert "loss:" in result.stdout and "-> " in result.stdout
    assert "step 6/6" in result.stderr  # the rank-0 progress line
    assert result.stderr.count("step 6/6") == 1  # ... from rank 0 only
    assert result.stderr.count("parameter groups at step 1:") == 1  # rank 0's table of the rates
    assert "\nimage/decay+text/decay " in result.stderr and "\nimage/no_decay+text/no_decay " in result.stderr

    logged = scalars(run_dir)
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/logit_scale",
                "train/samples_per_second", "train/step_time"]:
        assert len(logged[tag]) == 6, tag
    final_loss = float(result.stdout.split("-> ")[1].split()[0])
    assert logged["train/loss"][-1] == pytest.approx(final_loss, abs=1e-4)
    assert all(v > 0 for v in logged["train/samples_per_second"])

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["train"]["zero_stage"] == 1


def test_deepspeed_launcher_two_ranks(tmp_path, synthetic_shards):
    result = launch([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--module", "tuneclip_ds.train"],
                    tmp_path, synthetic_shards, "train.zero_stage=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6" in result.stdout + result.stderr
    assert len(scalars(tmp_path / "launched")["train/loss"]) == 6


def test_nonfinite_loss_stops_every_rank_with_one_message_and_its_exit_status(tmp_path, synthetic_shards):
    from tuneclip_ds.train import NONFINITE_LOSS

    # lr 1e10: the first update wrecks the weights and the second step's loss is NaN (on every rank: it is global)
    result = launch([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--module", "tuneclip_ds.train"],
                    tmp_path, synthetic_shards, "optim.lr=1e10")
    assert result.returncode == NONFINITE_LOSS == 3  # the deepspeed launcher passes a rank's status on
    output = result.stdout + result.stderr
    assert "[rank 0] ERROR tuneclip_ds: step 2: loss is nan; stopping (train.on_nonfinite_loss=stop)" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stps=3"], "unknown key train.stps"),
        (["optim.lr=-1"], "error: override optim.lr=-1: optim.lr must be at least 0, got -1.0"),  # not torch's error
        (["optim.layer_decay=1.5"], "error: override optim.layer_decay=1.5: optim.layer_decay must be in (0, 1]"),
        (["model.pretrained=openai"], "reads weights from disk only"),
        (["data.train_shards=/no/such/shards"], "/no/such/shards"),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, synthetic_shards, overrides, message):
    result = launch([sys.executable, "-m", "tuneclip_ds.train"], tmp_path, synthetic_shards, *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
