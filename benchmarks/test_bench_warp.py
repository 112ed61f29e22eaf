"""pytest-benchmark entry points (not part of the test suite):
    pytest benchmarks --benchmark-enable [--benchmark-json out.json]
Small volumes so a run takes seconds; `python -m benchmarks` gives the full-size table."""
import pytest

from benchmarks import bench_warp

SHAPE = (64, 64, 64)


@pytest.mark.parametrize("case", list(bench_warp.CASES))
def test_warp(benchmark, case):
    benchmark(bench_warp.CASES[case](SHAPE))
