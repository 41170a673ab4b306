"""The package makes open_clip importable in every kind of process."""

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import tuneclip_ds  # noqa: F401  (first, as in any module of the package: spawned workers re-import this one)


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


_REFAULTS = """
import resource, sys, torch
if sys.argv[1] == "trainer":
    from tuneclip_ds.distributed import init_distributed
    init_distributed()
def faults_of_a_fresh_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.ones(50 << 20)  # 200 MiB of float32, as big as the buffers ZeRO-2 makes in each step
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(faults_of_a_fresh_buffer() for _ in range(6)) / (200 << 8))  # of its 4-KiB pages
"""


@pytest.mark.parametrize("process, low, high", [("trainer", 0.0, 0.05), ("plain", 0.5, 1.1)])
def test_a_cpu_rank_reuses_freed_memory_without_faulting_it_in_again(process, low, high):
    """glibc hands a freed 200 MiB buffer back to the kernel and faults the next one in page by page; a CPU rank
    of the trainer keeps it, and a later buffer reuses its pages (the plain process shows the default this
    changes)."""
    result = subprocess.run([sys.executable, "-c", _REFAULTS, process], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert low <= float(result.stdout.split()[-1]) <= high, result.stdout


def test_a_users_malloc_settings_are_kept(monkeypatch):
    from tuneclip_ds.distributed import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory()
