"""Losses of DeepAtlas: image similarity (LNCC, global NCC), soft Dice, and displacement
regularisers (diffusion, bending energy). All return a scalar to minimise."""
from __future__ import annotations

import torch

from .ops import lncc, soft_dice


def lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """1 - local normalised cross-correlation (VoxelMorph's NCC, fused op), batch mean."""
    return 1 - lncc(a, b, window=window, eps=eps).mean()


def ncc_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - global normalised cross-correlation per batch item (over channels and voxels), batch
    mean. DeepAtlas's official code uses this one."""
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    ncc = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1) + eps).sqrt()
    return 1 - ncc.mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, *, include_background: bool = False,
              from_logits: bool = False, eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """1 - soft Dice (DeepAtlas form, see ``deepatlas_fast.soft_dice``).

    Args:
        probs: [B, C, ...] probabilities (or logits with ``from_logits``).
        target: integer labels [B, 1, ...] or probabilities [B, C, ...].
        include_background: keep class 0 (excluded by default, as in DeepAtlas).
        reduction: "mean" averages over classes then batch (every class weighs the same,
            whatever its size); "none" returns the per-class losses [B, C'].
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"dice_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    d = soft_dice(probs, target, eps=eps, from_logits=from_logits)
    if not include_background:
        if d.shape[1] < 2:
            raise ValueError("dice_loss: include_background=False needs at least 2 classes")
        d = d[:, 1:]
    return 1 - d if reduction == "none" else 1 - d.mean()


def gradient_l2(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of the displacement, averaged
    over the three axes (VoxelMorph's Grad('l2')). A constant field gives exactly 0.

    (DeepAtlas's official code adds instead of subtracting in two of the three directions.)"""
    if disp.dim() != 5:
        raise ValueError(f"gradient_l2: disp must be [B, 3, D, H, W], got shape {tuple(disp.shape)}")
    dd = disp[:, :, 1:] - disp[:, :, :-1]
    dh = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dw = disp[..., 1:] - disp[..., :-1]
    return (dd.pow(2).mean() + dh.pow(2).mean() + dw.pow(2).mean()) / 3


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Bending energy: mean over interior voxels and channels of
    sum_i (d2u/dx_i^2)^2 + 2 sum_{i<j} (d2u/dx_i dx_j)^2, with central second differences
    (voxel units). Zero for affine fields; u = x_0^2 gives 4."""
    if disp.dim() != 5 or min(disp.shape[2:]) < 3:
        raise ValueError(f"bending_energy: disp must be [B, C, D, H, W] with D, H, W >= 3, got shape {tuple(disp.shape)}")

    def at(offsets):  # disp[x + offsets] for x on the interior (1 voxel from every face)
        idx = [slice(1 + k, n - 1 + k) for k, n in zip(offsets, disp.shape[2:])]
        return disp[(slice(None), slice(None), *idx)]

    def e(*pairs):  # unit offset vector with the given (axis, step) entries
        o = [0, 0, 0]
        for axis, k in pairs:
            o[axis] = k
        return at(o)

    center = at([0, 0, 0])
    energy = 0
    for i in range(3):
        energy = energy + (e((i, 1)) - 2 * center + e((i, -1))).pow(2).mean()
        for j in range(i + 1, 3):
            mixed = (e((i, 1), (j, 1)) - e((i, 1), (j, -1)) - e((i, -1), (j, 1)) + e((i, -1), (j, -1))) / 4
            energy = energy + 2 * mixed.pow(2).mean()
    return energy
