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


def lncc_reference(a, b, window=9, eps=1e-5):
    """VoxelMorph's NCC written plainly: conv3d box sums (zero padding), u = S / n,
    cross = S(ab) - u_b S(a) - u_a S(b) + u_a u_b n, var = S(aa) - 2 u_a S(a) + u_a^2 n;
    mean over channels and voxels of cross^2 / (var_a var_b + eps) -> [B]."""
    C = a.shape[1]
    k = torch.ones(C, 1, window, window, window, dtype=a.dtype, device=a.device)
    n = float(window ** 3)

    def S(x):
        return F.conv3d(x, k, padding=window // 2, groups=C)

    Sa, Sb, Saa, Sbb, Sab = S(a), S(b), S(a * a), S(b * b), S(a * b)
    ua, ub = Sa / n, Sb / n
    cross = Sab - ub * Sa - ua * Sb + ua * ub * n
    var_a = Saa - 2 * ua * Sa + ua * ua * n
    var_b = Sbb - 2 * ub * Sb + ub * ub * n
    return (cross * cross / (var_a * var_b + eps)).flatten(1).mean(1)


def soft_dice_reference(probs, target, eps=1e-6, from_logits=False):
    """(2 sum p t + eps) / (sum p + sum t + eps) per batch item and class, with an explicit
    one_hot for integer labels -> [B, C]."""
    if from_logits:
        probs = probs.softmax(1)
    if not target.is_floating_point():
        target = F.one_hot(target[:, 0].long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    B, C = probs.shape[:2]

    def total(x):  # over the spatial dims (there may be none)
        return x.reshape(B, C, -1).sum(-1)

    return (2 * total(probs * target) + eps) / (total(probs) + total(target) + eps)


def soft_dice_sums_reference(probs, target, from_logits=False):
    """The soft_dice_sums op written plainly: [B, C, 3] = (sum p t, sum p, sum t) over the
    voxels, with an explicit one_hot for integer labels."""
    if from_logits:
        probs = probs.softmax(1)
    if not target.is_floating_point():
        target = F.one_hot(target[:, 0].long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    B, C = probs.shape[:2]

    def total(x):
        return x.reshape(B, C, -1).sum(-1)

    return torch.stack([total(probs * target), total(probs), total(target)], -1)


def _difference_conv(disp, kernel):
    """Valid conv3d of every channel of disp with one 3x3x3 finite-difference kernel."""
    k = kernel.to(disp.dtype).expand(disp.shape[1], 1, *kernel.shape).contiguous()
    return F.conv3d(disp, k, groups=disp.shape[1])


def gradient_l2_reference(disp):
    """Mean squared forward difference per axis, averaged over the axes, by explicit loops
    over voxel pairs (float64)."""
    total = 0.0
    for axis in range(3):
        n = disp.shape[2 + axis]
        acc, count = 0.0, 0
        for i in range(n - 1):
            diff = disp.select(2 + axis, i + 1) - disp.select(2 + axis, i)
            acc += float((diff.double() ** 2).sum())
            count += diff.numel()
        total += acc / count
    return total / 3


def bending_energy_reference(disp):
    """Bending energy with second-difference stencils as 3x3x3 conv3d kernels (interior
    voxels): sum_i u_ii^2 + 2 sum_{i<j} u_ij^2, mean over channels and voxels."""
    energy = 0.0
    for i in range(3):
        k = torch.zeros(3, 3, 3, dtype=torch.float64)
        idx = [1, 1, 1]
        for step, w in ((0, 1.0), (1, -2.0), (2, 1.0)):
            idx[i] = step
            k[tuple(idx)] = w
        energy += float(_difference_conv(disp.double(), k).pow(2).mean())
        for j in range(i + 1, 3):
            k = torch.zeros(3, 3, 3, dtype=torch.float64)
            for si, sj, w in ((2, 2, 0.25), (2, 0, -0.25), (0, 2, -0.25), (0, 0, 0.25)):
                idx = [1, 1, 1]
                idx[i], idx[j] = si, sj
                k[tuple(idx)] = w
            energy += 2 * float(_difference_conv(disp.double(), k).pow(2).mean())
    return energy
