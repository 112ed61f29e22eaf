"""NIfTI input/output (affine kept) and the label table.

Arrays are in nibabel's voxel order (i, j, k) = the network's (D, H, W): no reorientation, so an
output written with the input's affine lands exactly on the input.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_header(path):
    """(shape, affine, spacing) of a NIfTI file, without reading its voxels."""
    img = _open(path)
    return tuple(int(s) for s in img.shape[:3]), img.affine.copy(), tuple(float(z) for z in img.header.get_zooms()[:3])


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not is_nifti(path):
        raise DataError(f"{path}: expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for truncated/corrupt files
        raise DataError(f"{path}: cannot read NIfTI file ({e})") from e
    if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise DataError(f"{path}: expected a 3D volume, got shape {img.shape}")
    return img


def load_nifti(path, *, label: bool = False):
    """Read a 3D NIfTI -> (array, affine). Images come back float32, labels int64.

    Refuses NaN/inf images and non-integer label values with a message naming the file."""
    img = _open(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"{path}: cannot read NIfTI voxel data ({e})") from e
    data = data.reshape(img.shape[:3])
    if label:
        if np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all() or (data != np.round(data)).any():
                raise DataError(f"{path}: label map has non-integer or non-finite values")
        return data.astype(np.int64), img.affine.copy()
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: image contains NaN or inf values")
    return data, img.affine.copy()


def save_nifti(path, array, affine, *, dtype=None):
    """Write ``array`` (3D, or 4D with vectors last) with ``affine``; parent folders are created."""
    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"{path}: output must end with .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def label_dtype(values) -> np.dtype:
    """Smallest integer dtype that holds all original label values (uint8 for FreeSurfer asegs < 256)."""
    lo, hi = min(values), max(values)
    for dt in (np.uint8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


class LabelTable:
    """Maps arbitrary label values (e.g. FreeSurfer numbers) to contiguous classes 0..C-1 and back.

    ``values[c]`` is the original value of class ``c``; value 0 (background) is always class 0."""

    def __init__(self, values):
        values = sorted({int(v) for v in values} | {0})
        self.values = values
        self._lut = {v: c for c, v in enumerate(values)}

    def __len__(self):
        return len(self.values)

    def __eq__(self, other):
        return isinstance(other, LabelTable) and self.values == other.values

    def __repr__(self):
        return f"LabelTable({self.values})"

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def to_classes(self, labels: np.ndarray, *, name: str = "label map") -> np.ndarray:
        """Original values -> class indices (int64); unknown values are an error naming them."""
        vals = np.asarray(self.values)
        idx = np.searchsorted(vals, labels)
        idx = np.clip(idx, 0, len(vals) - 1)
        bad = vals[idx] != labels
        if bad.any():
            unknown = np.unique(labels[bad])[:20].tolist()
            raise DataError(f"{name}: label values {unknown} are not in the label table {self.values}")
        return idx.astype(np.int64)

    def to_values(self, classes) -> np.ndarray:
        """Class indices -> original label values, in the smallest integer dtype that holds them."""
        return np.asarray(self.values, dtype=label_dtype(self.values))[np.asarray(classes)]

    @classmethod
    def from_file(cls, path) -> "LabelTable":
        """A text file of label values (whitespace or comma separated); '#' starts a comment."""
        try:
            text = "\n".join(line.split("#")[0] for line in Path(path).read_text().splitlines())
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file of label values") from None
        values = []
        for t in text.replace(",", " ").split():
            try:
                values.append(int(t))
            except ValueError:
                raise DataError(f"{path}: {t[:40]!r} is not an integer label value (a label file lists "
                                "integers, whitespace or comma separated; '#' starts a comment)") from None
        return cls(values)


def check_writable(path, name) -> None:
    """``path`` (a file or folder to be created, with any missing parent folders) can be written:
    the nearest existing ancestor is a folder we may write into. ``name`` opens the message."""
    import os
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{name}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{name}: cannot write into {parent} (permission denied)")
