"""Checkpoints of a run directory: RUN_DIR/checkpoints/ckpt-GGGGGGGG.pt (G = global step over the
plan), written atomically (temp file + rename), the oldest removed past ``keep``, read back with
``torch.load(weights_only=True)``.

Keys: format, plan, stage, stage_step, global_step, completed (stages done), reg, seg (state
dicts), optim, sched (per trained net), rng (``rng_state``), config and preprocessing (JSON
strings: a checkpoint alone rebuilds the nets).
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DeepAtlasWarning

CKPT_FORMAT = 1


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a reader (or a crash)
    never sees a partial file under the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_checkpoints(run_dir) -> list:
    """Completed checkpoints of a run, oldest first (temp files of an interrupted write are ignored)."""
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("ckpt-*.pt")) if d.is_dir() else []


def save_checkpoint(run_dir, ckpt: dict, *, keep: int = 0) -> Path:
    """Writes ``ckpt`` as RUN_DIR/checkpoints/ckpt-<global_step>.pt, then removes all but the
    ``keep`` newest checkpoints (``keep`` <= 0: none removed)."""
    d = Path(run_dir) / "checkpoints"
    d.mkdir(exist_ok=True)
    path = d / f"ckpt-{ckpt['global_step']:08d}.pt"
    atomic_save(ckpt, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise DataError(f"{path}: not a deepatlas_fast checkpoint (format {CKPT_FORMAT})")
    return ckpt


def latest_checkpoint(run_dir):
    """(path, checkpoint) of the newest readable checkpoint, or (None, None)."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            return p, load_checkpoint(p)
        except Exception as e:  # a damaged file must not block resuming from an older one
            warnings.warn(f"skipping unreadable checkpoint {p}: {e}", DeepAtlasWarning, stacklevel=2)
    return None, None


def rng_state() -> dict:
    """The torch, Python and NumPy random states, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def set_rng_state(s: dict) -> None:
    """Restores the states of ``rng_state``."""
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
