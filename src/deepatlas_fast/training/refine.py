"""Test-time refinement: optimise one pair's displacement field itself, starting from F_R's.

A registration net gives a good field in one forward pass but is a compromise over its training
set; a few hundred gradient steps on the pair at hand (the "instance optimisation" of VoxelMorph's
authors, the whole of optimisation-only tools) fit it further. The fused warp and LNCC make each
step cheap on a CPU.

    u = refine(moving, target, init=disp, settings=RefineSettings(iterations=50))

Coarse to fine over ``levels`` (pooling factors of the given grid, e.g. 4, 2, 1): at each level
the images are average-pooled, the field is the finer level's field pooled (or the coarser one's
upsampled), and Adam minimises

    1 - LNCC(m o phi, t) + lambda_r * gradL2(u) [+ lambda_a * (1 - Dice(l_m o phi, l_t))]

with phi(x) = x + u(x). ``diffeomorphic``: u is the net's field composed with exp(v), the flow of
a stationary velocity v (scaling and squaring), so the correction itself cannot fold. The anatomy
term needs both label maps (class indices) and warps the moving one-hot linearly.

Deterministic on the CPU (the ops are; no random state is used). Needs gradients, so it stays a
PyTorch feature (no ONNX graph).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..data.preprocess import pool
from ..errors import ConfigError, DataError
from ..nn.losses import dice_loss, gradient_l2, lncc_loss, one_hot
from ..ops import warp


@dataclass
class RefineSettings:
    """Settings of ``refine`` (the ``refine`` section of a run's config)."""
    iterations: int = 0          # Adam steps at each level; 0: no refinement
    levels: tuple = (4, 2, 1)    # pooling factors of the input grid, coarse to fine
    lr: float = 0.1              # Adam step (voxels of each level)
    window: int = 5              # LNCC window (odd, 3..15)
    lambda_r: float = 3.0        # diffusion regulariser weight
    lambda_a: float = 0.0        # anatomy (Dice) weight, used when both label maps are given
    diffeomorphic: bool = True   # refine through exp(v) composed with the net's field
    squarings: int = 7           # scaling-and-squaring steps of exp(v)

    def __post_init__(self):
        def bad(name, want):
            raise ConfigError(f"refine.{name} must be {want}, got {getattr(self, name)!r}")
        for name in ("iterations", "window", "squarings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "an integer >= 0")
        if self.window % 2 == 0 or not 3 <= self.window <= 15:
            bad("window", "odd and in [3, 15]")
        levels = self.levels
        if (not isinstance(levels, (list, tuple)) or not levels
                or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in levels)
                or list(levels) != sorted(levels, reverse=True)):
            bad("levels", "a non-empty list of integers >= 1, coarse to fine (e.g. [4, 2, 1])")
        self.levels = tuple(levels)
        for name, lo in (("lr", 0.0), ("lambda_r", None), ("lambda_a", None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float("-inf") < v < float("inf"):
                bad(name, "a finite number")
            if (lo is not None and v <= lo) or v < 0:
                bad(name, "> 0" if lo is not None else ">= 0")
        if not isinstance(self.diffeomorphic, bool):
            bad("diffeomorphic", "true or false")

    @classmethod
    def from_dict(cls, d: dict | None, **override) -> "RefineSettings":
        d = {**(d or {}), **{k: v for k, v in override.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"refine: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d


# -- grids -----------------------------------------------------------------------------------
def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    return pool(x, f, padding="replicate")  # edges replicated: a zero pad would bias the LNCC


def rescale_field(u: torch.Tensor, shape, ratio: float) -> torch.Tensor:
    """A displacement [B, 3, ...] in voxels of one grid -> grid ``shape`` whose voxels are
    ``ratio`` times as large (same field of view, voxel centres aligned as in ``pool``)."""
    if tuple(u.shape[2:]) == tuple(shape):
        return u / ratio
    if ratio > 1:  # to a coarser grid
        return _pool(u, int(round(ratio)))[:, :, :shape[0], :shape[1], :shape[2]] / ratio
    f = int(round(1 / ratio))
    up = F.interpolate(u, scale_factor=f, mode="trilinear", align_corners=False)
    return up[:, :, :shape[0], :shape[1], :shape[2]] / ratio


def exp_velocity(v: torch.Tensor, squarings: int) -> torch.Tensor:
    """Displacement of the time-1 flow of the stationary velocity ``v`` (scaling and squaring)."""
    u = v / (2 ** squarings)
    for _ in range(squarings):
        u = u + warp(u, u, padding="border")
    return u


# -- refinement ------------------------------------------------------------------------------
def refine(moving: torch.Tensor, target: torch.Tensor, init: torch.Tensor | None = None,
           settings: RefineSettings | None = None, *, moving_labels: torch.Tensor | None = None,
           target_labels: torch.Tensor | None = None, num_classes: int | None = None,
           progress: bool = False) -> torch.Tensor:
    """Refined displacement [1, 3, D, H, W] (voxels of the input grid) of one pair.

    moving, target: normalised images [1, 1, D, H, W] on one grid. init: the starting field
    (F_R's), zero if None. moving_labels, target_labels: class indices [1, 1, D, H, W] for the
    anatomy term (used when ``settings.lambda_a`` > 0 and both are given)."""
    s = settings or RefineSettings()
    if moving.dim() != 5 or moving.shape[:2] != (1, 1) or moving.shape != target.shape:
        raise DataError(f"refine: moving {tuple(moving.shape)} and target {tuple(target.shape)} must both be "
                        "[1, 1, D, H, W] on one grid")
    shape = tuple(moving.shape[2:])
    init = moving.new_zeros((1, 3, *shape)) if init is None else init.detach().to(moving)
    if tuple(init.shape) != (1, 3, *shape):
        raise DataError(f"refine: init must be [1, 3, {', '.join(map(str, shape))}], got {tuple(init.shape)}")
    if not (torch.isfinite(moving).all() and torch.isfinite(target).all() and torch.isfinite(init).all()):
        raise DataError("refine: moving, target and init must be finite")
    use_labels = s.lambda_a > 0 and moving_labels is not None and target_labels is not None
    if use_labels and num_classes is None:
        num_classes = int(max(moving_labels.max(), target_labels.max())) + 1
    if s.iterations == 0:
        return init.clone()

    from tqdm import tqdm
    bar = tqdm(total=s.iterations * len(s.levels), desc="refine", disable=not progress, leave=False)
    u_full = init  # the current field on the input grid
    state = None   # the previous level's parameter (u, or v when diffeomorphic)
    prev_f = None
    with torch.enable_grad():
        for f in s.levels:
            m, t = _pool(moving, f), _pool(target, f)
            lshape = tuple(m.shape[2:])
            base = rescale_field(init, lshape, f)
            if s.diffeomorphic:  # v starts at 0 on the coarsest level, then from the coarser v
                p0 = torch.zeros_like(base) if state is None else rescale_field(state, lshape, f / prev_f)
            else:
                p0 = base if state is None else rescale_field(state, lshape, f / prev_f)
            param = p0.clone().requires_grad_(True)
            if use_labels:
                ml = _pool(one_hot(moving_labels.long(), num_classes), f)
                tl = _pool(one_hot(target_labels.long(), num_classes), f)
            opt = torch.optim.Adam([param], lr=s.lr)
            for _ in range(s.iterations):
                opt.zero_grad(set_to_none=True)
                u = _field(param, base, s)
                loss = lncc_loss(warp(m, u), t, window=s.window) + s.lambda_r * gradient_l2(u)
                if use_labels:
                    loss = loss + s.lambda_a * dice_loss(warp(ml, u), tl)
                loss.backward()
                opt.step()
                bar.update()
            state, prev_f = param.detach(), f
            if f == 1:
                with torch.no_grad():
                    u_full = _field(state, init, s)
    bar.close()
    if prev_f != 1:  # the finest level was coarser than the input grid
        with torch.no_grad():
            param = rescale_field(state, shape, 1 / prev_f)
            u_full = _field(param, init, s)
    if not torch.isfinite(u_full).all():
        raise DataError("refine diverged (non-finite displacement); lower refine.lr")
    return u_full.detach()


def _field(param: torch.Tensor, base: torch.Tensor, s: RefineSettings) -> torch.Tensor:
    """The displacement a parameter stands for: itself, or base o exp(param)."""
    if not s.diffeomorphic:
        return param
    w = exp_velocity(param, s.squarings)
    return w + warp(base, w, padding="border")
