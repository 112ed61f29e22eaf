"""PNG figures (matplotlib, Agg backend): training curves, label overlays, registration, Dice."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers/CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_curves(metrics_path, out_path):
    """Losses (and validation Dice, if logged) against the global step, one panel per quantity."""
    recs = []
    for line in Path(metrics_path).read_text().splitlines() if Path(metrics_path).is_file() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    keys = sorted({k for r in recs for k in r if k.startswith(("L_", "loss_", "val_"))})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for stage in dict.fromkeys(r["stage"] for r in recs):
            pts = [(r["global_step"], r[k]) for r in recs if r["stage"] == stage and k in r]
            if pts:
                ax.plot(*zip(*pts), ".-", ms=3, label=stage)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, out_path)


def _slices(vol):
    c = [s // 2 for s in vol.shape]
    return [vol[c[0]], vol[:, c[1]], vol[:, :, c[2]]]


def _overlay(ax, img, lab=None, title=""):
    # transposed with origin="lower": voxel [i, j] is drawn at (x=i, y=j), the frame the grid uses
    ax.imshow(img.T, cmap="gray", origin="lower")
    if lab is not None:
        masked = np.ma.masked_equal(lab.T, 0)
        ax.imshow(masked % 20, cmap="tab20", alpha=0.45, vmin=0, vmax=19, interpolation="nearest", origin="lower")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_segmentation(image, truth, pred, out_path, title=""):
    """Three orthogonal slices: image, manual labels, prediction."""
    fig, axes = plt.subplots(3, 3, figsize=(8, 8))
    for r, (im, gt, pr) in enumerate(zip(_slices(image), _slices(truth) if truth is not None else [None] * 3,
                                         _slices(pred))):
        _overlay(axes[r, 0], im, None, "image")
        _overlay(axes[r, 1], im, gt, "manual labels" if gt is not None else "no labels")
        _overlay(axes[r, 2], im, pr, "F_S prediction")
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_path)


def _grid_lines(ax, disp2d, step=4):
    """Deformed grid x + u(x) of one slice; ``disp2d``: [2, A, B] in-plane displacement (voxels)."""
    A, B = disp2d.shape[1:]
    ii, jj = np.meshgrid(np.arange(A), np.arange(B), indexing="ij")
    px, py = ii + disp2d[0], jj + disp2d[1]
    for i in range(0, A, step):
        ax.plot(px[i], py[i], "k-", lw=0.5)
    for j in range(0, B, step):
        ax.plot(px[:, j], py[:, j], "k-", lw=0.5)
    ax.set_xlim(0, A - 1)
    ax.set_ylim(0, B - 1)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_registration(moving, target, warped, disp, out_path, moving_labels=None, target_labels=None,
                      warped_labels=None, title=""):
    """Middle axial-ish slice (last axis): moving, target, warped moving, |warped - target|, deformation grid."""
    k = moving.shape[2] // 2
    fig, axes = plt.subplots(2 if target_labels is not None else 1, 5, figsize=(14, 6 if target_labels is not None else 3),
                             squeeze=False)
    sl = lambda v: None if v is None else v[:, :, k]  # noqa: E731
    _overlay(axes[0, 0], sl(moving), None, "moving")
    _overlay(axes[0, 1], sl(target), None, "target")
    _overlay(axes[0, 2], sl(warped), None, "warped moving")
    axes[0, 3].imshow(np.abs(sl(warped) - sl(target)).T, cmap="magma", origin="lower")
    axes[0, 3].set_title("|warped - target|", fontsize=8)
    axes[0, 3].axis("off")
    _grid_lines(axes[0, 4], disp[:2, :, :, k], step=max(2, min(moving.shape[:2]) // 24))
    axes[0, 4].set_title("deformation grid", fontsize=8)
    if target_labels is not None:
        _overlay(axes[1, 0], sl(moving), sl(moving_labels), "moving labels")
        _overlay(axes[1, 1], sl(target), sl(target_labels), "target labels")
        _overlay(axes[1, 2], sl(target), sl(warped_labels), "warped moving labels")
        for ax in axes[1, 3:]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_path)


def plot_dice(per_structure: dict, out_path, title="Dice per structure"):
    """Box plot per structure; ``per_structure``: {method: {structure: [dice values]}}."""
    methods = list(per_structure)
    structs = sorted({s for m in methods for s in per_structure[m]}, key=lambda s: int(s))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(structs) * max(1, len(methods))), 3.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        data = [[v for v in per_structure[m].get(s, []) if np.isfinite(v)] or [np.nan] for s in structs]
        pos = np.arange(len(structs)) + (i - (len(methods) - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for b in bp["boxes"]:
            b.set_facecolor(f"C{i}")
        ax.plot([], [], "s", color=f"C{i}", label=m)
    ax.set_xticks(np.arange(len(structs)))
    ax.set_xticklabels([str(s) for s in structs], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_xlabel("structure (label value)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_path)
