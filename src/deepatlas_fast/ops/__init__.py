"""The package's custom ops (torch.library), one module per op."""
from .cpu_cache import cpu_cache_bytes, empty_cpu_cache
from .lncc import lncc
from .soft_dice import soft_dice
from .warp import MODES, PADDINGS, warp

__all__ = ["warp", "lncc", "soft_dice", "MODES", "PADDINGS", "cpu_cache_bytes", "empty_cpu_cache"]
