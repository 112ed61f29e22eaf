"""Affine pre-alignment: recovers known affines on a real (4 mm) brain, Dice rises, clear errors."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepatlas_fast.cli import main as cli_main
from deepatlas_fast.data.prealign import apply_affine, initial_matrix, prealign

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def brain():
    img = nib.load(str(DATA / "oasis_a_T1_4mm.nii.gz"))
    seg = np.asarray(nib.load(str(DATA / "oasis_a_seg_4mm.nii.gz")).dataobj).astype(np.int16)
    return np.asarray(img.dataobj).astype(np.float32), seg, img.affine


def random_affine(shape, rng, deg=8.0, scale=0.08, shift=3.0):
    """4x4 reference-voxel -> moving-voxel matrix about the volume centre."""
    a = np.deg2rad(rng.uniform(-deg, deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    A = rx @ ry @ rz @ np.diag(1 + rng.uniform(-scale, scale, 3))
    c = (np.array(shape) - 1) / 2
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = c - A @ c + rng.uniform(-shift, shift, 3)
    return M


def voxel_error(M_est, M_true, mask):
    """Largest distance (voxels) between where the two matrices send the masked voxels."""
    x = np.stack(np.nonzero(mask)).astype(float)
    d = (M_est - M_true)[:3, :3] @ x + (M_est - M_true)[:3, 3:]
    return float(np.linalg.norm(d, axis=0).max())


def dice(a, b):
    vals = [v for v in np.unique(b) if v != 0]
    return float(np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in vals]))


def make_moving(brain, seed):
    img, seg, _ = brain
    M = random_affine(img.shape, np.random.default_rng(seed))
    # moving(y) = reference(M^-1 y): registering moving back onto the reference must give M.
    Mi = np.linalg.inv(M)
    return apply_affine(img, Mi, img.shape, padding="border"), apply_affine(seg, Mi, seg.shape, mode="nearest"), M


def test_recovers_known_affine_mse(brain):
    img, seg, _ = brain
    mov, mov_seg, M = make_moving(brain, 0)
    res = prealign(mov, img, moving_labels=mov_seg, similarity="mse", init="identity",
                   levels=(2, 1), iterations=(60, 40))
    assert voxel_error(np.eye(4), M, seg > 0) > 2.0          # the task is not trivial
    assert voxel_error(res.matrix, M, seg > 0) < 0.25        # 4 mm voxels: < 1 mm everywhere in the brain
    assert res.warped_labels.dtype == mov_seg.dtype
    assert dice(res.warped_labels, seg) > dice(mov_seg, seg) + 0.15


def test_lncc_with_dice_term_and_moments_init(brain):
    img, seg, _ = brain
    mov, mov_seg, M = make_moving(brain, 2)
    before = dice(mov_seg, seg)
    # LNCC and Dice (6 large structures) at half resolution keep this test fast.
    res = prealign(mov, img, moving_labels=mov_seg, reference_labels=seg, similarity="lncc",
                   label_values=[2, 3, 4, 41, 42, 43], levels=(2,), iterations=(40,))
    assert voxel_error(res.matrix, M, seg > 0) < 1.0
    assert dice(res.warped_labels, seg) > before + 0.15
    assert len(res.losses) == 1 and res.world_matrix is None


def test_moments_init_matches_centroids(brain):
    img, _, _ = brain
    M = np.eye(4)
    M[:3, 3] = [6.0, -5.0, 4.0]                                # content moved by ~9 voxels
    mov = apply_affine(img, np.linalg.inv(M), img.shape)
    M0 = initial_matrix(mov, img, "center")
    np.testing.assert_allclose(M0[:3, 3], M[:3, 3], atol=1.0)   # content leaving the grid shifts centroids a bit
    assert np.allclose(initial_matrix(mov, img, "identity"), np.eye(4))


def test_bad_inputs(brain):
    img, seg, _ = brain
    with pytest.raises(ValueError, match="3D"):
        prealign(img[0], img)
    bad = img.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prealign(bad, img)
    with pytest.raises(ValueError, match="constant"):
        prealign(np.ones_like(img), img)
    with pytest.raises(ValueError, match="does not match"):
        prealign(img, img, moving_labels=seg[1:])
    with pytest.raises(ValueError, match="integer"):
        prealign(img, img, moving_labels=seg + 0.5)
    with pytest.raises(ValueError, match="similarity"):
        prealign(img, img, similarity="mi")
    with pytest.raises(ValueError, match="equal length"):
        prealign(img, img, levels=(2, 1), iterations=(10,))
    with pytest.raises(ValueError, match="too small"):
        prealign(img, img, levels=(32,), iterations=(1,))
    with pytest.raises(ValueError, match="header"):
        prealign(img, img, init="header")
    with pytest.raises(ValueError, match="no nonzero label"):
        prealign(img, img, moving_labels=(seg > 0) * 1, reference_labels=(seg > 0) * 2)


def test_cli_nifti_roundtrip(brain, tmp_path, capsys):
    img, seg, aff = brain
    mov, mov_seg, M = make_moving(brain, 3)
    # The moving file has its own header: a translated world frame, which the matrix must absorb.
    aff_m = aff.copy()
    aff_m[:3, 3] += [10.0, -20.0, 5.0]
    for name, arr, a in [("mov", mov, aff_m), ("mov_seg", mov_seg, aff_m), ("ref", img, aff)]:
        nib.save(nib.Nifti1Image(arr, a), str(tmp_path / f"{name}.nii.gz"))
    out, lout, mout = tmp_path / "w.nii.gz", tmp_path / "wl.nii.gz", tmp_path / "m.txt"
    rc = cli_main(["prealign", str(tmp_path / "mov.nii.gz"), str(tmp_path / "ref.nii.gz"), "-o", str(out),
                   "--labels", str(tmp_path / "mov_seg.nii.gz"), "--labels-out", str(lout),
                   "--matrix-out", str(mout), "--similarity", "mse", "--init", "identity",
                   "--levels", "2", "--iterations", "60", "--quiet"])
    assert rc == 0
    w, wl = nib.load(str(out)), nib.load(str(lout))
    assert np.allclose(w.affine, aff) and np.allclose(wl.affine, aff) and w.shape == img.shape
    assert np.issubdtype(wl.get_data_dtype(), np.integer)
    assert dice(np.asarray(wl.dataobj), seg) > dice(mov_seg, seg) + 0.15
    world = np.loadtxt(str(mout))
    expected = aff_m @ M @ np.linalg.inv(aff)
    x = aff @ np.vstack([np.stack(np.nonzero(seg > 0)), np.ones((1, int((seg > 0).sum())))])
    assert np.linalg.norm((world - expected) @ x, axis=0).max() < 4.0   # mm: one voxel (coarse level only)

    assert cli_main(["prealign", str(tmp_path / "nope.nii.gz"), str(tmp_path / "ref.nii.gz"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("similarity", ["lncc", "mse"])
def test_identical_images_give_the_identity(brain, similarity):
    img, seg, _ = brain
    res = prealign(img, img, similarity=similarity)
    assert np.abs(res.matrix[:3, :3] - np.eye(3)).max() < 1e-3
    assert voxel_error(res.matrix, np.eye(4), seg > 0) < 0.1
    assert abs(res.warped.mean() - img.mean()) < 1e-3 * img.mean()


@pytest.mark.parametrize("similarity", ["lncc", "mse"])
def test_divergence_is_an_error_not_an_empty_image(brain, tmp_path, similarity):
    from deepatlas_fast.errors import DeepAtlasError
    img, _, _ = brain
    moving = make_moving(brain, 3)[0]
    with pytest.raises(DeepAtlasError, match="diverged.*lower lr"):
        prealign(moving, img, similarity=similarity, lr=1e10)
