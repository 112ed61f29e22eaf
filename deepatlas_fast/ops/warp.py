"""3D trilinear / nearest warp: ``out(x) = image(x + disp(x))`` in voxel units.

TEMPORARY pure-torch implementation (grid_sample); replaced by the fused C++/CUDA op.
The signature is final.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("linear", "nearest")
PADDINGS = ("zeros", "border")


def warp(image: torch.Tensor, disp: torch.Tensor, *, mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` [B, C, D, H, W] at ``x + disp(x)``; ``disp`` is [B, 3, D', H', W'] in voxels, (d, h, w) order."""
    B, _, D, H, W = image.shape
    Dp, Hp, Wp = disp.shape[2:]
    grids = torch.meshgrid(
        *[torch.arange(s, dtype=disp.dtype, device=disp.device) for s in (Dp, Hp, Wp)], indexing="ij"
    )
    loc = torch.stack(grids)[None] + disp
    sizes = torch.tensor([D, H, W], dtype=disp.dtype, device=disp.device).view(1, 3, 1, 1, 1)
    grid = (2 * loc / (sizes - 1) - 1).permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                         padding_mode=padding, align_corners=True)
