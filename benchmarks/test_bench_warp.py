"""pytest-benchmark entry points, and smoke tests of the cases (not part of the test suite):
    pytest benchmarks --benchmark-enable [--benchmark-json out.json]
Small volumes so a run takes seconds; `python -m benchmarks` gives the full-size table."""
import math

import pytest
import torch

from benchmarks import bench_warp

SHAPE = (64, 64, 64)


@pytest.mark.parametrize("case", list(bench_warp.CASES))
def test_warp(run_case, case):
    run_case(bench_warp.CASES[case](SHAPE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bandwidth_report():
    bw = bench_warp.cuda_bandwidth(SHAPE, repeat=3)
    for key in ("warp_gbps", "copy_gbps"):
        assert math.isfinite(bw[key]) and bw[key] > 0, (key, bw[key])
    assert "GB/s" in bench_warp.format_bandwidth(bw)
