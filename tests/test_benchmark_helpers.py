"""The benchmark runner's helpers that do not time anything (benchmarks/ is not installed:
it is imported from the source tree, after the installed package)."""
import sys
from pathlib import Path

import pytest
import torch

import deepatlas_fast  # noqa: F401  (the installed package first, then the source tree's benchmarks)

sys.path.append(str(Path(__file__).resolve().parents[1]))
bench_warp = pytest.importorskip("benchmarks.bench_warp")


def test_warp_bytes_counts_disp_image_and_output():
    assert bench_warp.warp_bytes((2, 3, 4)) == 5 * 24 * 4
    assert bench_warp.warp_bytes((2, 3, 4), channels=3, itemsize=2) == 9 * 24 * 2


def test_bandwidth_report_without_and_with_a_device():
    if not torch.cuda.is_available():
        assert bench_warp.cuda_bandwidth((8, 8, 8)) is None
    assert "not measured" in bench_warp.format_bandwidth(None)
    line = bench_warp.format_bandwidth({"device": "X", "bytes": 2**30, "warp_gbps": 500.0, "copy_gbps": 1000.0})
    assert "500 GB/s" in line and "1000 GB/s" in line and "50% of copy" in line and "1024 MiB" in line
