"""End-to-end DeepAtlas demo on the shipped brain set, one-shot, offline.

    deepatlas-fast demo [--quick | --long] [--out DIR]
    from deepatlas_fast.demo import run_demo; table = run_demo("demo_out", quick=True)

One labelled training image (the real brain ``oasis_a``) and 15 unlabelled ones; held-out test
images: the real labelled brain ``oasis_b`` and 4 synthetic subjects (see demo_data/CREDITS.md).
Steps: supervised segmentation pretraining, unsupervised registration pretraining, Semi-DA
(each net trained with the other frozen), DA (alternating), then evaluation on the test split
and a report folder (``DIR/report/report.md`` with its PNG figures; ``DIR/results.json``).

Rows of the table: no registration (affine only: the shipped set is affinely aligned),
registration and segmentation baselines (the pretrained nets), Semi-DA and DA. Columns: mean
Dice over the labelled structures (mean of per-image / per-pair means), its standard deviation
over test images (segmentation) or ordered test pairs (registration), folding fraction
(share of voxels with Jacobian determinant <= 0).
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .demo_data import datalist_path

# Training runs at 4 mm (the shipped 2 mm set pooled by 2) so a 2-core CPU finishes in minutes;
# evaluation is on the 2 mm grid. LNCC window 5 at 4 mm spans ~20 mm, like 9 voxels at 2 mm.
# F_S: InstanceNorm, not BatchNorm. With batch 1, BatchNorm in train mode *is* instance
# normalisation, but in eval mode it uses running statistics gathered on the one labelled image,
# which do not fit the other subjects (measured: validation Dice 0.255/0.103 with BatchNorm in eval
# mode vs 0.286/0.197 with the same weights normalised per image). F_S's supervised pretraining
# (stage "seg", soft Dice on one image, 27 structures) needs lr 1e-2: at 1e-3 it barely moves in a
# few hundred steps (L_sp 0.99 -> 0.90 in 200 steps, Dice ~0.1). The other stages keep lr 1e-3
# (they fine-tune F_S and train F_R, whose unsupervised pretraining is fine at 1e-3).
# Known limit, left as is: L_sp is soft Dice without the background class, so F_S's background
# is never supervised and a class whose probability collapses early gets no gradient back; at
# 1000 steps 6 of the 27 structures are never predicted even on the training image, and 8 of 27
# have Dice < 0.011 on every test image, which caps the mean at 19/27 = 0.70 (see the README).
_COMMON = ["data.downsample=2", "loss.window=5", "train.lr=1e-3", "train.k_reg=5", "train.k_seg=1",
           "model.seg_norm=instance", "train.checkpoint_every=1000", "train.log_every=10"]
FULL = {
    "overrides": _COMMON,
    "stage_overrides": {"seg": ["train.lr=1e-2"]},
    "steps": {"seg": 400, "reg": 250, "semi-da": 50, "da": 180},
    "max_pairs": 20, "n_test": None, "n_train": None,
}
# --long: the README's experiment table; the same settings as FULL, 2-2.5x the steps.
LONG = {
    "overrides": _COMMON,
    "stage_overrides": {"seg": ["train.lr=1e-2"]},
    "steps": {"seg": 1000, "reg": 500, "semi-da": 100, "da": 420},
    "max_pairs": 20, "n_test": None, "n_train": None,
}
# --quick checks the pipeline end to end (8 mm, small nets, a few steps); its numbers mean little.
QUICK = {
    "overrides": ["data.downsample=4", "loss.window=3", "train.lr=1e-3", "train.k_reg=3", "train.k_seg=1",
                  "model.reg_enc=[8,16,16,16,16]", "model.reg_dec=[16,16,16,8,8]", "model.seg_enc=[8,8,16,16]",
                  "model.seg_norm=instance", "train.checkpoint_every=1000", "train.log_every=2"],
    "stage_overrides": {"seg": ["train.lr=1e-2"]},
    "steps": {"seg": 8, "reg": 8, "semi-da": 4, "da": 8},
    "max_pairs": 2, "n_test": 2, "n_train": 5,
}
PRESETS = {"full": FULL, "long": LONG, "quick": QUICK}
ROWS = [  # (row name, run, kind)
    ("no registration (affine only)", "pretrained", "unregistered"),
    ("registration baseline (unsupervised)", "pretrained", "reg"),
    ("segmentation baseline (1 labelled image)", "pretrained", "seg"),
    ("Semi-DA (seg)", "semi-da-seg", "seg"),
    ("Semi-DA (reg)", "semi-da-reg", "reg"),
    ("DA (seg)", "da", "seg"),
    ("DA (reg)", "da", "reg"),
]
_CSV = {"seg": "dice_seg.csv", "reg": "dice_reg.csv", "unregistered": "dice_unregistered.csv"}


def _data(n_train, n_test) -> dict:
    """The shipped datalist with absolute paths, optionally trimmed (quick mode)."""
    path = datalist_path()
    raw = json.loads(path.read_text())
    out = {}
    for split in ("training", "validation", "test"):
        items = raw.get(split, [])
        n = {"training": n_train, "test": n_test}.get(split)
        items = items[:n] if n else items
        out[split] = [{k: str(path.parent / v) for k, v in e.items()} for e in items]
    out["validation"] = []  # validation Dice during training is off in the demo
    return out


def _row_stats(csv_path: Path):
    """Mean and std over rows of the per-row mean Dice."""
    with open(csv_path) as f:
        vals = [float(r["mean"]) for r in csv.DictReader(f) if r["mean"]]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (float("nan"), float("nan"), 0)


def format_table(rows) -> str:
    lines = ["| method | mean Dice | std over test images / pairs | folding fraction |",
             "|---|---|---|---|"]
    for r in rows:
        fold = "" if r["folding"] is None else f"{r['folding']:.5f}"
        lines.append(f"| {r['method']} | {r['mean']:.3f} | {r['std']:.3f} (n={r['n']}) | {fold} |")
    return "\n".join(lines)


def run_demo(out_dir="deepatlas_demo", *, quick: bool = False, long: bool = False, progress: bool = True) -> list:
    """Train and evaluate the one-shot demo; writes ``out_dir``; returns the table rows.

    quick: the ~2 minute pipeline check; long: the README table's run (2-2.5x the steps)."""
    from .evaluate import evaluate
    from .train import train
    if quick and long:
        raise ValueError("run_demo: quick and long are exclusive")
    preset_name = "quick" if quick else "long" if long else "full"
    preset = PRESETS[preset_name]
    out = Path(out_dir)
    if (out / "runs").exists():
        raise FileExistsError(f"{out} already holds a demo run; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    data = _data(preset["n_train"], preset["n_test"])
    ov = preset["overrides"] + [f"train.steps.{k}={v}" for k, v in preset["steps"].items()]
    runs, times = {}, {}

    def stage(name, st, init=None, extra=()):
        t0 = time.time()
        if progress:
            print(f"== {name}: stage {st}" + (f", initialised from {Path(init).name}" if init else ""))
        ov_stage = ov + list(preset.get("stage_overrides", {}).get(name, [])) + list(extra)
        runs[name] = train(None, data, out / "runs" / name, stage=st, init=init, overrides=ov_stage,
                           progress=progress)
        times[name] = time.time() - t0

    t_start = time.time()
    stage("seg", "seg")                                  # F_S on the one labelled image
    stage("pretrained", "reg", init=runs["seg"])        # + F_R unsupervised: both nets pretrained
    stage("semi-da-seg", "semi-da", init=runs["pretrained"], extra=["train.semi_da_train=seg"])
    stage("semi-da-reg", "semi-da", init=runs["pretrained"], extra=["train.semi_da_train=reg"])
    stage("da", "da", init=runs["pretrained"])

    evals = {}
    for name in ("pretrained", "semi-da-seg", "semi-da-reg", "da"):
        t0 = time.time()
        evals[name] = out / "eval" / name
        evaluate(runs[name], data, split="test", out_dir=evals[name], max_pairs=preset["max_pairs"],
                 figures=name in ("pretrained", "da"), progress=progress)
        times[f"eval {name}"] = time.time() - t0

    rows = []
    for method, run, kind in ROWS:
        mean, std, n = _row_stats(evals[run] / _CSV[kind])
        folding = None
        if kind == "reg":
            summary = json.loads((evals[run] / "summary.json").read_text())
            folding = summary["reg"]["folding_fraction"]
        elif kind == "unregistered":
            folding = 0.0
        rows.append({"method": method, "mean": mean, "std": std, "n": n, "folding": folding})
    total = time.time() - t_start
    _write_report(out, rows, runs, evals, times, total, quick, preset_name)
    table = format_table(rows)
    print("\n" + table)
    print(f"\nreport: {out / 'report' / 'report.md'} ({total / 60:.1f} min)")
    return rows


def _write_report(out: Path, rows, runs, evals, times, total, quick, preset_name="full"):
    rep = out / "report"
    rep.mkdir(exist_ok=True)
    figs = []
    for src, dst, caption in [
        (runs["pretrained"] / "curves.png", "curves_pretraining_reg.png", "Registration pretraining curves"),
        (runs["seg"] / "curves.png", "curves_pretraining_seg.png", "Segmentation pretraining curves"),
        (runs["da"] / "curves.png", "curves_da.png", "DA training curves"),
        (evals["da"] / "seg_example.png", "da_segmentation.png", "DA segmentation of a test image (label overlays)"),
        (evals["da"] / "reg_example.png", "da_registration.png", "DA registration of a test pair: warped image, deformation grid"),
        (evals["da"] / "dice_per_structure.png", "da_dice_per_structure.png", "Dice per structure (DA)"),
        (evals["pretrained"] / "dice_per_structure.png", "baseline_dice_per_structure.png", "Dice per structure (baselines)"),
    ]:
        if Path(src).is_file():
            shutil.copyfile(src, rep / dst)
            figs.append((dst, caption))
    cfg = json.loads((Path(runs["da"]) / "config.json").read_text())
    seg_lr = json.loads((Path(runs["seg"]) / "config.json").read_text())["train"]["lr"]
    md = [f"# DeepAtlas one-shot demo{' (--quick: pipeline check, not a result)' if quick else ''}", "",
          "Training: one labelled image (oasis_a), the other training images unlabelled. "
          "Test: oasis_b (real) and synthetic subjects, all labelled; registration Dice over ordered test pairs. "
          "Mean Dice over the labelled structures of demo_data (27 FreeSurfer structures).", "",
          format_table(rows), "",
          f"Total time {total / 60:.1f} min. Steps: {json.dumps(cfg['train']['steps'])}, "
          f"k_reg:k_seg = {cfg['train']['k_reg']}:{cfg['train']['k_seg']}, "
          f"downsample {cfg['data']['downsample']}, lr {cfg['train']['lr']} "
          f"(segmentation pretraining: {seg_lr}), F_S normalisation {cfg['model']['seg_norm']}, "
          f"preset {preset_name}.", "",
          "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()] + [""]
    for f, caption in figs:
        md += [f"## {caption}", "", f"![{caption}]({f})", ""]
    (rep / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": times, "total_seconds": total,
                                                  "quick": quick, "preset": preset_name}, indent=2) + "\n")
