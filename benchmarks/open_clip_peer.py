"""open_clip_train's own trainer on CPU ranks, the peer that ``trainer_speed.py --peer`` measures.

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

import tuneclip_ds.models  # noqa: F401  (torchvision on a CPU-only torch; our model configs for open_clip)


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)


if __name__ == "__main__":
    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel
    from open_clip_train.main import main

    main(sys.argv[1:])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(f"peak_mib_rank{os.environ.get('RANK', '0')}.txt").write_text(f"{peak_mib}\n")
