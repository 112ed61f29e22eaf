"""deepatlas_fast: DeepAtlas (joint registration + segmentation) with fused CPU/CUDA kernels."""
from .ops import lncc, soft_dice, warp

__version__ = "0.1.0"
__all__ = ["warp", "lncc", "soft_dice", "__version__"]
