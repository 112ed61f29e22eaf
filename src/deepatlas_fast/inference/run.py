"""Python API: load a trained run, segment and register arrays or NIfTI files.

    from deepatlas_fast.inference import load_run
    run = load_run("runs/brain")                      # latest checkpoint of the run
    run.segment_file("sub.nii.gz", "sub_seg.nii.gz")  # original label values, input affine
    out = run.register_file("mov.nii.gz", "tgt.nii.gz", "warped.nii.gz",
                            labels="mov_seg.nii.gz", labels_out="warped_seg.nii.gz", disp_out="disp.nii.gz")

Arrays: ``run.segment(image)`` -> label map; ``run.register(moving, target, moving_labels=None)`` ->
dict(warped, disp, warped_labels). ``disp`` is [3, D, H, W] in voxels of the input grid, (i, j, k)
order: the moving image is sampled at x + disp(x).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import DataError, DeepAtlasError, DeepAtlasWarning
from ..data.io import load_header, load_nifti, save_nifti
from ..nn.nets import build_nets
from ..ops import warp
from ..data.preprocess import Preprocessing, resample
from ..training.checkpoint import latest_checkpoint, load_checkpoint
from ..training.refine import RefineSettings, refine as refine_field


class Run:
    """The trained nets of a run plus its pre/post-processing."""

    def __init__(self, ckpt: dict, *, device="cpu", source: str = "?"):
        self.config = json.loads(ckpt["config"])
        self.prep = Preprocessing.from_dict(json.loads(ckpt["preprocessing"]))
        self.device = resolve_device(device)
        self.reg_net, self.seg_net = build_nets(self.config["model"], self.prep.num_classes)
        self.reg_net.load_state_dict(ckpt["reg"])
        self.seg_net.load_state_dict(ckpt["seg"])
        for net in (self.reg_net, self.seg_net):
            net.to(self.device).eval()
        self.stage, self.step, self.completed = ckpt["stage"], ckpt["stage_step"], ckpt["completed"]
        self.source = source

    @property
    def labels(self):
        return self.prep.labels

    def _check_spacing(self, spacing, name):
        ref = self.prep.spacing
        if ref is not None and spacing is not None and not np.allclose(spacing, ref, rtol=0.05):
            warnings.warn(f"{name} has voxel size {tuple(round(s, 3) for s in spacing)} mm but the run was "
                          f"trained at {tuple(ref)} mm; resample it for reliable results", DeepAtlasWarning,
                          stacklevel=3)

    @torch.no_grad()
    def segment(self, image: np.ndarray, spacing=None) -> np.ndarray:
        """3D image -> label map (original label values) on the same grid.

        ``spacing``: the image's voxel size (mm). If it differs from the training voxel size
        (by more than 5 %), the image is resampled to the training voxel size (trilinear, same
        field of view), segmented there, and the class probabilities resampled back before the
        argmax. Without it the image is assumed to have the training voxel size."""
        shape = tuple(image.shape)
        work = self.prep.training_grid(shape, spacing)
        if work != shape:
            image = resample(torch.from_numpy(np.asarray(image, np.float32))[None, None], work)[0, 0].numpy()
        x = self.prep.image(image).to(self.device)
        return self.prep.logits_to_labels(self.seg_net(x).cpu(), work, out_shape=shape)

    @torch.no_grad()
    def displacement(self, moving: np.ndarray, target: np.ndarray, *, refine: int | RefineSettings | None = None,
                     net: bool = True, progress: bool = False) -> torch.Tensor:
        """F_R's displacement of ``moving`` onto ``target`` (one grid) -> [1, 3, D, H, W] (voxels, that grid).

        ``refine``: iterations per level of test-time refinement (the run config's ``refine``
        section gives the other settings), or full ``RefineSettings``; None or 0: F_R alone.
        ``net=False``: no F_R; the refinement starts from zero (pure optimisation)."""
        if moving.shape != target.shape:
            raise DataError(f"moving {moving.shape} and target {target.shape} must share one grid (pre-align them first)")
        settings = self.refine_settings(refine)
        if not net and settings.iterations == 0:
            raise DeepAtlasError("without the net (net=False / --no-net) the field comes from the refinement: "
                                 "give refine iterations > 0")
        m = self.prep.image(moving, name="moving").to(self.device)
        t = self.prep.image(target, name="target").to(self.device)
        u = self.reg_net(m, t) if net else None
        if settings.iterations > 0:
            u = refine_field(m, t, u, settings, progress=progress)
        return self.prep.disp_to_original(u.cpu(), moving.shape)

    @torch.no_grad()
    def register(self, moving: np.ndarray, target: np.ndarray, moving_labels: np.ndarray | None = None, *,
                 refine: int | RefineSettings | None = None, net: bool = True, progress: bool = False) -> dict:
        """Warp ``moving`` onto ``target`` (same grid). Returns warped (moving's intensities),
        disp [3, D, H, W] (voxels, original grid) and warped_labels (original values) if labels given.
        ``refine`` and ``net``: see ``displacement``."""
        if moving_labels is not None and moving_labels.shape != moving.shape:
            raise DataError(f"moving labels {moving_labels.shape} and moving image {moving.shape} differ in shape")
        disp = self.displacement(moving, target, refine=refine, net=net, progress=progress)
        out = {"disp": disp[0].numpy(),
               "warped": warp(torch.from_numpy(np.asarray(moving, np.float32))[None, None], disp)[0, 0].numpy()}
        if moving_labels is not None:
            cls = torch.from_numpy(self.labels.to_classes(np.asarray(moving_labels), name="moving labels"))
            wl = warp(cls[None, None].float(), disp, mode="nearest")[0, 0].round().long()
            out["warped_labels"] = self.labels.to_values(wl.numpy())
        return out

    @torch.no_grad()
    def class_probabilities(self, image: np.ndarray):
        """F_S's softmax on the image's grid, one class volume [D, H, W] at a time (a generator)."""
        probs = self.seg_net(self.prep.image(image).to(self.device)).cpu().softmax(1)
        for c in range(probs.shape[1]):
            yield self.prep.upsample(probs[:, c:c + 1], image.shape)[0, 0]

    def segment_atlas(self, image: np.ndarray, atlases, *, fuse: str = "atlas", weighting: str = "mean",
                      refine: int | RefineSettings | None = None, progress: bool = False) -> np.ndarray:
        """Multi-atlas segmentation through F_R (see ``inference.atlas``): ``atlases`` are
        (image, label map) pairs on the image's grid; labels in original values."""
        from .atlas import segment_with_atlases
        return segment_with_atlases(self, image, atlases, fuse=fuse, weighting=weighting, refine=refine,
                                    progress=progress)

    def refine_settings(self, refine: int | RefineSettings | None, overrides=()) -> RefineSettings:
        """The run config's ``refine`` section with ``refine`` iterations (or the given settings);
        ``overrides``: ``["refine.lambda_r=1", ...]`` applied to that section first."""
        if isinstance(refine, RefineSettings):
            return refine
        section = dict(self.config.get("refine") or {})
        if overrides:
            from ..training.config import apply_overrides, default_config
            bad = [o for o in overrides if not str(o).startswith("refine.")]
            if bad:
                raise DeepAtlasError(f"--set: only refine.* settings can change after training, got {bad}")
            cfg = {"refine": {**default_config()["refine"], **section}}
            apply_overrides(cfg, overrides)
            section = cfg["refine"]
        return RefineSettings.from_dict(section, iterations=refine if refine is not None else 0)

    # -- files
    def segment_file(self, image_path, out_path) -> Path:
        """Labels on the image's own grid, written with its affine; an image of another voxel
        size than the training images is resampled for the net (see ``segment``)."""
        img, affine = load_nifti(image_path)
        spacing = load_header(image_path)[2]
        work = self.prep.training_grid(img.shape, spacing)
        if work != tuple(img.shape):
            print(f"{image_path}: voxel size {tuple(round(float(s), 3) for s in spacing)} mm, the run was trained "
                  f"at {tuple(self.prep.spacing)} mm: segmenting it resampled to {work} voxels", file=sys.stderr)
        return save_nifti(out_path, self.segment(img, spacing), affine)

    def segment_atlas_file(self, image_path, out_path, atlases, *, fuse="atlas", weighting="mean", refine=None,
                           progress=False) -> Path:
        """``segment_atlas`` of NIfTI files: ``atlases`` [(image path, label path), ...], each on the
        image's grid (shape and affine); the labels are written with the image's affine."""
        img, affine = load_nifti(image_path)
        self._check_spacing(load_header(image_path)[2], image_path)
        if not atlases:
            raise DataError("no atlas given: pass at least one (image, label map) pair")
        arrays = []
        for apath, lpath in atlases:
            aimg, aaff = load_nifti(apath)
            alab, laff = load_nifti(lpath, label=True)
            for path, arr, aff in ((apath, aimg, aaff), (lpath, alab, laff)):
                if arr.shape != img.shape or not np.allclose(aff, affine, atol=1e-3):
                    raise DataError(f"atlas {path}: not on the grid of {image_path} (shape {arr.shape} vs {img.shape}, "
                                    "or another affine); pre-align/resample the atlas onto the image first")
            self.labels.to_classes(alab, name=f"atlas {lpath}")  # values outside the run's table: named here
            arrays.append((aimg, alab))
        self.refine_settings(refine)  # bad settings fail before any work
        return save_nifti(out_path, self.segment_atlas(img, arrays, fuse=fuse, weighting=weighting, refine=refine,
                                                       progress=progress), affine)

    def register_file(self, moving_path, target_path, out_path, *, labels=None, labels_out=None, disp_out=None,
                      refine=None, net=True, progress=False) -> dict:
        mov, maff = load_nifti(moving_path)
        tgt, taff = load_nifti(target_path)
        if mov.shape != tgt.shape or not np.allclose(maff, taff, atol=1e-3):
            raise DataError(f"{moving_path} and {target_path} must share one grid (shape and affine); "
                             "pre-align/resample the moving image onto the target first")
        self._check_spacing(load_header(target_path)[2], target_path)
        lab = None
        if labels is not None:
            lab, laff = load_nifti(labels, label=True)
            if lab.shape != mov.shape or not np.allclose(laff, maff, atol=1e-3):
                raise DataError(f"{labels}: not on the grid of the moving image {moving_path} (shape {lab.shape} vs "
                                f"{mov.shape}, or another affine)")
        settings = self.refine_settings(refine)  # bad settings fail before any work
        res = self.register(mov, tgt, lab, refine=settings, net=net, progress=progress)
        # the warped moving image lives on the target grid: write it with the target's affine
        save_nifti(out_path, res["warped"], taff, dtype=np.float32)
        if labels_out is not None:
            if lab is None:
                raise DeepAtlasError("labels_out needs labels (the moving image's label map)")
            save_nifti(labels_out, res["warped_labels"], taff)
        if disp_out is not None:
            save_nifti(disp_out, np.moveaxis(res["disp"], 0, -1).astype(np.float32), taff)
        return res


def load_run(run_dir, *, device="cpu", checkpoint=None) -> Run:
    """Latest checkpoint of ``run_dir`` (or the given checkpoint file) -> Run."""
    if checkpoint is not None:
        try:
            ckpt, src = load_checkpoint(checkpoint), str(checkpoint)
        except (DeepAtlasError, FileNotFoundError):
            raise
        except Exception as e:  # torch.load's many failure types for a damaged or foreign file
            raise DataError(f"{checkpoint}: cannot read this checkpoint ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no details'})") from None
    else:
        path, ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint found (is this a deepatlas-fast run directory?)")
        src = str(path)
    return Run(ckpt, device=device, source=src)
