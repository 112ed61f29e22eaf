"""pytest-benchmark entry points (not part of the test suite):
    pytest benchmarks --benchmark-enable [--benchmark-json out.json]
Small volumes so a run takes seconds; `python -m benchmarks` gives the full-size table."""
import pytest
import torch

from benchmarks import bench_warp

SHAPE = (64, 64, 64)


@pytest.mark.parametrize("case", list(bench_warp.CASES))
def test_warp(benchmark, case):
    benchmark(bench_warp.CASES[case](SHAPE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bandwidth_report():
    bw = bench_warp.cuda_bandwidth(SHAPE, repeat=3)
    assert bw["warp_gbps"] > 0 and bw["copy_gbps"] > 0
    assert "GB/s" in bench_warp.format_bandwidth(bw)
