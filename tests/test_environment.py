"""The package makes open_clip importable in every kind of process; CPU ranks' environment (DeepSpeed's
communication, glibc's memory reuse)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import tuneclip_ds  # noqa: F401  (first, as in any module of the package: spawned workers re-import this one)

REPO = Path(__file__).resolve().parent.parent


class OpenClipVersion(Dataset):
    """A dataset whose items need open_clip inside the data-loader worker."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import open_clip

        return open_clip.__version__


def test_fresh_interpreter_imports_open_clip_through_the_package():
    code = "import tuneclip_ds, open_clip, torchvision.transforms; print(open_clip.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3.3.0"


def test_spawned_data_loader_workers_import_open_clip():
    loader = DataLoader(OpenClipVersion(), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert list(loader) == ["3.3.0", "3.3.0"]


def test_patch_only_where_torchvision_ops_do_not_load():
    from tuneclip_ds import _torchvision_compat

    if _torchvision_compat._extension_loads():  # a matching torchvision build: nothing declared
        assert _torchvision_compat._library is None
    else:
        assert _torchvision_compat._library is not None
        assert hasattr(torch.ops.torchvision, "nms")


def test_deepspeed_starts_on_cpu_without_compiling_its_shared_memory_all_reduce(tmp_path):
    """DeepSpeed compiles a C++ all-reduce when its backend starts on CPUs (~20 s, each time another
    environment compiled it last); training never calls it."""
    start = (
        "import os; os.environ.update(TORCH_EXTENSIONS_DIR=os.getcwd())\n"
        "from tuneclip_ds.distributed import init_distributed\n"
        "init_distributed()\n"
        "import deepspeed.comm.comm as comm\n"
        "print('shared-memory op:', comm.cdb.shm_comm_op)\n"
    )
    result = subprocess.run([sys.executable, "-c", start], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shared-memory op: None" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing compiled into the extension folder


_STEP_FAULTS = """
import os, resource, sys
import torch
import torch.multiprocessing as mp


def rank_main(rank, port, zero_stage):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    from tuneclip_ds.config import load_config
    from tuneclip_ds.distributed import init_distributed
    from tuneclip_ds.engine import build_engine

    init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 1024))  # 84 MB of float32
    config = load_config(None, [f"train.zero_stage={zero_stage}", "train.batch_size=2", "train.steps=10",
                                "train.precision=fp32"])
    engine = build_engine(config, model, 10)
    pages = sum(param.numel() for param in model.parameters()) * 4 / 4096
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        engine.backward(engine(torch.randn(2, 4096)).square().mean())
        engine.step()
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
    if rank == 0:
        print(min(faults[2:]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from tuneclip_ds.distributed import free_port
    mp.spawn(rank_main, args=(free_port(), int(sys.argv[1])), nprocs=2)
"""


_THRESHOLDS_ONLY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@pytest.mark.parametrize("zero_stage, malloc_env, low, high", [
    (0, {}, 0.0, 0.05), (2, {}, 0.0, 0.05),
    (0, {"MALLOC_ARENA_MAX": "16"}, 0.5, 10.0),  # glibc's defaults (the arena limit is its own for 2 cores)
    (2, _THRESHOLDS_ONLY, 0.5, 10.0),
])
def test_steps_on_cpu_ranks_do_not_fault_their_buffers_in_again(tmp_path, zero_stage, malloc_env, low, high):
    """DeepSpeed makes buffers of a model's size in every step (ZeRO-0's gradient buckets, ZeRO-2's flat gradient
    partition and gathered parameters). Glibc maps each buffer over 32 MiB afresh and faults its pages in page by
    page; a CPU rank of the trainer keeps freed memory, so that a warm step faults in next to none. With the
    thresholds alone, gloo's threads (each in an arena of its own, which holds nothing over 64 MiB) still fault
    in about a model's size of pages a ZeRO-2 step. (Measured: 0.0 and 0.0 pages per parameter page a step;
    glibc's defaults 0.8 at ZeRO-0, 3.8 at ZeRO-2; the thresholds alone 1.1 at ZeRO-2.)"""
    script = tmp_path / "step_faults.py"
    script.write_text(_STEP_FAULTS)
    env = {**os.environ, "PYTHONPATH": str(REPO), **malloc_env}
    result = subprocess.run([sys.executable, str(script), str(zero_stage)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert low <= float(result.stdout.split()[-1]) <= high, result.stdout  # faults per parameter page a step


def test_a_users_malloc_settings_are_kept(monkeypatch):
    from tuneclip_ds.distributed import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory()
