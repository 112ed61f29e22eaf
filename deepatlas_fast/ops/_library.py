"""Loads the compiled kernels (deepatlas_fast._C) once; the ops then live in torch.ops."""
from __future__ import annotations

import torch  # first: loads libc10/libtorch, which _C links against

try:
    from .. import _C  # noqa: F401  (loading registers torch.ops.deepatlas_fast.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "deepatlas_fast: the compiled extension deepatlas_fast._C is missing or does not load "
        f"({e}). Install the package with `pip install --no-build-isolation .` after torch."
    ) from e

ops = torch.ops.deepatlas_fast
with_cuda: bool = bool(_C.with_cuda)
cuda_archs: str = str(_C.cuda_archs)
