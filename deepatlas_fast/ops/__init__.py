"""The package's custom ops (torch.library), one module per op."""
from .lncc import lncc
from .soft_dice import soft_dice
from .warp import MODES, PADDINGS, warp

__all__ = ["warp", "lncc", "soft_dice", "MODES", "PADDINGS"]
