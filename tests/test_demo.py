"""`deepatlas-fast demo --quick` end to end on the shipped demo set, plus the demo data itself."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepatlas_fast.cli import main as cli_main
from deepatlas_fast.training.config import load_config
from deepatlas_fast.cli.demo import (COMPARISONS, FULL, LONG, PRESETS, ROWS, paired_test, replace_block, row_stats,
                                 run_demo)
from deepatlas_fast.data.demo_data import ROOT, datalist_path


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
    # the 1 mm copy of the test brain oasis_b: its 2 mm files are its 2x2x2 reduction
    one = nib.load(str(ROOT / "extra" / "oasis_b_1mm.nii.gz"))
    one_seg = np.asarray(nib.load(str(ROOT / "extra" / "oasis_b_1mm_seg.nii.gz")).dataobj)
    assert one.shape == (160, 192, 224) and np.allclose(one.header.get_zooms(), 1.0)
    two = nib.load(str(ROOT / "images" / "oasis_b.nii.gz"))
    block = np.asarray(one.dataobj, np.float32).reshape(80, 2, 96, 2, 112, 2).mean((1, 3, 5))
    assert np.array_equal(np.round(block).astype(np.uint8), np.asarray(two.dataobj))
    assert set(np.unique(one_seg).tolist()) <= values
    assert "OASIS" in (ROOT / "CREDITS.md").read_text() and "SynthSeg" in (ROOT / "CREDITS.md").read_text()


def _dice(a, b, values):
    d = [2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())
         for v in values if ((a == v).sum() + (b == v).sum()) > 0]
    return float(np.mean(d))


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- demo:quick:start -->\nold table\n<!-- demo:quick:end -->\nafter\n")
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress", "--update-doc", str(doc)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["preset"] == "quick" and res["split"] == "test" and res["seeds"] == [0]
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == [name for name, _, _, _ in ROWS]
    for name, r in rows.items():
        assert 0 <= r["mean"] <= 1 and r["std"] >= 0 and r["n"] >= 1 and 0 <= r["below"] <= 27, name
        assert name in printed
        if r["group"] == "reg" and name != "no registration (affine only)":
            assert 0 <= r["folding"] <= 1 and r["seconds_per_pair"] > 0
    # quick: test images oasis_b and synth_17, one atlas (oasis_a)
    dl = json.loads(datalist_path().read_text())
    a, b = (np.asarray(nib.load(str(ROOT / e["label"])).dataobj) for e in dl["test"][:2])
    atlas = np.asarray(nib.load(str(ROOT / dl["training"][0]["label"])).dataobj)
    structures = [int(v) for v in dl["labels"] if v != "0"]
    # the "no registration" row is the plain Dice of the test label maps, both orders
    assert rows["no registration (affine only)"]["mean"] == pytest.approx(_dice(a, b, structures), abs=1e-3)
    assert rows["no registration (affine only)"]["n"] == 2
    # the atlas-copy row: the atlas labels against each test image's
    copy = np.mean([_dice(atlas, x, structures) for x in (a, b)])
    assert rows["atlas copy (no registration)"]["mean"] == pytest.approx(copy, abs=1e-3)
    assert rows["atlas copy (no registration)"]["n"] == 2
    # the controls train their net for as many steps as Semi-DA and DA do (quick: da 8 = 6 reg + 2 seg)
    assert res["control_steps"] == {"reg": 6, "seg": 4 + 2}
    assert len(res["comparisons"]) == len(COMPARISONS) and all(c["n"] >= 2 for c in res["comparisons"])
    report = (out / "report" / "report.md").read_text()
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(f"]({p})" in report for p in pngs)
    assert "| DA (reg) |" in report and "Left-Hippocampus (17)" in report
    assert "`register --refine 2`" in report and res["refine"] == 2
    text = doc.read_text()
    assert text.startswith("before\n<!-- demo:quick:start -->\nPreset `quick`, test split, seed 0: ")
    assert text.endswith("<!-- demo:quick:end -->\nafter\n")
    assert "old table" not in text and "| DA (seg) |" in text and "\n| method |" in text
    # the table again from results.json alone, training nothing
    doc2 = tmp_path / "doc2.md"
    doc2.write_text("<!-- demo:quick:start -->\n<!-- demo:quick:end -->\n\n"
                    "<!-- demo:quick:structures:start -->\n<!-- demo:quick:structures:end -->\n")
    capsys.readouterr()
    assert cli_main(["demo", "--from-results", str(out / "results.json"), "--update-doc", str(doc2)]) == 0
    assert doc2.read_text().startswith(text[len("before\n"):-len("after\n")])
    assert "| Left-Hippocampus (17) |" in doc2.read_text()   # the per-structure block
    assert "Left-Hippocampus" not in text                      # only where the doc asks for it
    assert "| DA (reg) |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["demo", "--from-results", str(tmp_path / "bad.json")]) == 2
    assert "not a demo results.json" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        run_demo(out, preset="quick", progress=False)


def test_demo_presets_are_valid_configs():
    for name, preset in PRESETS.items():
        steps = [f"train.steps.{k}={v}" for k, v in preset["steps"].items()]
        for stage_ov in [[]] + list(preset["stage_overrides"].values()):
            cfg = load_config(None, preset["overrides"] + steps + stage_ov)
            assert cfg["model"]["seg_norm"] == "instance", name  # see the comment above FULL in demo.py
            assert cfg["augment"]["enabled"] and cfg["loss"]["include_background"], name
    # --long: the full demo's settings, more steps, three seeds
    assert LONG["overrides"] == FULL["overrides"] and LONG["stage_overrides"] == FULL["stage_overrides"]
    assert all(LONG["steps"][k] >= FULL["steps"][k] for k in FULL["steps"]) and len(LONG["seeds"]) == 3


def test_demo_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--quick", "--long"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exclusive"):
        run_demo("unused", quick=True, long=True, progress=False)
    with pytest.raises(ValueError, match="preset"):
        run_demo("unused", preset="huge", progress=False)
    with pytest.raises(ValueError, match="split"):
        run_demo("unused", split="training", progress=False)
    assert cli_main(["demo", "--quick", "--seeds", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_statistics_of_rows_and_paired_comparisons():
    a = {("x",): (0.8, {"1": 0.9, "2": 0.7}), ("y",): (0.6, {"1": 0.9, "2": 0.25})}
    b = {("x",): (0.7, {"1": 0.8, "2": 0.6}), ("y",): (0.5, {"1": 0.8, "2": 0.2})}
    s = row_stats(a)
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1) and s["n"] == 2
    assert s["below"] == 1 and s["below_structures"] == ["2"] and s["min"] == pytest.approx(0.25)
    c = paired_test(a, b)
    assert c["diff"] == pytest.approx(0.1) and c["wins"] == 2 and c["n"] == 2
    assert np.isnan(c["p"])  # identical differences: no variance, no test
    b[("y",)] = (0.45, b[("y",)][1])
    from scipy import stats
    assert paired_test(a, b)["p"] == pytest.approx(stats.ttest_rel([0.8, 0.6], [0.7, 0.45]).pvalue)


def test_replace_block(tmp_path):
    f = tmp_path / "x.md"
    f.write_text("a\n<!-- demo:full:start -->\nold\n<!-- demo:full:end -->\nb\n")
    replace_block(f, "demo:full", "| new |")
    assert f.read_text() == "a\n<!-- demo:full:start -->\n| new |\n<!-- demo:full:end -->\nb\n"
    with pytest.raises(ValueError, match="no block"):
        replace_block(f, "demo:long", "x")
