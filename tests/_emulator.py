"""The emulated ops (torch.ops.deepatlas_fast_emulated): the CUDA kernel sources compiled for
the host and run under the CUDA emulator of csrc/emulator/, so that the tests execute them on
machines without a GPU. Test-only: built from this checkout's csrc/ into build/, never part of
the wheel (setup.py leaves csrc/emulator out).

The `emulated` fixture (conftest.py) builds them once per test run; ninja rebuilds only what
changed since the last build. A build that fails fails every test that uses them: they never
skip."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "test-extensions" / "deepatlas_fast_emulated"
NAME = "deepatlas_fast_emulated"
# -ffp-contract=off as for the wheel's CPU code (setup.py): no fused multiply-adds.
CFLAGS = ["-O2", "-ffp-contract=off"]


class EmulatorBuildError(RuntimeError):
    pass


def sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "emulator").glob("*.cpp"))


def load():
    """Builds (if needed) and loads the emulated ops; returns torch.ops.deepatlas_fast_emulated."""
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise EmulatorBuildError(f"no emulator sources in {CSRC / 'emulator'}: the tests need the checkout's csrc/")
    BUILD.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name=NAME, sources=srcs, extra_include_paths=[str(CSRC)], extra_cflags=CFLAGS,
                           build_directory=str(BUILD), is_python_module=False)
    except Exception as e:  # compile errors (with the compiler's output) arrive as RuntimeError
        raise EmulatorBuildError(
            f"could not build the emulated ops from {CSRC / 'emulator'} in {BUILD}: {type(e).__name__}: {e}") from e
    ops = torch.ops.deepatlas_fast_emulated
    for op in ("warp", "warp_backward", "lncc", "lncc_backward", "soft_dice_sums", "soft_dice_sums_backward"):
        if not hasattr(ops, op):
            raise EmulatorBuildError(f"the emulated ops library loaded but registers no {NAME}::{op}")
    return ops
