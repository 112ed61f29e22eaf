"""For the pytest-benchmark smoke tests of benchmarks/ (pytest benchmarks [--benchmark-enable])."""
import math
import time

import pytest


@pytest.fixture
def run_case(benchmark):
    """run_case(fn): runs fn under pytest-benchmark and returns its figures in seconds, each
    asserted finite and positive: the benchmark's statistics with --benchmark-enable; with
    --benchmark-disable (the project's default) the time of the one call it then makes."""
    def run(fn):
        if benchmark.enabled:
            benchmark(fn)
            s = benchmark.stats.stats
            figures = {"min": s.min, "max": s.max, "mean": s.mean, "median": s.median}
        else:
            t0 = time.perf_counter()
            benchmark(fn)
            figures = {"seconds": time.perf_counter() - t0}
        bad = {k: v for k, v in figures.items() if not (math.isfinite(v) and v > 0)}
        assert not bad, f"figures that are not finite and positive: {bad}"
        return figures

    return run
