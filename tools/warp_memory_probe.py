"""Where the CPU warp's forward time goes: memory or instructions.

    python tools/warp_memory_probe.py [--shape 160 192 224] [--threads 1 2] [--repeat 9]

Times deepatlas_fast.warp on three inputs with the benchmark's output grid:
  - the benchmark field (benchmarks.common.smooth_displacement) on a full-size image;
  - the same field with its d and h locations wrapped into a 16 x 16-row image that stays in
    L2: every voxel keeps its x cell and its fractions, so the instructions are the same
    (the same blocks are runs of cells or corner pairs), only the image's memory is not;
  - a constant shift (every block a run of cells, the image read in order): the streaming floor.
The first minus the second is what the image's memory costs; the second minus the third what
the rough field's corner fetching costs. Before each timed call a 128 MiB buffer is written,
so that the caches hold other data. A diagnostic, not a benchmark (no baseline).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks/ (after installed packages)
from benchmarks.common import DEFAULT_SHAPE, smooth_displacement  # noqa: E402

PERIOD = 13  # wrapped d and h cells lie in [1, PERIOD]: strictly interior in 16 rows


def wrapped(disp: torch.Tensor, period: int = PERIOD) -> torch.Tensor:
    """disp with its d and h sampling locations folded into [1, 1 + period): same fractions,
    same x locations, cells in an image of period + 3 slices and rows."""
    shape = disp.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=disp.dtype) for s in shape], indexing="ij"))
    loc = grid + disp
    loc[:, :2] = 1 + torch.remainder(loc[:, :2], period)
    return (loc - grid).contiguous()


def cases(shape, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    disp = smooth_displacement(shape)
    small = (1, 1, PERIOD + 3, PERIOD + 3, shape[2])
    return {
        "benchmark field": (torch.rand(1, 1, *shape), disp),
        "same cells, image in L2": (torch.rand(*small), wrapped(disp)),
        "constant shift 0.3": (torch.rand(1, 1, *shape), torch.full_like(disp, 0.3)),
    }


def main(argv=None) -> int:
    import deepatlas_fast as da

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args(argv)
    inputs = cases(tuple(args.shape))
    # say which build is timed
    print(f"warp forward of {Path(da.__file__).parent}, {tuple(args.shape)}, median of {args.repeat} (ms)")
    print("| input | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in args.threads) + " |")
    print("|---|" + "---:|" * len(args.threads))
    times = {name: {} for name in inputs}
    # Each timed call starts with caches holding other data, as in a training step or the
    # benchmark (back-to-back calls would find part of the image still in L3).
    flush = torch.empty(2 * 2**20 * 64 // 4)
    for n in args.threads:
        torch.set_num_threads(n)
        for name, (image, disp) in inputs.items():
            da.warp(image, disp)  # warm-up
            t = []
            for _ in range(args.repeat):
                flush.fill_(1.0)
                t0 = time.perf_counter()
                da.warp(image, disp)
                t.append(time.perf_counter() - t0)
            times[name][n] = statistics.median(t)
    for name, row in times.items():
        print(f"| {name} | " + " | ".join(f"{row[n] * 1e3:.1f}" for n in args.threads) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
