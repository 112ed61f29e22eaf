"""The warp op on a CUDA device. Skipped where there is none (every machine of this project
so far: these tests have never run; the emulator tests in test_warp.py run the same kernels)."""
import pytest
import torch

import deepatlas_fast as da
from deepatlas_fast.ops import _library
from reference import warp_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _library.with_cuda, reason="built without CUDA kernels"),
]


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_cuda_matches_cpu_reference(mode, padding):
    image = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)
    disp = torch.randn(2, 3, 8, 9, 10, dtype=torch.float64) * 2
    ref = warp_reference(image, disp, mode, padding)
    i = image.cuda().requires_grad_()
    d = disp.cuda().requires_grad_()
    out = da.warp(i, d, mode=mode, padding=padding)
    torch.testing.assert_close(out.cpu(), ref)
    g = torch.randn_like(ref)
    out.backward(g.cuda())
    ri = image.clone().requires_grad_()
    rd = disp.clone().requires_grad_()
    warp_reference(ri, rd, mode, padding).backward(g)
    torch.testing.assert_close(i.grad.cpu(), ri.grad)
    torch.testing.assert_close(d.grad.cpu(), rd.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_dtypes(dtype):
    image = torch.randn(1, 1, 8, 8, 8, device="cuda", dtype=dtype)
    disp = torch.randn(1, 3, 8, 8, 8, device="cuda", dtype=dtype)
    out = da.warp(image, disp)
    ref = warp_reference(image.double(), disp.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_cuda_opcheck():
    image = torch.randn(1, 2, 4, 5, 6, device="cuda", requires_grad=True)
    disp = torch.randn(1, 3, 3, 4, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.deepatlas_fast.warp.default, (image, disp, "linear", "zeros"))
