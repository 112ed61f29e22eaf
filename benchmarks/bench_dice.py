"""Soft Dice: deepatlas_fast.soft_dice (fused softmax, integer labels read directly) vs
MONAI's DiceLoss(softmax=True, to_onehot_y=True), 5 classes, forward and forward+backward."""
from __future__ import annotations

import math

import torch

import deepatlas_fast as da
from benchmarks.common import forward_backward

CLASSES = 5


def _monai():
    from monai.losses import DiceLoss
    return DiceLoss(softmax=True, to_onehot_y=True)


def _ours(logits, labels):
    return 1 - da.soft_dice(logits, labels, from_logits=True).mean()


def _inputs(shape, grad):
    torch.manual_seed(0)
    logits = torch.randn(1, CLASSES, *shape).requires_grad_(grad)
    labels = torch.randint(0, CLASSES, (1, 1, *shape))
    return logits, labels


def _forward(loss, shape):
    logits, labels = _inputs(shape, False)
    return lambda: loss(logits, labels)


def _fwd_bwd(loss, shape):
    return forward_backward(loss, *_inputs(shape, True))


CASES = {
    "deepatlas_fast.soft_dice forward": lambda s: _forward(_ours, s),
    "MONAI DiceLoss forward": lambda s: _forward(_monai(), s),
    "deepatlas_fast.soft_dice forward+backward": lambda s: _fwd_bwd(_ours, s),
    "MONAI DiceLoss forward+backward": lambda s: _fwd_bwd(_monai(), s),
}
# Least memory traffic: logits (float32) and labels (int64) read once by the forward; the
# backward needs the whole-volume sums first, so it reads them again and writes the gradient.
_PASS = lambda s: (4 * CLASSES + 8) * math.prod(s)  # noqa: E731
LEAST_BYTES = {
    "deepatlas_fast.soft_dice forward": _PASS,
    "deepatlas_fast.soft_dice forward+backward": lambda s: 2 * _PASS(s) + 4 * CLASSES * math.prod(s),
}
GROUPS = [
    (f"soft Dice ({CLASSES} classes) forward", "deepatlas_fast.soft_dice forward", ["MONAI DiceLoss forward"]),
    (f"soft Dice ({CLASSES} classes) forward+backward", "deepatlas_fast.soft_dice forward+backward",
     ["MONAI DiceLoss forward+backward"]),
]
