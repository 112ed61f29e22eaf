"""Training configuration: defaults, YAML/JSON files, ``key.sub=value`` overrides.

A config is a nested dict; every key has a default below, and unknown keys are an error (a typo
must not silently train with a default).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import yaml

from ..errors import ConfigError, ConfigKeyError
from ..data import augment
from ..nn.precision import PRECISIONS
from .refine import RefineSettings

STAGES = ("seg", "reg", "semi-da", "da", "all")

DEFAULTS = {
    "seed": 0,
    "device": "auto",            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    "data": {
        "labels": None,          # label values (list) or a text file of them; None: union of the training labels
        "percentiles": [0.5, 99.5],
        "downsample": 1,         # integer factor: 2 trains a 1 mm dataset at 2 mm
        "resample": False,       # resample images on another grid onto the first image's grid
        "cache": True,           # keep preprocessed volumes in memory
        # pair proportions; first letter = moving image, second = target, L labelled, U unlabelled
        "pairs": {"LL": 1.0, "LU": 1.0, "UL": 1.0, "UU": 1.0},
    },
    "model": {
        "reg_enc": [16, 32, 32, 32, 32],
        "reg_dec": [32, 32, 32, 8, 8],
        "diffeomorphic": False,
        "int_steps": 7,
        "seg_enc": [8, 16, 32, 64],
        "seg_norm": "batch",     # "batch" | "instance"
        "seg_upsample": "transpose",  # "transpose" | "trilinear"
        "channels_last": True,   # run both nets in channels_last_3d (faster CPU convolutions)
    },
    "loss": {
        "similarity": "lncc",    # "lncc" | "ncc" (global)
        "window": 9,
        "lambda_r": 1.0,         # gradient L2 of the displacement
        "lambda_a": 1.0,         # anatomy loss in F_R's loss (Dice of warped moving vs target segmentation)
        "lambda_a_seg": None,    # anatomy loss in F_S's loss; null: lambda_a
        "lambda_sp": 1.0,        # supervised loss of F_S vs manual labels
        "lambda_ce": 1.0,        # F_S's losses (supervised, anatomy): Dice + lambda_ce x cross-entropy
        "include_background": True,  # background is a class of every Dice loss
        # how F_R's registration of a labelled image onto an unlabelled one trains F_S:
        # "unlabelled": F_S on the unlabelled image against the warped labels (DeepAtlas's L_a);
        # "warped": F_S on the warped labelled image (with the unlabelled image's class
        # intensities) against the warped labels, which fit it exactly; "both"
        "seg_anatomy": "unlabelled",
        # F_R's anatomy loss where F_S stands in for labels: voxels weigh (F_S's top class
        # probability) ** anatomy_confidence; 0 = all voxels alike
        "anatomy_confidence": 0.0,
    },
    "augment": dict(augment.DEFAULTS),  # on-the-fly augmentation of F_S's training images (data/augment.py)
    # test-time refinement (register/segment/evaluate --refine N: N iterations per level; refine.py)
    "refine": {k: v for k, v in RefineSettings().to_dict().items() if k != "iterations"},
    "train": {
        "steps": {"seg": 1000, "reg": 1000, "semi-da": 1000, "da": 2000},
        "batch_size": 1,         # per process
        "lr": 1e-4,
        "lr_schedule": "constant",  # "constant" | "cosine" | "step"
        "lr_step": 1000,         # period of the "step" schedule (x0.5)
        "weight_decay": 0.0,
        "precision": "fp32",     # "fp32" | "bf16" (autocast; pays only where the CPU/GPU has bf16 units)
        "k_reg": 20,             # da: registration steps per cycle ...
        "k_seg": 1,              # ... then segmentation steps
        "semi_da_train": "seg",  # semi-da: the net that learns ("seg" or "reg"); the other is frozen
        "checkpoint_every": 100,
        "checkpoint_keep": 3,    # most recent checkpoints kept (0 = keep all)
        "log_every": 10,
        "val_every": 0,          # validation Dice every N steps (0 = off)
        "val_pairs": 4,
    },
}


def default_config() -> dict:
    return copy.deepcopy(DEFAULTS)


def load_config(path=None, overrides=()) -> dict:
    """Defaults <- file (YAML or JSON) <- overrides ``["train.lr=1e-3", ...]``; validated."""
    cfg = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a valid YAML or JSON file ({_one_line(e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping, got {type(loaded).__name__}")
        merge(cfg, loaded or {}, where=str(path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def merge(cfg: dict, new: dict, where: str = "config", prefix: str = "") -> dict:
    for k, v in new.items():
        if k not in cfg:
            raise ConfigKeyError(f"{where}: unknown config key {prefix + k!r}; known: {sorted(cfg)}")
        # dicts with free keys (pair proportions, steps per stage) are replaced key by key too
        if isinstance(cfg[k], dict) and not isinstance(v, dict):
            raise ConfigError(f"{where}: {prefix + k!r} is a section ({', '.join(sorted(cfg[k]))}); "
                              f"set its keys, e.g. {prefix + k}.{sorted(cfg[k])[0]}=...")
        if isinstance(cfg[k], dict) and isinstance(v, dict):
            merge(cfg[k], v, where, prefix + k + ".")
        else:
            cfg[k] = _coerce(cfg[k], v, prefix + k)
    return cfg


def _coerce(old, new, key):
    # YAML 1.1 reads "1e-4" as a string: convert where the default is a number
    if isinstance(new, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
        try:
            return float(new)
        except ValueError:
            raise ConfigError(f"config key {key!r}: expected a number, got {new!r}") from None
    return new


def apply_overrides(cfg: dict, overrides) -> dict:
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        try:
            nested = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        merge(cfg, nested, where=f"override {item!r}")
    return cfg


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: dict) -> None:
    t, m, lo, d = cfg["train"], cfg["model"], cfg["loss"], cfg["data"]
    if not _is_int(cfg["seed"]) or cfg["seed"] < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    if not isinstance(cfg["device"], str):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg['device']!r}")
    for k in ("reg_enc", "reg_dec", "seg_enc"):
        v = m[k]
        if not isinstance(v, list) or not v or not all(_is_int(c) and c >= 1 for c in v):
            raise ConfigError(f"model.{k} must be a non-empty list of channel counts >= 1, got {v!r}")
    if not isinstance(m["diffeomorphic"], bool) or not _is_int(m["int_steps"]) or m["int_steps"] < 0:
        raise ConfigError(f"model.diffeomorphic must be true or false and model.int_steps an integer >= 0, "
                          f"got {m['diffeomorphic']!r}, {m['int_steps']!r}")
    if m["seg_upsample"] not in ("transpose", "trilinear"):
        raise ConfigError(f"model.seg_upsample must be 'transpose' or 'trilinear', got {m['seg_upsample']!r}")
    p = d["percentiles"]
    if not (isinstance(p, list) and len(p) == 2 and all(_is_number(x) for x in p) and 0 <= p[0] < p[1] <= 100):
        raise ConfigError(f"data.percentiles must be [lo, hi] with 0 <= lo < hi <= 100, got {p!r}")
    if not _is_int(d["downsample"]) or d["downsample"] < 1:
        raise ConfigError(f"data.downsample must be an integer >= 1, got {d['downsample']!r}")
    for k in ("resample", "cache"):
        if not isinstance(d[k], bool):
            raise ConfigError(f"data.{k} must be true or false, got {d[k]!r}")
    labels = d["labels"]
    if not (labels is None or isinstance(labels, str) or (isinstance(labels, list) and all(_is_int(v) for v in labels))):
        raise ConfigError(f"data.labels must be a list of integer label values or a file, got {labels!r}")
    if not _is_number(t["lr"]) or not 0 < t["lr"] <= 1:
        raise ConfigError(f"train.lr must be a number in (0, 1], got {t['lr']!r}")
    if not _is_number(t["weight_decay"]) or t["weight_decay"] < 0:
        raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {t['weight_decay']!r}")
    if not _is_int(t["lr_step"]) or t["lr_step"] < 1:
        raise ConfigError(f"train.lr_step must be an integer >= 1, got {t['lr_step']!r}")
    if lo["similarity"] not in ("lncc", "ncc"):
        raise ConfigError(f"loss.similarity must be 'lncc' or 'ncc', got {lo['similarity']!r}")
    if m["seg_norm"] not in ("batch", "instance"):
        raise ConfigError(f"model.seg_norm must be 'batch' or 'instance', got {m['seg_norm']!r}")
    if not isinstance(m["channels_last"], bool):
        raise ConfigError(f"model.channels_last must be true or false, got {m['channels_last']!r}")
    if t["precision"] not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t['precision']!r}")
    if t["lr_schedule"] not in ("constant", "cosine", "step"):
        raise ConfigError(f"train.lr_schedule must be constant, cosine or step, got {t['lr_schedule']!r}")
    if t["semi_da_train"] not in ("seg", "reg"):
        raise ConfigError(f"train.semi_da_train must be 'seg' or 'reg', got {t['semi_da_train']!r}")
    for s, n in t["steps"].items():
        if s not in STAGES[:-1] or not _is_int(n) or n < 0:
            raise ConfigError(f"train.steps.{s}: expected a stage in {STAGES[:-1]} with a step count >= 0, got {n!r}")
    for k in ("batch_size", "k_reg", "checkpoint_every", "log_every"):
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] < 1:
            raise ConfigError(f"train.{k} must be a positive integer, got {t[k]!r}")
    for k in ("k_seg", "checkpoint_keep", "val_every", "val_pairs"):  # 0: none / keep all / off
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] < 0:
            raise ConfigError(f"train.{k} must be an integer >= 0, got {t[k]!r}")
    w = lo["window"]  # what ops.lncc accepts
    if isinstance(w, bool) or not isinstance(w, int) or w % 2 == 0 or not 3 <= w <= 15:
        raise ConfigError(f"loss.window must be an odd integer in [3, 15], got {w!r}")
    for k in ("lambda_r", "lambda_a", "lambda_a_seg", "lambda_sp", "lambda_ce", "anatomy_confidence"):
        v = lo[k]
        if k == "lambda_a_seg" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ConfigError(f"loss.{k} must be a finite number >= 0, got {v!r}")
    if lo["seg_anatomy"] not in ("unlabelled", "warped", "both"):
        raise ConfigError(f"loss.seg_anatomy must be 'unlabelled', 'warped' or 'both', got {lo['seg_anatomy']!r}")
    if not isinstance(lo["include_background"], bool):
        raise ConfigError(f"loss.include_background must be true or false, got {lo['include_background']!r}")
    augment.validate(cfg["augment"])
    RefineSettings.from_dict(cfg["refine"])
    bad = set(d["pairs"]) - {"LL", "LU", "UL", "UU"}
    weights = list(d["pairs"].values())
    if bad or not all(_is_number(v) and v >= 0 for v in weights) or not any(v > 0 for v in weights):
        raise ConfigError(f"data.pairs: keys LL/LU/UL/UU with weights >= 0, not all 0; got {d['pairs']}")


def save_config(cfg: dict, path) -> None:
    Path(path).write_text(json.dumps(cfg, indent=2) + "\n")
