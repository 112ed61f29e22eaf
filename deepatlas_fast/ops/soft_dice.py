"""Per-class soft Dice. TEMPORARY plain-torch version; replaced by the fused op of issue 3.
The signature is final."""
from __future__ import annotations

import torch


def soft_dice(probs: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-6, from_logits: bool = False) -> torch.Tensor:
    """(2 sum(p t) + eps) / (sum p + sum t + eps) per batch item and class -> Tensor[B, C].

    ``target``: integer labels [B, 1, ...] in [0, C) or probabilities [B, C, ...]."""
    if from_logits:
        probs = probs.softmax(1)
    C = probs.shape[1]
    if not target.is_floating_point():
        if target.numel() and (target.min() < 0 or target.max() >= C):
            raise ValueError(f"soft_dice: target labels must be in [0, {C}), got [{int(target.min())}, {int(target.max())}]")
        target = torch.nn.functional.one_hot(target[:, 0].long(), C).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.dim()))
    inter = (probs * target).sum(dims)
    return (2 * inter + eps) / (probs.sum(dims) + target.sum(dims) + eps)
