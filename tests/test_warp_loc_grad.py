"""The warp's location-gradient path (ops.warp_with_loc_grad): an eager CPU forward of a
one-channel image that autograd will differentiate with respect to disp computes d out / d
location with the output, and the backward's disp gradient is grad_out * loc_grad."""
import importlib

import pytest
import torch

import deepatlas_fast as da
from _simd import WARP_LEVELS, at_simd_level
from reference import warp_reference
from test_warp import smooth_disp

ops = torch.ops.deepatlas_fast
warp_module = importlib.import_module("deepatlas_fast.ops.warp")  # (the package's `warp` is the function)
PADS = ["zeros", "border"]


def inputs(dtype, shape=(12, 9, 21), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, *shape, generator=g, dtype=dtype)
    # smooth plus rough: interior blocks, border voxels on every side, a NaN, row tails (W = 21)
    disp = smooth_disp(2, shape, 3.0, dtype=dtype, seed=seed) + torch.randn(2, 3, *shape, generator=g, dtype=dtype)
    disp[1, 0, shape[0] // 2, shape[1] // 2, shape[2] // 2] = float("nan")
    return image, disp


@pytest.mark.parametrize("level", WARP_LEVELS)
@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_gives_the_plain_ops_bits_at_each_simd_level(level, padding, dtype):
    """out is warp's output, loc_grad the disp gradient of warp_backward for grad_out = 1."""
    image, disp = inputs(dtype)
    ones = torch.ones(2, 1, *disp.shape[2:], dtype=dtype)

    def run():
        out, loc = ops.warp_with_loc_grad(image, disp, padding)
        plain = ops.warp(image, disp, "linear", padding)
        _, grad_disp = ops.warp_backward(ones, image, disp, "linear", padding, [False, True])
        return out, loc, plain, grad_disp

    out, loc, plain, grad_disp = at_simd_level(level, run)
    assert torch.equal(out.nan_to_num(7.0), plain.nan_to_num(7.0))
    assert torch.equal(loc.nan_to_num(7.0), grad_disp.nan_to_num(7.0))


@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("image_grad", [False, True])
def test_gradients_match_grid_sample(padding, image_grad):
    image, disp = inputs(torch.float64)
    disp = disp.nan_to_num(0.0)
    i, d = image.clone().requires_grad_(image_grad), disp.clone().requires_grad_()
    assert warp_module._saves_loc_grad(i, d, "linear")
    g = torch.randn(2, 1, *disp.shape[2:], dtype=torch.float64)
    out = da.warp(i, d, padding=padding)
    grads = torch.autograd.grad(out, (i, d) if image_grad else (d,), g)
    ri, rd = i.detach().clone().requires_grad_(image_grad), d.detach().clone().requires_grad_()
    ref = warp_reference(ri, rd, "linear", padding)
    ref_grads = torch.autograd.grad(ref, (ri, rd) if image_grad else (rd,), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_gradcheck():
    image, disp = inputs(torch.float64, shape=(4, 5, 4))
    disp = disp.nan_to_num(0.0) * 0.5 + 0.013  # away from cell faces, where the derivative jumps
    for padding in PADS:
        f = lambda i, d: da.warp(i, d, padding=padding)  # noqa: E731
        assert torch.autograd.gradcheck(f, (image.clone().requires_grad_(), disp.clone().requires_grad_()),
                                        eps=1e-6, atol=1e-6)


def test_second_backward_through_a_retained_graph():
    """The first backward turns loc_grad into the disp gradient in place; a second one
    (retain_graph=True) must recompute it, not reuse the consumed buffer."""
    image, disp = inputs(torch.float64)
    d = disp.nan_to_num(0.0).requires_grad_()
    out = da.warp(image, d)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, d, g, retain_graph=True)[0].clone()
    second = torch.autograd.grad(out, d, g)[0]
    torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)
    third = torch.autograd.grad(da.warp(image, d), d, 2 * g)[0]
    torch.testing.assert_close(third, 2 * first, rtol=1e-12, atol=1e-12)


def test_which_calls_take_the_path():
    image, disp = inputs(torch.float32)
    d = disp.clone().requires_grad_()
    take = warp_module._saves_loc_grad
    assert take(image, d, "linear")
    assert not take(image, d, "nearest")              # no location gradient
    assert not take(image.expand(2, 3, -1, -1, -1), d, "linear")  # several channels
    assert not take(image.requires_grad_(), disp, "linear")       # no disp gradient wanted
    with torch.no_grad():
        assert not take(image, d, "linear")


def test_torch_compile_keeps_the_plain_op(monkeypatch):
    image, disp = inputs(torch.float64, shape=(5, 5, 5))
    disp = disp.nan_to_num(0.0)

    def not_under_compile(ctx, *args):
        raise AssertionError("the location-gradient path was traced")

    # (dynamo traces an autograd.Function through its forward, not its apply; the eager warp
    # below must still take the path: restored before it)
    monkeypatch.setattr(warp_module._WarpSavingLocGrad, "forward", staticmethod(not_under_compile))
    compiled = torch.compile(lambda i, d: da.warp(i, d).square().sum(), backend="eager", fullgraph=True)
    d1, d2 = disp.clone().requires_grad_(), disp.clone().requires_grad_()
    compiled(image, d1).backward()
    monkeypatch.undo()
    da.warp(image, d2).square().sum().backward()
    torch.testing.assert_close(d1.grad, d2.grad, rtol=1e-12, atol=1e-12)


def test_opcheck_and_bad_input():
    image, disp = inputs(torch.float64, shape=(3, 4, 5))
    torch.library.opcheck(ops.warp_with_loc_grad.default, (image, disp.nan_to_num(0.0), "border"))
    with pytest.raises(ValueError, match="image must have one channel, got 2"):
        ops.warp_with_loc_grad(image.expand(2, 2, -1, -1, -1), disp, "zeros")
    with pytest.raises(ValueError, match="padding must be"):
        ops.warp_with_loc_grad(image, disp, "reflect")


def backward_cases(dtype):
    """(image, disp, grad_out) for the slab schedule (smooth field, SIMD rows for float32), the
    sort schedule (rough field) and a grad_out broadcast along every axis (as out.sum() gives)."""
    image, rough = inputs(dtype, shape=(24, 9, 21))
    rough = rough * 2.0
    smooth = smooth_disp(2, (24, 9, 21), 0.5, dtype=dtype, seed=1)
    g = torch.randn(2, 1, 24, 9, 21, generator=torch.Generator().manual_seed(2), dtype=dtype)
    # (one batch item for the rough field: with two, its 24 chunks of one slice would still
    # fill the two-per-phase slab schedule)
    return [(image, smooth, g), (image[:1], rough[:1], g[:1]), (image, smooth, torch.ones((), dtype=dtype).expand_as(g))]


@pytest.mark.parametrize("level", WARP_LEVELS)
@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_with_loc_grad_gives_the_two_pass_bits(level, padding, dtype):
    """warp_backward_with_loc_grad = the image gradient of warp_backward and loc_grad * grad_out
    (the multiply done by the scatter's rows), bit for bit, at each SIMD level and schedule."""
    for image, disp, g in backward_cases(dtype):
        _, loc = ops.warp_with_loc_grad(image, disp, padding)

        def run():
            fused = loc.clone()
            grad_image = ops.warp_backward_with_loc_grad(g, image, disp, fused, padding)
            plain = ops.warp_backward(g, image, disp, "linear", padding, [True, False])[0]
            return grad_image, plain, fused

        grad_image, plain, fused = at_simd_level(level, run)
        assert torch.equal(grad_image, plain)
        assert torch.equal(fused.nan_to_num(7.0), (loc * g).nan_to_num(7.0))


def test_backward_with_loc_grad_takes_any_loc_grad_strides():
    image, disp, g = backward_cases(torch.float32)[0]
    _, loc = ops.warp_with_loc_grad(image, disp, "zeros")
    strided = torch.empty(2, 24, 9, 21, 3).permute(0, 4, 1, 2, 3).copy_(loc)  # channels last
    grad_image = ops.warp_backward_with_loc_grad(g, image, disp, strided, "zeros")
    assert torch.equal(grad_image, ops.warp_backward(g, image, disp, "linear", "zeros", [True, False])[0])
    assert torch.equal(strided, loc * g)


def test_backward_with_loc_grad_opcheck_and_bad_input():
    image, disp = inputs(torch.float64, shape=(3, 4, 5))
    disp = disp.nan_to_num(0.0)
    _, loc = ops.warp_with_loc_grad(image, disp, "zeros")
    g = torch.randn_like(image)
    torch.library.opcheck(ops.warp_backward_with_loc_grad.default, (g, image, disp, loc.clone(), "zeros"))
    with pytest.raises(ValueError, match=r"loc_grad must be \[2, 3, 3, 4, 5\]"):
        ops.warp_backward_with_loc_grad(g, image, disp, loc[:, :2], "zeros")
    with pytest.raises(TypeError, match="loc_grad is Float but image is Double"):
        ops.warp_backward_with_loc_grad(g, image, disp, loc.float(), "zeros")
    with pytest.raises(ValueError, match="image must have one channel, got 2"):
        two = image.expand(2, 2, -1, -1, -1)
        ops.warp_backward_with_loc_grad(g.expand_as(two), two, disp, loc, "zeros")
