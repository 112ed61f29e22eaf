"""Checkpoints of a run directory: RUN_DIR/checkpoints/ckpt-GGGGGGGG.pt (G = global step over the
plan), written atomically (temp file + rename), the oldest removed past ``keep``, read back with
``torch.load(weights_only=True)``.

A damaged checkpoint (a crash mid-write on a file system without atomic rename) or a foreign one
is skipped with a warning that names it and says why. Rotation only removes checkpoints older
than the one just written, so a stale file numbered past this run's steps never displaces them.

Keys: format, plan, stage, stage_step, global_step, completed (stages done), reg, seg (state
dicts), optim, sched (per trained net), rng (``rng_state``), config and preprocessing (JSON
strings: a checkpoint alone rebuilds the nets).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DeepAtlasWarning

CKPT_FORMAT = 1
_NAME = re.compile(r"ckpt-(\d+)\.pt")


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


def checkpoint_step(path) -> int | None:
    """The global step in a checkpoint's file name (None: not a ckpt-<digits>.pt name)."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir) -> list:
    """Checkpoint files of a run, oldest step first (temp files of an interrupted write are ignored)."""
    d = Path(run_dir) / "checkpoints"
    found = [p for p in d.glob("ckpt-*.pt") if checkpoint_step(p) is not None] if d.is_dir() else []
    return sorted(found, key=checkpoint_step)


def temp_files(run_dir) -> list:
    """Temp files that an atomic write killed before its rename left in a run folder
    (``atomic_save``, ``atomic_write_text``, the curves figure)."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob(".ckpt-*.pt.tmp*")) if (run_dir / "checkpoints").is_dir() else []
    for name in ("run.json", "preprocessing.json", "metrics.jsonl"):
        found += run_dir.glob(f".{name}.tmp*")
    found += run_dir.glob(".curves.tmp*.png")
    return sorted(p for p in found if p.is_file() and not p.is_symlink())


def save_checkpoint(run_dir, ckpt: dict, *, keep: int = 0) -> Path:
    """Writes ``ckpt`` as RUN_DIR/checkpoints/ckpt-<global_step>.pt, then removes the oldest
    checkpoints until ``keep`` are left (``keep`` <= 0: none removed). Only checkpoints of an
    earlier step than this one are candidates: files numbered past it are not this run's."""
    d = Path(run_dir) / "checkpoints"
    d.mkdir(exist_ok=True)
    step = ckpt["global_step"]
    path = d / f"ckpt-{step:08d}.pt"
    atomic_save(ckpt, path)
    if keep > 0:
        older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            old.unlink(missing_ok=True)
    return path


def _format_problem(ckpt) -> str | None:
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        return "not a deepatlas_fast checkpoint (a PyTorch file without the checkpoint's keys)"
    if ckpt["format"] != CKPT_FORMAT:
        return (f"checkpoint format {ckpt['format']!r}, this version reads format {CKPT_FORMAT} "
                "(written by another version of deepatlas_fast?)")
    return None


def load_checkpoint(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    problem = _format_problem(ckpt)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return ckpt


def unreadable_reason(path, error: Exception) -> str:
    """Why ``load_checkpoint(path)`` failed with ``error``, in words rather than the loader's."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"
    if size == 0:
        return "the file is empty (its write was cut short)"
    if isinstance(error, DataError):
        return str(error).removeprefix(f"{path}: ")
    if not zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint file (damaged, cut short, or another kind of file)"
    if isinstance(error, pickle.UnpicklingError):
        return ("it holds objects other than tensors and plain values, which weights-only loading refuses "
                "(not written by deepatlas_fast)")
    first = (str(error).strip().splitlines() or [""])[0]
    return f"a PyTorch file that could not be read ({type(error).__name__}: {first})"


def latest_checkpoint(run_dir):
    """(path, checkpoint) of the newest readable checkpoint, or (None, None)."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            return p, load_checkpoint(p)
        except Exception as e:  # a damaged file must not block resuming from an older one
            warnings.warn(f"skipping unreadable checkpoint {p}: {unreadable_reason(p, e)}", DeepAtlasWarning,
                          stacklevel=2)
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
