"""The cache of freed volume-sized CPU outputs of the kernels.

Outputs of 2 MiB or more (warp outputs and gradients, LNCC and soft Dice gradients) are kept
when freed, up to ``DEEPATLAS_FAST_CPU_CACHE_MB`` MiB (default 512; 0 turns the cache off), and
handed out again for the next output of the same size: a training loop asks for the same sizes
at every step, and memory fresh from the OS costs a page clearing at first touch (see
csrc/common/cpu_memory.h). Like PyTorch's CUDA caching allocator, the
process keeps that memory until :func:`empty_cpu_cache`.
"""
from __future__ import annotations

from ._library import ops


def cpu_cache_bytes() -> int:
    """Bytes held by the cache (freed buffers, not in use by any tensor)."""
    return int(ops.cpu_cache_bytes())


def empty_cpu_cache() -> None:
    """Returns every cached buffer to the OS (tensors in use are not affected)."""
    ops.empty_cpu_cache()
