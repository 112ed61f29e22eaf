"""LNCC: deepatlas_fast.lncc vs MONAI's LocalNormalizedCrossCorrelationLoss (rectangular
kernel) and VoxelMorph's conv3d NCC, window 9, forward and forward+backward (gradients to
both images: in DeepAtlas both come from networks or the warp)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import deepatlas_fast as da
from benchmarks.common import forward_backward

WINDOW = 9


class VoxelMorphNCC:
    """VoxelMorph's NCC loss (voxelmorph/torch/losses.py, Dalca et al.), re-written here, not
    imported: five conv3d box sums with a ones kernel, then the local squared correlation."""

    def __init__(self, win=WINDOW):
        self.win = win

    def __call__(self, y_true, y_pred):
        Ii, Ji = y_true, y_pred
        sum_filt = torch.ones(1, 1, self.win, self.win, self.win, dtype=Ii.dtype)
        pad = self.win // 2
        I2, J2, IJ = Ii * Ii, Ji * Ji, Ii * Ji
        I_sum = F.conv3d(Ii, sum_filt, padding=pad)
        J_sum = F.conv3d(Ji, sum_filt, padding=pad)
        I2_sum = F.conv3d(I2, sum_filt, padding=pad)
        J2_sum = F.conv3d(J2, sum_filt, padding=pad)
        IJ_sum = F.conv3d(IJ, sum_filt, padding=pad)
        win_size = math.prod([self.win] * 3)
        u_I, u_J = I_sum / win_size, J_sum / win_size
        cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
        I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
        J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
        cc = cross * cross / (I_var * J_var + 1e-5)
        return -torch.mean(cc)


def _monai():
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=WINDOW, kernel_type="rectangular")


def _ours(a, b):
    return 1 - da.lncc(a, b, window=WINDOW).mean()


def _images(shape, grad):
    torch.manual_seed(0)
    a = torch.rand(1, 1, *shape)
    # a smooth, correlated second image, as a warped moving image would be
    b = (0.5 * a + 0.5 * F.avg_pool3d(torch.rand(1, 1, *shape), 5, 1, 2)).contiguous()
    return a.requires_grad_(grad), b.requires_grad_(grad)


def _forward(loss, shape):
    a, b = _images(shape, False)
    return lambda: loss(a, b)


def _fwd_bwd(loss, shape):
    return forward_backward(loss, *_images(shape, True))


CASES = {
    "deepatlas_fast.lncc forward": lambda s: _forward(_ours, s),
    "MONAI LNCC forward": lambda s: _forward(_monai(), s),
    "deepatlas_fast.lncc forward+backward": lambda s: _fwd_bwd(_ours, s),
    "MONAI LNCC forward+backward": lambda s: _fwd_bwd(_monai(), s),
    "VoxelMorph NCC forward+backward": lambda s: _fwd_bwd(VoxelMorphNCC(), s),
}
GROUPS = [
    ("LNCC(9) forward", "deepatlas_fast.lncc forward", ["MONAI LNCC forward"]),
    ("LNCC(9) forward+backward", "deepatlas_fast.lncc forward+backward",
     ["MONAI LNCC forward+backward", "VoxelMorph NCC forward+backward"]),
]
