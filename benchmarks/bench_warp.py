"""Warp: deepatlas_fast.warp vs the VoxelMorph path (identity grid + normalise + grid_sample)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import deepatlas_fast as da
from benchmarks.common import smooth_displacement


class VoxelMorphTransformer:
    """What VoxelMorph's SpatialTransformer does (re-written here, not imported): a stored
    identity grid, plus the flow, normalised to [-1, 1], axes reversed, grid_sample."""

    def __init__(self, shape):
        axes = [torch.arange(s, dtype=torch.float32) for s in shape]
        self.grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
        self.shape = shape

    def __call__(self, image, flow):
        loc = self.grid + flow
        loc = torch.stack([2 * (loc[:, i] / (s - 1) - 0.5) for i, s in enumerate(self.shape)], -1)
        return F.grid_sample(image, loc[..., [2, 1, 0]], align_corners=True, mode="bilinear")


def _inputs(shape, grad, image_grad=None):
    torch.manual_seed(0)
    image = torch.rand(1, 1, *shape).requires_grad_(grad if image_grad is None else image_grad)
    disp = smooth_displacement(shape).requires_grad_(grad)
    return image, disp


def ours_forward(shape):
    image, disp = _inputs(shape, False)
    return lambda: da.warp(image, disp)


def torch_forward(shape):
    image, disp = _inputs(shape, False)
    vm = VoxelMorphTransformer(shape)
    return lambda: vm(image, disp)


def _fwd_bwd(warp, shape, image_grad=True):
    image, disp = _inputs(shape, True, image_grad)
    grad = torch.rand(1, 1, *shape)  # a loss gradient, materialised as a real loss gives it

    def run():
        warp(image, disp).backward(grad)
        image.grad = disp.grad = None  # freed after the call: the peak counts them, the baseline not

    return run


def ours_forward_backward(shape):
    return _fwd_bwd(da.warp, shape)


def torch_forward_backward(shape):
    return _fwd_bwd(VoxelMorphTransformer(shape), shape)


# Registration training needs only the displacement gradient (the moving image is data).
def ours_forward_backward_disp(shape):
    return _fwd_bwd(da.warp, shape, image_grad=False)


def torch_forward_backward_disp(shape):
    return _fwd_bwd(VoxelMorphTransformer(shape), shape, image_grad=False)


CASES = {
    "deepatlas_fast.warp forward": ours_forward,
    "VoxelMorph grid_sample forward": torch_forward,
    "deepatlas_fast.warp forward+backward": ours_forward_backward,
    "VoxelMorph grid_sample forward+backward": torch_forward_backward,
    "deepatlas_fast.warp forward+backward, disp grad only": ours_forward_backward_disp,
    "VoxelMorph grid_sample forward+backward, disp grad only": torch_forward_backward_disp,
}
GROUPS = [
    ("warp forward", "deepatlas_fast.warp forward", ["VoxelMorph grid_sample forward"]),
    ("warp forward+backward", "deepatlas_fast.warp forward+backward", ["VoxelMorph grid_sample forward+backward"]),
    ("warp forward+backward (disp only)", "deepatlas_fast.warp forward+backward, disp grad only",
     ["VoxelMorph grid_sample forward+backward, disp grad only"]),
]
