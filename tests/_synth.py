"""Synthetic 3D volumes for the training-system tests: blurred blobs with labelled parts.

Each subject is the same anatomy (two ellipsoids + a ball, label values 0, 7, 42, 100 to exercise
the label table) moved by a random shift, so registration has something to recover."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepatlas_fast.data.io import save_nifti

LABEL_VALUES = (0, 7, 42, 100)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def subject(shape=(24, 24, 24), shift=(0, 0, 0), seed=0):
    """-> (image float32, labels with values LABEL_VALUES)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    c = np.array(shape, np.float32)[:, None, None, None] / 2 + np.array(shift, np.float32)[:, None, None, None]
    r = (g - c) / (np.array(shape, np.float32)[:, None, None, None] / 2)
    lab = np.zeros(shape, np.int16)
    lab[(r[0] / 0.8) ** 2 + (r[1] / 0.6) ** 2 + (r[2] / 0.7) ** 2 < 1] = 7
    lab[((r[0] - 0.25) / 0.35) ** 2 + (r[1] / 0.3) ** 2 + (r[2] / 0.3) ** 2 < 1] = 42
    lab[((r[0] + 0.3) ** 2 + (r[1] + 0.1) ** 2 + r[2] ** 2) < 0.2 ** 2] = 100
    inten = {0: 0.0, 7: 0.5, 42: 1.0, 100: 0.25}
    img = np.zeros(shape, np.float32)
    for v, i in inten.items():
        img[lab == v] = i
    img += rng.normal(0, 0.03, shape).astype(np.float32)
    return img * 200 + 10, lab


def write_dataset(root, n_labelled=3, n_unlabelled=2, shape=(24, 24, 24), n_val=1, seed=0):
    """Write NIfTI files + datalist.json under ``root``; returns the datalist path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n_labelled + n_unlabelled + n_val):
        shift = rng.uniform(-2.5, 2.5, 3)
        img, lab = subject(shape, shift, seed=seed + k)
        save_nifti(root / f"img{k}.nii.gz", img, AFFINE)
        item = {"image": f"img{k}.nii.gz"}
        if k < n_labelled or k >= n_labelled + n_unlabelled:
            save_nifti(root / f"seg{k}.nii.gz", lab, AFFINE)
            item["label"] = f"seg{k}.nii.gz"
        items.append(item)
    n_train = n_labelled + n_unlabelled
    dl = {"training": items[:n_train], "validation": items[n_train:], "test": items[n_train:]}
    (root / "datalist.json").write_text(json.dumps(dl, indent=1))
    return root / "datalist.json"


def tiny_overrides(**steps):
    """Config overrides for a fast CPU run: narrow nets, few steps."""
    st = {"seg": 2, "reg": 2, "semi-da": 2, "da": 3}
    st.update(steps)
    return ["model.reg_enc=[4,8,8]", "model.reg_dec=[8,8,8,4]", "model.seg_enc=[4,8,8]",
            "loss.window=5", "train.lr=1e-3", "train.k_reg=2", "train.k_seg=1", "train.log_every=1",
            "train.checkpoint_every=2", "device=cpu"] + [f"train.steps.{k}={v}" for k, v in st.items()]


_RUNS = {}


def tiny_run(base, stage="all", **steps):
    """A trained tiny run on a synthetic dataset under ``base`` (built once per test run)."""
    key = (str(base), stage, tuple(sorted(steps.items())))
    if key not in _RUNS:
        from deepatlas_fast.training.trainer import train
        root = Path(base) / f"tiny_{stage}_{len(_RUNS)}"
        dl = write_dataset(root / "data")
        run = train(None, dl, root / "run", stage=stage, overrides=tiny_overrides(**steps), progress=False)
        _RUNS[key] = (dl, run)
    return _RUNS[key]
