"""The files a run writes into its folder, the check before a new run starts there, and their
removal for ``train --overwrite``.

Only what a run (or ``evaluate``'s default output) writes is removed: other files in the folder,
and files in checkpoints/ that are not checkpoints, are left alone. A symbolic link eval/ is
removed as a link (its target is not the run's to delete); checkpoints/ may be a link to other
storage, so the checkpoints in it are removed and the link kept.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..data.io import check_writable
from .checkpoint import list_checkpoints, temp_files

RUN_FILES = ("config.json", "run.json", "preprocessing.json", "metrics.jsonl", "curves.png")


def check_new_run_folder(run_dir, *, overwrite: bool) -> None:
    """Refuses a folder that is not empty, unless ``overwrite``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run folder")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FileExistsError(f"{run_dir} is not empty ({shown}): use --resume to continue its run, --overwrite "
                              "to replace the run's files, or another --out")
    check_writable(run_dir, str(run_dir))


def clear_run(run_dir) -> None:
    """Removes a run's files from ``run_dir`` (see the module docstring for what is kept)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in [run_dir / n for n in RUN_FILES] + list_checkpoints(run_dir) + temp_files(run_dir):
        if p.is_symlink() or p.is_file():
            p.unlink()
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and not ckpts.is_symlink() and not any(ckpts.iterdir()):
        ckpts.rmdir()
    ev = run_dir / "eval"
    if ev.is_symlink() or ev.is_file():
        ev.unlink()
    elif ev.is_dir():
        shutil.rmtree(ev)


def read_run_info(run_dir) -> dict:
    """RUN/run.json ({"plan", "data", "version"}) -> dict; {} where there is none. A damaged file
    is an error naming it."""
    import json

    from ..errors import DataError
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged ({type(e).__name__}: {e}); it records the run's data: pass --data") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: damaged (a JSON object expected); it records the run's data: pass --data")
    return info
