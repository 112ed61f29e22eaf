"""OAI-ZIB-style knee loader on a small synthetic knee (femur, tibia and their cartilage)."""
import json
import sys

import nibabel as nib
import numpy as np
import pytest

from deepatlas_fast.data.datasets import read_datalist
from deepatlas_fast.data.knee import find_subjects, load_knee, lr_axis, prepare_knee_dataset

AFFINE = np.diag([0.36, 0.36, 0.7, 1.0])   # RAS, axis 0 = left-right


def knee(shape=(20, 24, 16)):
    """Right knee: femur above tibia, cartilage between, medial (low axis-0) side larger."""
    lab = np.zeros(shape, np.uint8)
    lab[2:16, 2:10] = 1
    lab[2:16, 10:12] = 2
    lab[2:16, 13:15] = 4
    lab[2:16, 15:22] = 3
    lab[:6, 10:15] = np.array([2, 2, 2, 4, 4])[:, None]   # medial compartment: cartilage meets
    inten = np.array([0, 120, 200, 110, 190], np.float32)
    img = inten[lab] + np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return img, lab


def write_nii(path, arr, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


@pytest.fixture
def oai(tmp_path):
    """Right knee in NIfTI, its mirror image as a left knee in OAI-ZIB's .mhd naming."""
    sitk = pytest.importorskip("SimpleITK")
    img, lab = knee()
    write_nii(tmp_path / "images" / "9001.nii.gz", img)
    write_nii(tmp_path / "labels" / "9001.nii.gz", lab)
    for arr, name in [(img[::-1], "images/9002.mhd"), (lab[::-1], "segmentation_masks/9002.segmentation_masks.mhd")]:
        im = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # ITK wants (k, j, i)
        im.SetSpacing((0.36, 0.36, 0.7))
        (tmp_path / name).parent.mkdir(exist_ok=True)
        sitk.WriteImage(im, str(tmp_path / name))
    write_nii(tmp_path / "images" / "9003.nii.gz", img)              # unlabelled
    (tmp_path / "sides.csv").write_text("id,side\n9001,right\n9002,left\n9003,RIGHT\n")
    return tmp_path, img, lab


def test_find_and_flip(oai):
    root, img, lab = oai
    subs = find_subjects(root)
    assert [(s.id, s.side, s.label is not None) for s in subs] == [("9001", "right", True), ("9002", "left", True),
                                                                  ("9003", "right", False)]
    right = load_knee(subs[0].image, subs[0].label, side=subs[0].side)
    left = load_knee(subs[1].image, subs[1].label, side=subs[1].side)
    assert not right.flipped and left.flipped and lr_axis(left.affine) == 0
    # The mirrored left knee (read from .mhd, LPS) matches the right knee voxel for voxel.
    np.testing.assert_array_equal(left.labels, lab)
    np.testing.assert_allclose(left.image, img, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.diag(left.affine)[:3]), [0.36, 0.36, 0.7], rtol=1e-6)
    unflipped = load_knee(subs[1].image, subs[1].label, side="left", flip_left=False)
    assert (unflipped.labels != lab).any()                          # the test data are asymmetric


def test_prepare_dataset_feeds_training(oai, tmp_path):
    root, img, lab = oai
    path = prepare_knee_dataset(root, tmp_path / "out", n_test=1)
    dl = json.loads(path.read_text())
    assert [e.get("label") is not None for e in dl["training"]] == [True, False]
    assert dl["test"] == [{"image": "images/9002.nii.gz", "label": "labels/9002.nii.gz"}]
    assert dl["labels"]["2"] == "femoral cartilage"
    written = nib.load(str(tmp_path / "out" / "labels" / "9002.nii.gz"))
    np.testing.assert_array_equal(np.asarray(written.dataobj), lab)
    assert read_datalist(path)                                       # the training data reader accepts it


def test_side_from_file_name(tmp_path):
    img, lab = knee()
    write_nii(tmp_path / "k_LEFT.nii.gz", img)
    v = load_knee(tmp_path / "k_LEFT.nii.gz")
    assert v.side == "left" and v.flipped
    np.testing.assert_array_equal(v.image, img[::-1])


def test_bad_inputs(tmp_path):
    img, lab = knee()
    write_nii(tmp_path / "k.nii.gz", img)
    with pytest.raises(ValueError, match="side unknown"):
        load_knee(tmp_path / "k.nii.gz")
    bad = lab.copy()
    bad[0, 0, 0] = 7
    write_nii(tmp_path / "bad.nii.gz", bad)
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        load_knee(tmp_path / "k.nii.gz", tmp_path / "bad.nii.gz", side="right")
    write_nii(tmp_path / "small.nii.gz", lab[1:])
    with pytest.raises(ValueError, match="does not match"):
        load_knee(tmp_path / "k.nii.gz", tmp_path / "small.nii.gz", side="right")
    write_nii(tmp_path / "flat.nii.gz", np.ones_like(img))
    with pytest.raises(ValueError, match="constant"):
        load_knee(tmp_path / "flat.nii.gz", side="left")
    (tmp_path / "trunc.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(ValueError, match="cannot read"):
        load_knee(tmp_path / "trunc.nii.gz", side="left")
    with pytest.raises(FileNotFoundError, match="images/"):
        find_subjects(tmp_path)
    (tmp_path / "images").mkdir()
    write_nii(tmp_path / "images" / "1.nii.gz", img)
    (tmp_path / "sides.csv").write_text("1,up\n")
    with pytest.raises(ValueError, match="sides.csv:1"):
        find_subjects(tmp_path)
    (tmp_path / "sides.csv").unlink()
    with pytest.raises(ValueError, match="side unknown for"):
        prepare_knee_dataset(tmp_path, tmp_path / "o")


def test_mhd_without_simpleitk(tmp_path, monkeypatch):
    (tmp_path / "k_right.mhd").write_text("NDims = 3\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)              # import now raises ImportError
    with pytest.raises(ImportError, match=r"deepatlas_fast\[knee\]"):
        load_knee(tmp_path / "k_right.mhd")
