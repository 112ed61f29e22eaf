"""Registration Dice on the two real labelled OASIS brains, at 1 mm over the 30 standard structures:
the figure the data README gives for no registration (0.522), for a trained run.

    python tools/real_pair_dice.py --src /path/to/shared/data RUN [RUN ...]

For each run (e.g. DEMO_OUT/runs/pretrained, DEMO_OUT/runs/da), oasis_a and oasis_b are registered
both ways on the demo's 2 mm grid (the shipped images: the same field of view as the 1 mm
originals), the displacement is brought to 1 mm (trilinear, voxel units doubled) and warps the
1 mm FreeSurfer segmentation (nearest), compared with the other brain's 1 mm segmentation.
Note: in the demo, oasis_a is the one labelled training image and oasis_b a test image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from deepatlas_fast import warp
from deepatlas_fast.inference.run import load_run
from deepatlas_fast.data.demo_data import datalist_path
from deepatlas_fast.data.io import load_nifti
from deepatlas_fast.data.preprocess import resample


def dice_30(a: np.ndarray, b: np.ndarray, structures) -> float:
    d = [2 * np.sum((a == s) & (b == s)) / max(1, np.sum(a == s) + np.sum(b == s)) for s in structures]
    return float(np.mean(d))


def warp_labels_1mm(disp_2mm: np.ndarray, seg_1mm: np.ndarray) -> np.ndarray:
    """2 mm displacement [3, D, H, W] (2 mm voxels) -> warps a 1 mm label map (nearest)."""
    shape = seg_1mm.shape
    d = resample(torch.from_numpy(disp_2mm)[None].float(), shape) * 2  # 1 mm voxels
    values = np.unique(seg_1mm)
    index = np.searchsorted(values, seg_1mm).astype(np.float32)  # labels as 0..K-1 for nearest sampling
    w = warp(torch.from_numpy(index)[None, None], d, mode="nearest")[0, 0].round().long().numpy()
    return values[w]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the shared data folder (with brains/real/)")
    p.add_argument("runs", nargs="+", help="run directories")
    args = p.parse_args(argv)
    real = Path(args.src) / "brains" / "real"
    structures = [int(s) for s in (real / "evaluation_labels.txt").read_text().split()]
    seg = {k: load_nifti(real / f"oasis_{k}_seg.nii.gz", label=True)[0] for k in "ab"}
    img2 = {k: load_nifti(datalist_path().parent / "images" / f"oasis_{k}.nii.gz")[0] for k in "ab"}
    print(f"no registration: a->b {dice_30(seg['a'], seg['b'], structures):.3f} "
          f"({len(structures)} structures, 1 mm)")
    for run_dir in args.runs:
        run = load_run(run_dir)
        out = []
        for m, t in (("a", "b"), ("b", "a")):
            disp = run.register(img2[m], img2[t])["disp"]
            out.append(f"{m}->{t} {dice_30(warp_labels_1mm(disp, seg[m]), seg[t], structures):.3f}")
        print(f"{run_dir}: " + ", ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
