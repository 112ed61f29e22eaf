"""Augmentation: identity, left-right flip with label swap, shared spatial transform of image and
targets, determinism, and exact resume of an augmented training run."""
import numpy as np
import pytest
import torch

from deepatlas_fast.data.augment import DEFAULTS, FREESURFER_LR_PAIRS, Augmenter, lr_axis_of, lr_permutation
from deepatlas_fast.training.config import load_config

VALUES = [0, 2, 17, 41, 53, 16]  # background, L/R white matter, L/R hippocampus, brain stem (unpaired)
OFF = dict(DEFAULTS, rotate=0.0, scale=0.0, shear=0.0, translate=0.0, elastic=0.0, gamma=0.0, bias=0.0, noise=0.0)


def _volume(shape=(10, 9, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, *shape, generator=g) + 0.1
    labels = torch.randint(0, len(VALUES), (1, 1, *shape), generator=g)
    return image, labels


def _aug(cfg, shape=(10, 9, 8), axis=0):
    return Augmenter(cfg, VALUES, voxel_mm=(2.0, 2.0, 2.0), data_shape=shape, lr_axis=axis)


def test_lr_permutation_swaps_declared_pairs_only():
    perm = lr_permutation(VALUES, "freesurfer")
    assert [VALUES[i] for i in perm] == [0, 41, 53, 2, 17, 16]
    assert lr_permutation(VALUES, None) == list(range(len(VALUES)))
    assert lr_permutation(VALUES, [[16, 0]]) == [5, 1, 2, 3, 4, 0]
    assert (2, 41) in FREESURFER_LR_PAIRS
    with pytest.raises(ValueError, match="pairs"):
        lr_permutation(VALUES, [[2, 41, 3]])


def test_lr_axis_follows_the_affine():
    assert lr_axis_of(np.diag([-2.0, 2.0, 2.0, 1.0])) == 0
    # the OASIS demo grid: i runs along -x, j along +z, k along +y
    oasis = np.array([[-2, 0, 0, 79.5], [0, 0, 2, -111.5], [0, -2, 0, 95.5], [0, 0, 0, 1.0]])
    assert lr_axis_of(oasis) == 0
    assert lr_axis_of(np.array([[0, 0, 1.5, 0], [1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])) == 2


def test_all_transforms_off_is_the_identity():
    image, labels = _volume()
    out, lab = _aug(OFF)(torch.Generator().manual_seed(1), image, labels)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
    assert torch.equal(lab, labels)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_mirrors_the_volume_and_swaps_left_and_right(axis):
    image, labels = _volume()
    out, lab = _aug(dict(OFF, flip=1.0), axis=axis)(torch.Generator().manual_seed(0), image, labels)
    torch.testing.assert_close(out, image.flip(2 + axis), atol=1e-5, rtol=0)
    perm = torch.tensor(lr_permutation(VALUES, "freesurfer"))
    assert torch.equal(lab, perm[labels.flip(2 + axis)])
    # probability targets: the same mirror, channels swapped
    probs = torch.nn.functional.one_hot(labels[:, 0], len(VALUES)).movedim(-1, 1).float()
    _, p = _aug(dict(OFF, flip=1.0), axis=axis)(torch.Generator().manual_seed(0), image, probs)
    torch.testing.assert_close(p, probs.flip(2 + axis)[:, perm], atol=1e-5, rtol=0)


def test_no_flip_without_a_pair_in_the_label_table():
    image, labels = _volume()
    aug = Augmenter(dict(OFF, flip=1.0), [0, 16], voxel_mm=(2, 2, 2), data_shape=image.shape[2:])
    out, _ = aug(torch.Generator().manual_seed(0), image, labels.clamp(max=1))
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_image_and_targets_share_one_spatial_transform():
    # a smooth image and its thresholded label map: after the same warp, the labels still are the
    # threshold of the image (away from the threshold itself and from the zero-padded border), for
    # integer and probability targets
    shape = (16, 16, 16)
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    image = (1 + torch.sin(g[0] / 3) * torch.cos(g[1] / 4) + 0.01 * g[2])[None, None] / 2
    labels = (image > 0.5).long()
    cfg = dict(DEFAULTS, gamma=0.0, bias=0.0, noise=0.0, rotate=15.0, elastic=3.0)
    aug = Augmenter(cfg, [0, 16], voxel_mm=(2, 2, 2), data_shape=shape)
    disp, _ = aug.spatial(torch.Generator().manual_seed(3), 1, shape)
    loc = g + disp[0]
    inside = ((loc >= 0.5) & (loc <= 14.5)).all(0)
    out, lab = aug(torch.Generator().manual_seed(3), image, labels)
    clear = ((out - 0.5).abs() > 0.1) & inside
    assert clear.float().mean() > 0.3
    assert torch.equal(lab[clear], (out > 0.5).long()[clear])
    probs = torch.cat([1 - labels, labels], 1).float()
    _, p = aug(torch.Generator().manual_seed(3), image, probs)
    assert torch.equal(p.argmax(1, keepdim=True)[clear], lab[clear])
    assert not torch.equal(out, image)  # it did move


def test_same_generator_same_transform():
    image, labels = _volume((12, 12, 12))
    aug = _aug(dict(DEFAULTS, flip=0.5), (12, 12, 12))
    a = aug(torch.Generator().manual_seed(7), image, labels)
    b = aug(torch.Generator().manual_seed(7), image, labels)
    c = aug(torch.Generator().manual_seed(8), image, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_intensity_keeps_the_background_and_varies_the_rest():
    image = torch.zeros(2, 1, 12, 12, 12)
    image[:, :, 3:9, 3:9, 3:9] = 0.5
    aug = _aug(dict(OFF, gamma=0.3, bias=0.3, noise=0.05), (12, 12, 12))
    out, none = aug(torch.Generator().manual_seed(0), image)
    assert none is None
    assert torch.equal(out[image == 0], torch.zeros_like(out[image == 0]))
    assert out[image > 0].std() > 0.01 and (out >= 0).all()
    assert not torch.equal(out[0], out[1])  # each sample draws its own transform


def test_config_validation():
    load_config(None, ["augment.enabled=true", "augment.flip=0.5", "augment.lr_pairs=[[2,41]]"])
    for bad in ("augment.flip=2", "augment.rotate=-1", "augment.elastic_spacing=0", "augment.lr_pairs=left",
                "augment.noise=nan"):
        with pytest.raises(ValueError, match="augment"):
            load_config(None, [bad])
