"""deepatlas_fast: DeepAtlas (joint registration + segmentation) with fused CPU/CUDA kernels."""
from .ops import cpu_cache_bytes, empty_cpu_cache, lncc, soft_dice, warp

__version__ = "0.1.0"
__all__ = ["warp", "lncc", "soft_dice", "cpu_cache_bytes", "empty_cpu_cache", "__version__"]
