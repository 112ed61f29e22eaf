"""How the CPU warp's SIMD rows see a displacement: the share of 8-voxel blocks that take each path.

    python tools/warp_block_stats.py [--shape 160 192 224] [--magnitude 3]

On the benchmark's displacement (benchmarks.common.smooth_displacement). The
forward of csrc/warp/warp_cpu_simd_rows.h cuts each output row into blocks of 8 voxels (from w = 0;
row tails go scalar). A block whose 8 sampling locations are strictly interior and whose cells
are one run along x (same z and y cell, x cells x0..x0+7) takes plain vector loads; other
interior blocks fetch the 16 corner pairs one by one; the non-interior voxels of a block take
the general stencil with masked gathers (border_lanes; only row tails go to the scalar code). Prints those shares, the mean number of distinct (z, y) cell rows per block, the
mean number of runs per interior block (lanes whose cell continues the previous lane's along x
join its run; the AVX-512 backward scatters run by run), and the share of voxels that are not
strictly interior.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks/ (after installed packages)
from benchmarks.common import DEFAULT_SHAPE, smooth_displacement  # noqa: E402


def block_stats(disp: torch.Tensor) -> dict:
    """disp: [1, 3, D, H, W] in voxels (channels d, h, w); the image has the grid of disp."""
    shape = disp.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=disp.dtype) for s in shape], indexing="ij"))
    loc = grid + disp[0]
    top = torch.tensor([s - 1 for s in shape], dtype=disp.dtype).view(3, 1, 1, 1)
    interior = ((loc > 0) & (loc < top)).all(0)  # strictly_interior (warp_math.h)
    blocks = shape[2] // 8
    cell = loc[..., : blocks * 8].floor().long().reshape(3, shape[0], shape[1], blocks, 8)
    inside = interior[..., : blocks * 8].reshape(shape[0], shape[1], blocks, 8).all(-1)
    cz, cy, cx = cell
    same_row = (cz == cz[..., :1]).all(-1) & (cy == cy[..., :1]).all(-1)
    run = inside & same_row & (cx == cx[..., :1] + torch.arange(8)).all(-1)
    rows = cz * (shape[1] + 2) + cy  # one key per (z, y) cell row
    distinct = 1 + (rows.sort(-1).values.diff(dim=-1) != 0).sum(-1)
    joins = (rows.diff(dim=-1) == 0) & (cx.diff(dim=-1) == 1)
    runs = (8 - joins.sum(-1))[inside]
    return {
        "blocks: one run of cells (vector loads)": run.float().mean().item(),
        "blocks: interior, corner pairs": (inside & ~run).float().mean().item(),
        "blocks: with a non-interior voxel": (~inside).float().mean().item(),
        "distinct (z, y) cell rows per block (mean)": distinct.float().mean().item(),
        "runs per interior block (mean)": runs.float().mean().item(),
        "voxels not strictly interior": 1 - interior.float().mean().item(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"))
    p.add_argument("--magnitude", type=float, default=3.0, help="of smooth_displacement (voxels)")
    args = p.parse_args(argv)
    disp = smooth_displacement(tuple(args.shape), magnitude=args.magnitude)
    for name, value in block_stats(disp).items():
        print(f"{name}: {value:.3f}" if "mean" in name else f"{name}: {value:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
