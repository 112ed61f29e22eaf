"""Evaluation of a run: segmentation and registration Dice per structure, folding, figures.

Dice is computed on the original grid in original label values, background (0) excluded; a
structure absent from both maps gives NaN and is left out of means. Registration Dice compares
the moving labels warped (nearest) by F_R with the target labels, for ordered pairs of labelled
images; "unregistered" is the same without warping (the baseline a registration must beat).

Output folder (default RUN_DIR/eval/SPLIT)::

    dice_seg.csv, dice_reg.csv, dice_unregistered.csv   one row per image / pair, one column per structure
    dice_reg_refined.csv   with ``refine``: the pairs again, F_R's field refined per pair
    dice_atlas_copy.csv, dice_atlas_reg.csv   with ``atlases``: one row per (atlas, image)
    dice_atlas_fused.csv, dice_net_atlas.csv  with ``atlases``: one row per image
    summary.json     {"split", "structures", "seg"|"reg"|"unregistered"|"reg_refined"|"atlas_copy"|
                      "atlas_reg"|"atlas_fused"|"net_atlas": {"mean", "n", "per_structure"},
                      "reg"|"reg_refined": {..., "folding_fraction", "seconds_per_pair"}}
                     (folding: share of voxels with det J <= 0)

Atlas rows (``atlases``: labelled images, e.g. a one-shot run's labelled training image) are the
two segmentations any registration method offers: the atlas labels copied onto each image of
the split as they are (affine alignment only), and warped onto it by F_R (nearest). Multi-atlas
rows (``inference.atlas``): all atlases registered by F_R (refined with ``refine``), their one-hot
labels warped linearly and fused ("atlas_fused"), and that averaged with F_S ("net_atlas").
    seg_example.png, reg_example.png, dice_per_structure.png
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import DataError, DeepAtlasError
from ..data.datasets import VolumeDataset, check_grids, read_data
from ..data.io import LabelTable
from ..training.metrics import dice_per_class, folding_fraction
from ..training.run_folder import read_run_info
from .run import Run, load_run


def _write_csv(path, key_cols, rows, structures):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(key_cols + ["mean"] + [str(s) for s in structures])
        for keys, d in rows:
            w.writerow(list(keys) + [_fmt(np.nanmean(d) if np.isfinite(d).any() else np.nan)] + [_fmt(v) for v in d])


def _fmt(v):
    return "" if not np.isfinite(v) else f"{v:.4f}"


def _summary(rows, structures):
    if not rows:
        return None
    arr = np.array([d for _, d in rows])
    per = {str(s): (None if not np.isfinite(arr[:, i]).any() else float(np.nanmean(arr[:, i])))
           for i, s in enumerate(structures)}
    return {"mean": float(np.nanmean(arr)) if np.isfinite(arr).any() else None, "n": len(rows), "per_structure": per}


def evaluate(run, data=None, *, split=None, out_dir=None, structures=None, max_pairs: int = 20,
             atlases=None, refine=0, refine_overrides=(), weighting: str = "mean", figures: bool = True,
             progress: bool = True) -> dict:
    """Evaluate ``run`` (a run directory or a ``Run``) on a split of ``data`` -> summary dict.

    split: "test", "validation" or "training" (default: the first non-empty in that order).
    structures: label values to score (default: all non-zero values of the run's label table).
    atlases: labelled images [{"image": path, "label": path}] on the split's grid, scored as
    atlas-copy and atlas-registration segmentations of every labelled image of the split.
    refine: iterations per level of test-time refinement (0: none) or ``RefineSettings``, for the
    "reg_refined" rows and the multi-atlas rows; refine_overrides: ``["refine.lambda_r=1", ...]``
    applied to the run's refine settings; weighting: atlas weights of the fusion ("mean" or "lncc")."""
    import time

    from tqdm import tqdm

    from .atlas import WEIGHTINGS, segment_with_atlases
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
        raise DeepAtlasError(f"max_pairs must be an integer >= 0, got {max_pairs!r}")
    if weighting not in WEIGHTINGS:
        raise DeepAtlasError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    run_dir = None
    if not isinstance(run, Run):
        run_dir = Path(run)
        run = load_run(run_dir)
    if data is None:
        if run_dir is None:
            raise DeepAtlasError("data is required")
        data = read_run_info(run_dir).get("data")
        if data is None:
            raise DeepAtlasError("the run did not record its data; pass --data")
    splits = read_data(data)
    if split is None:
        split = next((s for s in ("test", "validation", "training") if splits[s]), None)
    if split not in splits or not splits[split]:
        raise DataError(f"split {split!r} of {data} is empty")
    if out_dir is None:
        if run_dir is None:
            raise DeepAtlasError("out_dir is required when evaluating a Run object")
        out_dir = run_dir / "eval" / split
    out_dir = Path(out_dir)

    table: LabelTable = run.labels
    structures = [v for v in (structures if structures is not None else table.values) if v != 0]
    missing = [v for v in structures if v not in table.values]
    if missing:
        raise DeepAtlasError(f"structures {missing} are not in the run's label table {table.values}")
    refine = run.refine_settings(refine, refine_overrides)  # bad settings fail before any work
    resample = run.config["data"]["resample"]
    entries = splits[split]
    ref = check_grids(entries, resample)
    if run.prep.training_grid(ref[0], ref[2]) != tuple(ref[0]):
        # F_R only registers at its training voxel size, and scores on another grid would not
        # compare with the run's: refused rather than scored wrong
        raise DataError(f"{entries[0]['image']}: voxel size {tuple(round(float(s), 3) for s in ref[2])} mm, but the run "
                        f"was trained at {tuple(run.prep.spacing)} mm; resample the {split} split to that voxel size "
                        "(segment resamples single images itself)")
    ds = VolumeDataset(entries, run.prep, resample=resample, cache=False, ref=ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ds.names()
    lab_idx = [i for i, f in enumerate(ds.labelled) if f]
    originals = {}

    def orig(i):
        if i not in originals:
            originals[i] = ds.load_original(i)[:2]
        return originals[i]

    seg_rows, preds = [], {}
    for i in tqdm(lab_idx, desc="segment", disable=not progress):
        img, lab = orig(i)
        preds[i] = run.segment(img)
        seg_rows.append(((names[i],), dice_per_class(preds[i], lab, structures)))
    pairs = [(i, j) for i in lab_idx for j in lab_idx if i != j][:max_pairs]
    reg_rows, base_rows, refined_rows, example = [], [], [], None
    folds, seconds = {"reg": [], "reg_refined": []}, {"reg": [], "reg_refined": []}
    for i, j in tqdm(pairs, desc="register", disable=not progress):
        (mi, ml), (ti, tl) = orig(i), orig(j)
        base_rows.append(((names[i], names[j]), dice_per_class(ml, tl, structures)))
        for key, rows, n in (("reg", reg_rows, 0), ("reg_refined", refined_rows, refine)):
            if key == "reg_refined" and not refine.iterations:
                continue
            t0 = time.perf_counter()
            res = run.register(mi, ti, ml, refine=n)
            seconds[key].append(time.perf_counter() - t0)
            fold = folding_fraction(res["disp"])
            folds[key].append(fold)
            rows.append(((names[i], names[j], f"{fold:.6f}"), dice_per_class(res["warped_labels"], tl, structures)))
            if example is None:
                example = (i, j, res)

    copy_rows, atlas_rows, fused_rows, net_atlas_rows = [], [], [], []
    if atlases:
        atlas_ds = VolumeDataset(read_data({"training": atlases})["training"], run.prep, resample=resample,
                                 cache=False, ref=ds.ref)
        if not all(atlas_ds.labelled):
            raise DataError("atlases: every atlas needs a label map")
        pairs_ = [atlas_ds.load_original(a)[:2] for a in range(len(atlas_ds))]
        for (aimg, alab), aname in zip(tqdm(pairs_, desc="atlas", disable=not progress), atlas_ds.names()):
            for i in lab_idx:
                img, lab = orig(i)
                copy_rows.append(((aname, names[i]), dice_per_class(alab, lab, structures)))
                warped = run.register(aimg, img, alab)["warped_labels"]
                atlas_rows.append(((aname, names[i]), dice_per_class(warped, lab, structures)))
        for i in tqdm(lab_idx, desc="multi-atlas", disable=not progress):
            img, lab = orig(i)
            disps = [run.displacement(aimg, img, refine=refine) for aimg, _ in pairs_]
            for key, rows in (("atlas", fused_rows), ("net+atlas", net_atlas_rows)):
                pred = segment_with_atlases(run, img, pairs_, fuse=key, weighting=weighting, disps=disps)
                rows.append(((names[i],), dice_per_class(pred, lab, structures)))
        _write_csv(out_dir / "dice_atlas_copy.csv", ["atlas", "image"], copy_rows, structures)
        _write_csv(out_dir / "dice_atlas_reg.csv", ["atlas", "image"], atlas_rows, structures)
        _write_csv(out_dir / "dice_atlas_fused.csv", ["image"], fused_rows, structures)
        _write_csv(out_dir / "dice_net_atlas.csv", ["image"], net_atlas_rows, structures)

    _write_csv(out_dir / "dice_seg.csv", ["image"], seg_rows, structures)
    _write_csv(out_dir / "dice_reg.csv", ["moving", "target", "folding_fraction"], reg_rows, structures)
    _write_csv(out_dir / "dice_unregistered.csv", ["moving", "target"], base_rows, structures)
    if refine.iterations:
        _write_csv(out_dir / "dice_reg_refined.csv", ["moving", "target", "folding_fraction"], refined_rows, structures)
    summary = {"split": split, "run": run.source, "structures": structures,
               "seg": _summary(seg_rows, structures), "reg": _summary(reg_rows, structures),
               "unregistered": _summary(base_rows, structures)}
    if atlases:
        summary["atlas_copy"] = _summary(copy_rows, structures)
        summary["atlas_reg"] = _summary(atlas_rows, structures)
        summary["atlas_fused"] = _summary(fused_rows, structures)
        summary["net_atlas"] = _summary(net_atlas_rows, structures)
    if refine.iterations:
        summary["reg_refined"] = _summary(refined_rows, structures)
        summary["refine"] = refine.to_dict()
    for key in ("reg", "reg_refined"):
        if summary.get(key) is not None:
            summary[key]["folding_fraction"] = float(np.mean(folds[key]))
            summary[key]["seconds_per_pair"] = float(np.mean(seconds[key]))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    if figures:
        from ..training.figures import plot_dice, plot_registration, plot_segmentation
        if lab_idx:
            i = lab_idx[0]
            plot_segmentation(orig(i)[0], orig(i)[1], preds[i], out_dir / "seg_example.png", title=names[i])
        if example is not None:
            i, j, res = example
            plot_registration(orig(i)[0], orig(j)[0], res["warped"], res["disp"], out_dir / "reg_example.png",
                              orig(i)[1], orig(j)[1], res["warped_labels"], title=f"{names[i]} -> {names[j]}")
        per = {}
        for key, rows in (("seg", seg_rows), ("unregistered", base_rows), ("reg", reg_rows),
                          ("reg_refined", refined_rows)):
            if rows:
                arr = np.array([d for _, d in rows])
                per[key] = {str(s): arr[:, k].tolist() for k, s in enumerate(structures)}
        if per:
            plot_dice(per, out_dir / "dice_per_structure.png")
    return summary
