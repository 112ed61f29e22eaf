"""Affine pre-alignment: 12-parameter affine registration of a moving image to a reference.

DeepAtlas (like VoxelMorph) assumes affinely aligned inputs; this module provides that step.
The affine is optimised coarse-to-fine with Adam on LNCC or MSE between the images, optionally
plus soft Dice between label maps. The sampling field is built as a displacement in voxel units
and applied with the package's own :func:`deepatlas_fast.warp`, so gradients reach the affine
parameters through the warp op's displacement gradient.

Convention: ``matrix`` (4x4) maps a *reference voxel index* to the *moving voxel index* sampled
there (the "pull" convention of ``scipy.ndimage.affine_transform``). With NIfTI affines
``A_ref``/``A_mov``, ``world_matrix = A_mov @ matrix @ inv(A_ref)`` maps reference world
coordinates (mm) to moving world coordinates.

Python::

    res = prealign(moving, reference, moving_labels=seg)   # numpy arrays or tensors, 3D
    res.matrix, res.warped, res.warped_labels

Files: :func:`prealign_files` (used by ``deepatlas-fast prealign``).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, DeepAtlasError
from ..ops import soft_dice, warp

SIMILARITIES = ("lncc", "mse")
INITS = ("moments", "center", "identity", "header")


@dataclass
class AffineResult:
    matrix: np.ndarray                     # 4x4, reference voxel -> moving voxel
    warped: np.ndarray                     # moving image resampled on the reference grid (float32)
    warped_labels: np.ndarray | None       # moving labels, nearest sampling, input dtype kept
    init_matrix: np.ndarray                # 4x4 initialisation the optimisation started from
    losses: list[float] = field(default_factory=list)  # final loss at each level
    world_matrix: np.ndarray | None = None  # 4x4, reference world -> moving world (if affines given)


# --------------------------------------------------------------------------- checks / helpers

def _as_volume(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 5 and t.shape[:2] == (1, 1):
        t = t[0, 0]
    if t.dim() != 3:
        raise DataError(f"prealign: {name} must be a 3D volume (D, H, W), got shape {tuple(t.shape)}")
    if min(t.shape) < 2:
        raise DataError(f"prealign: {name} has a degenerate shape {tuple(t.shape)}")
    return t


def _as_image(x, name: str) -> torch.Tensor:
    t = _as_volume(x, name).float()
    if not torch.isfinite(t).all():
        raise DataError(f"prealign: {name} contains NaN or inf")
    lo, hi = t.min(), torch.quantile(t.flatten()[:: max(1, t.numel() // 1_000_000)], 0.99)
    if hi <= lo:
        hi = t.max()
    if hi <= lo:
        raise DataError(f"prealign: {name} is constant; nothing to register")
    # Percentile scaling keeps LNCC/MSE comparable across scanners and dtypes.
    return ((t - lo) / (hi - lo)).clamp(0, 1).contiguous()


def _as_labels(x, name: str, shape) -> torch.Tensor:
    t = _as_volume(x, name)
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise DataError(f"prealign: {name} must hold integer label values")
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if tuple(t.shape) != tuple(shape):
        raise DataError(f"prealign: {name} shape {tuple(t.shape)} does not match its image {tuple(shape)}")
    return t


def _moments(img: torch.Tensor):
    """Centroid and per-axis spread (voxels) of the foreground (above 10% of the [0, 1] range)."""
    w = (img > 0.1).double() * img.double()
    if w.sum() == 0:
        raise DataError("prealign: image has no foreground above 10% of its intensity range")
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in img.shape], indexing="ij")
    c = torch.stack([(g * w).sum() / w.sum() for g in grids])
    sd = torch.stack([(((g - ci) ** 2) * w).sum().div(w.sum()).sqrt() for g, ci in zip(grids, c)])
    return c, sd


def initial_matrix(moving, reference, init: str = "moments") -> np.ndarray:
    """4x4 reference-voxel -> moving-voxel start: "identity", "center" (foreground centroids
    matched) or "moments" (centroids matched and per-axis spreads, clamped to a 1.5x scale)."""
    m, r = _as_image(moving, "moving"), _as_image(reference, "reference")
    M = np.eye(4)
    if init == "identity":
        return M
    if init not in ("center", "moments"):
        raise DeepAtlasError(f"prealign: init must be one of {INITS} or a 4x4 matrix, got {init!r}")
    cm, sm = _moments(m)
    cr, sr = _moments(r)
    S = (sm / sr).clamp(1 / 1.5, 1.5) if init == "moments" else torch.ones(3, dtype=torch.float64)
    M[:3, :3] = np.diag(S.numpy())
    M[:3, 3] = (cm - S * cr).numpy()
    return M


def _grid(shape, scale: int):
    """Voxel indices [3, N] of a grid and their full-resolution coordinates s*i + (s-1)/2
    (the centre of an average-pooling block of size s)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    return idx, scale * idx + (scale - 1) / 2


def _disp(M, idx, x, shape, moving_scale: int) -> torch.Tensor:
    y = M[:3, :3] @ x + M[:3, 3:]
    j = (y - (moving_scale - 1) / 2) / moving_scale
    return (j - idx).reshape(1, 3, *shape).float()


def affine_disp(matrix, shape, *, scale: int = 1, moving_scale: int | None = None) -> torch.Tensor:
    """Displacement [1, 3, *shape] (voxels) realising ``matrix`` on a grid of ``shape``.

    ``scale``: the grid is the reference downsampled by this factor (voxel i <-> full-resolution
    coordinate s*i + (s-1)/2); ``moving_scale`` likewise for the image that will be sampled
    (default: ``scale``). ``matrix`` is a 4x4 (numpy or tensor; differentiable)."""
    M = torch.as_tensor(matrix).double()
    idx, x = _grid(tuple(shape), scale)
    return _disp(M, idx, x, tuple(shape), scale if moving_scale is None else moving_scale)


def apply_affine(moving, matrix, shape, *, mode: str = "linear", padding: str = "zeros") -> np.ndarray:
    """Resample a 3D ``moving`` volume onto a reference grid of ``shape`` with ``matrix``.
    Labels: pass ``mode="nearest"``; the input dtype is kept."""
    t = _as_volume(moving, "moving")
    disp = affine_disp(np.asarray(matrix, dtype=np.float64), tuple(shape))
    out = warp(t.float()[None, None].contiguous(), disp, mode=mode, padding=padding)[0, 0]
    if mode == "nearest":
        return out.round().to(t.dtype).numpy()
    return out.numpy()


def _pool(x: torch.Tensor, s: int) -> torch.Tensor:
    return x if s == 1 else F.avg_pool3d(x, s, s)


def _similarity(a, b, kind: str, window: int) -> torch.Tensor:
    if kind == "mse":
        return (a - b).pow(2).mean()
    from ..nn.losses import lncc_loss
    # a tiny eps: with the usual 1e-5 the guard outweighs the local variance of [0, 1] images in
    # smooth regions and rewards any warp that sharpens them (identical images drifted from the
    # identity); windows flat in both images are exactly 0 either way
    return lncc_loss(a, b, window=window, eps=1e-9)


# --------------------------------------------------------------------------- main entry point

def prealign(moving, reference, *, moving_labels=None, reference_labels=None,
             similarity: str = "lncc", dice_weight: float = 1.0, label_values=None,
             levels=(4, 2, 1), iterations=(100, 50, 50), lr: float = 0.01,
             init="moments", window: int = 5,
             moving_affine=None, reference_affine=None, verbose: bool = False) -> AffineResult:
    """Register ``moving`` to ``reference`` with a 12-parameter affine.

    moving, reference: 3D arrays/tensors (any shapes). moving_labels: integer map on the moving
    grid, carried with nearest sampling. If ``reference_labels`` is also given, ``dice_weight``
    times (1 - soft Dice) over ``label_values`` (default: nonzero values present in both maps)
    is added to the image loss. levels: downsampling factors, coarse to fine; iterations: Adam
    steps per level. init: "moments" | "center" | "identity" | "header" (needs both affines) |
    a 4x4 reference-voxel -> moving-voxel matrix. Returns an :class:`AffineResult`."""
    if similarity not in SIMILARITIES:
        raise DeepAtlasError(f"prealign: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    levels, iterations = tuple(levels), tuple(iterations)
    if not levels or len(levels) != len(iterations):
        raise DeepAtlasError(f"prealign: levels {levels} and iterations {iterations} must be non-empty and of equal length")
    if any(int(s) != s or s < 1 for s in levels) or any(int(n) != n or n < 0 for n in iterations):
        raise DeepAtlasError("prealign: levels must be positive integers and iterations non-negative integers")
    mov, ref = _as_image(moving, "moving"), _as_image(reference, "reference")
    if any(n // max(levels) < 2 for n in (*mov.shape, *ref.shape)):
        raise DataError(f"prealign: volumes {tuple(mov.shape)}, {tuple(ref.shape)} too small for level {max(levels)}")
    mlab = None if moving_labels is None else _as_labels(moving_labels, "moving_labels", mov.shape)
    rlab = None if reference_labels is None else _as_labels(reference_labels, "reference_labels", ref.shape)

    # Label channels for the Dice term: one-hot per chosen value, kept as float probabilities.
    use_dice = mlab is not None and rlab is not None and dice_weight > 0
    if use_dice:
        if label_values is None:
            label_values = sorted(set(mlab.unique().tolist()) & set(rlab.unique().tolist()) - {0})
        if not label_values:
            raise DataError("prealign: moving_labels and reference_labels share no nonzero label value")
        mh = torch.stack([(mlab == v) for v in label_values]).float()[None]
        rh = torch.stack([(rlab == v) for v in label_values]).float()[None]

    if isinstance(init, str) and init == "header":
        if moving_affine is None or reference_affine is None:
            raise DeepAtlasError("prealign: init='header' needs moving_affine and reference_affine")
        M0 = np.linalg.inv(np.asarray(moving_affine, float)) @ np.asarray(reference_affine, float)
    elif isinstance(init, str):
        M0 = initial_matrix(mov, ref, init)
    else:
        M0 = np.asarray(init, dtype=np.float64)
        if M0.shape != (4, 4) or not np.isfinite(M0).all():
            raise DeepAtlasError(f"prealign: init matrix must be a finite 4x4 array, got shape {M0.shape}")

    # Optimise a correction about the reference centre: M = M0 @ [(I + L)(x - c) + c + t].
    c = torch.tensor([(n - 1) / 2 for n in ref.shape], dtype=torch.float64)
    L = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    M0t = torch.as_tensor(M0)
    extent = float(max(ref.shape)) / 2

    def matrix():
        A = torch.eye(3, dtype=torch.float64) + L
        D = torch.eye(4, dtype=torch.float64)
        D = torch.cat([torch.cat([A, (c - A @ c + t * extent)[:, None]], 1), D[3:]], 0)
        return M0t @ D

    losses = []
    for s, n_it in zip(levels, iterations):
        m_s, r_s = _pool(mov[None, None], s), _pool(ref[None, None], s)
        if use_dice:
            mh_s, rh_s = _pool(mh, s), _pool(rh, s)
        # Translation is scaled by the half-extent so one learning rate fits both parameter kinds;
        # finer levels take smaller steps.
        opt = torch.optim.Adam([L, t], lr=lr * s / max(levels))
        # Adam's steps keep their size near the optimum (the gradient is normalised), so a constant
        # rate leaves the matrix jittering ~lr around it: the rate decays to 0 over each level
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k, n=max(int(n_it), 1): 0.5 * (1 + math.cos(math.pi * k / n)))
        shape_s = tuple(r_s.shape[2:])
        idx, x = _grid(shape_s, s)
        loss = first = None
        for _ in range(int(n_it)):
            opt.zero_grad()
            disp = _disp(matrix(), idx, x, shape_s, s)
            loss = _similarity(warp(m_s, disp), r_s, similarity, window)
            if use_dice:
                loss = loss + dice_weight * (1 - soft_dice(warp(mh_s, disp), rh_s).mean())
            if first is None:
                first = float(loss.detach())
            loss.backward()
            opt.step()
            sched.step()
        if loss is not None:
            with torch.no_grad():
                d_end = _disp(matrix(), idx, x, shape_s, s)
                end = _similarity(warp(m_s, d_end), r_s, similarity, window)
                if use_dice:
                    end = end + dice_weight * (1 - soft_dice(warp(mh_s, d_end), rh_s).mean())
            # a level that ends clearly worse than it started has diverged (too large a rate)
            if not math.isfinite(float(end)) or float(end) > first + max(0.02, 0.1 * abs(first)):
                raise DeepAtlasError(f"prealign diverged at level {s} (loss {first:.4f} -> {float(end):.4f}); "
                                     f"lower lr (now {lr:g})")
            losses.append(float(loss.detach()))
            if verbose:
                print(f"prealign: level {s}: loss {losses[-1]:.4f}")

    M = matrix().detach().numpy()
    if not np.isfinite(M).all():
        raise DeepAtlasError(f"prealign diverged (non-finite matrix); lower lr (now {lr:g})")
    warped = apply_affine(moving if isinstance(moving, torch.Tensor) else np.asarray(moving, np.float32), M, ref.shape)
    warped_labels = None if mlab is None else apply_affine(mlab, M, ref.shape, mode="nearest")
    world = None
    if moving_affine is not None and reference_affine is not None:
        world = np.asarray(moving_affine, float) @ M @ np.linalg.inv(np.asarray(reference_affine, float))
    return AffineResult(M, warped.astype(np.float32), warped_labels, M0, losses, world)


# --------------------------------------------------------------------------- NIfTI files

def prealign_files(moving, reference, out, *, labels=None, labels_out=None, reference_labels=None,
                   matrix_out=None, **kwargs) -> AffineResult:
    """Register NIfTI ``moving`` to ``reference``; write the warped image (and labels) on the
    reference grid with the reference affine. ``matrix_out``: text file with the 4x4
    reference-world -> moving-world matrix (mm)."""
    from .io import label_dtype, load_nifti, save_nifti
    if labels is not None and labels_out is None:
        raise DeepAtlasError("prealign: labels given without labels_out")
    mov, a_mov = load_nifti(moving)
    ref, a_ref = load_nifti(reference)
    mlab = rlab = None
    if labels is not None:
        mlab, a_lab = load_nifti(labels, label=True)
        if mlab.shape != mov.shape or not np.allclose(a_lab, a_mov, atol=1e-3):
            raise DataError(f"prealign: labels {labels} are not on the moving image's grid")
    if reference_labels is not None:
        rlab, a_rl = load_nifti(reference_labels, label=True)
        if rlab.shape != ref.shape or not np.allclose(a_rl, a_ref, atol=1e-3):
            raise DataError(f"prealign: reference labels {reference_labels} are not on the reference grid")
    res = prealign(mov, ref, moving_labels=mlab, reference_labels=rlab,
                   moving_affine=a_mov, reference_affine=a_ref, **kwargs)
    save_nifti(out, res.warped, a_ref, dtype=np.float32)
    if labels_out is not None:
        save_nifti(labels_out, res.warped_labels, a_ref, dtype=label_dtype(np.unique(mlab).tolist()))
    if matrix_out is not None:
        np.savetxt(str(matrix_out), res.world_matrix, fmt="%.8f")
    return res
