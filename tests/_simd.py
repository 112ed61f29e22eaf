"""The SIMD levels of the CPU kernels as pytest parameters (values of DEEPATLAS_FAST_SIMD, which
the kernels read at every call). A level whose instruction sets this CPU lacks is skipped, with
the reason naming them: it would fall back to the scalar code, and a comparison of that with
the scalar code would pass without testing anything."""
import os

import pytest

from deepatlas_fast.ops import _library

NAMES = {"avx2": "AVX2", "fma": "FMA", "avx512": "AVX-512 (F, VL, DQ)"}
SCALAR = "0"


def simd_level(level: str, needs: tuple[str, ...]):
    """DEEPATLAS_FAST_SIMD=level as a pytest parameter, skipped unless the CPU has `needs`
    (names of _library.cpu_instruction_sets)."""
    missing = [s for s in needs if s not in _library.cpu_instruction_sets]
    marks = [pytest.mark.skip(reason="this CPU lacks " + " and ".join(NAMES[s] for s in missing))] if missing else []
    return pytest.param(level, marks=marks, id=level)


# The warp's SIMD rows: AVX2, and AVX-512 (which the level "avx512" allows: anything but "0"
# and "avx2" lets the kernels take the best their CPU runs).
WARP_SIMD_LEVELS = [simd_level("avx2", ("avx2",)), simd_level("avx512", ("avx2", "avx512"))]
WARP_LEVELS = [pytest.param(SCALAR, id="scalar")] + WARP_SIMD_LEVELS
# The soft Dice AVX2 + FMA kernel.
DICE_LEVELS = [pytest.param(SCALAR, id="scalar"), simd_level("avx2", ("avx2", "fma"))]


def at_simd_level(level, fn):
    """fn() with DEEPATLAS_FAST_SIMD=level."""
    old = os.environ.get("DEEPATLAS_FAST_SIMD")
    os.environ["DEEPATLAS_FAST_SIMD"] = level
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["DEEPATLAS_FAST_SIMD"]
        else:
            os.environ["DEEPATLAS_FAST_SIMD"] = old
