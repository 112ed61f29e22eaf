"""Losses of DeepAtlas: image similarity (LNCC, global NCC), segmentation (soft Dice,
cross-entropy, their sum), and displacement regularisers (diffusion, bending energy). All return
a scalar to minimise; the modules at the end (LNCCLoss, DiceLoss, ...) add a ``reduction``
over the batch, as MONAI's losses do."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import lncc, soft_dice


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


def dice_loss(probs: torch.Tensor, target: torch.Tensor, *, include_background: bool = True,
              from_logits: bool = False, eps: float = 1e-6, weight: torch.Tensor | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """1 - soft Dice (DeepAtlas form, see ``deepatlas_fast.soft_dice``).

    Args:
        probs: [B, C, ...] probabilities (or logits with ``from_logits``).
        target: integer labels [B, 1, ...] or probabilities [B, C, ...].
        include_background: keep class 0 (the default, as DeepAtlas's official code and MONAI
            do). Without it nothing pulls a voxel towards background, and a structure whose
            probability has collapsed everywhere gets almost no gradient back.
        weight: optional per-class weights [C] for the class mean.
        reduction: "mean" averages over classes (weighted) then batch; "none" returns the
            per-class losses [B, C'].
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"dice_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    d = soft_dice(probs, target, eps=eps, from_logits=from_logits)
    w = _class_weight(weight, d.shape[1], d)
    if not include_background:
        if d.shape[1] < 2:
            raise ValueError("dice_loss: include_background=False needs at least 2 classes")
        d = d[:, 1:]
        w = None if w is None else w[1:]
    if reduction == "none":
        return 1 - d
    if w is None:
        return 1 - d.mean()
    return 1 - (d * w).sum(1).mean() / w.sum()


def cross_entropy(pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True,
                  weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Voxel-mean cross-entropy -sum_c t_c log p_c.

    Args:
        pred: [B, C, ...] logits (``from_logits``) or probabilities (e.g. a warped softmax);
            probabilities are clamped to ``eps`` before the log.
        target: integer labels [B, 1, ...] or probabilities [B, C, ...] (soft targets, such as
            an atlas's one-hot labels warped by a registration).
        weight: optional per-class weights [C] (each voxel's term is scaled by its class weight;
            the mean is over voxels, not over weights).
    """
    if pred.dim() < 3:
        raise ValueError(f"cross_entropy: pred must be [B, C, ...], got shape {tuple(pred.shape)}")
    w = _class_weight(weight, pred.shape[1], pred)
    logp = pred.log_softmax(1) if from_logits else pred.clamp_min(eps).log()
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if target.shape[1] != 1 or target.shape[2:] != pred.shape[2:]:
            raise ValueError(f"cross_entropy: integer target must be [B, 1, ...] on pred's grid, "
                             f"got {tuple(target.shape)} for pred {tuple(pred.shape)}")
        per_voxel = torch.nn.functional.nll_loss(logp, target[:, 0].long(), weight=w, reduction="none")
        return per_voxel.mean()
    if target.shape != pred.shape:
        raise ValueError(f"cross_entropy: probability target must match pred's shape {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)}")
    t = target if w is None else target * w.view(1, -1, *([1] * (pred.dim() - 2)))
    return -(t * logp).sum(1).mean()


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True,
                      include_background: bool = True, lambda_ce: float = 1.0,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss + ``lambda_ce`` x cross-entropy: the supervised loss of F_S and the anatomy
    loss that trains it. Dice balances the classes whatever their size; the cross-entropy keeps a
    gradient on every voxel, so a class whose probability is near 0 recovers."""
    loss = dice_loss(pred, target, from_logits=from_logits, include_background=include_background, weight=weight)
    if lambda_ce:
        loss = loss + lambda_ce * cross_entropy(pred, target, from_logits=from_logits, weight=weight)
    return loss


def _class_weight(weight, num_classes: int, like: torch.Tensor):
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != num_classes or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"class weights must be {num_classes} finite values >= 0, not all 0; got {weight}")
    return w


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


# ---- Modules (MONAI-style): the functions above with a ``reduction`` over the batch -----------
class _BatchLoss(torch.nn.Module):
    """Base of the loss modules. ``reduction``: "mean" (the function's value: the batch mean),
    "sum" (over the batch) or "none" ([B], one value per batch item). Each function above is a
    mean of equal-sized per-item means, so "mean" equals the mean of "none"."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def loss(self, *inputs: torch.Tensor) -> torch.Tensor:  # the batch mean
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return self.loss(*inputs)
        per_item = torch.stack([self.loss(*(x[i:i + 1] for x in inputs)) for i in range(inputs[0].shape[0])])
        return per_item if self.reduction == "none" else per_item.sum()


class LNCCLoss(_BatchLoss):
    """1 - LNCC (``lncc_loss``). Inputs: two images [B, C, D, H, W]."""

    def __init__(self, window: int = 9, eps: float = 1e-5, reduction: str = "mean"):
        super().__init__(reduction)
        self.window, self.eps = window, eps

    def loss(self, a, b):
        return lncc_loss(a, b, window=self.window, eps=self.eps)


class NCCLoss(_BatchLoss):
    """1 - global NCC (``ncc_loss``)."""

    def __init__(self, eps: float = 1e-5, reduction: str = "mean"):
        super().__init__(reduction)
        self.eps = eps

    def loss(self, a, b):
        return ncc_loss(a, b, eps=self.eps)


class DiceLoss(_BatchLoss):
    """1 - soft Dice (``dice_loss``): prediction [B, C, ...], target labels [B, 1, ...] or
    probabilities [B, C, ...]."""

    def __init__(self, *, include_background: bool = True, from_logits: bool = False, eps: float = 1e-6,
                 weight=None, reduction: str = "mean"):
        super().__init__(reduction)
        self.include_background, self.from_logits, self.eps, self.weight = include_background, from_logits, eps, weight

    def loss(self, pred, target):
        return dice_loss(pred, target, include_background=self.include_background, from_logits=self.from_logits,
                         eps=self.eps, weight=self.weight)


class SegmentationLoss(_BatchLoss):
    """Soft Dice + ``lambda_ce`` x cross-entropy (``segmentation_loss``)."""

    def __init__(self, *, from_logits: bool = True, include_background: bool = True, lambda_ce: float = 1.0,
                 weight=None, reduction: str = "mean"):
        super().__init__(reduction)
        self.from_logits, self.include_background, self.lambda_ce, self.weight = (
            from_logits, include_background, lambda_ce, weight)

    def loss(self, pred, target):
        return segmentation_loss(pred, target, from_logits=self.from_logits,
                                 include_background=self.include_background, lambda_ce=self.lambda_ce,
                                 weight=self.weight)


class GradientL2Loss(_BatchLoss):
    """Diffusion regulariser (``gradient_l2``) of a displacement [B, 3, D, H, W]."""

    def loss(self, disp):
        return gradient_l2(disp)


class BendingEnergyLoss(_BatchLoss):
    """Bending energy (``bending_energy``) of a displacement [B, C, D, H, W]."""

    def loss(self, disp):
        return bending_energy(disp)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, 1, ...] int labels -> [B, C, ...] float one-hot (float32, contiguous)."""
    if labels.dim() < 2 or labels.shape[1] != 1 or labels.is_floating_point():
        raise ValueError(f"one_hot: labels must be integer [B, 1, ...], got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"one_hot: labels must be in [0, {num_classes}), found {labels.min().item()}..{labels.max().item()}")
    # scattered straight into float32: no int64 one-hot volume, no conversion pass
    out = torch.zeros(labels.shape[0], num_classes, *labels.shape[2:], device=labels.device)
    return out.scatter_(1, labels.long(), 1.0)
