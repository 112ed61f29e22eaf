"""ONNX Runtime deployment: same results as the PyTorch path on real and synthetic NIfTI files,
affine and label values kept, CLI --onnx, providers, clear errors for malformed or mismatched models."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest

from _onnx import exported_run
from _synth import LABEL_VALUES
from deepatlas_fast.inference.run import load_run
from deepatlas_fast.cli import main
from deepatlas_fast.deploy.runtime import default_providers, load_onnx
from deepatlas_fast.data.io import load_nifti, save_nifti
from deepatlas_fast.errors import DeepAtlasWarning

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    dl, run_dir, out = exported_run(tmp_path_factory.getbasetemp())
    return Path(dl).parent, load_run(run_dir), load_onnx(out), out, run_dir


def test_cpu_provider_is_reported(exported):
    model = exported[2]
    assert model.providers[0] == "CPUExecutionProvider"  # no GPU here
    assert default_providers("cpu") == ["CPUExecutionProvider"]
    assert default_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="device must be"):
        default_providers("tpu")


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # onnxruntime's own
def test_fallback_to_cpu_is_a_warning(exported):
    out = exported[3]
    with pytest.warns(DeepAtlasWarning, match="fell back to CPU"):
        model = load_onnx(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert model.providers == ["CPUExecutionProvider"]


def test_same_results_as_pytorch_on_real_brains(exported):
    _, run, model, _, _ = exported
    mov, tgt = (load_nifti(DATA / f"oasis_{s}_T1_4mm.nii.gz")[0] for s in "ab")
    a, b = run.register(mov, tgt), model.register(mov, tgt)
    assert np.abs(a["disp"]).max() > 0.5
    assert np.abs(a["disp"] - b["disp"]).max() <= 1e-4
    # warped in the moving image's own intensities: 1e-4 relative to its range
    assert np.abs(a["warped"] - b["warped"]).max() <= 1e-4 * np.ptp(mov)
    seg_a, seg_b = run.segment(mov), model.segment(mov)
    assert seg_a.dtype == seg_b.dtype and (seg_a == seg_b).mean() > 0.999  # ties only


def test_cli_onnx_matches_cli_run_and_keeps_affine(exported, tmp_path):
    data, _, _, out, run_dir = exported
    # a non-trivial affine on the inputs must come back unchanged
    img, aff = load_nifti(data / "img0.nii.gz")
    aff = aff.copy()
    aff[:3, 3] = [-10.0, 5.0, 3.5]
    save_nifti(tmp_path / "in.nii.gz", img, aff)
    save_nifti(tmp_path / "tgt.nii.gz", load_nifti(data / "img1.nii.gz")[0], aff)
    save_nifti(tmp_path / "seg.nii.gz", load_nifti(data / "seg0.nii.gz", label=True)[0].astype(np.int16), aff)
    res = {}
    for src in ("run", "onnx"):
        where = str(out if src == "onnx" else run_dir)
        assert main(["segment", f"--{src}", where, str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / f"s_{src}.nii.gz")]) == 0
        assert main(["register", f"--{src}", where, str(tmp_path / "in.nii.gz"), str(tmp_path / "tgt.nii.gz"),
                     "-o", str(tmp_path / f"w_{src}.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                     "--labels-out", str(tmp_path / f"wl_{src}.nii.gz"), "--disp-out", str(tmp_path / f"d_{src}.nii.gz")]) == 0
        res[src] = {k: load_nifti(tmp_path / f"{k}_{src}.nii.gz", label=k in ("s", "wl")) for k in ("s", "w", "wl")}
        disp = nib.load(str(tmp_path / f"d_{src}.nii.gz"))  # (D, H, W, 3): not a load_nifti volume
        res[src]["d"] = np.asarray(disp.dataobj), disp.affine
    s, saff = res["onnx"]["s"]
    assert np.allclose(saff, aff) and s.shape == img.shape and set(np.unique(s)) <= set(LABEL_VALUES)
    assert (s == res["run"]["s"][0]).mean() > 0.999
    assert set(np.unique(res["onnx"]["wl"][0])) <= set(LABEL_VALUES)
    assert (res["onnx"]["wl"][0] == res["run"]["wl"][0]).mean() > 0.999
    assert np.abs(res["onnx"]["d"][0] - res["run"]["d"][0]).max() <= 1e-4
    assert np.abs(res["onnx"]["w"][0] - res["run"]["w"][0]).max() <= 1e-4 * np.ptp(img)
    assert all(np.allclose(res["onnx"][k][1], aff) for k in ("w", "wl", "d"))


def _copy(out, dst):
    shutil.copytree(out, dst)
    return dst


def _set_meta(path, *, resum=True, drop=(), **kv):
    """Edit a model's metadata; ``resum``: also update checksums.json, as a consistent (but
    malformed) export would have it."""
    m = onnx.load(str(path))
    for p in m.metadata_props:
        key = p.key.removeprefix("deepatlas_fast.")
        if key in kv:
            p.value = kv[key] if isinstance(kv[key], str) else json.dumps(kv[key])
    keep = [p for p in m.metadata_props if p.key.removeprefix("deepatlas_fast.") not in drop]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    onnx.save(m, str(path))
    if resum:
        _resum(path)


def _resum(path):
    from deepatlas_fast.deploy.export import file_sha256
    sums_path = Path(path).parent / "checksums.json"
    sums = json.loads(sums_path.read_text())
    sums["sha256"][Path(path).name] = file_sha256(path)
    sums_path.write_text(json.dumps(sums))


def test_malformed_and_mismatched_models_are_clear_errors(exported, tmp_path):
    out = exported[3]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_onnx(tmp_path / "nothing")
    d = _copy(out, tmp_path / "missing")
    (d / "reg.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="reg.onnx"):
        load_onnx(d)
    d = _copy(out, tmp_path / "truncated")
    data = (d / "seg.onnx").read_bytes()
    (d / "seg.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="seg.onnx: contents differ from the export's checksum"):
        load_onnx(d)
    _resum(d / "seg.onnx")  # damaged at export time: ONNX Runtime's own refusal
    with pytest.raises(ValueError, match="seg.onnx: cannot load ONNX model"):
        load_onnx(d)
    d = _copy(out, tmp_path / "swapped")
    shutil.copy(out / "seg.onnx", d / "reg.onnx")
    _resum(d / "reg.onnx")
    with pytest.raises(ValueError, match="'seg' model, expected 'reg'"):
        load_onnx(d)
    d = _copy(out, tmp_path / "foreign")  # a valid ONNX model that deepatlas-fast did not write
    foreign = onnx.load(str(out / "seg.onnx"))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(d / "seg.onnx"))
    _set_meta(d / "seg.onnx")
    with pytest.raises(ValueError, match="not a deepatlas-fast model"):
        load_onnx(d)
    d = _copy(out, tmp_path / "future")
    _set_meta(d / "seg.onnx", format="99")
    with pytest.raises(ValueError, match="re-export"):
        load_onnx(d)
    d = _copy(out, tmp_path / "mixed")  # seg.onnx of another export
    _set_meta(d / "seg.onnx", export_id="0" * 32)
    with pytest.raises(ValueError, match="different exports"):
        load_onnx(d)
    d = _copy(out, tmp_path / "classes")  # label table that does not match the logits
    prep = exported[1].prep.to_dict()
    prep["label_values"] = [0, 7, 42]
    for kind in ("seg", "reg"):
        _set_meta(d / f"{kind}.onnx", preprocessing=prep, label_values=prep["label_values"])
    with pytest.raises(ValueError, match="4 output classes but its label table has 3"):
        load_onnx(d)
    # through the CLI: one line, exit code 2
    assert main(["segment", "--onnx", str(d), str(DATA / "oasis_a_T1_4mm.nii.gz"), "-o", str(tmp_path / "x.nii.gz")]) == 2


def test_edited_or_malformed_metadata_is_refused(exported, tmp_path):
    """An edit of a model (label table, spacing) without a matching checksum, a missing checksum
    file, and metadata that is malformed even with consistent checksums: clear errors."""
    out, prep = exported[3], exported[1].prep.to_dict()
    d = _copy(out, tmp_path / "edited")
    _set_meta(d / "seg.onnx", resum=False, spacing=[3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="seg.onnx: contents differ from the export's checksum"):
        load_onnx(d)
    d = _copy(out, tmp_path / "no_sums")
    (d / "checksums.json").unlink()
    with pytest.raises(ValueError, match="no checksums.json"):
        load_onnx(d)
    bad = [({"preprocessing": {**prep, "multiple": 0}}, "power of 2"),
           ({"preprocessing": {**prep, "multiple": 3}}, "power of 2"),
           ({"preprocessing": {**prep, "spacing": [0.0, 2.0, 2.0]}}, "positive voxel sizes"),
           ({"spacing": [2.0, -1.0, 2.0]}, "positive voxel sizes"),
           ({"preprocessing": {**prep, "unexpected": 1}}, "preprocessing is not valid"),
           ({"preprocessing": "{not json"}, "not valid JSON"),
           ({"label_values": [0, 7, 42, 101]}, "differ from the preprocessing's label table"),
           ({"drop": ("export_id",)}, "metadata lacks")]
    for k, (edit, msg) in enumerate(bad):
        d = _copy(out, tmp_path / f"bad{k}")
        for kind in ("seg", "reg"):
            _set_meta(d / f"{kind}.onnx", **edit)
        with pytest.raises(ValueError, match=msg):
            load_onnx(d)


def test_export_refuses_bad_targets_before_exporting(exported, tmp_path, capsys):
    run_dir = exported[4]
    (tmp_path / "file").write_text("x")
    assert main(["export", "--run", str(run_dir), "-o", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert main(["export", "--run", str(run_dir), "-o", str(tmp_path / "x"), "--checkpoint",
                 str(tmp_path / "corrupt.pt")]) == 2
    err = capsys.readouterr().err
    assert "corrupt.pt" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_atlas_segmentation_with_onnx_matches_pytorch(exported, tmp_path):
    """segment --atlas through reg.onnx (+ seg.onnx with net+atlas) gives the PyTorch run's labels."""
    data, _, _, out, run_dir = exported
    (tmp_path / "atlases.json").write_text(json.dumps({"training": [
        {"image": str(data / f"img{k}.nii.gz"), "label": str(data / f"seg{k}.nii.gz")} for k in (0, 1)]}))
    img = str(data / "img2.nii.gz")
    seg = {}
    for src in ("run", "onnx"):
        where = str(out if src == "onnx" else run_dir)
        assert main(["segment", f"--{src}", where, img, "-o", str(tmp_path / f"a_{src}.nii.gz"), "--atlas",
                     str(tmp_path / "atlases.json"), "--fuse", "net+atlas", "--weighting", "lncc", "--no-progress"]) == 0
        seg[src], aff = load_nifti(tmp_path / f"a_{src}.nii.gz", label=True)
        assert np.allclose(aff, load_nifti(img)[1]) and set(np.unique(seg[src])) <= set(LABEL_VALUES)
    assert (seg["onnx"] == seg["run"]).mean() > 0.999
