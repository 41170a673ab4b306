"""What this machine charges for memory a process touches for the first time, in steps of 256 MiB.

The kernel gives a process its pages at first touch (a minor page fault and a zeroed page). On bare metal that
costs about the same for every page; a virtual machine whose host backs guest memory lazily, or takes back the
guest's free pages, charges far more for pages the host no longer backs. A trainer's first steps touch
gigabytes (activations, gradients, optimizer state), so their seconds follow this machine property more than
the trainer: run this before comparing times to the first step, and read ``trainer_speed.py``'s first-step
column with it.

    .venv/bin/python benchmarks/first_touch.py                 # 8 GiB, twice, 15 s apart
    .venv/bin/python benchmarks/first_touch.py --gib 12 --pause 5 --passes 3
"""

from __future__ import annotations

import argparse
import mmap
import time

CHUNK_MIB = 256
PAGE = mmap.PAGESIZE


def touch_pass(gib: int) -> list[float]:
    """Microseconds per page of each 256 MiB chunk of one fresh anonymous mapping of ``gib`` GiB, written
    one byte a page (the mapping is given back at the end)."""
    chunk = CHUNK_MIB << 20
    memory = mmap.mmap(-1, gib << 30)
    costs = []
    try:
        for start in range(0, gib << 30, chunk):
            began = time.perf_counter()
            for offset in range(start, start + chunk, PAGE):
                memory[offset] = 1
            costs.append((time.perf_counter() - began) / (chunk // PAGE) * 1e6)
    finally:
        memory.close()
    return costs


def describe(costs: list[float]) -> str:
    """The chunks as runs of similar cost: '0-4.0 GiB 2.1 us/page, 4.0-8.0 GiB 29.8 us/page'."""
    runs: list[list] = []  # [first chunk, last chunk, costs]
    for index, cost in enumerate(costs):
        if runs and (cost > 5.0) == (runs[-1][2][0] > 5.0):  # cheap (host-backed) or not
            runs[-1][1] = index
            runs[-1][2].append(cost)
        else:
            runs.append([index, index, [cost]])
    gib = CHUNK_MIB / 1024
    return ", ".join(f"{first * gib:.2f}-{(last + 1) * gib:.2f} GiB {sum(c) / len(c):.1f} us/page"
                     for first, last, c in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=8, help="memory touched in each pass")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--pause", type=float, default=15.0, help="seconds between passes")
    options = parser.parse_args()
    for number in range(options.passes):
        if number:
            time.sleep(options.pause)
        print(f"pass {number + 1}: {describe(touch_pass(options.gib))}", flush=True)


if __name__ == "__main__":
    main()
