"""Losses: the wrappers' conventions, global NCC, and the regularisers against float64
finite-difference references and analytic values."""
import pytest
import torch

from deepatlas_fast import losses
from reference import (bending_energy_reference, gradient_l2_reference, lncc_reference,
                       soft_dice_reference)


def test_lncc_loss_is_one_minus_batch_mean():
    a, b = torch.randn(2, 1, 6, 7, 8, dtype=torch.float64), torch.randn(2, 1, 6, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(losses.lncc_loss(a, b, window=5), 1 - lncc_reference(a, b, 5).mean())
    assert losses.lncc_loss(a, a) < 1e-3


def test_ncc_loss():
    a = torch.randn(2, 1, 5, 6, 7, dtype=torch.float64)
    assert abs(float(losses.ncc_loss(a, 3 * a + 1))) < 1e-9      # global NCC: affine invariant
    assert abs(float(losses.ncc_loss(a, -a)) - 2) < 1e-9
    b = torch.randn(2, 1, 5, 6, 7, dtype=torch.float64)
    x, y = a.flatten(1).numpy(), b.flatten(1).numpy()
    import numpy as np
    expected = 1 - np.mean([np.corrcoef(x[i], y[i])[0, 1] for i in range(2)])
    assert abs(float(losses.ncc_loss(a, b, eps=0)) - expected) < 1e-12


def test_dice_loss_background_and_reduction():
    logits = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 5, 6, 7))
    d = soft_dice_reference(logits, y, from_logits=True)
    torch.testing.assert_close(losses.dice_loss(logits, y, from_logits=True), 1 - d[:, 1:].mean())
    torch.testing.assert_close(losses.dice_loss(logits, y, from_logits=True, include_background=True), 1 - d.mean())
    torch.testing.assert_close(losses.dice_loss(logits.softmax(1), y, reduction="none"), 1 - d[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        losses.dice_loss(logits, y, reduction="sum")
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.dice_loss(logits[:, :1], torch.zeros_like(y))


def test_gradient_l2_matches_reference_and_vanishes_on_constants():
    disp = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    assert abs(float(losses.gradient_l2(disp)) - gradient_l2_reference(disp)) < 1e-12
    const = torch.ones(1, 3, 4, 5, 6) * torch.tensor([1.5, -2.0, 7.0]).view(1, 3, 1, 1, 1)
    assert float(losses.gradient_l2(const)) == 0.0  # exactly: DeepAtlas's sum-for-difference bug gives > 0
    # u = (0, 0, 2 w): slope 2 along w only -> (0 + 0 + 4 * 1/3 of the channels) / 3 axes
    w = torch.arange(6, dtype=torch.float64)
    ramp = torch.zeros(1, 3, 4, 5, 6, dtype=torch.float64)
    ramp[:, 2] = 2 * w
    assert abs(float(losses.gradient_l2(ramp)) - 4 / 3 / 3) < 1e-12


def test_bending_energy_matches_reference_and_analytic_values():
    disp = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    assert abs(float(losses.bending_energy(disp)) - bending_energy_reference(disp)) < 1e-12
    d, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (5, 6, 7)), indexing="ij")
    affine = torch.stack([1 + 2 * d - h, 0.5 * w + d, 3 - h])[None]
    assert float(losses.bending_energy(affine)) < 1e-24
    quad = torch.stack([d * d, d * h, torch.zeros_like(d)])[None]  # u_dd = 2; u_dh = 1
    assert abs(float(losses.bending_energy(quad)) - (4 + 2 * 1) / 3) < 1e-12
    with pytest.raises(ValueError, match=">= 3"):
        losses.bending_energy(torch.zeros(1, 3, 2, 5, 5))


def test_regularisers_have_gradients():
    disp = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.gradient_l2, (disp,))
    assert torch.autograd.gradcheck(losses.bending_energy, (disp,))
