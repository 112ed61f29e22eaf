"""Test-time refinement: ITERATIONS Adam iterations of ``training.refine.refine`` (one level, the
full grid; fused warp and LNCC) vs the same loop written with grid_sample (VoxelMorph's spatial
transformer) and MONAI's LNCC: 1 - LNCC(window 5) + 3 x grad-L2, plain and diffeomorphic
(7 squarings, the correction composed with a start field)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.bench_warp import VoxelMorphTransformer
from benchmarks.common import smooth_displacement
from deepatlas_fast.nn.losses import gradient_l2
from deepatlas_fast.training.refine import RefineSettings, refine

ITERATIONS = 3
WINDOW, LAMBDA_R, LR, SQUARINGS = 5, 3.0, 0.1, 7


def _pair(shape):
    torch.manual_seed(0)
    moving = F.avg_pool3d(torch.rand(1, 1, *shape), 3, 1, 1)
    init = smooth_displacement(shape)
    target = VoxelMorphTransformer(shape)(moving, smooth_displacement(shape, seed=1)).detach()
    return moving, target, init


def _ours(shape, diffeomorphic):
    moving, target, init = _pair(shape)
    s = RefineSettings(iterations=ITERATIONS, levels=(1,), lr=LR, window=WINDOW, lambda_r=LAMBDA_R,
                       diffeomorphic=diffeomorphic, squarings=SQUARINGS)
    return lambda: refine(moving, target, init, s)


def _torch(shape, diffeomorphic):
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    moving, target, init = _pair(shape)
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=WINDOW, kernel_type="rectangular")
    st = VoxelMorphTransformer(shape)

    def field(param):
        if not diffeomorphic:
            return param
        w = param / 2 ** SQUARINGS
        for _ in range(SQUARINGS):
            w = w + st(w, w)
        return w + st(init, w)

    def run():
        param = (torch.zeros_like(init) if diffeomorphic else init.clone()).requires_grad_(True)
        opt = torch.optim.Adam([param], lr=LR)
        for _ in range(ITERATIONS):
            opt.zero_grad(set_to_none=True)
            u = field(param)
            loss = lncc(st(moving, u), target) + LAMBDA_R * gradient_l2(u)
            loss.backward()
            opt.step()
        return field(param.detach())
    return run


CASES = {
    "deepatlas_fast refine, plain": lambda s: _ours(s, False),
    "grid_sample + MONAI LNCC, plain": lambda s: _torch(s, False),
    "deepatlas_fast refine, diffeomorphic": lambda s: _ours(s, True),
    "grid_sample + MONAI LNCC, diffeomorphic": lambda s: _torch(s, True),
}
GROUPS = [
    (f"{ITERATIONS} refinement iterations, plain", "deepatlas_fast refine, plain", ["grid_sample + MONAI LNCC, plain"]),
    (f"{ITERATIONS} refinement iterations, diffeomorphic", "deepatlas_fast refine, diffeomorphic",
     ["grid_sample + MONAI LNCC, diffeomorphic"]),
]
