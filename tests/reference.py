"""Plain-torch float64 references that the fused kernels are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """[1, 3, D, H, W] voxel coordinates (d, h, w)."""
    axes = [torch.arange(s, dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def warp_reference(image, disp, mode="linear", padding="zeros"):
    """VoxelMorph's SpatialTransformer: identity + disp, normalised to [-1, 1] with the image's
    sizes, (d, h, w) -> (x, y, z) order, grid_sample(align_corners=True)."""
    sizes = torch.tensor(image.shape[2:], dtype=disp.dtype, device=disp.device).view(1, 3, 1, 1, 1)
    loc = identity_grid(disp.shape[2:], disp.dtype, disp.device) + disp
    grid = (2 * loc / (sizes - 1) - 1).permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                         padding_mode=padding, align_corners=True)
