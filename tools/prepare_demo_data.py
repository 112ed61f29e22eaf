"""Rebuild the demo data set shipped in src/deepatlas_fast/data/demo_data/ from the raw files.

    python tools/prepare_demo_data.py --src /path/to/shared/data --out src/deepatlas_fast/data/demo_data

Inputs (see CREDITS.md for sources): 3 real OASIS T1 brains on one 1 mm grid (160x192x224; a and
b with FreeSurfer aseg labels, c unlabelled) and 20 SynthSeg whole-head label maps (256^3, each
in its own space) with SynthSeg's T1 intensity priors.

Steps:
1. Real brains -> 2 mm (2x2x2 block mean for images, block majority for labels).
2. Each label map -> a T1-like image: per-label Gaussian intensities drawn from the SynthSeg T1
   priors, a smooth multiplicative bias field, noise, slight blur, skull removal via the labels.
3. Affine registration of each synthetic image (2 mm) to the mean of the 3 real brains with
   ``deepatlas_fast.data.prealign`` (moments initialisation, then MSE, 8 mm -> 4 mm -> 2 mm), then
   the 1 mm image/labels are resampled on the real 1 mm grid and reduced to 2 mm like the real ones.
4. Labels are kept as FreeSurfer values restricted to STRUCTURES (the 30 standard evaluation
   structures minus choroid plexus 31/63, which the SynthSeg maps do not contain); everything
   else becomes 0. Images are uint8 on the OASIS intensity scale.
5. The test brain oasis_b is also kept at 1 mm (extra/), to check segmentation on a grid other
   than the training grid.

Deterministic (seeded); about 2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from deepatlas_fast.data.prealign import apply_affine, prealign

EVAL_30 = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
           41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]
# Choroid plexus (31/63) is absent from the SynthSeg maps, and CSF (24) means all extra-cerebral
# CSF there but a few sulcal voxels in the skull-stripped OASIS aseg: both are left out.
STRUCTURES = [v for v in EVAL_30 if v not in (24, 31, 63)]
NAMES = {
    0: "background", 2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum",
    14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus",
    18: "Left-Amygdala", 24: "CSF", 28: "Left-VentralDC", 41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle", 46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen",
    52: "Right-Pallidum", 53: "Right-Hippocampus", 54: "Right-Amygdala", 60: "Right-VentralDC",
}
# Labels kept by skull removal: FreeSurfer brain structures. Extra-cerebral CSF (24) and the
# SynthSeg head classes (5xx) are removed, as in the skull-stripped OASIS images.
BRAIN = {2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 25, 26, 28, 30, 41, 42, 43, 44,
         46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 72, 85, 136, 137, 163, 164}
# Brain labels absent from the OASIS aseg borrow the intensity of a neighbouring OASIS label.
PROXY = {25: 2, 57: 41, 30: 2, 62: 41, 72: 14, 136: 31, 163: 63, 137: 17, 164: 53}
# Right -> left label: both hemispheres share one intensity class.
RIGHT_TO_LEFT = {41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 49: 10, 50: 11, 51: 12, 52: 13, 53: 17,
                 54: 18, 57: 25, 58: 26, 60: 28, 62: 30, 63: 31, 163: 136, 164: 137}
JITTER = 0.5              # fraction of the priors' spread used for the per-subject class means
N_SYNTH = 20
TRAIN_SYNTH = 14          # synthetic subjects in the (unlabelled) training split
VAL_SYNTH = 2             # then validation; the rest is test


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def dice(a, b, labels):
    out = []
    for v in labels:
        x, y = a == v, b == v
        s = x.sum() + y.sum()
        if s:
            out.append(2 * (x & y).sum() / s)
    return float(np.mean(out))


def down2_image(x):
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2].astype(np.float32)
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean((1, 3, 5))


def down2_labels(x):
    """Majority label of each 2x2x2 block (ties -> smaller label value)."""
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    subs = [x[i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    best = np.zeros(subs[0].shape, x.dtype)
    best_n = np.zeros(subs[0].shape, np.uint8)
    for v in np.unique(x):
        n = sum((s == v).astype(np.uint8) for s in subs)
        upd = n > best_n
        best[upd], best_n[upd] = v, n[upd]
    return best


def keep_structures(lab):
    return np.where(np.isin(lab, STRUCTURES), lab, 0).astype(np.uint8)


def affine_2mm(a1):
    """Affine of the 2 mm grid whose voxel i is the centre of 1 mm voxels 2i, 2i+1."""
    s = np.diag([2.0, 2.0, 2.0, 1.0])
    s[:3, 3] = 0.5
    return a1 @ s


def intensity_table(priors_dir, oasis_img, oasis_seg):
    """Map each brain label to a column of SynthSeg's T1 priors, and the prior->OASIS gain.

    SynthSeg pairs prior_*_t1.npy with generation_classes_contrast_specific.npy, which is not
    among the shipped files; so each label takes the prior column whose mean is closest to the
    label's median intensity in a real OASIS brain, after one global gain fitted over all
    labels. Intensities are then drawn from the priors, not from OASIS."""
    pm = np.load(priors_dir / "prior_means_t1.npy")
    med = {}
    for v in sorted(BRAIN | {31, 63}):
        if v in RIGHT_TO_LEFT:
            continue
        sides = [v] + [r for r, l in RIGHT_TO_LEFT.items() if l == v]
        vals = oasis_img[np.isin(oasis_seg, sides)]
        if vals.size > 50:
            med[v] = float(np.median(vals))
    m = np.array(list(med.values()))
    gains = np.linspace(1.0, 2.5, 301)
    cost = [np.abs(g * m[:, None] - pm[0][None]).min(1).sum() for g in gains]
    gain = float(gains[int(np.argmin(cost))])
    col = {v: int(np.abs(gain * mv - pm[0]).argmin()) for v, mv in med.items()}
    for v, p in PROXY.items():
        if v not in RIGHT_TO_LEFT:
            col.setdefault(v, col[RIGHT_TO_LEFT.get(p, p)])
    for r, l in RIGHT_TO_LEFT.items():
        col[r] = col[l]
    return col, gain


def synthesise(lab, col, gain, priors_dir, rng):
    """T1-like image (OASIS scale, float) from a label map."""
    pm = np.load(priors_dir / "prior_means_t1.npy")
    ps = np.load(priors_dir / "prior_stds_t1.npy")
    means = rng.normal(pm[0], JITTER * pm[1])       # one draw per class, shared by all its labels
    stds = np.abs(rng.normal(ps[0], ps[1]))
    lut_mean = np.zeros(int(lab.max()) + 1, np.float32)
    lut_std = np.zeros_like(lut_mean)
    for v in np.unique(lab):
        c = col.get(int(v), 0)                      # non-brain labels: background class
        lut_mean[v], lut_std[v] = means[c], min(stds[c], 25.0)
    img = lut_mean[lab] + lut_std[lab] * rng.standard_normal(lab.shape, dtype=np.float32)
    # Smooth multiplicative bias field: a 4^3 random field upsampled, +-~20%.
    coarse = rng.normal(0, 0.1, (4, 4, 4))
    bias = torch.nn.functional.interpolate(torch.from_numpy(coarse).float()[None, None], size=lab.shape,
                                           mode="trilinear", align_corners=True)[0, 0].exp().numpy()
    img = img * bias
    img += rng.normal(0, 3.0, lab.shape).astype(np.float32)
    img = ndimage.gaussian_filter(img, 0.6)
    # Skull removal; sulcal CSF (the part of label 24 within 2 mm of brain tissue) is kept, as
    # skull stripping keeps it in real images.
    brain = np.isin(lab, list(BRAIN))
    img *= brain | ((lab == 24) & ndimage.binary_dilation(brain, iterations=2))
    return np.clip(img / gain, 0, 255)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default="/work/shared/data", help="shared data folder (README.md there)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src" / "deepatlas_fast" / "data" / "demo_data"))
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--n-synth", type=int, default=N_SYNTH, help="synthetic subjects (20 for the shipped set)")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    src, out = Path(a.src), Path(a.out)
    real, maps = src / "brains" / "real", src / "brains" / "labelmaps"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)

    # 1. Real brains.
    imgs1, segs1 = {}, {}
    for n in "abc":
        imgs1[n], aff1 = load(real / f"oasis_{n}_T1.nii.gz")
        if n != "c":
            segs1[n] = load(real / f"oasis_{n}_seg.nii.gz")[0]
    aff2 = affine_2mm(aff1)
    stats = {"dice_no_reg_oasis_a_b": {
        "1mm_30": dice(segs1["a"], segs1["b"], EVAL_30),
        "2mm_30": dice(down2_labels(segs1["a"]), down2_labels(segs1["b"]), EVAL_30),
        "2mm_27": dice(keep_structures(down2_labels(segs1["a"])), keep_structures(down2_labels(segs1["b"])), STRUCTURES),
    }}
    print("Dice oasis_a vs oasis_b, no registration:", {k: round(v, 3) for k, v in stats["dice_no_reg_oasis_a_b"].items()})
    entries = {}
    for n in "abc":
        name = f"oasis_{n}"
        nib.save(nib.Nifti1Image(np.round(down2_image(imgs1[n])).astype(np.uint8), aff2), str(out / "images" / f"{name}.nii.gz"))
        if n in segs1:
            nib.save(nib.Nifti1Image(keep_structures(down2_labels(segs1[n])), aff2), str(out / "labels" / f"{name}.nii.gz"))
        entries[name] = n in segs1
    (out / "extra").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(imgs1["b"]).astype(np.uint8), aff1), str(out / "extra" / "oasis_b_1mm.nii.gz"))
    nib.save(nib.Nifti1Image(keep_structures(segs1["b"]), aff1), str(out / "extra" / "oasis_b_1mm_seg.nii.gz"))
    seg_a2 = keep_structures(down2_labels(segs1["a"]))
    seg_b2 = keep_structures(down2_labels(segs1["b"]))

    # Registration template: mean of the 3 real brains at 2 mm.
    template = np.mean([down2_image(imgs1[n]) for n in "abc"], 0)
    col, gain = intensity_table(maps, imgs1["a"].astype(np.float32), segs1["a"])
    stats["prior_gain"] = gain
    stats["label_to_prior_column"] = {str(k): v for k, v in sorted(col.items())}
    del imgs1, segs1

    # 2-3. Synthetic subjects.
    stats["synthetic"] = {}
    for i in range(1, a.n_synth + 1):
        t1 = time.time()
        lab, _ = load(maps / f"training_seg_{i:02d}.nii.gz")
        lab = np.round(lab).astype(np.int16)
        # Crop to the head (+2 voxels) to save time; the crop offset is absorbed by the affine.
        nz = np.nonzero(lab)
        lab = lab[tuple(slice(max(x.min() - 2, 0), x.max() + 3) for x in nz)]
        img = synthesise(lab, col, gain, maps, rng)
        res = prealign(down2_image(img), template, levels=(4, 2, 1), iterations=(80, 40, 15),
                       similarity="mse", init="moments")
        # Matrix between 2 mm grids -> between 1 mm grids (voxel i_2 <-> 1 mm coordinate 2 i_2 + 0.5).
        s = np.diag([2.0, 2.0, 2.0, 1.0])
        s[:3, 3] = 0.5
        m1 = s @ res.matrix @ np.linalg.inv(s)
        shape1 = tuple(2 * n for n in template.shape)
        img_r = apply_affine(img, m1, shape1)
        lab_r = apply_affine(lab, m1, shape1, mode="nearest")
        lab2 = keep_structures(down2_labels(lab_r))
        name = f"synth_{i:02d}"
        nib.save(nib.Nifti1Image(np.round(np.clip(down2_image(img_r), 0, 255)).astype(np.uint8), aff2),
                 str(out / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab2, aff2), str(out / "labels" / f"{name}.nii.gz"))
        entries[name] = True
        d_a, d_b = dice(lab2, seg_a2, STRUCTURES), dice(lab2, seg_b2, STRUCTURES)
        # For the record: the moments initialisation alone.
        lab_i = keep_structures(down2_labels(apply_affine(lab, s @ res.init_matrix @ np.linalg.inv(s), shape1, mode="nearest")))
        d_i = dice(lab_i, seg_a2, STRUCTURES)
        stats["synthetic"][name] = {"dice_vs_oasis_a": d_a, "dice_vs_oasis_b": d_b, "dice_vs_oasis_a_moments_only": d_i}
        print(f"{name}: Dice vs oasis_a {d_i:.3f} (moments) -> {d_a:.3f} (affine), vs oasis_b {d_b:.3f} ({time.time() - t1:.1f} s)")

    # Datalist (MONAI / Decathlon format) for the one-shot setting: one labelled training image.
    def entry(name, labelled):
        e = {"image": f"images/{name}.nii.gz"}
        if labelled:
            e["label"] = f"labels/{name}.nii.gz"
        return e

    synth = [f"synth_{i:02d}" for i in range(1, a.n_synth + 1)]
    datalist = {
        "name": "deepatlas_fast brain demo (one-shot)",
        "description": "OASIS-1 T1 brains and SynthSeg label maps with synthetic T1 images, "
                       "affinely aligned, 2 mm, 80x96x112. See CREDITS.md.",
        "labels": {str(v): NAMES[v] for v in [0] + STRUCTURES},
        "training": [entry("oasis_a", True), entry("oasis_c", False)]
                    + [entry(n, False) for n in synth[:TRAIN_SYNTH]],
        "validation": [entry(n, True) for n in synth[TRAIN_SYNTH:TRAIN_SYNTH + VAL_SYNTH]],
        "test": [entry("oasis_b", True)] + [entry(n, True) for n in synth[TRAIN_SYNTH + VAL_SYNTH:]],
    }
    (out / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
    d = [v["dice_vs_oasis_a"] for v in stats["synthetic"].values()]
    stats["synthetic_mean_dice_vs_oasis_a"] = float(np.mean(d))
    stats["synthetic_mean_dice_vs_oasis_a_moments_only"] = float(np.mean([v["dice_vs_oasis_a_moments_only"] for v in stats["synthetic"].values()]))
    stats["seconds"] = round(time.time() - t0, 1)
    size = sum(f.stat().st_size for f in out.rglob("*.nii.gz"))
    stats["nifti_bytes"] = size
    (out / "prepare_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"mean Dice synthetic vs oasis_a: {stats['synthetic_mean_dice_vs_oasis_a_moments_only']:.3f} (moments) -> "
          f"{np.mean(d):.3f} (affine); {size / 1e6:.1f} MB; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
