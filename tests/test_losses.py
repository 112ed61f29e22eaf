"""Losses: the wrappers' conventions, global NCC, and the regularisers against float64
finite-difference references and analytic values."""
import pytest
import torch

from deepatlas_fast.nn import losses
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
    torch.testing.assert_close(losses.dice_loss(logits, y, from_logits=True), 1 - d.mean())
    torch.testing.assert_close(losses.dice_loss(logits, y, from_logits=True, include_background=False), 1 - d[:, 1:].mean())
    torch.testing.assert_close(losses.dice_loss(logits.softmax(1), y, reduction="none", include_background=False),
                               1 - d[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        losses.dice_loss(logits, y, reduction="sum")
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.dice_loss(logits[:, :1], torch.zeros_like(y), include_background=False)


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


def _fit_collapsed_class(loss_fn, steps=300, lr=5.0):
    """Logits w_c * x + b_c of a 3-class image (x = 0, 0.5, 1 for classes 0, 1, 2) where class 2
    starts at probability ~1e-11 everywhere; plain gradient descent -> Dice of class 2."""
    y = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    y[..., :3, :] = 1
    y[..., 4:, :, :] = 2
    x = y.double() / 2
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 0.0, -25.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr)
    for _ in range(steps):
        logits = w.view(1, 3, 1, 1, 1) * x + b.view(1, 3, 1, 1, 1)
        opt.zero_grad()
        loss_fn(logits, y).backward()
        opt.step()
    pred = (w.view(1, 3, 1, 1, 1) * x + b.view(1, 3, 1, 1, 1)).argmax(1, keepdim=True)
    return 2 * ((pred == 2) & (y == 2)).sum().item() / ((pred == 2).sum() + (y == 2).sum()).item()


def test_a_collapsed_class_recovers_under_the_segmentation_loss():
    assert _fit_collapsed_class(lambda p, y: losses.segmentation_loss(p, y)) == 1.0
    # Dice without background and without cross-entropy: the class's gradient is ~its probability
    assert _fit_collapsed_class(lambda p, y: losses.dice_loss(p, y, from_logits=True, include_background=False)) == 0.0


def test_cross_entropy_matches_torch_and_soft_targets():
    logits = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 5, 6, 7))
    torch.testing.assert_close(losses.cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits, y[:, 0]))
    onehot = torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).double()
    torch.testing.assert_close(losses.cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, y[:, 0]))
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    expected = (torch.nn.functional.cross_entropy(logits, y[:, 0], reduction="none") * w[y[:, 0]]).mean()
    torch.testing.assert_close(losses.cross_entropy(logits, y, weight=w), expected)
    torch.testing.assert_close(losses.cross_entropy(logits, onehot, weight=w), expected)
    probs = logits.softmax(1)  # probabilities in: log of the clamped probabilities
    torch.testing.assert_close(losses.cross_entropy(probs, y, from_logits=False),
                               torch.nn.functional.cross_entropy(logits, y[:, 0]))
    with pytest.raises(ValueError, match="match"):
        losses.cross_entropy(logits, onehot[:, :3])
    with pytest.raises(ValueError, match="weights"):
        losses.cross_entropy(logits, y, weight=torch.ones(3))


def test_segmentation_loss_is_dice_plus_weighted_ce():
    logits = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 5, 6, 7))
    d = soft_dice_reference(logits, y, from_logits=True)
    ce = torch.nn.functional.cross_entropy(logits, y[:, 0])
    torch.testing.assert_close(losses.segmentation_loss(logits, y, lambda_ce=0.5), 1 - d.mean() + 0.5 * ce)
    torch.testing.assert_close(losses.segmentation_loss(logits, y, lambda_ce=0, include_background=False),
                               1 - d[:, 1:].mean())
    w = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(losses.dice_loss(logits, y, from_logits=True, weight=w),
                               1 - (d * w).sum(1).mean() / w.sum())


def test_loss_modules_reduce_over_the_batch():
    from deepatlas_fast.nn.losses import (BendingEnergyLoss, DiceLoss, GradientL2Loss, LNCCLoss, NCCLoss,
                                          SegmentationLoss)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 6, 7, 8, generator=g, dtype=torch.float64), torch.rand(3, 1, 6, 7, 8, generator=g, dtype=torch.float64)
    b[1] = a[1]                                               # item 1: identical images
    logits = torch.randn(3, 4, 6, 7, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 1, 6, 7, 8), generator=g)
    disp = torch.randn(3, 3, 6, 7, 8, generator=g, dtype=torch.float64)
    disp[2] = 0.5                                             # item 2: constant field
    cases = [(LNCCLoss(window=3), (a, b)), (NCCLoss(), (a, b)), (GradientL2Loss(), (disp,)),
             (BendingEnergyLoss(), (disp,)), (DiceLoss(from_logits=True), (logits, labels)),
             (SegmentationLoss(weight=[0.5, 1, 1, 2]), (logits, labels))]
    for module, inputs in cases:
        mean = module(*inputs)
        module.reduction = "none"
        per_item = module(*inputs)
        module.reduction = "sum"
        total = module(*inputs)
        assert per_item.shape == (3,), type(module).__name__
        assert torch.allclose(per_item.mean(), mean) and torch.allclose(per_item.sum(), total), type(module).__name__
        assert len(set(per_item.tolist())) == 3, type(module).__name__   # really per item
    assert LNCCLoss(window=3, reduction="none")(a, b)[1] < 1e-4        # identical images: loss ~0 (eps)
    assert GradientL2Loss(reduction="none")(disp)[2] == 0             # constant field: exactly 0
    with pytest.raises(ValueError, match="reduction"):
        DiceLoss(reduction="batch")
