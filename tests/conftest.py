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


_COPIES = ("aten::contiguous", "aten::clone", "aten::copy_", "aten::_to_copy")


@pytest.fixture
def volume_copies():
    """volume_copies(fn, *shapes): the copying ops (contiguous, clone, copy_, _to_copy) that
    fn() applies to a tensor of one of `shapes`, as the profiler records them, including the
    calls made inside a kernel. An op reading its inputs through their strides makes none."""
    def run(fn, *shapes):
        shapes = [list(s) for s in shapes]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return [e.name for e in prof.events()
                if e.name in _COPIES and any(s in shapes for s in e.input_shapes)]
    return run
