"""Datasets: MONAI-style datalists or folders of NIfTI files, checks, cache, pair sampling.

Datalist JSON (MONAI decathlon format; paths relative to the JSON file; "label" optional)::

    {"training":   [{"image": "imgs/a.nii.gz", "label": "segs/a.nii.gz"}, {"image": "imgs/c.nii.gz"}],
     "validation": [...], "test": [...]}

Folder input: ``DIR/images/*.nii[.gz]`` with labels of the same file name in ``DIR/labels/`` (or a
plain folder of images, all unlabelled); everything goes to the "training" split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .io import LabelTable, is_nifti, load_header, load_nifti
from ..ops import warp
from .preprocess import Preprocessing

SPLITS = ("training", "validation", "test")
PAIR_KINDS = ("LL", "LU", "UL", "UU")  # first letter: moving image, second: target; L labelled, U unlabelled


def read_datalist(path) -> dict:
    """Datalist JSON -> {split: [{"image": Path, "label": Path | None}, ...]}."""
    path = Path(path)
    if is_nifti(path):
        raise DataError(f"{path} is an image: data is a datalist JSON or a folder of images/ and labels/")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a datalist (not valid JSON: {e})") from None
    if not isinstance(raw, dict) or not any(k in raw for k in SPLITS):
        raise DataError(f"{path}: a datalist is a JSON object with a 'training', 'validation' or 'test' list")
    out = {}
    for split in SPLITS:
        items = raw.get(split, [])
        if not isinstance(items, list):
            raise DataError(f"{path}: '{split}' must be a list")
        out[split] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                raise DataError(f"{path}: {split}[{i}] must be an object with an 'image' path")
            lab = item.get("label")
            for key, value in (("image", item["image"]), ("label", lab)):
                if not (isinstance(value, str) and value.strip() and "\x00" not in value) \
                        and not (key == "label" and value in (None, "")):
                    raise DataError(f"{path}: {split}[{i}].{key} must be a file path (a non-empty string), "
                                    f"got {value!r}"[:300])
            out[split].append({"image": _resolve(path.parent, item["image"], path),
                               "label": None if lab in (None, "") else _resolve(path.parent, lab, path)})
    return out


def _resolve(base: Path, p: str, where: Path) -> Path:
    q = Path(p) if Path(p).is_absolute() else base / p
    if not q.is_file():
        raise FileNotFoundError(f"{where}: file not found: {p} (resolved to {q})")
    return q


def read_folder(path, labels_dir=None) -> dict:
    """Folder of images (``DIR/images`` if present) + labels of the same name (``DIR/labels``)."""
    path = Path(path)
    img_dir = path / "images" if (path / "images").is_dir() else path
    lab_dir = Path(labels_dir) if labels_dir else path / "labels"
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and is_nifti(p))
    if not images:
        raise DataError(f"{img_dir}: no .nii or .nii.gz images found")
    items = [{"image": p, "label": (lab_dir / p.name) if (lab_dir / p.name).is_file() else None} for p in images]
    return {"training": items, "validation": [], "test": []}


def read_data(data) -> dict:
    """A datalist JSON path, a folder, or an already-parsed {split: [...]} dict."""
    if isinstance(data, dict):
        return {s: [{"image": Path(e["image"]), "label": Path(e["label"]) if e.get("label") else None}
                    for e in data.get(s, [])] for s in SPLITS}
    p = Path(data)
    if p.is_dir():
        return read_folder(p)
    if p.is_file():
        return read_datalist(p)
    raise FileNotFoundError(f"data not found: {p} (expected a datalist .json or a folder of images)")


def check_grids(entries, resample: bool = False):
    """Reference (shape, affine, spacing) of ``entries``; mismatched grids are an error unless ``resample``."""
    if not entries:
        raise DataError("no images in the dataset")
    ref = load_header(entries[0]["image"])
    for e in entries:
        for key in ("image", "label"):
            if e[key] is None:
                continue
            shape, affine, _ = load_header(e[key])
            if not _same_grid((shape, affine), ref) and not resample:
                raise DataError(
                    f"{e[key]}: grid (shape {shape}, affine {np.round(affine, 3).tolist()}) differs from "
                    f"{entries[0]['image']} (shape {ref[0]}, affine {np.round(ref[1], 3).tolist()}); all images "
                    "and labels of a dataset must share one grid: resample them, or set data.resample=true")
    return ref


def _same_grid(a, b) -> bool:
    return tuple(a[0]) == tuple(b[0]) and np.allclose(a[1], b[1], atol=1e-3)


def resample_to(array: np.ndarray, affine, ref_shape, ref_affine, *, label: bool = False) -> np.ndarray:
    """Resample ``array`` (on ``affine``) onto the grid (ref_shape, ref_affine) via world coordinates."""
    m = np.linalg.inv(affine) @ np.asarray(ref_affine)  # ref voxel -> array voxel
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in ref_shape], indexing="ij"))
    mt = torch.from_numpy(m)
    loc = torch.einsum("ij,jdhw->idhw", mt[:3, :3], grid) + mt[:3, 3].view(3, 1, 1, 1)
    disp = (loc - grid).float()[None]
    x = torch.from_numpy(np.ascontiguousarray(array)).float()[None, None]
    out = warp(x, disp, mode="nearest" if label else "linear", padding="zeros")[0, 0].numpy()
    return np.rint(out).astype(np.int64) if label else out


def infer_label_table(entries) -> LabelTable:
    """Union of the label values found in the label files of ``entries``."""
    values = set()
    for e in entries:
        if e["label"] is not None:
            values |= set(np.unique(load_nifti(e["label"], label=True)[0]).tolist())
    if len(values - {0}) == 0:
        raise DataError("no labelled image in the training data (or labels are all 0): cannot build a label table; "
                         "declare data.labels or add labels")
    return LabelTable(values)


class VolumeDataset:
    """Images (and labels where present) of one split, preprocessed for the networks.

    ``ds[i]`` -> (image [1, D, H, W] float32, label [1, D, H, W] int64 or None) on the network grid.
    Grids are checked at construction from the headers; voxels are read at first access and kept
    in memory if ``cache``."""

    def __init__(self, entries, prep: Preprocessing, *, resample: bool = False, cache: bool = True, ref=None):
        self.entries = list(entries)
        self.prep = prep
        self.cache = cache
        self.resample = resample
        self.ref = ref if ref is not None else check_grids(self.entries, resample)
        if ref is not None:
            for e in self.entries:
                for key in ("image", "label"):
                    if e[key] is not None and not resample and not _same_grid(load_header(e[key])[:2], ref[:2]):
                        raise DataError(f"{e[key]}: grid differs from the training grid {ref[0]}; "
                                         "resample it or set data.resample=true")
        self._cache = {}
        self.labelled = [e["label"] is not None for e in self.entries]

    def __len__(self):
        return len(self.entries)

    def check_voxels(self, progress: bool = False) -> None:
        """Read every image and label map once (kept if ``cache``): a NaN, constant, truncated or
        mislabelled file fails here, before training, not when a later stage first draws it."""
        from tqdm import tqdm
        for i in tqdm(range(len(self)), desc="checking images", disable=not progress, leave=False):
            if i not in self._cache:
                self[i]

    def names(self):
        return [_stem(e["image"]) for e in self.entries]

    def load_original(self, i):
        """(image, label or None, affine) on the reference grid, before normalisation (label values)."""
        e = self.entries[i]
        img, aff = load_nifti(e["image"])
        lab = None
        if e["label"] is not None:
            lab, laff = load_nifti(e["label"], label=True)
            if lab.shape != img.shape and not self.resample:
                raise DataError(f"{e['label']}: shape {lab.shape} differs from its image {img.shape}")
        if self.resample:
            ref_shape, ref_aff = self.ref[0], self.ref[1]
            if not _same_grid((img.shape, aff), (ref_shape, ref_aff)):
                img = resample_to(img, aff, ref_shape, ref_aff)
            if lab is not None and not _same_grid((lab.shape, laff), (ref_shape, ref_aff)):
                lab = resample_to(lab, laff, ref_shape, ref_aff, label=True)
            aff = ref_aff
        return img, lab, aff

    def __getitem__(self, i):
        if i in self._cache:
            return self._cache[i]
        img, lab, _ = self.load_original(i)
        e = self.entries[i]
        x = self.prep.image(img, name=str(e["image"]))[0]
        y = None if lab is None else self.prep.label(lab, name=str(e["label"]))[0]
        if self.cache:
            self._cache[i] = (x, y)
        return x, y


def _stem(p) -> str:
    name = Path(p).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


class PairSampler:
    """Draws (moving, target) index pairs of one labelled/unlabelled kind per call.

    ``weights`` maps "LL", "LU", "UL", "UU" to proportions; kinds impossible with the data (e.g. "UU"
    without two unlabelled images) are dropped and the rest renormalised."""

    def __init__(self, labelled, weights):
        self.lab = [i for i, f in enumerate(labelled) if f]
        self.unl = [i for i, f in enumerate(labelled) if not f]
        self.weights = {k: float(weights.get(k, 0.0)) for k in PAIR_KINDS}

    def _pool(self, letter):
        return self.lab if letter == "L" else self.unl

    def kinds(self, allowed=PAIR_KINDS):
        out = {}
        for k in allowed:
            a, b = self._pool(k[0]), self._pool(k[1])
            enough = len(a) >= 2 if k[0] == k[1] else (a and b)
            if self.weights[k] > 0 and enough:
                out[k] = self.weights[k]
        return out

    def sample(self, gen: torch.Generator, n: int, allowed=PAIR_KINDS):
        """-> (kind, [(moving, target)] * n), drawn with ``gen`` (moving != target)."""
        kinds = self.kinds(allowed)
        if not kinds:
            raise DataError(f"no image pair of kinds {list(allowed)} with positive weight in data.pairs "
                             f"({len(self.lab)} labelled, {len(self.unl)} unlabelled training images)")
        names = list(kinds)
        w = torch.tensor([kinds[k] for k in names], dtype=torch.float64)
        kind = names[int(torch.multinomial(w, 1, generator=gen))]
        a, b = self._pool(kind[0]), self._pool(kind[1])
        pairs = []
        for _ in range(n):
            i = a[int(torch.randint(len(a), (1,), generator=gen))]
            choices = [j for j in b if j != i]
            j = choices[int(torch.randint(len(choices), (1,), generator=gen))]
            pairs.append((i, j))
        return kind, pairs

    def sample_labelled(self, gen: torch.Generator, n: int):
        if not self.lab:
            raise DataError("segmentation training needs at least one labelled training image")
        return [self.lab[int(torch.randint(len(self.lab), (1,), generator=gen))] for _ in range(n)]
