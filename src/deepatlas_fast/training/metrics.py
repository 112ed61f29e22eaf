"""Scores of segmentations and displacement fields: hard Dice per structure, Jacobian
determinant and folding fraction."""
from __future__ import annotations

import numpy as np
import torch


def dice_per_class(pred, target, classes) -> np.ndarray:
    """Hard Dice of integer maps for each value in ``classes`` (NaN where absent from both)."""
    p = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).reshape(-1).long()
    t = torch.as_tensor(np.asarray(target) if not torch.is_tensor(target) else target).reshape(-1).long()
    out = []
    for c in classes:
        pc, tc = p == c, t == c
        denom = int(pc.sum() + tc.sum())
        out.append(np.nan if denom == 0 else 2.0 * int((pc & tc).sum()) / denom)
    return np.asarray(out, dtype=np.float64)


def jacobian_determinant(disp) -> np.ndarray:
    """det of d(x + u)/dx for ``disp`` [3, D, H, W] (voxels), central differences."""
    u = np.asarray(disp, dtype=np.float64)
    grads = [np.gradient(u[i]) for i in range(3)]  # grads[i][j] = du_i / dx_j
    J = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def folding_fraction(disp) -> float:
    """Share of voxels where the map x + u(x) folds (Jacobian determinant <= 0)."""
    return float((jacobian_determinant(disp) <= 0).mean())
