"""pytest-benchmark entry points for LNCC and soft Dice, and smoke tests of the cases (not part
of the test suite):
    pytest benchmarks --benchmark-enable
Small volumes so a run takes seconds; `python -m benchmarks --only lncc,dice` gives the
full-size table. The MONAI cases skip where MONAI (an optional package) is not installed."""
import pytest

from benchmarks import bench_dice, bench_lncc

SHAPE = (48, 48, 48)


def needs_monai(case):
    if case.startswith("MONAI"):
        pytest.importorskip("monai")


@pytest.mark.parametrize("case", list(bench_lncc.CASES))
def test_lncc(run_case, case):
    needs_monai(case)
    run_case(bench_lncc.CASES[case](SHAPE))


@pytest.mark.parametrize("case", list(bench_dice.CASES))
def test_dice(run_case, case):
    needs_monai(case)
    run_case(bench_dice.CASES[case](SHAPE))
