"""Evaluation: Dice, Jacobian/folding, output files, and the real-brain end-to-end check."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _synth import tiny_run
from deepatlas_fast.inference.evaluation import evaluate
from deepatlas_fast.training.metrics import dice_per_class, folding_fraction, jacobian_determinant
from deepatlas_fast.data.io import load_nifti

DATA = Path(__file__).parent / "data"


def test_dice_per_class_known_values():
    pred = np.array([0, 1, 1, 2, 2, 2])
    true = np.array([0, 1, 2, 2, 2, 0])
    d = dice_per_class(pred, true, [1, 2, 3])
    assert d[0] == pytest.approx(2 * 1 / 3) and d[1] == pytest.approx(2 * 2 / 6) and np.isnan(d[2])


def test_jacobian_identity_scaling_and_folding():
    shape = (6, 7, 8)
    assert np.allclose(jacobian_determinant(np.zeros((3, *shape))), 1)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    # x + u = diag(2, 1, 0.5) x -> det 1
    scale = np.array([1.0, 0.0, -0.5])[:, None, None, None] * g
    assert np.allclose(jacobian_determinant(scale), 1.0)
    assert folding_fraction(scale) == 0
    # x + u = -x along axis 0 (a mirror): every voxel folds
    assert folding_fraction(np.stack([-2 * g[0], 0 * g[1], 0 * g[2]])) == 1.0
    # half the volume folded
    u = np.zeros((3, *shape))
    u[0, :3] = -2 * g[0, :3]
    assert 0.3 < folding_fraction(u) < 0.7


def test_evaluate_writes_tables_summary_and_figures(tmp_path_factory):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("eval")
    s = evaluate(run, dl, split="training", out_dir=out, structures=[7, 42], max_pairs=2, progress=False)
    for f in ("dice_seg.csv", "dice_reg.csv", "dice_unregistered.csv", "summary.json", "seg_example.png",
              "reg_example.png", "dice_per_structure.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "dice_unregistered.csv")))
    assert len(rows) == 2 and list(rows[0]) == ["moving", "target", "mean", "7", "42"]
    # the unregistered table is exactly the Dice of the raw label maps
    names = {Path(e).name.split(".")[0]: e for e in (Path(dl).parent / f"seg{k}.nii.gz" for k in range(3))}
    a, b = rows[0]["moving"].replace("img", "seg"), rows[0]["target"].replace("img", "seg")
    la, lb = load_nifti(names[a], label=True)[0], load_nifti(names[b], label=True)[0]
    assert float(rows[0]["7"]) == pytest.approx(dice_per_class(la, lb, [7])[0], abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(s))
    assert summary["structures"] == [7, 42] and set(summary["reg"]["per_structure"]) == {"7", "42"}
    assert 0 <= summary["reg"]["folding_fraction"] <= 1 and summary["seg"]["n"] == 3
    with pytest.raises(ValueError, match="not in the run's label table"):
        evaluate(run, dl, out_dir=out, structures=[5], progress=False)


def test_real_brains_registration_beats_unregistered(tmp_path):
    """3 real OASIS brains at 4 mm (tests/data): weakly supervised registration training must raise
    the Dice of the 30 standard structures above the unregistered Dice (0.534 at 4 mm). The
    evaluated pair is in the training set: this checks the machinery, not generalisation."""
    from deepatlas_fast.training.trainer import train
    structures = [int(v) for v in (DATA / "evaluation_labels.txt").read_text().split()]
    run = train(None, DATA / "oasis_4mm.json", tmp_path / "run", stage="reg", progress=False, overrides=E2E)
    s = evaluate(run, split="test", structures=structures, figures=False, progress=False)
    assert s["unregistered"]["mean"] == pytest.approx(0.534, abs=0.002)
    assert s["reg"]["mean"] > s["unregistered"]["mean"] + 0.005
    assert s["reg"]["folding_fraction"] < 0.01


# trained at 8 mm (data.downsample=2, evaluated at 4 mm) with a narrow net and labelled pairs only:
# 60 steps raise the Dice by ~0.013 (120 steps: ~0.02); more steps would not fit the CI budget
E2E = ["train.steps.reg=60", "train.lr=3e-3", "train.checkpoint_every=1000", "train.log_every=20",
       "loss.window=5", "model.reg_enc=[8,16,16,16]", "model.reg_dec=[16,16,16,8,8]",
       "data.pairs={LL: 1, LU: 0, UL: 0, UU: 0}", "data.downsample=2"]


def test_evaluate_atlas_rows(tmp_path_factory):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("eval_atlas")
    root = Path(dl).parent
    atlas = {"image": str(root / "img0.nii.gz"), "label": str(root / "seg0.nii.gz")}
    s = evaluate(run, dl, split="validation", out_dir=out, structures=[7, 42], max_pairs=0, atlases=[atlas],
                 figures=False, progress=False)
    assert s["reg"] is None and not list(csv.DictReader(open(out / "dice_reg.csv")))  # max_pairs=0: no pairs
    copy = list(csv.DictReader(open(out / "dice_atlas_copy.csv")))
    warped = list(csv.DictReader(open(out / "dice_atlas_reg.csv")))
    assert len(copy) == len(warped) == 1 and copy[0]["atlas"] == "img0" and copy[0]["image"] == "img5"
    a = load_nifti(root / "seg0.nii.gz", label=True)[0]
    b = load_nifti(root / "seg5.nii.gz", label=True)[0]
    assert float(copy[0]["7"]) == pytest.approx(dice_per_class(a, b, [7])[0], abs=1e-4)
    assert s["atlas_copy"]["n"] == s["atlas_reg"]["n"] == 1 and 0 <= s["atlas_reg"]["mean"] <= 1
    # the fused rows are the run's own atlas segmentation of each image
    from deepatlas_fast.inference.run import load_run
    model = load_run(run)
    img5 = load_nifti(root / "img5.nii.gz")[0]
    atlas_arrays = [(load_nifti(root / "img0.nii.gz")[0], a)]
    for name, fuse in (("dice_atlas_fused.csv", "atlas"), ("dice_net_atlas.csv", "net+atlas")):
        row = list(csv.DictReader(open(out / name)))
        assert len(row) == 1 and row[0]["image"] == "img5"
        want = dice_per_class(model.segment_atlas(img5, atlas_arrays, fuse=fuse), b, [7, 42])
        assert [float(row[0][k]) for k in ("7", "42")] == pytest.approx(want.tolist(), abs=1e-4)
    assert s["atlas_fused"]["n"] == s["net_atlas"]["n"] == 1
    with pytest.raises(ValueError, match="label map"):
        evaluate(run, dl, split="validation", out_dir=out, atlases=[{"image": atlas["image"]}], progress=False)
    with pytest.raises(ValueError, match="max_pairs"):
        evaluate(run, dl, split="validation", out_dir=out, max_pairs=-1, progress=False)


def test_evaluate_refined_rows(tmp_path_factory):
    """``refine``: the pairs scored again with F_R's field refined, with folding and time per pair;
    the refined row equals the run's own refined registration of the pair."""
    from deepatlas_fast.inference.run import load_run
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("eval_refine")
    s = evaluate(run, dl, split="training", out_dir=out, structures=[7, 42], max_pairs=2, refine=3,
                 figures=False, progress=False)
    rows = list(csv.DictReader(open(out / "dice_reg_refined.csv")))
    plain = list(csv.DictReader(open(out / "dice_reg.csv")))
    assert [(r["moving"], r["target"]) for r in rows] == [(r["moving"], r["target"]) for r in plain]
    assert s["reg_refined"]["n"] == 2 and s["refine"]["iterations"] == 3
    for key in ("reg", "reg_refined"):
        assert 0 <= s[key]["folding_fraction"] <= 1 and s[key]["seconds_per_pair"] > 0
    root = Path(dl).parent
    mov = load_nifti(root / f"{rows[0]['moving']}.nii.gz")[0]
    tgt = load_nifti(root / f"{rows[0]['target']}.nii.gz")[0]
    lm = load_nifti(root / f"{rows[0]['moving'].replace('img', 'seg')}.nii.gz", label=True)[0]
    lt = load_nifti(root / f"{rows[0]['target'].replace('img', 'seg')}.nii.gz", label=True)[0]
    want = dice_per_class(load_run(run).register(mov, tgt, lm, refine=3)["warped_labels"], lt, [7, 42])
    assert [float(rows[0][k]) for k in ("7", "42")] == pytest.approx(want.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="refine.iterations"):
        evaluate(run, dl, split="training", out_dir=out, refine=-1, progress=False)
    with pytest.raises(ValueError, match="weighting"):
        evaluate(run, dl, split="training", out_dir=out, weighting="vote", progress=False)


def test_evaluate_refuses_data_of_another_voxel_size(tmp_path_factory, tmp_path):
    from _synth import write_dataset
    from deepatlas_fast.data.io import save_nifti
    from deepatlas_fast.errors import DataError
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    other = write_dataset(tmp_path / "data")
    for f in (tmp_path / "data").glob("*.nii.gz"):  # the same volumes, 3 mm voxels instead of 2 mm
        arr = load_nifti(f, label=f.name.startswith("seg"))[0]
        save_nifti(f, arr.astype(np.int16) if f.name.startswith("seg") else arr, np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(DataError, match="voxel size"):
        evaluate(run, other, split="test", out_dir=tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()
