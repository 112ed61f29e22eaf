"""Loader for user-supplied OAI-ZIB-style knee MRI (no knee data can be shipped: OAI images may
not be redistributed).

OAI-ZIB (Ambellan et al., Medical Image Analysis 2019) gives manual segmentations of 507 OAI
DESS knee MRIs with labels 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial cartilage. As in
DeepAtlas, left knees are mirrored to look like right knees so one atlas/network fits all.

Expected layout (``root``)::

    images/<id>.nii.gz | <id>.nii | <id>.mhd            one image per subject
    segmentation_masks/<id>.segmentation_masks.mhd      OAI-ZIB's naming, or
    labels/<id>.nii.gz | <id>.mhd                       (either folder; label may be absent)
    sides.csv                                           "id,side" rows, side = left | right

A subject's side comes from ``sides.csv``, else from "left"/"right" in its file name. ``.mhd``
needs SimpleITK (``pip install deepatlas_fast[knee]``); volumes are returned in NIfTI voxel order
(i, j, k) with a RAS affine, whatever the input format.

    from deepatlas_fast.data.knee import find_subjects, load_knee, prepare_knee_dataset
    prepare_knee_dataset("OAI-ZIB", "knee_nifti")   # -> knee_nifti/datalist.json for `train`
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, MissingDependencyError

LABELS = {0: "background", 1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage"}
SIDES = ("left", "right")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd")


@dataclass
class KneeSubject:
    id: str
    image: Path
    label: Path | None
    side: str | None


@dataclass
class KneeVolume:
    image: np.ndarray          # float32, (i, j, k)
    labels: np.ndarray | None  # uint8 in LABELS
    affine: np.ndarray         # 4x4 RAS (of the input grid; a flipped volume keeps it)
    side: str                  # side of the knee as acquired
    flipped: bool              # True if mirrored left -> right


def _stem(path: Path) -> str:
    name = path.name
    for s in _IMAGE_SUFFIXES:
        if name.endswith(s):
            name = name[: -len(s)]
            break
    return name.removesuffix(".segmentation_masks").removesuffix(".image")


def _read_mhd(path: Path):
    try:
        import SimpleITK as sitk
    except ImportError:
        raise MissingDependencyError(f"{path}: reading .mhd needs SimpleITK: pip install 'deepatlas_fast[knee]'") from None
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: cannot read MetaImage ({str(e).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a 3D scalar volume")
    # ITK arrays are (k, j, i) in LPS; NIfTI order is (i, j, k) in RAS.
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    D = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None]
    affine = np.eye(4)
    affine[:3, :3] = D
    affine[:3, 3] = img.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def read_volume(path, *, label: bool = False):
    """(array, RAS affine) of a .nii/.nii.gz/.mhd volume; clear errors for bad files/values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.name.endswith(".mhd"):
        data, affine = _read_mhd(path)
        if label:
            if np.issubdtype(data.dtype, np.floating) and (data != np.round(data)).any():
                raise DataError(f"{path}: label map has non-integer values")
            return data.astype(np.int64), affine
        data = data.astype(np.float32)
        if not np.isfinite(data).all():
            raise DataError(f"{path}: image contains NaN or inf values")
        return data, affine
    from .io import load_nifti
    return load_nifti(path, label=label)


def lr_axis(affine) -> int:
    """Voxel axis closest to the patient's left-right (x in RAS) direction."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3])))


def _side_from_name(name: str) -> str | None:
    found = {s for s in SIDES if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", name.lower())}
    return found.pop() if len(found) == 1 else None


def read_sides(path) -> dict:
    """``id,side`` CSV (header optional) -> {id: "left" | "right"}."""
    sides = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().lower() in ("id", "subject", "#"):
                continue
            if len(row) < 2 or row[1].strip().lower() not in SIDES:
                raise DataError(f"{path}:{n}: expected 'id,left' or 'id,right', got {','.join(row)!r}")
            sides[row[0].strip()] = row[1].strip().lower()
    return sides


def find_subjects(root) -> list[KneeSubject]:
    """Subjects of an OAI-ZIB-style folder (layout in the module docstring), sorted by id."""
    root = Path(root)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root}: no images/ folder (expected OAI-ZIB-style layout, see deepatlas_fast.data.knee)")
    sides = read_sides(root / "sides.csv") if (root / "sides.csv").is_file() else {}
    labels = {}
    for d in ("segmentation_masks", "labels"):
        for p in sorted((root / d).glob("*")) if (root / d).is_dir() else []:
            if p.name.endswith(_IMAGE_SUFFIXES):
                if _stem(p) in labels:
                    raise DataError(f"{root}: two label files for subject {_stem(p)}: {labels[_stem(p)]}, {p}")
                labels[_stem(p)] = p
    subjects = []
    for p in sorted(img_dir.glob("*")):
        if not p.name.endswith(_IMAGE_SUFFIXES):
            continue
        sid = _stem(p)
        subjects.append(KneeSubject(sid, p, labels.pop(sid, None), sides.get(sid) or _side_from_name(p.name)))
    if not subjects:
        raise FileNotFoundError(f"{img_dir}: no .nii, .nii.gz or .mhd images")
    if labels:
        raise DataError(f"{root}: label files without an image: {sorted(labels)[:5]}")
    return subjects


def load_knee(image, label=None, *, side=None, flip_left: bool = True) -> KneeVolume:
    """Load one knee; mirror it along its left-right axis if it is a left knee.

    ``side``: "left" | "right"; if None it is taken from "left"/"right" in the image file name."""
    image = Path(image)
    side = side or _side_from_name(image.name)
    if side not in SIDES:
        raise DataError(f"{image}: knee side unknown; pass side='left'/'right' or list it in sides.csv")
    img, affine = read_volume(image)
    if img.ndim != 3:
        raise DataError(f"{image}: expected a 3D volume, got shape {img.shape}")
    if np.ptp(img) == 0:
        raise DataError(f"{image}: constant image")
    lab = None
    if label is not None:
        lab, laff = read_volume(label, label=True)
        if lab.shape != img.shape or not np.allclose(laff, affine, atol=1e-3):
            raise DataError(f"{label}: label grid {lab.shape} does not match image {image} {img.shape}")
        bad = sorted(set(np.unique(lab).tolist()) - set(LABELS))
        if bad:
            raise DataError(f"{label}: label values {bad[:10]} not in the OAI-ZIB table {LABELS}")
        lab = lab.astype(np.uint8)
    flipped = flip_left and side == "left"
    if flipped:
        ax = lr_axis(affine)
        img = np.flip(img, ax).copy()
        lab = None if lab is None else np.flip(lab, ax).copy()
    return KneeVolume(img, lab, affine, side, flipped)


def prepare_knee_dataset(root, out_dir, *, flip_left: bool = True, n_test: int = 0) -> Path:
    """Convert an OAI-ZIB-style folder into NIfTI (left knees mirrored) plus a MONAI datalist.

    The last ``n_test`` labelled subjects (by id) go to "test"; the rest to "training".
    Returns the datalist path, ready for ``deepatlas-fast train --data``."""
    from .io import save_nifti
    out = Path(out_dir)
    subjects = find_subjects(root)
    unknown = [s.id for s in subjects if s.side is None]
    if unknown:
        raise DataError(f"{root}: knee side unknown for {unknown[:5]}; add them to sides.csv as 'id,left|right'")
    labelled = [s.id for s in subjects if s.label is not None]
    test_ids = set(labelled[len(labelled) - n_test:]) if n_test else set()
    datalist = {"name": "OAI-ZIB knees", "labels": {str(k): v for k, v in LABELS.items()},
                "training": [], "test": []}
    for s in subjects:
        v = load_knee(s.image, s.label, side=s.side, flip_left=flip_left)
        e = {"image": f"images/{s.id}.nii.gz"}
        save_nifti(out / e["image"], v.image, v.affine, dtype=np.float32)
        if v.labels is not None:
            e["label"] = f"labels/{s.id}.nii.gz"
            save_nifti(out / e["label"], v.labels, v.affine, dtype=np.uint8)
        datalist["test" if s.id in test_ids else "training"].append(e)
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1) + "\n")
    return path
