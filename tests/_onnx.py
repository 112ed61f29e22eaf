"""Shared by test_export.py and test_deploy.py: the tiny trained run exported once per test run."""
from __future__ import annotations

from pathlib import Path

from _synth import tiny_run

_EXPORTS = {}


def exported_run(base, warp="gridsample"):
    """(datalist, run_dir, onnx_dir) for the test run's tiny run (see _synth.tiny_run)."""
    key = (str(base), warp)
    if key not in _EXPORTS:
        from deepatlas_fast.deploy.export import export_run
        dl, run = tiny_run(base)
        out = Path(base) / f"onnx_{warp}"
        export_run(run, out, warp=warp)
        _EXPORTS[key] = (dl, run, out)
    return _EXPORTS[key]
