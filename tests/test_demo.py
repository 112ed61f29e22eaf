"""`deepatlas-fast demo --quick` end to end on the shipped demo set, plus the demo data itself."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepatlas_fast.cli import main as cli_main
from deepatlas_fast.config import load_config
from deepatlas_fast.demo import FULL, LONG, PRESETS, ROWS
from deepatlas_fast.demo_data import ROOT, datalist_path


def test_demo_data_is_consistent():
    dl = json.loads(datalist_path().read_text())
    labelled_train = [e for e in dl["training"] if "label" in e]
    assert len(labelled_train) == 1                                  # one-shot
    assert {"image": "images/oasis_b.nii.gz", "label": "labels/oasis_b.nii.gz"} in dl["test"]
    values = {int(v) for v in dl["labels"]}
    assert len(values) == 28 and 0 in values                          # background + 27 structures
    ref = nib.load(str(ROOT / "images" / "oasis_a.nii.gz"))
    assert ref.shape == (80, 96, 112) and np.allclose(ref.header.get_zooms(), 2.0)
    for e in dl["training"] + dl["validation"] + dl["test"]:
        img = nib.load(str(ROOT / e["image"]))
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert img.get_data_dtype() == np.uint8
        if "label" in e:
            lab = np.asarray(nib.load(str(ROOT / e["label"])).dataobj)
            assert set(np.unique(lab).tolist()) <= values
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size < 15e6
    assert "OASIS" in (ROOT / "CREDITS.md").read_text() and "SynthSeg" in (ROOT / "CREDITS.md").read_text()


def _dice(a, b, values):
    d = [2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())
         for v in values if ((a == v).sum() + (b == v).sum()) > 0]
    return float(np.mean(d))


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["preset"] == "quick" and res["quick"] is True
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == [name for name, _, _ in ROWS]
    for name, r in rows.items():
        assert 0 <= r["mean"] <= 1 and r["std"] >= 0 and r["n"] >= 1, name
        assert name in printed
        if "reg" in name or "registration" in name:
            assert 0 <= r["folding"] <= 1
    # The "no registration" row is the plain Dice of the test label maps (quick: oasis_b and synth_17).
    dl = json.loads(datalist_path().read_text())
    a, b = (np.asarray(nib.load(str(ROOT / e["label"])).dataobj) for e in dl["test"][:2])
    structures = [int(v) for v in dl["labels"] if v != "0"]
    assert rows["no registration (affine only)"]["mean"] == pytest.approx(_dice(a, b, structures), abs=1e-3)
    report = (out / "report" / "report.md").read_text()
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(f"]({p})" in report for p in pngs)
    assert "| DA (reg) |" in report
    with pytest.raises(FileExistsError):
        from deepatlas_fast.demo import run_demo
        run_demo(out, quick=True, progress=False)


def test_demo_presets_are_valid_configs():
    for name, preset in PRESETS.items():
        steps = [f"train.steps.{k}={v}" for k, v in preset["steps"].items()]
        for stage_ov in [[]] + list(preset["stage_overrides"].values()):
            cfg = load_config(None, preset["overrides"] + steps + stage_ov)
            assert cfg["model"]["seg_norm"] == "instance", name  # see the comment above FULL in demo.py
    # --long is the full demo's settings with more steps
    assert LONG["overrides"] == FULL["overrides"] and LONG["stage_overrides"] == FULL["stage_overrides"]
    assert all(LONG["steps"][k] >= 2 * FULL["steps"][k] for k in FULL["steps"])


def test_demo_quick_and_long_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--quick", "--long"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exclusive"):
        from deepatlas_fast.demo import run_demo
        run_demo("unused", quick=True, long=True, progress=False)
