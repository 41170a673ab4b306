"""Bad or damaged checkpoints: clear errors, and a killed save falls back to the previous checkpoint."""

import json
import logging
import shutil

import pytest

from test_checkpoint import assert_bit_identical, train_and_snapshot
from test_resume_world_size import resume_and_finish
from test_training import TINY_RUN
from tuneclip_ds import checkpoint
from tuneclip_ds.checkpoint import CheckpointError

METADATA = {"model": "tiny-ViT", "zero_stage": 2, "loss": "infonce"}


def fake_checkpoint(root, step: int, complete: bool = True, ranks: int = 2):
    """A checkpoint folder as a save leaves it, with empty stand-ins for DeepSpeed's files."""
    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").touch()
    for rank in range(ranks):
        checkpoint.rank_file(folder, rank).touch()
    if complete:
        (folder / checkpoint.COMPLETE).write_text(json.dumps(dict(METADATA, step=step, world_size=ranks)))
        (root / checkpoint.LATEST).write_text(folder.name)
    return folder


def test_resume_latest_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="holds no complete checkpoint.*resume=auto"):
        checkpoint.resolve("latest", tmp_path / "checkpoints")
    assert checkpoint.resolve("auto", tmp_path / "checkpoints") is None  # auto starts fresh


def test_resume_from_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve(str(tmp_path / "step_00000100"), tmp_path)


def test_resume_from_a_partial_checkpoint(tmp_path):
    partial = fake_checkpoint(tmp_path, 100, complete=False)
    with pytest.raises(CheckpointError, match="is incomplete"):
        checkpoint.resolve(str(partial), tmp_path)


def test_resume_from_another_models_checkpoint(tmp_path):
    folder = fake_checkpoint(tmp_path, 100)
    this_run = dict(METADATA, model="ViT-B-16")
    with pytest.raises(CheckpointError, match="model: checkpoint has 'tiny-ViT', this run 'ViT-B-16'"):
        checkpoint.check_compatible(checkpoint.read_metadata(folder), this_run, folder)


def test_killed_save_is_skipped_with_a_warning(tmp_path, caplog):
    previous = fake_checkpoint(tmp_path, 2)
    killed = fake_checkpoint(tmp_path, 4, complete=False)
    checkpoint.rank_file(killed, 1).unlink()  # rank 1 died before writing its trainer state
    with caplog.at_level(logging.WARNING, logger="tuneclip_ds"):
        assert checkpoint.resolve("latest", tmp_path) == previous
    assert f"ignoring {killed}: its save did not complete" in caplog.text



def test_run_resumed_after_a_killed_save_continues_from_the_previous_checkpoint(pool, synthetic_shards, tmp_path):
    common = TINY_RUN + [f"data.train_shards={synthetic_shards}", "train.batch_size=8", "data.shuffle_buffer=16",
                         "data.num_workers=0", "train.steps=6", "checkpoint.every=2"]
    straight, _ = pool.run(train_and_snapshot, common + [f"output_dir={tmp_path}/straight"])
    # The same run killed while saving step 4: rank 1 had not written its file, so no complete.json,
    # and `latest` still names step 2.
    killed = tmp_path / "killed" / "run" / "checkpoints"
    shutil.copytree(tmp_path / "straight" / "run" / "checkpoints", killed)
    shutil.rmtree(killed / "step_00000006")
    (killed / "step_00000004" / checkpoint.COMPLETE).unlink()
    checkpoint.rank_file(killed / "step_00000004", 1).unlink()
    (killed / checkpoint.LATEST).write_text("step_00000002")
    resumed, _ = pool.run(resume_and_finish, common + [f"output_dir={tmp_path}/killed", "checkpoint.resume=latest"])
    assert any("step_00000004: its save did not complete" in message for message in resumed["warnings"])
    assert resumed["loaded"]["step"] == 2 and resumed["final"]["step"] == 6
    assert resumed["losses"] == straight["losses"][2:]
    assert_bit_identical(straight["params"], resumed["final"]["params"], "params")
    assert (killed / "step_00000006" / checkpoint.COMPLETE).is_file()


def test_convert_command_explains_what_it_did_or_why_not(tmp_path, capsys):
    def convert(*arguments) -> tuple[int, str]:
        status = checkpoint.main(["convert", *arguments])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    assert convert(str(tmp_path / "nothing")) == (2, f"error: {tmp_path / 'nothing'} does not exist: give a run "
                                                      "directory or one of its checkpoints/step_* folders\n")
    damaged = fake_checkpoint(tmp_path, 100)  # ZeRO-2, with empty files
    assert convert(str(damaged), "--workers", "0") == (2, "error: --workers must be at least 1, got 0\n")
    status, output = convert(str(tmp_path), "--workers", "1")  # the latest checkpoint of these
    last_line = output.splitlines()[-1]  # after DeepSpeed's own lines
    assert status == 2 and last_line.startswith(f"error: cannot resume {damaged} on another number of ranks: "
                                                "DeepSpeed's conversion to a universal checkpoint failed (")
    assert "Traceback" not in output and not list(damaged.glob(checkpoint.UNIVERSAL + "*"))
    (damaged / checkpoint.UNIVERSAL).mkdir()
    assert convert(str(damaged)) == (0, f"{damaged / checkpoint.UNIVERSAL} exists already: a resume on another "
                                        "number of ranks loads it\n")
    replicated = fake_checkpoint(tmp_path / "zero0", 100)
    (replicated / checkpoint.COMPLETE).write_text(json.dumps(dict(METADATA, zero_stage=0, step=100, world_size=2)))
    assert convert(str(replicated)) == (0, f"{replicated} is a ZeRO-0 checkpoint: it resumes on any number of "
                                           "ranks as it is, nothing to convert\n")
