"""Multi-atlas segmentation (inference.atlas): local NCC, the fusion rules on known fields, a
trained run's atlas segmentation, the CLI round trip and its errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _synth import AFFINE, LABEL_VALUES, subject, tiny_run
from deepatlas_fast.cli import main
from deepatlas_fast.data.io import LabelTable, load_header, load_nifti, save_nifti
from deepatlas_fast.errors import DataError, DeepAtlasError
from deepatlas_fast.inference.atlas import local_ncc, segment_with_atlases
from deepatlas_fast.ops import warp


def _smooth(shape=(16, 18, 20), seed=0):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)


def _ncc_reference(a, b, window):
    """Voxel-wise NCC over the window's voxels inside the volume, in float64."""
    a, b = a[0, 0].double().numpy(), b[0, 0].double().numpy()
    r = window // 2
    out = np.zeros(a.shape)
    for idx in np.ndindex(*a.shape):
        sl = tuple(slice(max(i - r, 0), i + r + 1) for i in idx)
        x, y = a[sl].ravel(), b[sl].ravel()
        x, y = x - x.mean(), y - y.mean()
        out[idx] = (x * y).mean() / np.sqrt((x * x).mean() * (y * y).mean() + 1e-5)
    return out


def test_local_ncc_matches_a_float64_reference_and_is_affine_invariant():
    a, b = _smooth(seed=1), _smooth(seed=2)
    a, b = a / a.std(), b / b.std()  # unit variance: the 1e-5 guard is negligible
    got = local_ncc(a, 0.5 * a + 0.5 * b, 3)[0, 0].double().numpy()
    ref = _ncc_reference(a, 0.5 * a + 0.5 * b, 3)
    assert np.abs(got - ref).max() < 2e-3
    assert local_ncc(a, 3 * a + 2, 5)[0, 0].mean() > 0.999
    assert local_ncc(a, -a, 5)[0, 0].mean() < -0.999


class _KnownFields:
    """A stand-in run with chosen displacements and F_S probabilities (tests the fusion alone)."""

    def __init__(self, values, disps, net_labels=None):
        self.labels = LabelTable(values)
        self.prep = type("P", (), {"num_classes": len(self.labels)})()
        self.disps, self.net_labels, self.calls = list(disps), net_labels, 0

    def displacement(self, moving, target, refine=None):
        d = self.disps[self.calls % len(self.disps)]
        self.calls += 1
        return d

    def class_probabilities(self, image):
        cls = torch.from_numpy(self.labels.to_classes(self.net_labels))
        for c in range(len(self.labels)):
            yield (cls == c).float()


def _scene(shape=(16, 18, 20)):
    img, lab = subject(shape, seed=3)
    return img, lab.astype(np.int64), torch.zeros(1, 3, *shape)


def test_identity_fields_give_back_the_atlas_labels_and_identical_atlases_equal_one():
    img, lab, zero = _scene()
    run = _KnownFields(LABEL_VALUES, [zero])
    for weighting in ("mean", "lncc"):
        one = segment_with_atlases(run, img, [(img, lab)], weighting=weighting)
        assert np.array_equal(one, lab)
        assert np.array_equal(segment_with_atlases(run, img, [(img, lab)] * 3, weighting=weighting), one)
    # a shifted field: the fused soft labels are the linearly warped one-hot's argmax, which for one
    # atlas is the nearest warp away from label boundaries
    shift = torch.zeros_like(zero)
    shift[:, 0] = 2.0
    run = _KnownFields(LABEL_VALUES, [shift])
    got = segment_with_atlases(run, img, [(img, lab)])
    cls = torch.from_numpy(run.labels.to_classes(lab))[None, None].float()
    nearest = run.labels.to_values(warp(cls, shift, mode="nearest")[0, 0].round().long().numpy())
    assert np.array_equal(got, nearest)


def test_lncc_weighting_prefers_the_atlas_that_matches_the_image():
    img, lab, zero = _scene()
    wrong = np.roll(lab, 4, axis=0)  # labels of another anatomy, on an unrelated image
    noise = np.random.default_rng(0).normal(size=img.shape).astype(np.float32)
    run = _KnownFields(LABEL_VALUES, [zero])
    atlases = [(noise, wrong), (img, lab)]
    mean = segment_with_atlases(run, img, atlases, weighting="mean")
    lncc = segment_with_atlases(run, img, atlases, weighting="lncc")
    assert (lncc == lab).mean() > (mean == lab).mean() + 0.05
    assert (lncc == lab).mean() > 0.95


def test_net_plus_atlas_averages_with_the_segmentation_net():
    img, lab, zero = _scene()
    other = np.where(lab == 42, 100, lab)  # F_S calls structure 42 "100"
    run = _KnownFields(LABEL_VALUES, [zero], net_labels=other)
    got = segment_with_atlases(run, img, [(img, lab)], fuse="net+atlas")
    agree = lab == other
    assert np.array_equal(got[agree], lab[agree])
    # where they disagree both classes have probability 1/2: the first class (value 42) wins the tie
    assert np.all(got[~agree] == 42)
    # two atlases against the net: the atlases' class wins
    run = _KnownFields(LABEL_VALUES, [zero], net_labels=other)
    assert np.array_equal(segment_with_atlases(run, img, [(img, lab), (img, lab)], fuse="atlas"), lab)


def test_bad_atlas_requests_are_clear_errors():
    img, lab, zero = _scene()
    run = _KnownFields(LABEL_VALUES, [zero])
    with pytest.raises(DataError, match="on the image's grid"):
        segment_with_atlases(run, img, [(img[:-1], lab[:-1])])
    bad = lab.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(DataError, match=r"atlas 0 labels: label values \[5\]"):
        segment_with_atlases(run, img, [(img, bad)])
    with pytest.raises(DataError, match="no atlas"):
        segment_with_atlases(run, img, [])
    with pytest.raises(DeepAtlasError, match="fuse must be one of"):
        segment_with_atlases(run, img, [(img, lab)], fuse="vote")
    with pytest.raises(DeepAtlasError, match="weighting must be one of"):
        segment_with_atlases(run, img, [(img, lab)], weighting="staple")
    with pytest.raises(DeepAtlasError, match="window must be"):
        segment_with_atlases(run, img, [(img, lab)], weighting="lncc", window=4)


def test_trained_run_atlas_segmentation_is_deterministic_and_in_the_label_table(tmp_path_factory):
    from deepatlas_fast.inference.run import load_run
    dl, run_dir = tiny_run(tmp_path_factory.getbasetemp())
    run = load_run(run_dir)
    data = Path(dl).parent
    img, lab = load_nifti(data / "img0.nii.gz")[0], load_nifti(data / "seg0.nii.gz", label=True)[0]
    other, olab = load_nifti(data / "img1.nii.gz")[0], load_nifti(data / "seg1.nii.gz", label=True)[0]
    one = run.segment_atlas(img, [(other, olab)])
    assert one.shape == img.shape and set(np.unique(one)) <= set(LABEL_VALUES)
    assert np.array_equal(run.segment_atlas(img, [(other, olab)] * 2), one)
    both = run.segment_atlas(img, [(other, olab)], fuse="net+atlas", weighting="lncc")
    assert both.shape == img.shape and set(np.unique(both)) <= set(LABEL_VALUES)


def test_cli_segment_atlas_round_trip_and_errors(tmp_path_factory, tmp_path, capsys):
    dl, run_dir = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    img = str(data / "img5.nii.gz")  # the validation image: not an atlas of the run
    out = tmp_path / "atlas_seg.nii.gz"
    for extra in ([], ["--fuse", "net+atlas", "--weighting", "lncc"]):
        assert main(["segment", "--run", str(run_dir), img, "-o", str(out), "--atlas", "--no-progress", *extra]) == 0
        seg, aff = load_nifti(out, label=True)
        shape, taff, _ = load_header(img)
        assert seg.shape == shape and np.allclose(aff, taff) and set(np.unique(seg)) <= set(LABEL_VALUES)
        assert len(np.unique(seg)) > 2
    # an explicit datalist of atlases, one of them on another affine: refused, nothing written
    moved = AFFINE.copy()
    moved[:3, 3] += 5.0
    a, la = load_nifti(data / "img0.nii.gz")[0], load_nifti(data / "seg0.nii.gz", label=True)[0]
    save_nifti(tmp_path / "a.nii.gz", a, moved)
    save_nifti(tmp_path / "la.nii.gz", la.astype(np.int16), moved)
    (tmp_path / "atlases.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "la.nii.gz"}]}))
    capsys.readouterr()
    out2 = tmp_path / "refused.nii.gz"
    assert main(["segment", "--run", str(run_dir), img, "-o", str(out2), "--atlas", str(tmp_path / "atlases.json")]) == 2
    err = capsys.readouterr().err
    assert "not on the grid of" in err and err.count("\n") == 1 and not out2.exists()
    # labels outside the run's table
    bad = la.astype(np.int16)
    bad[0, 0, 0] = 5
    save_nifti(tmp_path / "la.nii.gz", bad, AFFINE)
    save_nifti(tmp_path / "a.nii.gz", a, AFFINE)
    assert main(["segment", "--run", str(run_dir), img, "-o", str(out2), "--atlas", str(tmp_path / "atlases.json")]) == 2
    assert "label values [5]" in capsys.readouterr().err and not out2.exists()
    for args, msg in ((["--fuse", "net+atlas"], "only apply with --atlas"),
                      (["--atlas", "--refine", "-2"], "--refine must be >= 0")):
        assert main(["segment", "--run", str(run_dir), img, "-o", str(out2), *args]) == 2
        assert msg in capsys.readouterr().err
    assert main(["segment", "--onnx", str(tmp_path), img, "-o", str(out2), "--atlas"]) == 2
    assert "give a datalist with --onnx" in capsys.readouterr().err


def test_register_no_net_needs_refine_and_starts_from_zero(tmp_path_factory, tmp_path, capsys):
    from deepatlas_fast.inference.run import load_run
    dl, run_dir = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    base = [str(data / "img0.nii.gz"), str(data / "img1.nii.gz")]
    assert main(["register", "--run", str(run_dir), *base, "-o", str(tmp_path / "w.nii.gz"), "--no-net"]) == 2
    assert "--no-net needs --refine" in capsys.readouterr().err
    assert main(["register", "--run", str(run_dir), *base, "-o", str(tmp_path / "w.nii.gz"), "--no-net",
                 "--refine", "2", "--no-progress"]) == 0
    run = load_run(run_dir)
    mov, tgt = load_nifti(base[0])[0], load_nifti(base[1])[0]
    from deepatlas_fast.training.refine import RefineSettings
    from_zero = run.register(mov, tgt, refine=2, net=False)["disp"]
    with_net = run.register(mov, tgt, refine=2)["disp"]
    assert not np.allclose(from_zero, with_net)
    # zero iterations from zero would be the identity: refused rather than returned
    with pytest.raises(DeepAtlasError, match="refine iterations > 0"):
        run.register(mov, tgt, net=False, refine=RefineSettings(iterations=0))


def test_a_run_trained_on_a_dict_datalist_records_it_for_its_atlases(tmp_path):
    """train(data={...}) records the datalist itself (absolute paths), so segment --atlas and
    evaluate find the run's labelled images later."""
    from _synth import tiny_overrides, write_dataset
    from deepatlas_fast.cli.commands.segment import atlas_pairs
    from deepatlas_fast.training.run_folder import read_run_info
    from deepatlas_fast.training.trainer import train
    dl = write_dataset(tmp_path / "data")
    raw = json.loads(Path(dl).read_text())
    data = {s: [{k: str(Path(dl).parent / v) for k, v in e.items()} for e in raw[s]] for s in ("training", "test")}
    run = train(None, data, tmp_path / "run", stage="seg", overrides=tiny_overrides(seg=1), progress=False)
    recorded = read_run_info(run)["data"]
    assert [e["image"] for e in recorded["training"]] == [e["image"] for e in data["training"]]
    assert atlas_pairs("run", run) == [(Path(e["image"]), Path(e["label"])) for e in data["training"] if "label" in e]
