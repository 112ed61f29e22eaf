"""DeepAtlas training: stages seg, reg, semi-da, da and all (= seg -> reg -> da).

Python::

    from deepatlas_fast.training import train
    run_dir = train("config.yaml", "datalist.json", "runs/brain", stage="all",
                    overrides=["train.steps.da=500", "data.downsample=2"])

Losses (weights in ``config["loss"]``), for a pair (moving m, target t), u = F_R(m, t):

- registration step (trains F_R): L_i(m o u, t) + lambda_r |grad u|^2 + lambda_a L_a, where
  L_a = 1 - soft Dice(S_m o u, S_t), S = one-hot manual labels, or F_S's softmax where an image is
  unlabelled (stages semi-da/da only; in stage ``reg`` L_a needs both images labelled);
- segmentation step (trains F_S, F_R frozen): lambda_sp (1 - Dice(F_S, manual labels)) on the
  labelled images of the pair + lambda_a L_a if exactly one image is labelled (both labelled: L_a
  does not depend on F_S; both unlabelled: no F_S loss, so such pairs are not drawn).
- stage ``seg``: lambda_sp (1 - Dice) on labelled images only.

Stage ``da`` alternates ``k_reg`` registration steps and ``k_seg`` segmentation steps;
``semi-da`` trains ``train.semi_da_train`` with the other net frozen.

Run directory (RUN_DIR)::

    config.json          resolved config (defaults <- --config file <- --set overrides)
    run.json             {"plan": [stages], "data": datalist/folder used, "version": package version}
    preprocessing.json   label table (original values of classes 0..C-1), intensity percentiles,
                         downsampling factor, pad multiple, training spacing, shape and affine
                         (see data/preprocess.py)
    checkpoints/ckpt-GGGGGGGG.pt   G = global step over the plan; written atomically (temp + rename);
                         keys: format, plan, stage, stage_step, global_step, completed (stages done),
                         reg, seg (state dicts), optim, sched (per trained net), rng, config and
                         preprocessing (JSON strings: a checkpoint alone rebuilds the nets)
    metrics.jsonl        one JSON object per log line: stage, step, global_step, time, losses, val Dice
    curves.png           training curves
    eval/                written by ``deepatlas-fast evaluate`` (see inference/evaluation.py)

A new run starts only in an empty or new RUN_DIR (``overwrite=True`` removes an earlier run's
files first, see run_folder.py). Checkpoints load with ``torch.load(weights_only=True)``.
``resume=True`` continues from the latest checkpoint exactly: each step draws its pairs from a
generator seeded by (seed, stage, step, rank), so the resumed run sees the same data as an
uninterrupted one. A resume that would change the nets, the preprocessing, the optimiser state
of the stage in progress or the data's grid is refused before the folder is written.

Multi-process: launch with ``torchrun --nproc_per_node N -m deepatlas_fast.cli train ...``; each
process trains on ``train.batch_size`` pairs of a global batch drawn identically on all ranks,
gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA), rank 0 writes.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import __version__
from ..devices import resolve_device
from ..errors import ConfigError, DataError, DeepAtlasError, DeepAtlasWarning
from .checkpoint import (CKPT_FORMAT, atomic_write_text, latest_checkpoint, rng_state, save_checkpoint,
                         set_rng_state, temp_files)
from .config import DEFAULTS, STAGES, load_config, merge, save_config, validate
from .run_folder import check_new_run_folder, clear_run, read_run_info
from .metrics import dice_per_class
from ..data.datasets import PairSampler, VolumeDataset, check_grids, infer_label_table, read_data
from ..data.io import LabelTable
from ..data.augment import Augmenter, lr_axis_of, match_class_intensities
from ..nn.losses import dice_loss, gradient_l2, lncc_loss, ncc_loss, one_hot, segmentation_loss
from ..nn.nets import build_nets
from ..nn.precision import autocast
from ..ops import warp
from ..data.preprocess import Preprocessing

PLANS = {"all": ["seg", "reg", "da"], "seg": ["seg"], "reg": ["reg"], "semi-da": ["semi-da"], "da": ["da"]}


# ---------------------------------------------------------------------------------------------
def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    s = np.random.SeedSequence([seed, STAGES.index(stage), step]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(s))


def make_scheduler(opt, kind: str, n_steps: int, period: int):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_steps))
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=period, gamma=0.5)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def stage_schedule(stage: str, cfg: dict) -> list:
    """The net trained at each step of ``stage`` ("reg" or "seg")."""
    t = cfg["train"]
    n = t["steps"].get(stage, 0)
    if stage == "seg":
        return ["seg"] * n
    if stage == "reg":
        return ["reg"] * n
    if stage == "semi-da":
        return [t["semi_da_train"]] * n
    cycle = ["reg"] * t["k_reg"] + ["seg"] * t["k_seg"]
    return [cycle[i % len(cycle)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: dict, prep: Preprocessing, train_ds: VolumeDataset, val_ds, run_dir: Path,
                 *, progress: bool = True):
        self.cfg, self.prep, self.ds, self.val_ds = cfg, prep, train_ds, val_ds
        self.run_dir = Path(run_dir)
        self.rank, self.world = _dist_info()
        self.device = resolve_device(cfg["device"])
        self.progress = progress and self.rank == 0
        torch.manual_seed(cfg["seed"])
        self.C = prep.num_classes
        reg, seg = build_nets(cfg["model"], self.C)
        self.nets = {"reg": reg.to(self.device), "seg": seg.to(self.device)}
        lab = [i for i, f in enumerate(train_ds.labelled) if f]
        if lab:  # weights loaded later (init, resume) replace this
            counts = sum(torch.bincount(train_ds[i][1].flatten(), minlength=self.C) for i in lab)
            seg.init_class_prior(counts.float() / counts.sum())
        self.sampler = PairSampler(train_ds.labelled, cfg["data"]["pairs"])
        self.augment = None
        if cfg["augment"]["enabled"]:
            shape, affine = train_ds.ref[0], train_ds.ref[1]
            f = prep.downsample
            spacing = prep.spacing or (1.0, 1.0, 1.0)
            self.augment = Augmenter(cfg["augment"], prep.label_values, voxel_mm=[s * f for s in spacing],
                                     data_shape=[-(-n // f) for n in shape], lr_axis=lr_axis_of(affine))
        self.completed = []
        self._last_plot = time.time()

    # -- helpers
    def _batch(self, idx):
        items = [self.ds[i] for i in idx]
        x = torch.stack([it[0] for it in items]).to(self.device)
        y = None if items[0][1] is None else torch.stack([it[1] for it in items]).to(self.device)
        return x, y

    def _similarity(self, a, b):
        lo = self.cfg["loss"]
        return lncc_loss(a, b, window=lo["window"]) if lo["similarity"] == "lncc" else ncc_loss(a, b)

    def _local(self, items):
        """This rank's slice of a global batch."""
        bs = self.cfg["train"]["batch_size"]
        return items[self.rank * bs:(self.rank + 1) * bs]

    # -- losses of one step; ``model`` is the (possibly DDP-wrapped) trained net
    def _seg_loss(self, logits, target, from_logits=True):
        lo = self.cfg["loss"]
        return segmentation_loss(logits, target, from_logits=from_logits, lambda_ce=lo["lambda_ce"],
                                 include_background=lo["include_background"])

    def _augment(self, gen, image, target):
        return (image, target) if self.augment is None else self.augment(gen, image, target)

    def seg_pretrain_step(self, model, gen):
        idx = self._local(self.sampler.sample_labelled(gen, self.cfg["train"]["batch_size"] * self.world))
        x, y = self._augment(gen, *self._batch(idx))
        lsp = self._seg_loss(model(x), y)
        return self.cfg["loss"]["lambda_sp"] * lsp, {"L_sp": lsp.item()}

    def reg_step(self, model, gen, use_seg: bool):
        lo = self.cfg["loss"]
        kind, pairs = self.sampler.sample(gen, self.cfg["train"]["batch_size"] * self.world)
        pairs = self._local(pairs)
        m, lm = self._batch([p[0] for p in pairs])
        t, lt = self._batch([p[1] for p in pairs])
        disp = model(m, t)
        li = self._similarity(warp(m, disp), t)
        lr = gradient_l2(disp)
        loss = li + lo["lambda_r"] * lr
        logs = {"L_i": li.item(), "L_r": lr.item()}
        if lo["lambda_a"] > 0:
            gamma = lo["anatomy_confidence"]
            scaled = gamma > 0 and (lm is None or lt is None)
            # manual target labels go to the Dice as integers (soft_dice reads them as one-hot)
            sm = self._seg_maps(m, lm, use_seg)
            st = lt if lt is not None and not scaled else self._seg_maps(t, lt, use_seg)
            if sm is not None and st is not None:
                wm = warp(sm, disp)
                if scaled:
                    # trust F_S where it is sure: both maps scaled by the confidence of the
                    # unlabelled side(s), on the target grid
                    with torch.no_grad():
                        conf = torch.ones_like(st[:, :1])
                        if lt is None:
                            conf = conf * st.amax(1, keepdim=True) ** gamma
                        if lm is None:
                            conf = conf * warp(sm.amax(1, keepdim=True), disp) ** gamma
                    wm, st = wm * conf, st * conf
                la = dice_loss(wm, st, include_background=lo["include_background"])
                loss = loss + lo["lambda_a"] * la
                logs["L_a"] = la.item()
        return loss, logs

    @torch.no_grad()
    def _seg_maps(self, x, labels, use_seg):
        """One-hot manual labels, else F_S's softmax (frozen) if allowed, else None."""
        if labels is not None:
            return one_hot(labels, self.C)
        if use_seg:
            return self.nets["seg"](x).softmax(1)
        return None

    def seg_step(self, model, gen):
        """F_S learns from the manual labels of the pair's labelled image(s) (L_sp) and, when one
        image is unlabelled, from the frozen F_R (L_a): for a labelled moving image (LU) the
        atlas labels warped onto the target are F_S's soft target there; for a labelled target
        (UL) F_S's prediction on the moving image, warped onto the target, is compared with the
        target's labels. Augmentation applies to every image whose target lives on its own grid
        (labelled images and LU targets), not to a UL moving image, whose prediction is warped
        by the displacement F_R computed on the clean image."""
        lo = self.cfg["loss"]
        kind, pairs = self.sampler.sample(gen, self.cfg["train"]["batch_size"] * self.world, allowed=("LL", "LU", "UL"))
        pairs = self._local(pairs)
        m, lm = self._batch([p[0] for p in pairs])
        t, lt = self._batch([p[1] for p in pairs])
        lambda_a = lo["lambda_a"] if lo["lambda_a_seg"] is None else lo["lambda_a_seg"]
        anatomy = kind != "LL" and lambda_a > 0
        mode = lo["seg_anatomy"]
        if anatomy:
            with torch.no_grad():
                disp = self.nets["reg"](m, t)
        # F_S's inputs and targets, in one batch: [(image, target, "sp" | "a")]
        if kind == "LL":
            parts = [(*self._augment(gen, m, lm), "sp"), (*self._augment(gen, t, lt), "sp")]
        elif kind == "LU":
            parts = [(*self._augment(gen, m, lm), "sp")]
            if anatomy and mode in ("unlabelled", "both"):
                parts.append((*self._augment(gen, t, warp(one_hot(lm, self.C), disp)), "a"))
        else:  # UL: the moving image's prediction is warped onto the (clean) labelled target
            parts = [(*self._augment(gen, t, lt), "sp")]
            if anatomy and mode in ("unlabelled", "both"):
                parts.append((m, None, "a"))
        if anatomy and mode in ("warped", "both"):
            (lab_img, lab), unl = ((m, lm), t) if kind == "LU" else ((t, lt), m)
            with torch.no_grad():
                d = disp if kind == "LU" else self.nets["reg"](lab_img, unl)
                soft = warp(one_hot(lab, self.C), d)
                synth = match_class_intensities(warp(lab_img, d), soft, unl).clamp_min(0)
            parts.append((*self._augment(gen, synth, soft), "w"))
        n = m.shape[0]
        logits = model(torch.cat([x for x, _, _ in parts]))  # one forward: DDP expects one per backward
        losses = {"sp": [], "a": [], "w": []}
        for i, (_, target, role) in enumerate(parts):
            out = logits[i * n:(i + 1) * n]
            if role == "a" and kind == "UL":
                losses[role].append(self._seg_loss(warp(out.softmax(1), disp), lt, from_logits=False))
            else:
                losses[role].append(self._seg_loss(out, target))
        lsp = sum(losses["sp"]) / len(losses["sp"])
        loss = lo["lambda_sp"] * lsp
        logs = {"L_sp": lsp.item()}
        la = losses["a"] + losses["w"]
        if la:
            la = sum(la) / len(la)
            loss = loss + lambda_a * la
            logs["L_a"] = la.item()
        return loss, logs

    # -- validation (rank 0, network grid)
    @torch.no_grad()
    def validate(self):
        ds = self.val_ds
        if ds is None or sum(ds.labelled) == 0:
            return {}
        reg, seg = self.nets["reg"], self.nets["seg"]
        was = reg.training, seg.training
        reg.eval(), seg.eval()
        lab = [i for i, f in enumerate(ds.labelled) if f]
        segd = []
        for i in lab:
            x, y = ds[i]
            pred = seg(x[None].to(self.device)).argmax(1)
            segd.append(np.nanmean(dice_per_class(pred[0].cpu(), y[0], range(1, self.C))))
        regd = []
        pairs = [(i, j) for i in lab for j in lab if i != j][: self.cfg["train"]["val_pairs"]]
        for i, j in pairs:
            (m, lm), (t, lt) = ds[i], ds[j]
            disp = reg(m[None].to(self.device), t[None].to(self.device))
            wl = warp(lm[None].float().to(self.device), disp, mode="nearest").long()
            regd.append(np.nanmean(dice_per_class(wl[0, 0].cpu(), lt[0], range(1, self.C))))
        reg.train(was[0]), seg.train(was[1])
        out = {"val_seg_dice": float(np.mean(segd))}
        if regd:
            out["val_reg_dice"] = float(np.mean(regd))
        return out

    # -- one stage
    def run_stage(self, stage: str, offset: int, start: int = 0, state=None):
        cfg, t = self.cfg, self.cfg["train"]
        sched_of = stage_schedule(stage, cfg)
        n = len(sched_of)
        trained = sorted(set(sched_of))
        opts, scheds, models = {}, {}, {}
        for name in trained:
            net = self.nets[name]
            opts[name] = torch.optim.Adam(net.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
            scheds[name] = make_scheduler(opts[name], t["lr_schedule"], sched_of.count(name), t["lr_step"])
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP
                models[name] = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            else:
                models[name] = net
        if state is not None:
            for name in trained:
                opts[name].load_state_dict(state["optim"][name])
                scheds[name].load_state_dict(state["sched"][name])
        window, t0 = {}, time.time()
        bar = tqdm(total=n, initial=start, desc=stage, disable=not self.progress, dynamic_ncols=True)
        for step in range(start, n):
            name = sched_of[step]
            for k, net in self.nets.items():  # the frozen net runs in eval mode (BatchNorm stats fixed)
                net.train(k == name)
            gen = _step_generator(cfg["seed"], stage, step)
            with autocast(t["precision"], self.device):  # the backward runs outside, as autocast wants
                if stage == "seg":
                    loss, logs = self.seg_pretrain_step(models[name], gen)
                elif name == "reg":
                    loss, logs = self.reg_step(models[name], gen, use_seg=stage in ("semi-da", "da"))
                else:
                    loss, logs = self.seg_step(models[name], gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{stage} step {step}: loss is {loss.item()}; lower train.lr or check the data")
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            scheds[name].step()
            logs[f"loss_{name}"] = loss.item()
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            done = step + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
            if self.rank == 0 and (done % t["log_every"] == 0 or done == n):
                rec = {"stage": stage, "step": done, "global_step": offset + done,
                       "time": round(time.time() - t0, 3), "lr": opts[name].param_groups[0]["lr"]}
                rec.update({k: float(np.mean(v)) for k, v in window.items()})
                if t["val_every"] and (done % t["val_every"] == 0 or done == n):
                    rec.update(self.validate())
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                window = {}
            if done % t["checkpoint_every"] == 0 or done == n:
                if done == n:
                    self.completed.append(stage)
                self.save(stage, done, offset, opts, scheds)
        bar.close()

    def save(self, stage, step, offset, opts, scheds):
        if self.rank != 0:
            return
        ckpt = {"format": CKPT_FORMAT, "plan": self.plan, "stage": stage, "stage_step": step,
                "global_step": offset + step, "completed": list(self.completed),
                "reg": self.nets["reg"].state_dict(), "seg": self.nets["seg"].state_dict(),
                "optim": {k: o.state_dict() for k, o in opts.items()},
                "sched": {k: s.state_dict() for k, s in scheds.items()},
                "rng": rng_state(), "config": json.dumps(self.cfg),
                "preprocessing": json.dumps(self.prep.to_dict())}
        save_checkpoint(self.run_dir, ckpt, keep=self.cfg["train"]["checkpoint_keep"])
        # plotting costs ~1 s: at the end of a stage, else at most once a minute
        if stage in self.completed or time.time() - self._last_plot > 60:
            self._last_plot = time.time()
            try:
                from .figures import plot_curves
                plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
            except Exception as e:  # a plotting problem must not stop training
                warnings.warn(f"could not plot training curves: {e}", DeepAtlasWarning, stacklevel=2)

    def fit(self, plan, resume_ckpt=None):
        self.plan = list(plan)
        offsets, acc = {}, 0
        for s in plan:
            offsets[s] = acc
            acc += self.cfg["train"]["steps"].get(s, 0)
        start, state = 0, None
        if resume_ckpt is not None:
            self.completed = list(resume_ckpt["completed"])
            set_rng_state(resume_ckpt["rng"])
            if resume_ckpt["stage"] not in self.completed:
                start, state = resume_ckpt["stage_step"], resume_ckpt
        for s in plan:
            if s in self.completed:
                continue
            if resume_ckpt is not None and s != resume_ckpt["stage"]:
                start, state = 0, None
            self.run_stage(s, offsets[s], start, state)
            start, state = 0, None


# ---------------------------------------------------------------------------------------------
def build_preprocessing(cfg: dict, entries, ref) -> Preprocessing:
    d = cfg["data"]
    if d["labels"] is None:
        table = infer_label_table(entries)
    elif isinstance(d["labels"], (list, tuple)):
        table = LabelTable(d["labels"])
    else:
        table = LabelTable.from_file(d["labels"])
    reg_mult = 2 ** (len(cfg["model"]["reg_enc"]) - 1)
    seg_mult = 2 ** (len(cfg["model"]["seg_enc"]) - 1)
    affine = None if ref[1] is None else np.asarray(ref[1], dtype=float).tolist()
    return Preprocessing(table.values, tuple(d["percentiles"]), d["downsample"], max(reg_mult, seg_mult),
                         spacing=tuple(ref[2]), shape=tuple(ref[0]), affine=affine)


def _data_ref(data):
    """What run.json records of the data: a datalist/folder path, or a datalist given as a dict
    (absolute paths), so evaluate and segment --atlas find the run's images later."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {split: [{"image": str(Path(e["image"]).resolve()),
                         **({"label": str(Path(e["label"]).resolve())} if e.get("label") else {})}
                        for e in items] for split, items in read_data(data).items()}
    return str(Path(data).resolve())


def train(config=None, data=None, out_dir=None, *, stage: str = "all", resume: bool = False, init=None,
          overrides=(), progress: bool = True, overwrite: bool = False) -> Path:
    """Train DeepAtlas; returns the run directory.

    config: YAML/JSON path, a (partial) config dict, or None for defaults; ``overrides`` are
    ``"key.sub=value"`` strings applied last. data: datalist JSON, folder, or {split: [...]} dict
    (optional with ``resume``: the run's own data is reused). init: a run directory whose latest
    weights initialise both nets (e.g. pretrained seg/reg runs before ``stage="da"``).

    A new run needs an empty or new ``out_dir``; ``overwrite=True`` first removes the files of a
    run already there (run_folder.py). Everything (config, checkpoint, data) is checked before the
    folder is touched, so a refused or failing start leaves it as it was."""
    if stage not in STAGES:
        raise DeepAtlasError(f"stage must be one of {STAGES}, got {stage!r}")
    if out_dir is None:
        raise DeepAtlasError("out_dir is required")
    if resume and overwrite:
        raise DeepAtlasError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    run_dir = Path(out_dir)
    rank, _ = _dist_info()
    if resume:
        ckpt_path, ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        cfg = json.loads(ckpt["config"])
        if isinstance(config, dict):
            merge(cfg, config)
        elif config is not None:
            merge(cfg, load_config(config))
        if overrides:
            from .config import apply_overrides
            apply_overrides(cfg, overrides)
        validate(cfg)
        _check_resume_config(cfg, ckpt, ckpt_path)
        prep = Preprocessing.from_dict(json.loads(ckpt["preprocessing"]))
        plan = ckpt["plan"]
        data = data if data is not None else read_run_info(run_dir).get("data")
        if data is None:
            raise DeepAtlasError("--resume: the run did not record its data; pass --data")
    else:
        check_new_run_folder(run_dir, overwrite=overwrite)
        cfg = load_config(None, overrides) if config is None else (
            load_config(config, overrides) if not isinstance(config, dict)
            else _from_dict(config, overrides))
        plan = PLANS[stage]
        prep = None
    if data is None:
        raise DeepAtlasError("data is required (a datalist JSON, a folder, or a dict)")
    splits = read_data(data)
    entries = splits["training"]
    if not entries:
        raise DataError(f"{data}: the 'training' split is empty")
    ref = check_grids(entries, cfg["data"]["resample"])
    if resume:
        _check_resume_grid(prep, ref, data, run_dir)
    init_ckpt = None
    if init is not None and not resume:
        _, init_ckpt = latest_checkpoint(init)
        if init_ckpt is None:
            raise FileNotFoundError(f"--init: no checkpoint in {init}")
        prep = Preprocessing.from_dict(json.loads(init_ckpt["preprocessing"]))
        cfg["model"] = json.loads(init_ckpt["config"])["model"]  # the weights fix the architecture
    if prep is None:
        prep = build_preprocessing(cfg, entries, ref)
    kw = dict(resample=cfg["data"]["resample"], cache=cfg["data"]["cache"], ref=ref)
    train_ds = VolumeDataset(entries, prep, **kw)
    val_ds = VolumeDataset(splits["validation"], prep, **kw) if splits["validation"] else None
    for ds in (train_ds, val_ds):
        if ds is not None:
            ds.check_voxels(progress)

    trainer = Trainer(cfg, prep, train_ds, val_ds, run_dir, progress=progress)
    if resume:
        for k in ("reg", "seg"):
            trainer.nets[k].load_state_dict(ckpt[k])
    elif init_ckpt is not None:
        for k in ("reg", "seg"):
            trainer.nets[k].load_state_dict(init_ckpt[k])

    # every rank has passed the checks above before rank 0 changes the folder they looked at
    _barrier()
    if rank == 0:
        if overwrite:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in temp_files(run_dir):  # left by a write that was killed before its rename
            p.unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.json")
        atomic_write_text(json.dumps(prep.to_dict(), indent=2) + "\n", run_dir / "preprocessing.json")
        atomic_write_text(json.dumps({"plan": plan, "data": _data_ref(data), "version": __version__}, indent=2) + "\n",
                          run_dir / "run.json")
        if resume:
            _truncate_metrics(run_dir / "metrics.jsonl", ckpt["global_step"])
    trainer.fit(plan, ckpt if resume else None)
    return run_dir


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[int(os.environ.get("LOCAL_RANK", "0"))])
        else:
            dist.barrier()


# config keys the checkpoint fixes: the nets' architecture, and the preprocessing the weights were
# trained with (taken from the checkpoint on resume, so a new value would only be recorded, not used)
_FIXED_BY_CHECKPOINT = [("model", k) for k in DEFAULTS["model"] if k != "channels_last"] + \
    [("data", "labels"), ("data", "percentiles"), ("data", "downsample")]
# optimiser and schedule settings that a stage's saved optimiser and scheduler states carry
_FIXED_IN_STAGE = ("lr", "weight_decay", "lr_schedule", "lr_step")


def _check_resume_config(cfg: dict, ckpt: dict, ckpt_path) -> None:
    """Refuses a config that the checkpoint cannot continue with (before anything is written)."""
    old = json.loads(ckpt["config"])
    fix = "; train a new run for that (another --out, or --overwrite)"
    for section, key in _FIXED_BY_CHECKPOINT:
        was, now = old.get(section, {}).get(key), cfg[section].get(key)
        if now != was:
            raise ConfigError(f"--resume: {section}.{key} is {was!r} in the run's checkpoint {ckpt_path.name}, "
                              f"{now!r} now; the architecture and preprocessing of a run cannot change{fix}")
    stage = ckpt["stage"]
    if stage in ckpt["completed"]:
        return
    done, schedule = ckpt["stage_step"], stage_schedule(stage, cfg)
    if len(schedule) < done:
        raise ConfigError(f"--resume: train.steps.{stage}={len(schedule)} is below the {done} steps of stage "
                          f"{stage} that {ckpt_path.name} has done")
    trains, trained = sorted(set(schedule)), sorted(ckpt["optim"])
    if trains != trained:
        raise ConfigError(f"--resume: stage {stage} is in progress training {'+'.join(trained)}, the config now "
                          f"trains {'+'.join(trains) or 'nothing'} (train.semi_da_train, train.k_reg/k_seg); finish "
                          "the stage as it was")
    t, was = cfg["train"], old.get("train", {})
    for key in _FIXED_IN_STAGE:
        if key == "lr_step" and "step" not in (t["lr_schedule"], was.get("lr_schedule")):
            continue
        if t[key] != was.get(key):
            raise ConfigError(f"--resume: train.{key} is {was.get(key)!r} in stage {stage}, in progress in "
                              f"{ckpt_path.name}, and {t[key]!r} now; its optimiser and schedule continue from "
                              "the checkpoint, so it can change only between stages")


def _check_resume_grid(prep: Preprocessing, ref, data, run_dir) -> None:
    """Refuses resuming on data whose grid differs from the run's (preprocessing.json)."""
    shape, affine, spacing = ref
    diffs = []
    if prep.shape is not None and tuple(shape) != tuple(prep.shape):
        diffs.append(f"shape {tuple(shape)}, the run's {tuple(prep.shape)}")
    if prep.spacing is not None and not np.allclose(spacing, prep.spacing, rtol=1e-4, atol=1e-6):
        diffs.append(f"voxel size {tuple(round(float(v), 4) for v in spacing)} mm, the run's "
                     f"{tuple(round(float(v), 4) for v in prep.spacing)} mm")
    if prep.affine is not None and affine is not None and not np.allclose(affine, prep.affine, atol=1e-3):
        diffs.append(f"affine {np.round(affine, 3).tolist()}, the run's {np.round(prep.affine, 3).tolist()}")
    if diffs:
        raise DataError(f"--resume: {data} is on another grid than the run in {run_dir} ({'; '.join(diffs)}); "
                        "resume with the run's data, or train a new run on this data (e.g. --init the run)")


def _from_dict(config: dict, overrides) -> dict:
    from .config import apply_overrides, default_config
    cfg = merge(default_config(), config)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= global_step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by the kill
    atomic_write_text("".join(k + "\n" for k in keep), path)
