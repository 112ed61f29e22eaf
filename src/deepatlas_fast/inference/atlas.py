"""Multi-atlas segmentation through F_R: labelled atlases registered to an image, labels fused.

    labels = segment_with_atlases(run, image, [(atlas_image, atlas_labels), ...], fuse="net+atlas")

Each atlas is registered to the image by the run's F_R (optionally refined, see ``refine``), its
one-hot labels are warped *linearly* (soft labels, not nearest), and the warped probabilities are
fused per voxel:

    p_c(x) = sum_a w_a(x) p_c^a(x) / sum_a w_a(x)

with w_a = 1 ("mean") or, with ``weighting="lncc"``, the local normalised cross-correlation of
the warped atlas image and the image in a window around x (clipped at 0, plus a small floor so a
voxel no atlas matches still gets the mean): atlases that match the image locally count more.
``fuse="net+atlas"`` averages that with F_S's softmax. The argmax runs one class at a time, so
no [classes, D, H, W] array is held.

Images are on one grid at the run's voxel size (pre-aligned like ``register``'s inputs); labels
come back in original label values.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocess import normalise, running_argmax
from ..errors import DataError, DeepAtlasError
from ..ops import warp

FUSIONS = ("atlas", "net+atlas")
WEIGHTINGS = ("mean", "lncc")
_FLOOR = 1e-3  # weight every atlas keeps, so no voxel divides by zero


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Voxel-wise NCC of [1, 1, D, H, W] images over a cubic window (zero-padded box sums)."""
    def box(x):
        return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=False)
    ma, mb = box(a), box(b)
    cov = box(a * b) - ma * mb
    va = (box(a * a) - ma * ma).clamp_min(0)
    vb = (box(b * b) - mb * mb).clamp_min(0)
    return cov / (va * vb + 1e-5).sqrt()


def segment_with_atlases(run, image: np.ndarray, atlases, *, fuse: str = "atlas", weighting: str = "mean",
                         window: int = 5, refine=None, disps=None, progress: bool = False) -> np.ndarray:
    """``image`` (3D) and ``atlases`` [(atlas image, atlas label map), ...] on its grid -> label map.

    run: an ``inference.run.Run`` (or ``deploy.OnnxRun``: F_R in ONNX Runtime, warps by the package's op).
    refine: test-time refinement of each atlas's field (iterations per level, or RefineSettings).
    disps: the atlases' displacements onto the image ([1, 3, D, H, W] each), if already computed."""
    from tqdm import tqdm
    if fuse not in FUSIONS:
        raise DeepAtlasError(f"fuse must be one of {FUSIONS}, got {fuse!r}")
    if weighting not in WEIGHTINGS:
        raise DeepAtlasError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise DeepAtlasError(f"window must be an odd integer >= 1, got {window!r}")
    if not atlases:
        raise DataError("no atlas given: pass at least one (image, label map) pair")
    image = np.asarray(image, np.float32)
    shape = image.shape
    classes = []
    for a, (aimg, alab) in enumerate(atlases):
        if np.shape(aimg) != shape or np.shape(alab) != shape:
            raise DataError(f"atlas {a}: image {np.shape(aimg)} and labels {np.shape(alab)} must be on the "
                            f"image's grid {shape} (pre-align the atlas first)")
        classes.append(torch.from_numpy(run.labels.to_classes(np.asarray(alab), name=f"atlas {a} labels")))
    target = torch.from_numpy(normalise(image, name="image"))[None, None]
    if disps is None:
        disps = [run.displacement(aimg, image, refine=refine)
                 for aimg, _ in tqdm(atlases, desc="atlases", disable=not progress or len(atlases) < 2)]
    elif len(disps) != len(atlases) or any(tuple(d.shape) != (1, 3, *shape) for d in disps):
        raise DataError(f"disps: one [1, 3, {', '.join(map(str, shape))}] field per atlas expected")
    weights = []
    if weighting == "lncc":
        for (aimg, _), disp in zip(atlases, disps):
            warped = warp(torch.from_numpy(normalise(aimg, name="atlas image"))[None, None], disp)
            weights.append(local_ncc(warped, target, window).clamp_min(0)[0, 0] + _FLOOR)
    total = sum(weights) if weights else None
    net = run.class_probabilities(image) if fuse == "net+atlas" else None

    def class_volumes():
        for c in range(run.prep.num_classes):
            p = None
            for k, (disp, cls) in enumerate(zip(disps, classes)):
                pa = warp((cls == c).float()[None, None], disp)[0, 0]
                pa = pa * weights[k] if weights else pa
                p = pa if p is None else p + pa
            p = p / total if total is not None else p / len(disps)
            yield p if net is None else 0.5 * (p + next(net))
    return run.labels.to_values(running_argmax(class_volumes()).numpy())
