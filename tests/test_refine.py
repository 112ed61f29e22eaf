"""Test-time refinement (training.refine): it fits a known smooth deformation better than the
starting field, leaves identical images alone, and refuses bad settings and inputs."""
import math

import pytest
import torch

from deepatlas_fast.errors import ConfigError, DataError
from deepatlas_fast.training.refine import RefineSettings, exp_velocity, refine, rescale_field
from deepatlas_fast.nn.losses import lncc_loss
from deepatlas_fast.ops import warp


def _blobs(shape=(24, 24, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *shape, generator=g)
    for _ in range(3):  # smooth noise: structure at several scales, no flat windows
        x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - x.mean()) / x.std()


def _smooth_field(shape, amplitude=1.5):
    z, y, x = torch.meshgrid(*[torch.linspace(0, math.pi, s) for s in shape], indexing="ij")
    u = torch.stack([torch.sin(y) * torch.sin(x), torch.sin(z) * torch.sin(x), torch.sin(z) * torch.sin(y)])
    return amplitude * u[None]


def _residual(u, truth, margin=4):
    sl = (slice(None), slice(None)) + (slice(margin, -margin),) * 3
    return (u - truth)[sl].norm(dim=1).mean().item()


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_refine_recovers_a_known_smooth_deformation(diffeomorphic):
    moving = _blobs()
    truth = _smooth_field(moving.shape[2:])
    target = warp(moving, truth, padding="border")
    s = RefineSettings(iterations=60, levels=(2, 1), lr=0.1, window=5, lambda_r=0.1,
                       diffeomorphic=diffeomorphic)
    u = refine(moving, target, None, s)
    zero = torch.zeros_like(truth)
    # the similarity improves and the field comes much closer to the truth than the start (0)
    assert lncc_loss(warp(moving, u), target, window=5) < 0.5 * lncc_loss(moving, target, window=5)
    assert _residual(u, truth) < 0.5 * _residual(zero, truth)


def test_refine_is_deterministic_and_keeps_the_identity_for_identical_images():
    moving = _blobs(seed=1)
    s = RefineSettings(iterations=20, levels=(2, 1))
    u1 = refine(moving, moving, None, s)
    u2 = refine(moving, moving, None, s)
    assert torch.equal(u1, u2)
    # Adam moves each value by up to lr (0.1 voxel) a step, so the field jitters around 0 by about that
    assert u1.abs().mean() < 0.05 and u1.abs().max() < 0.25


def test_refine_from_a_start_field_and_zero_iterations():
    moving = _blobs(seed=2)
    init = _smooth_field(moving.shape[2:], 0.5)
    assert torch.equal(refine(moving, moving, init, RefineSettings(iterations=0)), init)


def test_anatomy_term_uses_both_label_maps():
    moving = _blobs(seed=3)
    truth = _smooth_field(moving.shape[2:])
    target = warp(moving, truth, padding="border")
    ml = (moving > 0).long()
    tl = (target > 0).long()
    s = RefineSettings(iterations=30, levels=(2, 1), lambda_a=1.0, lambda_r=0.1)
    u = refine(moving, target, None, s, moving_labels=ml, target_labels=tl, num_classes=2)
    before = ((ml == tl).float().mean()).item()
    after = ((warp(ml.float(), u, mode="nearest") == tl.float()).float().mean()).item()
    assert after > before


def test_exp_of_zero_velocity_is_identity_and_rescale_round_trip():
    v = torch.zeros(1, 3, 8, 8, 8)
    assert torch.equal(exp_velocity(v, 7), v)
    u = torch.ones(1, 3, 8, 8, 8)
    half = rescale_field(u, (4, 4, 4), 2.0)
    assert half.shape[2:] == (4, 4, 4) and torch.allclose(half, torch.full_like(half, 0.5))
    assert torch.allclose(rescale_field(half, (8, 8, 8), 0.5), u)


@pytest.mark.parametrize("bad", [
    {"iterations": -1}, {"iterations": 2.5}, {"window": 4}, {"window": 17}, {"levels": []},
    {"levels": [1, 2]}, {"levels": [2, 0]}, {"lr": 0.0}, {"lr": float("nan")}, {"lambda_r": -1.0},
    {"lambda_a": float("inf")}, {"diffeomorphic": 1}, {"unknown": 3},
])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="refine"):
        RefineSettings.from_dict(bad)


def test_settings_round_trip():
    s = RefineSettings(iterations=5, levels=[4, 2, 1])
    assert RefineSettings.from_dict(s.to_dict()) == s


def test_bad_inputs_are_data_errors():
    m = _blobs(shape=(8, 8, 8))
    with pytest.raises(DataError, match="one grid"):
        refine(m, _blobs(shape=(8, 8, 10)), None, RefineSettings(iterations=1))
    with pytest.raises(DataError, match="init"):
        refine(m, m, torch.zeros(1, 3, 8, 8, 9), RefineSettings(iterations=1))
    bad = m.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="finite"):
        refine(bad, m, None, RefineSettings(iterations=1))


@pytest.mark.parametrize("override,message", [("refine.window=4", "refine.window must be odd"),
                                              ("refine.levels=[1, 2]", "coarse to fine"),
                                              ("refine.lr=0", "refine.lr must be > 0"),
                                              ("refine.lambda_r=-1", "refine.lambda_r must be >= 0"),
                                              ("refine.iterations=3", "unknown config key 'refine.iterations'")])
def test_run_config_refine_section_is_validated(override, message):
    from deepatlas_fast.training.config import load_config
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_run_config_refine_section_gives_the_settings(tmp_path_factory):
    from _synth import tiny_run
    from deepatlas_fast.training.config import load_config
    from deepatlas_fast.inference.run import load_run
    cfg = load_config(None, ["refine.lambda_r=5", "refine.levels=[2, 1]"])
    assert RefineSettings.from_dict(cfg["refine"], iterations=7) == RefineSettings(iterations=7, lambda_r=5, levels=(2, 1))
    run = load_run(tiny_run(tmp_path_factory.getbasetemp())[1])
    assert run.refine_settings(4) == RefineSettings(iterations=4)  # the defaults, recorded with the run
    run.config["refine"]["lambda_r"] = 0.5
    assert run.refine_settings(4) == RefineSettings(iterations=4, lambda_r=0.5)
    del run.config["refine"]  # a run trained before the section existed: the defaults
    assert run.refine_settings(None) == RefineSettings()
