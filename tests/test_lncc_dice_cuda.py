"""The LNCC and soft Dice ops on a CUDA device. Skipped where there is none (every machine of
this project so far: the emulator tests in test_lncc.py / test_soft_dice.py run the same
kernels on the CPU)."""
import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.ops import _library
from reference import lncc_reference, soft_dice_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _library.with_cuda, reason="built without CUDA kernels"),
]


@pytest.mark.parametrize("window", [3, 9, 15])
def test_lncc_cuda_matches_reference(window):
    a = torch.randn(2, 2, 9, 10, 11, dtype=torch.float64)
    b = 0.6 * a + torch.randn_like(a)
    ref = lncc_reference(a, b, window)
    x, y = a.cuda().requires_grad_(), b.cuda().requires_grad_()
    out = da.lncc(x, y, window=window)
    torch.testing.assert_close(out.cpu(), ref)
    g = torch.randn(2, dtype=torch.float64)
    out.backward(g.cuda())
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    lncc_reference(ra, rb, window).backward(g)
    torch.testing.assert_close(x.grad.cpu(), ra.grad)
    torch.testing.assert_close(y.grad.cpu(), rb.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lncc_cuda_dtypes(dtype):
    a = torch.randn(1, 1, 12, 12, 12)
    b = 0.6 * a + torch.randn_like(a)
    out = da.lncc(a.cuda().to(dtype), b.cuda().to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), lncc_reference(a.double(), b.double()), rtol=tol, atol=tol)


@pytest.mark.parametrize("labels", [False, True])
def test_soft_dice_cuda_matches_reference(labels):
    logits = torch.randn(2, 5, 9, 10, 11, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 1, 9, 10, 11)) if labels else torch.randn_like(logits).softmax(1)
    ref = soft_dice_reference(logits, target, from_logits=True)
    p = logits.cuda().requires_grad_()
    out = da.soft_dice(p, target.cuda(), from_logits=True)
    torch.testing.assert_close(out.cpu(), ref)
    g = torch.randn(2, 5, dtype=torch.float64)
    out.backward(g.cuda())
    rp = logits.clone().requires_grad_()
    soft_dice_reference(rp, target, from_logits=True).backward(g)
    torch.testing.assert_close(p.grad.cpu(), rp.grad)
    with pytest.raises(ValueError, match="target labels must be in"):
        da.soft_dice(p, torch.full((2, 1, 9, 10, 11), 5, device="cuda"))


def test_cuda_opcheck():
    a = torch.randn(1, 2, 4, 5, 6, device="cuda", requires_grad=True)
    b = torch.randn(1, 2, 4, 5, 6, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.deepatlas_fast.lncc.default, (a, b, 3, 1e-5))
    y = torch.randint(0, 2, (1, 1, 4, 5, 6), device="cuda")
    torch.library.opcheck(torch.ops.deepatlas_fast.soft_dice_sums.default, (a, y, True))
