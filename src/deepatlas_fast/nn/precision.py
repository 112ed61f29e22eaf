"""Training precision: ``fp32`` (the default) or ``bf16`` (autocast, on the CPU and on CUDA).

Under ``bf16`` the convolutions of both nets run in bfloat16; the nets' outputs come back in
float32 (``RegNet`` and ``SegNet`` cast their last layer's output): a displacement of tens of
voxels in bfloat16 (8 mantissa bits) would be off by a tenth of a voxel, and the losses and
their sums stay exact enough to compare runs. The ops take bfloat16 too (float32 accumulation),
for callers that pass bfloat16 volumes themselves.

Whether bf16 pays depends on the CPU: with AVX-512 BF16 or AMX, oneDNN runs bfloat16
convolutions natively; without them it converts, and a step is slower than in float32
(docs/performance.md measures both on the benchmark machine).
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device | str):
    """The context a training step runs in: autocast to bfloat16 for ``bf16``, nothing for
    ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
