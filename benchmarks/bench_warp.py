"""Warp: deepatlas_fast.warp vs the VoxelMorph path (identity grid + normalise + grid_sample)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import deepatlas_fast as da
from benchmarks.common import forward_backward, smooth_displacement


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
    return forward_backward(warp, image, disp, grad=grad)


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


def warp_bytes(shape, channels: int = 1, itemsize: int = 4) -> int:
    """Least memory traffic of one forward warp: read the displacement (3 volumes) and the
    image, write the output (each image voxel read once: the best case of the gather)."""
    voxels = shape[0] * shape[1] * shape[2]
    return (3 + 2 * channels) * voxels * itemsize


# Least memory traffic, in float32 volumes: forward reads disp (3) and image, writes the output;
# backward reads grad_out, disp (3) and image, writes grad_disp (3) and grad_image (if asked).
LEAST_BYTES = {
    "deepatlas_fast.warp forward": warp_bytes,
    "deepatlas_fast.warp forward+backward": lambda s: warp_bytes(s) + 9 * 4 * math.prod(s),
    "deepatlas_fast.warp forward+backward, disp grad only": lambda s: warp_bytes(s) + 8 * 4 * math.prod(s),
}
GROUPS = [
    ("warp forward", "deepatlas_fast.warp forward", ["VoxelMorph grid_sample forward"]),
    ("warp forward+backward", "deepatlas_fast.warp forward+backward", ["VoxelMorph grid_sample forward+backward"]),
    ("warp forward+backward (disp only)", "deepatlas_fast.warp forward+backward, disp grad only",
     ["VoxelMorph grid_sample forward+backward, disp grad only"]),
]


# ---- CUDA: achieved bandwidth (runs only where a CUDA device exists)

def _cuda_seconds(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def cuda_bandwidth(shape, repeat: int = 20):
    """GB/s of the CUDA warp forward next to a device-to-device copy moving the same bytes
    (half read, half written), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    image, disp = (t.cuda() for t in _inputs(shape, False))
    nbytes = warp_bytes(shape)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    warp_s = _cuda_seconds(lambda: da.warp(image, disp), repeat)
    copy_s = _cuda_seconds(lambda: dst.copy_(src), repeat)
    return {"device": torch.cuda.get_device_name(), "bytes": nbytes,
            "warp_gbps": nbytes / warp_s / 1e9, "copy_gbps": nbytes / copy_s / 1e9}


def format_bandwidth(result) -> str:
    if result is None:
        return "CUDA: no device; achieved GB/s not measured."
    return (f"CUDA ({result['device']}): warp forward {result['warp_gbps']:.0f} GB/s, device-to-device copy "
            f"{result['copy_gbps']:.0f} GB/s ({result['warp_gbps'] / result['copy_gbps']:.0%} of copy), "
            f"{result['bytes'] / 2**20:.0f} MiB moved per call")
