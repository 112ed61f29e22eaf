"""pytest-benchmark entry points for the refinement loop (not part of the test suite):
    pytest benchmarks --benchmark-enable
A small volume; `python -m benchmarks --only refine` gives the full-size table."""
import pytest

from benchmarks import bench_refine

SHAPE = (32, 32, 32)


@pytest.mark.parametrize("case", list(bench_refine.CASES))
def test_refine(run_case, case):
    if "MONAI" in case:
        pytest.importorskip("monai")
    run_case(bench_refine.CASES[case](SHAPE))
