"""pytest-benchmark entry points for LNCC and soft Dice (not part of the test suite):
    pytest benchmarks --benchmark-enable
Small volumes so a run takes seconds; `python -m benchmarks --only lncc,dice` gives the
full-size table."""
import pytest

from benchmarks import bench_dice, bench_lncc

SHAPE = (48, 48, 48)


@pytest.mark.parametrize("case", list(bench_lncc.CASES))
def test_lncc(benchmark, case):
    benchmark(bench_lncc.CASES[case](SHAPE))


@pytest.mark.parametrize("case", list(bench_dice.CASES))
def test_dice(benchmark, case):
    benchmark(bench_dice.CASES[case](SHAPE))
