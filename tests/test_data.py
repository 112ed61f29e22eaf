"""Data: label table, preprocessing round trips, datalists/folders, grid checks, pair sampling."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from _synth import AFFINE, LABEL_VALUES, subject, write_dataset
from deepatlas_fast.data.datasets import PairSampler, VolumeDataset, check_grids, read_data, read_folder, resample_to
from deepatlas_fast.data.io import LabelTable, load_nifti, save_nifti
from deepatlas_fast.data.preprocess import Preprocessing, normalise


def test_label_table_round_trip_and_unknown_values():
    t = LabelTable([2, 41, 3, 255])
    assert t.values == [0, 2, 3, 41, 255] and t.num_classes == 5
    lab = np.array([[[0, 2], [41, 255]]])
    cls = t.to_classes(lab)
    assert cls.tolist() == [[[0, 1], [3, 4]]]
    back = t.to_values(cls)
    assert back.dtype == np.uint8 and (back == lab).all()
    with pytest.raises(ValueError, match=r"\[4, 7\]"):
        t.to_classes(np.array([0, 4, 7, 2]), name="x")


def test_label_table_from_file(tmp_path):
    (tmp_path / "l.txt").write_text("# FreeSurfer\n2 3, 41\n")
    assert LabelTable.from_file(tmp_path / "l.txt").values == [0, 2, 3, 41]


def test_normalise_and_bad_images():
    rng = np.random.default_rng(0)
    a = rng.normal(100, 20, (8, 8, 8)).astype(np.float32)
    n = normalise(a, (1, 99))
    assert n.min() == 0 and n.max() == 1 and n.dtype == np.float32
    assert np.corrcoef(n.ravel(), a.ravel())[0, 1] > 0.98
    with pytest.raises(ValueError, match="constant"):
        normalise(np.full((4, 4, 4), 3.0))
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        normalise(bad)


def test_preprocessing_shapes_and_label_round_trip():
    img, lab = subject((20, 22, 26), seed=1)
    p = Preprocessing(list(LABEL_VALUES), downsample=2, multiple=4)
    x, y = p.image(img), p.label(lab)
    assert x.shape == y.shape == (1, 1, 12, 12, 16) == (1, 1, *p.net_shape(img.shape))
    assert y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1, 2, 3}
    # one-hot "logits" of the pooled classes, upsampled back: labels mostly agree with the original
    logits = torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).float() * 10
    back = p.logits_to_labels(logits, img.shape)
    assert back.shape == img.shape and set(np.unique(back)) <= set(LABEL_VALUES)
    assert (back == lab).mean() > 0.9
    # at factor 1 the round trip is exact
    p1 = Preprocessing(list(LABEL_VALUES), multiple=4)
    y1 = p1.label(lab)
    logits1 = torch.nn.functional.one_hot(y1[:, 0], 4).movedim(-1, 1).float()
    assert (p1.logits_to_labels(logits1, lab.shape) == lab).all()


def test_displacement_to_original_grid_scales_and_aligns():
    p = Preprocessing([0, 1], downsample=2, multiple=4)
    shape = (10, 12, 9)
    # net-grid displacement u_d(i) = 0.25 * i along axis 0 (linear): at original x,
    # i = (x - 0.5) / 2, so u(x) = 2 * 0.25 * (x - 0.5) / 2 = 0.25 * (x - 0.5) away from the borders
    ns = p.net_shape(shape)
    i = torch.arange(ns[0], dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 1, *ns)
    disp = torch.cat([0.25 * i, torch.zeros(1, 2, *ns)], 1)
    u = p.disp_to_original(disp, shape)
    assert u.shape == (1, 3, *shape)
    x = torch.arange(shape[0], dtype=torch.float32)
    assert torch.allclose(u[0, 0, 1:-1, 5, 5], 0.25 * (x[1:-1] - 0.5), atol=1e-5)
    assert u[0, 1:].abs().max() == 0


def test_read_datalist_relative_paths_and_errors(tmp_path):
    dl = write_dataset(tmp_path, n_labelled=2, n_unlabelled=1, n_val=1, shape=(8, 8, 8))
    s = read_data(dl)
    assert len(s["training"]) == 3 and len(s["validation"]) == 1
    assert s["training"][2]["label"] is None and s["training"][0]["label"].is_file()
    (tmp_path / "bad.json").write_text('{"training": [{"image": "nope.nii.gz"}]}')
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_data(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{training")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_data(tmp_path / "broken.json")
    (tmp_path / "nosplit.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="training"):
        read_data(tmp_path / "nosplit.json")


def test_read_folder_matches_labels_by_name(tmp_path):
    img, lab = subject((8, 8, 8))
    save_nifti(tmp_path / "images" / "a.nii.gz", img, AFFINE)
    save_nifti(tmp_path / "images" / "b.nii.gz", img, AFFINE)
    save_nifti(tmp_path / "labels" / "a.nii.gz", lab, AFFINE)
    s = read_folder(tmp_path)
    assert [e["image"].name for e in s["training"]] == ["a.nii.gz", "b.nii.gz"]
    assert s["training"][0]["label"].name == "a.nii.gz" and s["training"][1]["label"] is None


def test_grid_mismatch_is_an_error_unless_resampling(tmp_path):
    img, lab = subject((12, 12, 12))
    save_nifti(tmp_path / "a.nii.gz", img, AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0  # one voxel along i
    save_nifti(tmp_path / "b.nii.gz", img, shifted)
    entries = [{"image": tmp_path / "a.nii.gz", "label": None}, {"image": tmp_path / "b.nii.gz", "label": None}]
    with pytest.raises(ValueError, match="share one grid"):
        check_grids(entries)
    ref = check_grids(entries, resample=True)
    ds = VolumeDataset(entries, Preprocessing([0, 7]), resample=True, ref=ref)
    a, _, _ = ds.load_original(0)
    b, _, aff = ds.load_original(1)
    assert np.allclose(aff, AFFINE)
    # b's voxel i sits at world 2 + 2i = a's voxel i + 1, so on a's grid b is a shifted by one voxel
    assert np.allclose(b[1:], a[:-1], atol=1e-4)


def test_resample_to_identity_and_labels():
    _, lab = subject((10, 10, 10))
    out = resample_to(lab, AFFINE, lab.shape, AFFINE, label=True)
    assert (out == lab).all()


def test_bad_files_and_labels_give_clear_errors(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="junk.nii.gz"):
        load_nifti(tmp_path / "junk.nii.gz")
    img, lab = subject((8, 8, 8))
    save_nifti(tmp_path / "i.nii.gz", img, AFFINE)
    save_nifti(tmp_path / "l.nii.gz", lab, AFFINE)
    ds = VolumeDataset([{"image": tmp_path / "i.nii.gz", "label": tmp_path / "l.nii.gz"}], Preprocessing([0, 7, 42]))
    with pytest.raises(ValueError, match=r"l.nii.gz: label values \[100\]"):
        ds[0]
    save_nifti(tmp_path / "c.nii.gz", np.ones((8, 8, 8), np.float32), AFFINE)
    ds = VolumeDataset([{"image": tmp_path / "c.nii.gz", "label": None}], Preprocessing([0, 7]))
    with pytest.raises(ValueError, match="constant"):
        ds[0]


def test_dataset_cache_and_shapes(tmp_path):
    dl = write_dataset(tmp_path, n_labelled=1, n_unlabelled=1, n_val=0, shape=(12, 12, 12))
    s = read_data(dl)
    ds = VolumeDataset(s["training"], Preprocessing(list(LABEL_VALUES), multiple=8))
    x, y = ds[0]
    assert x.shape == y.shape == (1, 16, 16, 16) and ds[1][1] is None
    assert ds[0][0] is x  # cached: same tensor object


def test_pair_sampler_proportions_and_availability():
    labelled = [True, True, True, False, False]
    s = PairSampler(labelled, {"LL": 2, "LU": 1, "UL": 1, "UU": 0})
    g = torch.Generator().manual_seed(0)
    kinds = Counter()
    for _ in range(800):
        kind, pairs = s.sample(g, 2)
        kinds[kind] += 1
        for i, j in pairs:
            assert i != j and labelled[i] == (kind[0] == "L") and labelled[j] == (kind[1] == "L")
    assert kinds["UU"] == 0
    assert abs(kinds["LL"] / 800 - 0.5) < 0.06 and abs(kinds["LU"] / 800 - 0.25) < 0.06
    # only one unlabelled image: UU impossible and dropped even with weight
    s2 = PairSampler([True, True, False], {"LL": 1, "LU": 1, "UL": 1, "UU": 5})
    assert set(s2.kinds()) == {"LL", "LU", "UL"}
    with pytest.raises(ValueError, match="no image pair"):
        PairSampler([False, False], {"LL": 1}).sample(g, 1)
