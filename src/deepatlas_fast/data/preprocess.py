"""Pre- and post-processing shared by training, evaluation, the CLI and the ONNX deploy code.

One ``Preprocessing`` object (saved as ``preprocessing.json`` in a run directory) holds everything
needed to go from a NIfTI array on the original grid to a network input and back:

- intensity: clip to the [p_lo, p_hi] percentiles of each image, rescale to [0, 1];
- labels: original values <-> contiguous classes (``LabelTable``);
- grid: zero-pad to a multiple of ``downsample``, average-pool by ``downsample`` (labels: per-class
  vote), then zero-pad at the end of each axis to a multiple of ``multiple`` (the U-Nets' stride).
  Back to the original grid: crop, trilinear upsampling (align_corners=False, which maps the
  pooled voxel i to the original coordinate f*i + (f-1)/2), crop. Displacements are multiplied by f.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .io import LabelTable


@dataclass
class Preprocessing:
    label_values: list = field(default_factory=lambda: [0])
    percentiles: tuple = (0.5, 99.5)
    downsample: int = 1
    multiple: int = 16
    spacing: tuple | None = None  # voxel size (mm) of the training images, before downsampling
    shape: tuple | None = None    # grid of the training images, before downsampling
    affine: list | None = None    # their voxel -> world matrix (4 x 4 nested lists); None in older runs

    def __post_init__(self):
        self.labels = LabelTable(self.label_values)
        self.label_values = self.labels.values
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {self.percentiles}")
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise ConfigError(f"downsample must be a positive integer, got {self.downsample}")
        self.downsample = int(self.downsample)

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def to_dict(self) -> dict:
        return {"label_values": list(self.label_values), "percentiles": list(self.percentiles),
                "downsample": self.downsample, "multiple": self.multiple,
                "spacing": None if self.spacing is None else list(self.spacing),
                "shape": None if self.shape is None else list(self.shape),
                "affine": None if self.affine is None else [list(map(float, r)) for r in self.affine]}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        for k in ("percentiles", "spacing", "shape"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    # ---- original grid -> network grid ------------------------------------------------------
    def training_grid(self, shape, spacing, *, tolerance: float = 0.05) -> tuple:
        """Shape of an image of ``shape`` and voxel size ``spacing`` (mm) resampled to the
        training voxel size, over the same field of view; ``shape`` itself when the voxel sizes
        agree within ``tolerance`` (relative) or either is unknown."""
        ref = self.spacing
        if ref is None or spacing is None or np.allclose(spacing, ref, rtol=tolerance):
            return tuple(shape)
        return tuple(max(1, int(round(n * s / r))) for n, s, r in zip(shape, spacing, ref))

    def net_shape(self, shape) -> tuple:
        """Shape of the network input for an original grid ``shape``."""
        return tuple(_ceil_div(_ceil_div(s, self.downsample), self.multiple) * self.multiple for s in shape)

    def image(self, array: np.ndarray, *, name: str = "image") -> torch.Tensor:
        """Original image (3D array) -> normalised, downsampled, padded tensor [1, 1, D, H, W]."""
        x = torch.from_numpy(normalise(array, self.percentiles, name=name))[None, None]
        return self._pad(pool(x, self.downsample))

    def label(self, array: np.ndarray, *, name: str = "label map") -> torch.Tensor:
        """Original label map -> class indices [1, 1, D, H, W] (int64) on the network grid."""
        cls = torch.from_numpy(self.labels.to_classes(np.asarray(array), name=name))
        return self._pad(downsample_labels(cls, self.downsample, self.num_classes)[None, None])

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        m = self.multiple
        pad = [(-s) % m for s in x.shape[2:]]
        return F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]])

    # ---- network grid -> original grid ------------------------------------------------------
    def _unpad(self, x: torch.Tensor, shape) -> torch.Tensor:
        d, h, w = (_ceil_div(s, self.downsample) for s in shape)
        return x[:, :, :d, :h, :w]

    def upsample(self, x: torch.Tensor, shape) -> torch.Tensor:
        """Net-grid field [B, C, ...] -> original grid ``shape`` (trilinear), values unchanged."""
        x = self._unpad(x, shape)
        if self.downsample > 1:
            x = F.interpolate(x, scale_factor=self.downsample, mode="trilinear", align_corners=False)
        return x[:, :, :shape[0], :shape[1], :shape[2]]

    def disp_to_original(self, disp: torch.Tensor, shape) -> torch.Tensor:
        """Displacement on the net grid (net voxels) -> original grid, in original voxels."""
        return self.upsample(disp, shape) * self.downsample

    def logits_to_labels(self, logits: torch.Tensor, shape, out_shape=None) -> np.ndarray:
        """Class logits [1, C, ...] on the net grid -> original label values on the original grid
        ``shape`` (or, if given, on ``out_shape``: the grid ``shape`` was resampled from, the same
        field of view; class probabilities are resampled trilinearly before the argmax).

        Upsamples one class at a time with a running argmax, so a 1 mm brain with 46 classes needs
        no [C, D, H, W] float array."""
        probs = logits.softmax(1)

        def class_volumes():
            for c in range(probs.shape[1]):
                p = self.upsample(probs[:, c:c + 1], shape)
                if out_shape is not None and tuple(out_shape) != tuple(shape):
                    p = resample(p, out_shape)
                yield p[0, 0]
        return self.labels.to_values(running_argmax(class_volumes()).cpu().numpy())


def resample(x: torch.Tensor, shape) -> torch.Tensor:
    """[B, C, ...] on one grid -> the same field of view on a grid of ``shape`` (trilinear,
    voxel centres as in image resampling: align_corners=False)."""
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def normalise(array: np.ndarray, percentiles=(0.5, 99.5), *, name: str = "image") -> np.ndarray:
    """Clip to the image's [lo, hi] percentiles and rescale to [0, 1] (float32)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 3:
        raise DataError(f"{name}: expected a 3D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{name}: image contains NaN or inf values")
    lo, hi = np.percentile(a, percentiles)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            raise DataError(f"{name}: image is constant (all voxels = {lo}); cannot normalise")
    return np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)


def pool(x: torch.Tensor, f: int, padding: str = "constant") -> torch.Tensor:
    """[B, C, D, H, W] -> mean of each f^3 block; sides padded to a multiple of f with zeros
    ("constant") or the edge voxels ("replicate")."""
    if f == 1:
        return x
    pad = [(-s) % f for s in x.shape[2:]]
    x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]], mode=padding)
    return F.avg_pool3d(x, f)


def downsample_labels(classes: torch.Tensor, f: int, num_classes: int) -> torch.Tensor:
    """[D, H, W] class map -> the most frequent class of each f^3 block (one class at a time)."""
    if f == 1:
        return classes
    return running_argmax(pool((classes == c).float()[None, None], f)[0, 0] for c in range(num_classes))


def running_argmax(volumes) -> torch.Tensor:
    """Voxel-wise index of the largest of the volumes an iterable yields (the first on ties),
    holding one volume at a time besides the running maximum: an argmax over classes without a
    [C, D, H, W] array."""
    best = best_cls = None
    for c, v in enumerate(volumes):
        if best is None:
            best, best_cls = v, torch.zeros(v.shape, dtype=torch.int64, device=v.device)
        else:
            better = v > best
            best = torch.where(better, v, best)
            best_cls[better] = c
    return best_cls
