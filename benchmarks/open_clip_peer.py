"""open_clip_train's own trainer on CPU ranks, the peer that ``trainer_speed.py --peer`` measures; and the
environment of any process that imports open_clip_train (``peer_environment``, for input_speed.py too).

    PYTHONPATH=PEER_SITE:. torchrun --nproc_per_node 2 benchmarks/open_clip_peer.py --device cpu ...

``PEER_SITE`` holds webdataset 0.2.86 and pandas (open_clip_train 3.3.0 fails with webdataset 1.0.2:
KeyError 'fname'); see trainer_speed.py. Two things differ from ``python -m open_clip_train.main``:
our model configs (tiny-ViT) are registered with open_clip first, and DistributedDataParallel is given
no ``device_ids``, which open_clip_train always passes and DDP refuses for a module on the CPU. At the
end each rank writes its peak resident memory to ``peak_mib_rank<RANK>.txt`` in the working folder.
"""

import os
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PEER_SITE_INSTALL = ".venv/bin/pip install --target /tmp/peer-site --no-deps webdataset==0.2.86 pandas"


def peer_environment(peer_site: str) -> dict[str, str]:
    """The environment of a process importing open_clip_train: ``peer_site`` (webdataset 0.2.86 and pandas) ahead
    of this repository on its path, the project's own webdataset 1.0.2 left as it is."""
    if not Path(peer_site, "webdataset").is_dir():
        raise SystemExit(f"{peer_site} holds no webdataset: install the peer's packages with {PEER_SITE_INSTALL}")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([peer_site, str(REPO)])}


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)


if __name__ == "__main__":
    import tuneclip_ds.models  # noqa: F401  (torchvision on a CPU-only torch; our model configs for open_clip)

    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel
    from open_clip_train.main import main

    main(sys.argv[1:])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(f"peak_mib_rank{os.environ.get('RANK', '0')}.txt").write_text(f"{peak_mib}\n")
