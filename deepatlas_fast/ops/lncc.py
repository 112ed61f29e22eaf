"""Local normalised cross-correlation. TEMPORARY plain-torch version (conv3d box sums);
replaced by the fused op of issue 3. The signature is final."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lncc(a: torch.Tensor, b: torch.Tensor, *, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean local squared correlation per batch item -> Tensor[B]. Loss: ``1 - lncc``."""
    C = a.shape[1]
    k = torch.ones(C, 1, window, window, window, dtype=a.dtype, device=a.device)
    pad = window // 2
    n = float(window ** 3)

    def S(x):
        return F.conv3d(x, k, padding=pad, groups=C)

    Sa, Sb, Saa, Sbb, Sab = S(a), S(b), S(a * a), S(b * b), S(a * b)
    ua, ub = Sa / n, Sb / n
    cross = Sab - ub * Sa - ua * Sb + ua * ub * n
    va = Saa - 2 * ua * Sa + ua * ua * n
    vb = Sbb - 2 * ub * Sb + ub * ub * n
    cc = cross * cross / (va * vb + eps)
    return cc.flatten(1).mean(1)
