"""Losses of DeepAtlas: image similarity, regularity, Dice. TEMPORARY first version (issue 3 owns it)."""
from __future__ import annotations

import torch

from .ops import lncc, soft_dice


def lncc_loss(a, b, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """1 - LNCC, averaged over the batch."""
    return 1 - lncc(a, b, window=window, eps=eps).mean()


def ncc_loss(a, b, eps: float = 1e-5) -> torch.Tensor:
    """1 - global normalised cross-correlation, averaged over the batch."""
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    ncc = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1) + eps).sqrt()
    return 1 - ncc.mean()


def dice_loss(probs, target, *, include_background: bool = False, from_logits: bool = False, eps: float = 1e-6):
    """1 - mean soft Dice over classes (background class 0 excluded by default) and batch."""
    d = soft_dice(probs, target, eps=eps, from_logits=from_logits)
    if not include_background:
        d = d[:, 1:]
    return 1 - d.mean()


def gradient_l2(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of the displacement along each axis."""
    dd = disp[:, :, 1:] - disp[:, :, :-1]
    dh = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dw = disp[..., 1:] - disp[..., :-1]
    return (dd.pow(2).mean() + dh.pow(2).mean() + dw.pow(2).mean()) / 3
