"""Slurm: tuneclip_ds.submit (submitit) and slurm/train.sbatch on a real single-node Slurm, 2 tasks on CPU.

The cluster starts once for this module when Slurm's daemons are installed.
Without them the tests skip, unless TUNECLIP_REQUIRE_SLURM is set (.ci/run
sets it): then a missing Slurm fails.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from test_launch import scalars

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
# A deterministic run (fp32, fixed seed), the same under every launcher; only its directory differs.
TINY_CONFIG = """\
model: {{name: tiny-ViT}}
data: {{train_shards: {shards}, num_workers: 0, shuffle_buffer: 64}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{steps: {steps}, batch_size: 8, precision: fp32, zero_stage: 2}}
log: {{every: 1}}
"""
SUBMIT = [sys.executable, "-m", "tuneclip_ds.submit"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not slurm_cluster.installed():
        message = f"Slurm is not installed (needs {', '.join(slurm_cluster.PROGRAMS)}: apt-get install slurm-wlm munge)"
        if os.environ.get("TUNECLIP_REQUIRE_SLURM"):
            pytest.fail(f"{message}; TUNECLIP_REQUIRE_SLURM is set, so these tests must run")
        pytest.skip(message)
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def config(tmp_path_factory, synthetic_shards) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(shards=synthetic_shards, steps=STEPS))
    return str(path)


def run_in(output_dir: Path, name: str) -> list[str]:
    return [f"output_dir={output_dir}", f"run_name={name}"]


def environment(base: dict[str, str]) -> dict[str, str]:
    """``base`` (with or without SLURM_CONF) for the commands and the jobs (sbatch passes it on)."""
    return dict(base, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable)


def submit(base_env: dict[str, str], config: str, tmp_path: Path, name: str, *arguments: str):
    """``python -m tuneclip_ds.submit`` of the run ``name``, 2 tasks."""
    command = [*SUBMIT, "--config", config, *run_in(tmp_path, name), "--gpus-per-node", "2", "--time", "10",
               *arguments]
    return subprocess.run(command, cwd=tmp_path, env=environment(base_env), capture_output=True, text=True,
                          timeout=300)


def submitted_job(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"^job (\d+):", result.stdout, re.MULTILINE)[1]


def sbatch(slurm, config: str, tmp_path: Path, name: str) -> str:
    """``sbatch slurm/train.sbatch`` of the run ``name``, 2 tasks; its log is tmp_path/slurm-JOBID.out."""
    command = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--chdir={tmp_path}",
               str(REPO / "slurm" / "train.sbatch"), config, *run_in(tmp_path, name)]
    return subprocess.run(command, env=environment(slurm.env), capture_output=True, text=True,
                          check=True).stdout.strip()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from tuneclip_ds.export import find_checkpoint, fp32_weights

    checkpoint = find_checkpoint(run_dir)
    assert checkpoint.name == f"step_{STEPS:08d}"
    return fp32_weights(checkpoint, zero_stage=2)


def assert_finished(run_dir: Path, job: dict[str, str], log: Path, restarts: int = 0) -> None:
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log.read_text()[-3000:])
    assert job["Restarts"] == str(restarts)
    assert len(scalars(run_dir)["train/loss"]) == STEPS
    final_weights(run_dir)


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    weights, expected = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def wait_for_preemption_handlers(slurm, job_id: str, ranks: int = 2, timeout: float = 120) -> dict[int, int]:
    """The pid of each rank once it handles the preemption signals (before that a signal would kill it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = slurm.task_pids(job_id)
        if len(pids) == ranks and all(catches(pid, signal.SIGUSR1) for pid in pids.values()):
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id}: the ranks did not install the preemption handler in {timeout} s")


def catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)[1], 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.fixture(scope="module")
def submitted_run(slurm, config, tmp_path_factory):
    """An uninterrupted run submitted through tuneclip_ds.submit: (submit's output, the job, the run directory)."""
    folder = tmp_path_factory.mktemp("submitted")
    result = submit(slurm.env, config, folder, "reference")
    job = slurm.wait_for_job(submitted_job(result))
    return result, job, folder / "reference"


def test_submit_runs_two_tasks_to_the_end(submitted_run):
    result, job, run_dir = submitted_run
    logs = run_dir / "submitit"
    assert f"run directory: {run_dir}" in result.stdout
    assert f"logs: {logs}/{job['JobId']}_0_log.out" in result.stdout
    assert_finished(run_dir, job, logs / f"{job['JobId']}_0_log.err")
    assert job["NumTasks"] == "2"
    assert f"step {STEPS}/{STEPS}" in (logs / f"{job['JobId']}_0_log.err").read_text()
    assert (logs / f"{job['JobId']}_1_log.err").is_file()


def test_submitted_job_preempted_on_one_rank_checkpoints_requeues_and_ends_like_uninterrupted(
        slurm, submitted_run, config, tmp_path):
    job_id = submitted_job(submit(slurm.env, config, tmp_path, "preempted"))
    pids = wait_for_preemption_handlers(slurm, job_id)
    os.kill(pids[1], signal.SIGUSR2)  # submitit's signal, to rank 1 only: rank 0 must save and stop with it
    job = slurm.wait_for_job(job_id)
    run_dir = tmp_path / "preempted"
    log_path = run_dir / "submitit" / f"{job_id}_0_log.err"
    assert_finished(run_dir, job, log_path, restarts=1)
    log = log_path.read_text()
    stopped = int(re.search(r"stopping at step (\d+) on request", log)[1])
    assert 0 < stopped < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in log
    assert_same_weights(run_dir, submitted_run[2])


def test_sbatch_script_trains_through_a_preemption_like_submit(slurm, submitted_run, config, tmp_path):
    job_id = sbatch(slurm, config, tmp_path, "sbatch")
    wait_for_preemption_handlers(slurm, job_id)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)  # as Slurm does before the time limit
    job = slurm.wait_for_job(job_id)
    log = tmp_path / f"slurm-{job_id}.out"
    assert_finished(tmp_path / "sbatch", job, log, restarts=1)
    assert f"preempted: requeueing job {job_id}" in log.read_text()
    assert_same_weights(tmp_path / "sbatch", submitted_run[2])


def test_local_mode_runs_the_tasks_here(config, tmp_path):
    result = submit(os.environ, config, tmp_path, "local", "--local")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "job finished" in result.stdout
    assert len(scalars(tmp_path / "local")["train/loss"]) == STEPS
    final_weights(tmp_path / "local")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["train.stps=3"], "unknown key train.stps"),
        (["--partition", "nosuch"], "partition nosuch does not exist: give --partition, one of debug"),
        (["--gpus-per-node", "3"], "partition debug: the job asks for 1 node(s) with 3 CPUs (3 tasks x 1 CPUs; "
                                   "the partition has no GPUs), 0 have that many (the most on a node: 2)"),
    ],
)
def test_bad_input_is_refused_before_anything_is_queued(slurm, config, tmp_path, arguments, message):
    result = submit(slurm.env, config, tmp_path, "refused", *arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert slurm.queue() == [] and not (tmp_path / "refused").exists()


def test_gpu_requests_are_checked_against_the_partition():
    from tuneclip_ds.submit import Node, SlurmError, gpu_count, gpus_per_node

    gres = ["gpu:8", "gpu:a100:4(S:0-1),nvme:1", "(null)", "gpu:a:2,gpu:b:2"]
    assert [gpu_count(g) for g in gres] == [8, 4, 0, 4]
    nodes = [Node(cpus=64, gpus=8), Node(cpus=64, gpus=8), Node(cpus=64, gpus=4)]
    assert gpus_per_node(nodes, "gpu", count=2, tasks_per_node=8, cpus_per_task=8) == 8
    assert gpus_per_node(nodes, "gpu", count=3, tasks_per_node=4, cpus_per_task=1) == 4
    with pytest.raises(SlurmError, match=r"3 node\(s\) with 8 GPUs, 2 have that many \(the most on a node: 8\)"):
        gpus_per_node(nodes, "gpu", count=3, tasks_per_node=8, cpus_per_task=1)
    assert gpus_per_node([Node(cpus=16, gpus=0)], "cpu", count=1, tasks_per_node=4, cpus_per_task=4) == 0


def test_cpus_per_task_defaults_to_the_tasks_share_of_a_node(monkeypatch, capsys, tmp_path):
    from tuneclip_ds import submit
    from tuneclip_ds.config import load_config
    from tuneclip_ds.submit import Node, default_cpus_per_task

    nodes = [Node(cpus=64, gpus=8), Node(cpus=128, gpus=8), Node(cpus=96, gpus=4)]
    monkeypatch.setattr(submit, "partition_nodes", lambda partition: ("gpu", nodes))

    def cpus_per_task(arguments: list[str], num_workers: int | None) -> int:
        args = submit.parse_args(["--nodes", "2", *arguments])
        workers = "null" if num_workers is None else num_workers
        config = load_config(None, ["train.steps=1", f"data.num_workers={workers}", f"output_dir={tmp_path}"])
        parameters = submit.slurm_executor(args, config, minutes=60).parameters
        assert parameters["srun_args"] == ["--cpus-per-task", str(parameters["cpus_per_task"])]  # not inherited
        return parameters["cpus_per_task"]

    # Two nodes with 8 GPUs: the second best of those two gives 64 CPUs / 8 GPUs. With 4 GPUs, any node will do and
    # each task takes its GPU's share (the second best is the 128-CPU node: 16, not 128 / 4).
    assert cpus_per_task(["--gpus-per-node", "8"], num_workers=7) == 8
    assert cpus_per_task(["--gpus-per-node", "4"], num_workers=7) == 16
    assert capsys.readouterr().err == ""
    assert cpus_per_task(["--gpus-per-node", "8", "--cpus-per-task", "6"], num_workers=7) == 6
    assert capsys.readouterr().err == ("warning: 6 CPU(s) per task for data.num_workers=7 data-loading workers and "
                                       "the rank itself: the GPUs may wait for data; give --cpus-per-task 8 or more, "
                                       "or lower data.num_workers\n")
    assert cpus_per_task(["--gpus-per-node", "8", "--cpus-per-task", "2"], num_workers=None) == 2
    assert capsys.readouterr().err == ""  # the automatic data.num_workers takes what the task has
    assert default_cpus_per_task([Node(cpus=16, gpus=0)], count=1, tasks_per_node=4, gpus=0) == 4  # CPU tasks


def test_slurm_task_counts_and_time_limits_are_read():
    from tuneclip_ds.distributed import tasks_on_node
    from tuneclip_ds.errors import InputError
    from tuneclip_ds.submit import time_limit_minutes

    assert [tasks_on_node("4(x2),3", node) for node in range(3)] == [4, 4, 3]
    assert tasks_on_node("8", 0) == 8
    assert [time_limit_minutes(t) for t in ["90", "02:30:00", "1-00:00:30"]] == [90, 150, 24 * 60 + 1]
    with pytest.raises(InputError, match="--time 90m: give minutes"):
        time_limit_minutes("90m")


def test_submitted_job_is_requeued_resuming_up_to_the_limit():
    from tuneclip_ds.config import load_config
    from tuneclip_ds.submit import TrainingJob, resuming

    resumed = resuming(load_config(None, ["train.steps=8"]))
    requeued = TrainingJob(resumed, max_requeues=2).checkpoint().function
    assert (requeued.requeues, requeued.config.checkpoint.resume) == (1, "latest")
    assert TrainingJob(resumed, max_requeues=2, requeues=2).checkpoint() is None
