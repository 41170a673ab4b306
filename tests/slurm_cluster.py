"""A single-node Slurm for the tests: munged, slurmctld and slurmd on a temporary config, stopped by PID.

The daemons come from Debian's ``slurm-wlm`` and ``munge`` (.ci/run installs
them). The node is this machine, named as ``hostname -s``, with 2 CPUs and no
GPUs, in one default partition ``debug``; ports, sockets, state and logs all
live in the cluster's folder, so that other test sessions on the machine keep
theirs apart.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

SLURM_CONF = """\
ClusterName=tuneclip-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 s after its requeue (default 121 s; 5 is the minimum).
AuthInfo=socket={munge}/socket,cred_expire=5
# The scheduler notices that a requeued job may start on its periodic pass (every 60 s by default).
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def installed() -> bool:
    return all(shutil.which(program) for program in PROGRAMS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """``with SlurmCluster(folder) as cluster:`` the daemons run, idle, until the block ends."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        self.daemons: list[subprocess.Popen] = []
        # munged wants every folder above its socket open to all (pytest's temporary folders are private)
        self.munge = Path(tempfile.mkdtemp(prefix="tuneclip-munge-"))

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start(self) -> None:
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir()
        munge = self.munge
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", "--foreground", f"--socket={munge}/socket", f"--key-file={key}",
                    f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/seed", f"--log-file={munge}/log")
        self._wait_for(lambda: (munge / "socket").exists(), "munged's socket")
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], ctld_port=free_port(), slurmd_port=free_port(),
            user=getpass.getuser(), root=self.root, munge=munge))
        self._spawn("slurmctld", "-D")
        self._spawn("slurmd", "-D")
        self._wait_for(lambda: self.run("sinfo", "--noheader", "--format=%T", check=False).stdout.strip() == "idle",
                       "the node to be idle")

    def _spawn(self, *command: str) -> None:
        with open(self.root / "log" / f"{command[0]}.out", "w") as log:
            self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in self.daemons):
                raise RuntimeError(f"Slurm test cluster: no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.terminate()
        for daemon in reversed(self.daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons = []
        shutil.rmtree(self.munge, ignore_errors=True)

    def logs(self) -> str:
        logs = sorted((self.root / "log").iterdir())
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in logs)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm command (sbatch, scontrol, ...) against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for_job(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        """The job's fields once it has ended (after any requeues); cancels it after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in ENDED:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout} s")
            time.sleep(0.5)
        return job

    def queue(self) -> list[str]:
        """The ids of the jobs Slurm holds that have not ended."""
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()

    def task_pids(self, job_id: str) -> dict[int, int]:
        """The process of each task (rank) of the job's first srun step."""
        listing = self.run("scontrol", "listpids", job_id, check=False).stdout.splitlines()[1:]
        rows = [line.split() for line in listing]
        return {int(rank): int(pid) for pid, _, step, _, rank in rows if step == "0" and rank.isdigit()}
