"""pytest-benchmark entry points for the training steps (not part of the test suite):
    pytest benchmarks --benchmark-enable
A small volume; `python -m benchmarks --only step` gives the full-size tables."""
import pytest

from benchmarks import bench_step

SHAPE = (32, 32, 32)


@pytest.mark.parametrize("case", list(bench_step.CASES))
def test_step(run_case, case):
    if "MONAI" in case or "torch/MONAI" in case or "grid_sample" in case:
        pytest.importorskip("monai")
    run_case(bench_step.CASES[case](SHAPE))
