"""The brain demo set shipped with the package (see CREDITS.md here for sources and credits).

    from deepatlas_fast.data.demo_data import datalist_path
    deepatlas-fast train --data $(python -c "from deepatlas_fast.data.demo_data import datalist_path; print(datalist_path())")
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def datalist_path() -> Path:
    """MONAI-style datalist of the demo set (one-shot split: one labelled training image)."""
    path = ROOT / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo data missing from this installation "
                                "(package data not installed? rebuild with tools/prepare_demo_data.py)")
    return path
