"""The cache of freed volume-sized CPU outputs (csrc/common/cpu_memory.h): reused buffers never
leak old values into results, the limit holds, and DEEPATLAS_FAST_CPU_CACHE_MB is honoured."""
import os
import subprocess
import sys

import pytest
import torch

from reference import warp_reference

import deepatlas_fast as da

MIB = 1 << 20
SHAPE = (32, 64, 128)  # 1 MiB per float32 volume: small ones bypass the cache
BIG = (64, 64, 128)    # 2 MiB: the smallest cached size


@pytest.fixture(autouse=True)
def _empty():
    da.empty_cpu_cache()
    yield
    da.empty_cpu_cache()


def poison_cache(*shapes):
    """Leaves NaN-filled buffers of these sizes in the cache (what a reused buffer may hold)."""
    outs = [da.warp(torch.zeros(1, 1, *shape), torch.zeros(1, 3, *shape)) for shape in shapes]
    for t in outs:
        t.fill_(float("nan"))


def test_freed_outputs_are_kept_and_emptied():
    out = da.warp(torch.rand(1, 1, *BIG), torch.zeros(1, 3, *BIG))
    assert da.cpu_cache_bytes() == 0
    ptr = out.data_ptr()
    del out
    assert da.cpu_cache_bytes() == 2 * MIB
    again = da.warp(torch.rand(1, 1, *BIG), torch.zeros(1, 3, *BIG))
    assert again.data_ptr() == ptr and da.cpu_cache_bytes() == 0
    del again
    da.empty_cpu_cache()
    assert da.cpu_cache_bytes() == 0


def test_small_outputs_bypass_the_cache():
    out = da.warp(torch.rand(1, 1, *SHAPE), torch.zeros(1, 3, *SHAPE))
    del out
    assert da.cpu_cache_bytes() == 0


def test_reused_buffers_give_exact_results():
    # The image gradient is a scatter into a buffer that must start at zero: a reused NaN buffer
    # shows at once if it does not. Same for every output that comes from the cache.
    image = torch.rand(1, 1, *BIG, dtype=torch.float64, requires_grad=True)
    disp = (2 * torch.randn(1, 3, *BIG, dtype=torch.float64)).requires_grad_()
    g = torch.randn(1, 1, *BIG, dtype=torch.float64)
    ref = warp_reference(image, disp)
    ref_grads = torch.autograd.grad(ref, (image, disp), g)
    for _ in range(2):  # fresh buffers, then reused ones
        # the float64 output and image gradient (4 MiB), disp gradient (12 MiB)
        poison_cache((2 * BIG[0], *BIG[1:]), (2 * BIG[0], *BIG[1:]), (6 * BIG[0], *BIG[1:]))
        out = da.warp(image, disp)
        grads = torch.autograd.grad(out, (image, disp), g)
        torch.testing.assert_close(out, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)


def test_reused_buffers_for_lncc_and_soft_dice_gradients():
    a = torch.rand(1, 1, *BIG, requires_grad=True)
    b = torch.rand(1, 1, *BIG, requires_grad=True)
    first = torch.autograd.grad(da.lncc(a, b).sum(), (a, b))
    poison_cache(BIG, BIG)
    second = torch.autograd.grad(da.lncc(a, b).sum(), (a, b))
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    probs = torch.rand(1, 2, *BIG, requires_grad=True)
    labels = torch.randint(0, 2, (1, 1, *BIG))
    first = torch.autograd.grad(da.soft_dice(probs, labels).sum(), probs)[0]
    poison_cache((2 * BIG[0], *BIG[1:]))
    second = torch.autograd.grad(da.soft_dice(probs, labels).sum(), probs)[0]
    assert torch.equal(first, second)


def _run(code, mib, cwd):
    env = dict(os.environ, DEEPATLAS_FAST_CPU_CACHE_MB=mib)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_limit_and_off_switch_from_the_environment(tmp_path):
    code = (
        "import torch, deepatlas_fast as da\n"
        f"outs = [da.warp(torch.rand(1, 1, *{BIG}), torch.zeros(1, 3, *{BIG})) for _ in range(3)]\n"
        "del outs\n"
        "print(da.cpu_cache_bytes())\n"
    )
    for mib, held in [("4", 4 * MIB), ("0", 0)]:  # the limit keeps two of the three; 0: none
        run = _run(code, mib, tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert int(run.stdout.split()[-1]) == held
    bad = _run(code, "lots", tmp_path)
    assert bad.returncode != 0 and "DEEPATLAS_FAST_CPU_CACHE_MB must be a whole number of MiB" in bad.stderr
