import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import _emulator

# Small, deterministic example counts: CI has 2 cores and runs the whole suite.
settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")), deadline=None,
    derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def _emulated_ops():
    return _emulator.load()


@pytest.fixture
def emulated():
    """torch.ops.deepatlas_fast_emulated: the CUDA kernel sources run under the CUDA emulator
    (tests/_emulator.py), built once per test run. A failed build is a test failure, never a skip."""
    try:
        return _emulated_ops()
    except _emulator.EmulatorBuildError as e:
        pytest.fail(str(e), pytrace=False)
