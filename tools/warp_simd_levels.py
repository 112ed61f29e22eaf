"""The CPU warp's SIMD levels timed against each other in one process.

    python tools/warp_simd_levels.py [--shape 160 192 224] [--levels avx2 1] [--rounds 7]

On the benchmark's displacement (benchmarks.common.smooth_displacement), one channel: the
forward, the forward with the location gradient (warp_with_loc_grad), the backward (both
gradients, image gradient only, displacement gradient only) and the backward of the
location-gradient forward (warp_backward_with_loc_grad)
at each DEEPATLAS_FAST_SIMD level (0: scalar code, avx2: AVX2 rows, 1: the best rows the CPU
runs; the kernels read the variable at every call). The levels are timed in alternating rounds
after warm-up rounds (a shared host's speed can drift within a run); each level's results are checked
to be bit-identical to the first level's. Prints the median per case and level (ms).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks/ (after installed packages)
from benchmarks.common import DEFAULT_SHAPE, smooth_displacement  # noqa: E402

CASES = {"forward": None, "forward with location gradient": "loc", "backward, both gradients": [True, True],
         "backward, image gradient": [True, False], "backward, disp gradient": [False, True],
         "backward with location gradient (image gradient, loc_grad * grad_out)": "loc_backward"}


def time_levels(shape, levels, rounds: int = 7, warmup: int = 10) -> dict:
    """{case: {level: median seconds}}; raises if a level's results differ from the first's."""
    ops = torch.ops.deepatlas_fast
    torch.manual_seed(0)
    image, grad = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    disp = smooth_displacement(shape)

    loc = ops.warp_with_loc_grad(image, disp, "zeros")[1]

    def call(mask, buf=None):
        if mask == "loc":  # what deepatlas_fast.warp runs when disp will get a gradient
            return ops.warp_with_loc_grad(image, disp, "zeros")
        if mask == "loc_backward":  # and its backward when the image needs a gradient too
            return ops.warp_backward_with_loc_grad(grad, image, disp, buf, "zeros"), buf
        if mask is None:
            return (ops.warp(image, disp, "linear", "zeros"),)
        return ops.warp_backward(grad, image, disp, "linear", "zeros", mask)

    old = os.environ.get("DEEPATLAS_FAST_SIMD")
    times = {case: {level: [] for level in levels} for case in CASES}
    ref = {}  # the first level's results
    try:
        for r in range(warmup + rounds):
            for level in levels:
                os.environ["DEEPATLAS_FAST_SIMD"] = level
                for case, mask in CASES.items():
                    out = None  # the previous case's outputs are freed outside the timing
                    buf = loc.clone() if mask == "loc_backward" else None  # (the op overwrites it)
                    t0 = time.perf_counter()
                    out = call(mask, buf)
                    if r >= warmup:
                        times[case][level].append(time.perf_counter() - t0)
                    if r == 0 and level == levels[0]:
                        ref[case] = out
                    elif r == 0:  # compare the bits once
                        if not all(torch.equal(a, b) for a, b in zip(ref[case], out)):
                            raise AssertionError(f"{case}: level {level} differs from level {levels[0]}")
    finally:
        if old is None:
            os.environ.pop("DEEPATLAS_FAST_SIMD", None)
        else:
            os.environ["DEEPATLAS_FAST_SIMD"] = old
    return {case: {level: statistics.median(t) for level, t in row.items()} for case, row in times.items()}


def main(argv=None) -> int:
    import deepatlas_fast as da

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"))
    p.add_argument("--levels", nargs="+", default=["avx2", "1"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    # say which build is timed
    print(f"warp of {Path(da.__file__).parent}, {tuple(args.shape)}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds (ms)")
    times = time_levels(tuple(args.shape), args.levels, args.rounds)
    print("| case | " + " | ".join(f"DEEPATLAS_FAST_SIMD={lv}" for lv in args.levels) + " |")
    print("|---|" + "---:|" * len(args.levels))
    for case, row in times.items():
        print(f"| {case} | " + " | ".join(f"{row[lv] * 1e3:.1f}" for lv in args.levels) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
