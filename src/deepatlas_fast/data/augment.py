"""On-the-fly augmentation of training images and their label maps (torch, seeded).

One labelled image is all F_S gets in the one-shot setting; these transforms stand in for the
anatomy and scanner variation it never sees:

- spatial: a random affine (rotation, scaling, shear, translation) about the centre of the
  image's data region, plus a smooth elastic field (random control-point displacements,
  upsampled trilinearly), composed into one displacement and applied with ``warp`` (images and
  probability maps linearly, integer labels by nearest neighbour);
- left-right flip, with the left and right label values swapped (``lr_pairs``: FreeSurfer's
  pairs by default); the flip axis is the array axis closest to the world x axis of the images'
  affine;
- intensity: gamma (x ** exp(g)), a smooth multiplicative bias field, additive Gaussian noise
  inside the non-zero region.

Every random draw comes from the ``torch.Generator`` passed in: the trainer passes its per-step
generator, so a resumed run draws the same transforms as an uninterrupted one. Lengths are in mm
(converted with the network grid's voxel size), angles in degrees.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops import warp

# FreeSurfer aseg left/right pairs (left value, right value).
FREESURFER_LR_PAIRS = ((2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51),
                       (13, 52), (17, 53), (18, 54), (26, 58), (28, 60), (30, 62), (31, 63))

DEFAULTS = {
    "enabled": False,
    "rotate": 10.0,           # degrees, uniform in +-rotate about each axis
    "scale": 0.1,             # per-axis scale factor in [1/(1+s), 1+s] (log-uniform)
    "shear": 0.05,            # off-diagonal terms uniform in +-shear
    "translate": 4.0,         # mm, uniform in +-translate per axis
    "elastic": 2.0,           # mm, std of the control-point displacements
    "elastic_spacing": 32.0,  # mm between elastic control points
    "flip": 0.0,              # probability of a left-right flip (needs lr_pairs)
    "lr_pairs": "freesurfer",  # "freesurfer" or a list of [left, right] label values; null: none
    "gamma": 0.2,             # std of log(gamma)
    "bias": 0.2,              # std of the log bias field at its control points
    "bias_spacing": 64.0,     # mm between bias-field control points
    "noise": 0.02,            # std of additive noise on [0, 1] intensities
}


def lr_axis_of(affine) -> int:
    """The array axis that runs closest to the world x (left-right) axis of ``affine``."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(a[0]) / np.linalg.norm(a, axis=0)))


def lr_permutation(label_values, lr_pairs) -> list:
    """Class permutation that swaps the left and right classes of a label table."""
    values = list(label_values)
    perm = list(range(len(values)))
    pairs = FREESURFER_LR_PAIRS if lr_pairs == "freesurfer" else (lr_pairs or ())
    index = {v: i for i, v in enumerate(values)}
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"augment.lr_pairs: expected [left, right] pairs of label values, got {pair!r}")
        left, right = (int(v) for v in pair)
        if left in index and right in index:
            perm[index[left]], perm[index[right]] = index[right], index[left]
    return perm


def validate(cfg: dict) -> None:
    for k in ("rotate", "scale", "shear", "translate", "elastic", "gamma", "bias", "noise"):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"augment.{k} must be a finite number >= 0, got {v!r}")
    for k in ("elastic_spacing", "bias_spacing"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], (int, float)) or not cfg[k] > 0:
            raise ConfigError(f"augment.{k} must be a number > 0 (mm), got {cfg[k]!r}")
    if not isinstance(cfg["flip"], (int, float)) or not 0 <= cfg["flip"] <= 1:
        raise ConfigError(f"augment.flip is a probability in [0, 1], got {cfg['flip']!r}")
    if cfg["lr_pairs"] not in (None, "freesurfer") and not isinstance(cfg["lr_pairs"], (list, tuple)):
        raise ConfigError(f"augment.lr_pairs must be 'freesurfer', a list of [left, right] pairs or null, "
                         f"got {cfg['lr_pairs']!r}")


class Augmenter:
    """Random spatial + intensity transforms of a batch on the network grid.

    Args:
        cfg: the ``augment`` section of a config (see ``DEFAULTS``).
        label_values: the label table's values (class i has value label_values[i]).
        voxel_mm: voxel size of the network grid (mm), per axis.
        data_shape: the part of the network grid that holds data (before the U-Net padding);
            the affine part turns about its centre.
        lr_axis: the array axis of a left-right flip.
    """

    def __init__(self, cfg: dict, label_values, *, voxel_mm, data_shape, lr_axis: int = 0):
        validate(cfg)
        self.cfg = dict(cfg)
        self.voxel = torch.tensor([float(v) for v in voxel_mm], dtype=torch.float64)
        self.center = torch.tensor([(n - 1) / 2 for n in data_shape], dtype=torch.float64)
        self.lr_axis = int(lr_axis)
        self.perm = lr_permutation(label_values, cfg["lr_pairs"])
        self.can_flip = cfg["flip"] > 0 and self.perm != list(range(len(self.perm)))

    # -- random draws (all from ``gen``)
    @staticmethod
    def _uniform(gen, n, bound):
        return (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * bound

    def _matrix(self, gen, flip: bool) -> torch.Tensor:
        c = self.cfg
        ang = self._uniform(gen, 3, math.radians(c["rotate"]))
        rot = torch.eye(3, dtype=torch.float64)
        for axis in range(3):
            i, j = [a for a in range(3) if a != axis]
            r = torch.eye(3, dtype=torch.float64)
            r[i, i] = r[j, j] = math.cos(ang[axis])
            r[i, j], r[j, i] = -math.sin(ang[axis]), math.sin(ang[axis])
            rot = rot @ r
        scale = torch.diag(torch.exp(self._uniform(gen, 3, math.log1p(c["scale"]))))
        shear = torch.eye(3, dtype=torch.float64)
        off = self._uniform(gen, 6, c["shear"])
        shear[0, 1], shear[0, 2], shear[1, 0], shear[1, 2], shear[2, 0], shear[2, 1] = off.tolist()
        m = rot @ scale @ shear
        if flip:
            m[:, self.lr_axis] = -m[:, self.lr_axis]
        return m

    def _smooth_field(self, gen, batch, channels, shape, spacing_mm, std):
        """Gaussian control points every ``spacing_mm``, trilinearly upsampled to ``shape``."""
        coarse = [max(2, int(math.ceil(n * float(v) / spacing_mm)) + 1) for n, v in zip(shape, self.voxel)]
        field = torch.randn(batch, channels, *coarse, generator=gen) * std
        return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)

    def spatial(self, gen, batch: int, shape) -> tuple[torch.Tensor, list]:
        """(displacement [B, 3, *shape] in voxels, flipped flags [B])."""
        c = self.cfg
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
        x = grid - self.center.view(3, 1, 1, 1)
        disps, flips = [], []
        for _ in range(batch):
            flip = bool(self.can_flip and float(torch.rand(1, generator=gen)) < c["flip"])
            m = self._matrix(gen, flip)
            t = self._uniform(gen, 3, 1.0) * c["translate"] / self.voxel
            loc = torch.einsum("ij,jdhw->idhw", m, x) + (self.center + t).view(3, 1, 1, 1)
            disps.append((loc - grid).float())
            flips.append(flip)
        disp = torch.stack(disps)
        if c["elastic"] > 0:
            std = (c["elastic"] / self.voxel).float().view(1, 3, 1, 1, 1)
            disp = disp + self._smooth_field(gen, batch, 3, shape, c["elastic_spacing"], 1.0) * std
        return disp, flips

    def intensity(self, gen, image: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b = image.shape[0]
        mask = image > 0
        x = image.clamp_min(0)
        if c["gamma"] > 0:
            g = torch.exp(torch.randn(b, generator=gen) * c["gamma"]).to(image).view(b, *[1] * (image.dim() - 1))
            x = x.pow(g)
        if c["bias"] > 0:
            x = x * torch.exp(self._smooth_field(gen, b, 1, image.shape[2:], c["bias_spacing"], c["bias"])).to(image)
        if c["noise"] > 0:
            x = x + torch.randn(image.shape, generator=gen).to(image) * c["noise"] * mask
        return x.clamp_min(0)

    # -- the transform of a batch
    def __call__(self, gen: torch.Generator, image: torch.Tensor, target: torch.Tensor | None = None):
        """Augment ``image`` [B, 1, D, H, W] and, with the same spatial transform, ``target``:
        integer labels [B, 1, ...] (nearest) or class probabilities [B, C, ...] (linear).
        Returns (image, target)."""
        b, shape = image.shape[0], image.shape[2:]
        disp, flips = self.spatial(gen, b, shape)
        disp = disp.to(image.device)
        out = warp(image, disp)
        if target is not None:
            if target.dtype.is_floating_point:
                target = warp(target, disp.to(target.dtype))
                if any(flips):
                    perm = torch.tensor(self.perm, device=target.device)
                    flipped = torch.tensor(flips, device=target.device).view(b, 1, *[1] * (target.dim() - 2))
                    target = torch.where(flipped, target[:, perm], target)
            else:
                lab = warp(target.float(), disp, mode="nearest").round().long()
                if any(flips):
                    perm = torch.tensor(self.perm, device=lab.device)
                    flipped = torch.tensor(flips, device=lab.device).view(b, *[1] * (lab.dim() - 1))
                    lab = torch.where(flipped, perm[lab], lab)
                target = lab
        return self.intensity(gen, out), target


def match_class_intensities(image: torch.Tensor, probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``image`` with each class's mean intensity moved to the reference image's mean in the same
    class: image + sum_c probs_c (mean_c(reference) - mean_c(image)), means weighted by probs_c.

    With an atlas warped onto an unlabelled image (probs: the warped atlas labels), the result
    has the atlas's anatomy, labels that fit it exactly, and roughly the unlabelled image's
    contrast. image, reference: [B, 1, ...]; probs: [B, C, ...]."""
    dims = tuple(range(2, image.dim()))
    mass = probs.sum(dims, keepdim=True).clamp_min(1e-6)
    shift = ((probs * reference).sum(dims, keepdim=True) - (probs * image).sum(dims, keepdim=True)) / mass
    return image + (probs * shift).sum(1, keepdim=True)
