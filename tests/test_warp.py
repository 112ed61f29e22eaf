"""The warp op against grid_sample (float64) on every device, autograd, opcheck, bad input,
determinism, the CPU's SIMD levels, and the CUDA kernel source run under the CUDA emulator."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepatlas_fast as da
from _devices import DEVICES, assert_one_device, devices_and_dtypes
from _simd import SCALAR, WARP_LEVELS, WARP_SIMD_LEVELS, at_simd_level
from _layouts import relayout
from reference import warp_reference

MODES = ["linear", "nearest"]
PADS = ["zeros", "border"]


def random_inputs(b=2, c=3, in_shape=(5, 6, 7), out_shape=(4, 5, 6), scale=2.0, dtype=torch.float64):
    image = torch.randn(b, c, *in_shape, dtype=dtype)
    # Displacements that reach outside the volume on every side.
    disp = torch.randn(b, 3, *out_shape, dtype=dtype) * scale
    return image, disp


def sample_inputs(device, *, requires_grad=False):
    """Argument tuples (image, disp, mode, padding) of the warp op, float64 on `device`: every
    mode and padding, displacements reaching outside the volume on every side, one and two
    channels, an output grid other than the image's (small enough for gradcheck)."""
    def make(*size, scale=1.0):
        return (torch.randn(size, dtype=torch.float64) * scale).to(device).requires_grad_(requires_grad)

    return [(make(2, 1 if padding == "zeros" else 2, 4, 5, 6), make(2, 3, 3, 4, 5, scale=2.0), mode, padding)
            for mode in MODES for padding in PADS]


@pytest.mark.parametrize("device", DEVICES)
def test_correctness(device):
    for image, disp, mode, padding in sample_inputs(device):
        out = da.warp(image, disp, mode=mode, padding=padding)
        assert out.device == image.device and out.shape == (*image.shape[:2], *disp.shape[2:])
        ref = warp_reference(image.cpu(), disp.cpu(), mode, padding)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    for image, disp, mode, padding in sample_inputs(device, requires_grad=True):
        out = da.warp(image, disp, mode=mode, padding=padding)
        g = torch.randn_like(out)
        ours = torch.autograd.grad(out, (image, disp), g)
        ri, rd = image.detach().cpu().requires_grad_(), disp.detach().cpu().requires_grad_()
        theirs = torch.autograd.grad(warp_reference(ri, rd, mode, padding), (ri, rd), g.cpu())
        for o, r in zip(ours, theirs):
            assert o.device == image.device
            torch.testing.assert_close(o.cpu(), r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    # CPU: the backward must also be exactly reentrant; CUDA's image gradient uses atomics.
    nondet_tol = 0.0 if device == "cpu" else 1e-12
    for image, disp, mode, padding in sample_inputs(device, requires_grad=True):
        f = lambda i, d: da.warp(i, d, mode=mode, padding=padding)  # noqa: E731
        assert torch.autograd.gradcheck(f, (image, disp), eps=1e-6, atol=1e-6, nondet_tol=nondet_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in sample_inputs(device, requires_grad=True) + sample_inputs(device):
        torch.library.opcheck(torch.ops.deepatlas_fast.warp.default, args)


@pytest.mark.parametrize("device, dtype", devices_and_dtypes(cpu=[torch.float32, torch.float16, torch.bfloat16],
                                                             cuda=[torch.float32, torch.float16, torch.bfloat16]))
def test_dtypes(device, dtype):
    """float32, float16 and bfloat16 everywhere (float32 accumulation)."""
    image = torch.randn(1, 1, 8, 8, 8, device=device, dtype=dtype)
    disp = torch.randn(1, 3, 8, 8, 8, device=device, dtype=dtype)
    out = da.warp(image, disp)
    assert out.dtype == dtype and out.device == image.device
    ref = warp_reference(image.double().cpu(), disp.double().cpu())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


def backward_pair(fn, image, disp, g):
    i = image.clone().requires_grad_()
    d = disp.clone().requires_grad_()
    torch.autograd.backward(fn(i, d), g)
    return i.grad, d.grad


@st.composite
def warp_case(draw):
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    in_shape = tuple(draw(st.integers(2, 7)) for _ in range(3))
    out_shape = tuple(draw(st.integers(1, 7)) for _ in range(3))
    scale = draw(st.sampled_from([0.0, 0.7, 3.0]))
    return b, c, in_shape, out_shape, scale, draw(st.sampled_from(MODES)), draw(st.sampled_from(PADS))


@given(warp_case())
def test_forward_backward_match_grid_sample(case):
    b, c, in_shape, out_shape, scale, mode, padding = case
    image, disp = random_inputs(b, c, in_shape, out_shape, scale)
    out = da.warp(image, disp, mode=mode, padding=padding)
    ref = warp_reference(image, disp, mode, padding)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    gi, gd = backward_pair(lambda i, d: da.warp(i, d, mode=mode, padding=padding), image, disp, g)
    ri, rd = backward_pair(lambda i, d: warp_reference(i, d, mode, padding), image, disp, g)
    torch.testing.assert_close(gi, ri, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gd, rd, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADS)
def test_float32_close_to_float64(mode, padding):
    image, disp = random_inputs(dtype=torch.float64)
    ref = warp_reference(image, disp, mode, padding)
    out = da.warp(image.float(), disp.float(), mode=mode, padding=padding)
    assert out.dtype == torch.float32
    # nearest may flip at exact .5 ties under float32 rounding; random data has none
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_identity_and_integer_shift():
    image = torch.randn(1, 2, 6, 7, 8, dtype=torch.float64)
    zero = torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64)
    assert torch.equal(da.warp(image, zero), image)
    shift = zero.clone()
    shift[:, 2] = 1.0  # sample one voxel further along w
    out = da.warp(image, shift)
    assert torch.equal(out[..., :-1], image[..., 1:])
    assert torch.all(out[..., -1] == 0)  # zeros padding beyond the edge
    assert torch.equal(da.warp(image, shift, padding="border")[..., -1], image[..., -1])


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_requested_gradient(needs):
    image, disp = random_inputs()
    i = image.clone().requires_grad_(needs[0])
    d = disp.clone().requires_grad_(needs[1])
    da.warp(i, d).sum().backward()
    assert (i.grad is not None) == needs[0] and (d.grad is not None) == needs[1]
    gi, gd = torch.ops.deepatlas_fast.warp_backward(torch.ones(2, 3, 4, 5, 6, dtype=torch.float64),
                                                    image, disp, "linear", "zeros", list(needs))
    assert (gi.numel() > 0) == needs[0] and (gd.numel() > 0) == needs[1]


def test_non_contiguous_inputs():
    image, disp = random_inputs(2, 3, (6, 5, 7), (5, 6, 4))
    image_t = image.transpose(2, 4).contiguous().transpose(2, 4)  # same values, other strides
    disp_t = disp.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    assert not image_t.is_contiguous() and not disp_t.is_contiguous()
    torch.testing.assert_close(da.warp(image_t, disp_t), warp_reference(image, disp))
    g = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64).expand(2, 3, 5, 6, 4)
    a = backward_pair(da.warp, image_t, disp_t, g[:, :, :, :, :])
    r = backward_pair(warp_reference, image, disp, g)
    torch.testing.assert_close(a[0], r[0])
    torch.testing.assert_close(a[1], r[1])
    # a broadcast (stride-0) gradient, as out.sum().backward() produces
    i = image_t.clone().requires_grad_()
    da.warp(i, disp_t).sum().backward()
    ri = image.clone().requires_grad_()
    warp_reference(ri, disp).sum().backward()
    torch.testing.assert_close(i.grad, ri.grad)


def test_non_finite_displacement_gives_nan_not_garbage():
    image, disp = random_inputs(1, 1, (5, 5, 5), (3, 3, 3), 1.0)
    disp[0, 1, 1, 1, 1] = float("nan")
    disp[0, 0, 2, 2, 2] = float("inf")
    disp[0, 2, 0, 0, 0] = 1e30  # huge but finite: outside, so 0
    out = da.warp(image, disp)
    assert torch.isnan(out[0, 0, 1, 1, 1]) and torch.isnan(out[0, 0, 2, 2, 2])
    assert out[0, 0, 0, 0, 0] == 0
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 0, 1, 1, 1] = mask[0, 0, 2, 2, 2] = False
    assert torch.isfinite(out[mask]).all()
    i = image.clone().requires_grad_()
    da.warp(i, disp).sum().backward()
    assert torch.isfinite(i.grad).all()  # nothing scattered from NaN locations


def test_deterministic_backward_across_runs_and_thread_counts():
    image, disp = random_inputs(2, 2, (20, 18, 16), (20, 18, 16), 3.0, dtype=torch.float32)
    g = torch.randn(2, 2, 20, 18, 16)
    threads = torch.get_num_threads()
    grads = []
    for n in [1, 2, 1, 2]:
        torch.set_num_threads(n)
        grads.append(backward_pair(da.warp, image, disp, g))
    torch.set_num_threads(threads)
    for gi, gd in grads[1:]:
        assert torch.equal(gi, grads[0][0]) and torch.equal(gd, grads[0][1])


def test_torch_compile_traces_the_op():
    image, disp = random_inputs(1, 1, (5, 5, 5), (5, 5, 5), 1.0)
    compiled = torch.compile(lambda i, d: da.warp(i, d) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(image, disp), 2 * warp_reference(image, disp))


@pytest.mark.filterwarnings("error:There is a performance drop")  # vmap must not fall back to a loop
@pytest.mark.parametrize("mode", MODES)
def test_torch_func_transforms(mode):
    """torch.func.grad, vmap and vmap(grad), jacrev over da.warp (they need an autograd.Function
    with setup_context; vmap merges its dimension into the batch): the results equal plain
    autograd through the op, per sample too."""
    image, disp = random_inputs(2, 1, (4, 5, 6), (3, 4, 5), 1.5)
    image_b, disp_b = image[:1], disp[:1]

    def loss(i, d):
        return (da.warp(i, d, mode=mode) ** 2).sum()

    gi, gd = torch.func.grad(loss, argnums=(0, 1))(image_b, disp_b)
    i2, d2 = image_b.clone().requires_grad_(), disp_b.clone().requires_grad_()
    (torch.ops.deepatlas_fast.warp(i2, d2, mode, "zeros") ** 2).sum().backward()
    assert torch.equal(gi, i2.grad) and torch.equal(gd, d2.grad)

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(image[:, None], disp[:, None])
    for k in range(2):
        gi_k, gd_k = torch.func.grad(loss, argnums=(0, 1))(image[k : k + 1], disp[k : k + 1])
        assert torch.equal(per_sample[1][k], gd_k)
        # (the image gradient's order of summation depends on the batch size: rounding only)
        torch.testing.assert_close(per_sample[0][k], gi_k, rtol=1e-12, atol=1e-12)

    # an image shared by all samples, the samples along dimension 1 of disp
    out = torch.vmap(lambda i, d: da.warp(i, d, mode=mode), in_dims=(None, 1))(image_b, disp[None])
    assert torch.equal(out, torch.stack([da.warp(image_b, disp[k : k + 1], mode=mode) for k in range(2)]))
    # the shared image's gradient through that vmap: summed over the samples
    g = torch.func.grad(lambda i: torch.vmap(lambda d: loss(i, d), in_dims=1)(disp[None]).sum())(image_b)
    i3 = image_b.clone().requires_grad_()
    sum(loss(i3, disp[k : k + 1]) for k in range(2)).backward()
    torch.testing.assert_close(g, i3.grad, rtol=1e-12, atol=1e-12)

    jac = torch.func.jacrev(lambda d: da.warp(image_b, d, mode=mode))(disp_b)
    ref = torch.autograd.functional.jacobian(
        lambda d: torch.ops.deepatlas_fast.warp(image_b, d, mode, "zeros"), disp_b)
    torch.testing.assert_close(jac, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "image_shape, disp_shape, kwargs, error, match",
    [
        ((1, 1, 4, 4), (1, 3, 4, 4, 4), {}, ValueError, "image must be 5-D"),
        ((1, 1, 4, 4, 4), (1, 2, 4, 4, 4), {}, ValueError, "disp must be \\[B, 3"),
        ((2, 1, 4, 4, 4), (1, 3, 4, 4, 4), {}, ValueError, "batch sizes differ"),
        ((1, 1, 0, 4, 4), (1, 3, 4, 4, 4), {}, ValueError, "image is empty"),
        ((1, 1, 4, 4, 4), (1, 3, 4, 4, 4), {"mode": "cubic"}, ValueError, "mode must be"),
        ((1, 1, 4, 4, 4), (1, 3, 4, 4, 4), {"padding": "reflect"}, ValueError, "padding must be"),
    ],
)
def test_bad_shapes_and_options(image_shape, disp_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.warp(torch.zeros(image_shape), torch.zeros(disp_shape), **kwargs)


def test_bad_dtypes_and_devices():
    image, disp = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(TypeError, match="both must have one dtype"):
        da.warp(image, disp.double())
    with pytest.raises(TypeError, match="CPU tensors must be float32, float64, float16 or bfloat16"):
        da.warp(image.int(), disp.int())
    with pytest.raises(ValueError, match="is on meta"):
        torch.ops.deepatlas_fast.warp.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), image, disp.to("meta"), "linear", "zeros")


@pytest.mark.parametrize("name", ["warp", "warp_backward", "warp_with_loc_grad", "warp_backward_with_loc_grad"])
def test_every_tensor_on_one_device(name):
    image, disp = torch.rand(2, 1, 5, 5, 5), torch.rand(2, 3, 4, 5, 6)
    grad_out, loc_grad = torch.rand(2, 1, 4, 5, 6), torch.rand(2, 3, 4, 5, 6)
    args = {"warp": (image, disp, "linear", "zeros"),
            "warp_backward": (grad_out, image, disp, "linear", "zeros", [True, True]),
            "warp_with_loc_grad": (image, disp, "zeros"),
            "warp_backward_with_loc_grad": (grad_out, image, disp, loc_grad, "zeros")}[name]
    assert_one_device(getattr(torch.ops.deepatlas_fast, name), args)


# ---- float16/bfloat16 and memory formats on the CPU ----------------------------------------

# rtol of float16/bfloat16 results against the float64 reference evaluated on the same rounded
# inputs: the kernels compute in float32 and round each result to the dtype, half an ulp (2^-8
# of the value for bfloat16's 8 significant bits, 2^-11 for float16's 11); the disp gradient of
# the location-gradient path rounds twice (loc_grad is kept in the dtype). atol covers float32
# rounding where a result cancels to near 0. Arithmetic in the dtype itself would round at
# every step, several ulps.
REDUCED_RTOL = {torch.bfloat16: 2 ** -7 + 1e-5, torch.float16: 2 ** -10 + 1e-5}


def reduced_disp(b, shape, scale, dtype):
    """Displacements exact in float16/bfloat16 whose locations stay 1/16 voxel away from every
    integer and half-integer: there the float64 reference, which goes through a normalised
    grid, could round to the other side of a corner (linear) or of a tie (nearest)."""
    whole = (torch.randn(b, 3, *shape) * scale).round().clamp(-7, 7)
    return (whole + (2 * torch.randint(0, 8, (b, 3, *shape)) + 1) / 16).to(dtype)


@given(warp_case(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_reduced_precision_matches_the_reference_on_the_rounded_inputs(case, dtype):
    """Forward and both gradients (the location-gradient path for one channel in linear mode)."""
    b, c, in_shape, out_shape, scale, mode, padding = case
    image, disp = torch.randn(b, c, *in_shape).to(dtype), reduced_disp(b, out_shape, scale, dtype)
    f = lambda i, d: da.warp(i, d, mode=mode, padding=padding)  # noqa: E731
    ref_f = lambda i, d: warp_reference(i, d, mode, padding)  # noqa: E731
    out = f(image, disp)
    assert out.dtype == dtype
    rtol = REDUCED_RTOL[dtype]
    torch.testing.assert_close(out.double(), ref_f(image.double(), disp.double()), rtol=rtol, atol=1e-5)
    g = torch.randn(out.shape).to(dtype)
    ours = backward_pair(f, image, disp, g)
    theirs = backward_pair(ref_f, image.double(), disp.double(), g.double())
    for o, r in zip(ours, theirs):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
def test_memory_layouts_give_the_contiguous_bits_without_a_copy(layout, c, volume_copies):
    """Any layout is read through its strides (no copy of a volume), with the same bits as
    contiguous inputs (each value comes from the same code in the same order; the SIMD rows,
    which only serve W-contiguous rows, give the scalar code's bits). The output takes the
    image's memory format, each gradient its input's: channels_last_3d for channels-last
    inputs, contiguous otherwise."""
    ops = torch.ops.deepatlas_fast
    image, disp = random_inputs(2, c, (6, 7, 9), (5, 6, 8), 2.0, dtype=torch.float32)
    image_l, disp_l = relayout(image, layout), relayout(disp, layout)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    g = torch.randn(2, c, 5, 6, 8)
    for mode, padding in [("linear", "zeros"), ("linear", "border"), ("nearest", "zeros")]:
        out = ops.warp(image_l, disp_l, mode, padding)
        assert torch.equal(out, ops.warp(image, disp, mode, padding)) and out.is_contiguous(memory_format=fmt)
        grads = ops.warp_backward(g, image_l, disp_l, mode, padding, [True, True])
        for ours, theirs in zip(grads, ops.warp_backward(g, image, disp, mode, padding, [True, True])):
            assert torch.equal(ours, theirs) and ours.is_contiguous(memory_format=fmt)
        # autograd, with the location-gradient path for one channel in linear mode (.grad
        # takes the layout of its tensor: autograd's own rule)
        i, d = image_l.detach().requires_grad_(), disp_l.detach().requires_grad_()
        torch.autograd.backward(da.warp(i, d, mode=mode, padding=padding), g)
        assert torch.equal(i.grad, grads[0])
        torch.testing.assert_close(d.grad, grads[1], rtol=1e-6, atol=1e-6)

    def run():
        ops.warp(image_l, disp_l, "linear", "zeros")
        ops.warp_backward(g, image_l, disp_l, "linear", "zeros", [True, True])
        if c == 1:
            ops.warp_backward_with_loc_grad(g, image_l, disp_l, ops.warp_with_loc_grad(image_l, disp_l)[1], "zeros")
    assert volume_copies(run, image.shape, disp.shape) == []


def test_opcheck_reduced_precision_and_channels_last():
    """The fake kernels give the real kernels' dtypes and strides (opcheck compares them)."""
    image, disp = random_inputs(2, 1, (5, 6, 7), (4, 5, 6), 2.0, dtype=torch.float32)
    cl = torch.channels_last_3d
    for i, d in [(image.bfloat16(), disp.bfloat16()), (image.half(), disp.half()),
                 (image.contiguous(memory_format=cl), disp.contiguous(memory_format=cl)),
                 (image.contiguous(memory_format=cl), disp), (image, disp.contiguous(memory_format=cl)),
                 (image.expand(2, 3, 5, 6, 7).contiguous(memory_format=cl).bfloat16(), disp.bfloat16())]:
        for requires_grad in (True, False):
            args = (i.clone().requires_grad_(requires_grad), d.clone().requires_grad_(requires_grad))
            torch.library.opcheck(torch.ops.deepatlas_fast.warp.default, (*args, "linear", "zeros"))
        g = torch.randn(2, i.shape[1], 4, 5, 6, dtype=i.dtype)
        torch.library.opcheck(torch.ops.deepatlas_fast.warp_backward.default,
                              (g, i, d, "linear", "border", [True, True]))
        if i.shape[1] == 1:
            torch.library.opcheck(torch.ops.deepatlas_fast.warp_with_loc_grad.default, (i, d, "zeros"))
            loc = torch.ops.deepatlas_fast.warp_with_loc_grad(i, d, "zeros")[1]
            torch.library.opcheck(torch.ops.deepatlas_fast.warp_backward_with_loc_grad.default,
                                  (g, i, d, loc, "zeros"))


# ---- the CUDA kernel source, executed by the CUDA emulator ------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("launch", [(32, 3), (64, 1), (7, 5)])
def test_cuda_kernels_under_emulator(mode, padding, launch, emulated):
    """Grid-stride loops (grids smaller than the work), odd block sizes and real concurrent
    atomics: the .cuh kernels must agree with the float64 reference."""
    image, disp = random_inputs(2, 2, (5, 6, 7), (4, 5, 6), 2.0)
    out = emulated.warp(image, disp, mode, padding, *launch)
    torch.testing.assert_close(out, warp_reference(image, disp, mode, padding), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    ri, rd = backward_pair(lambda i, d: warp_reference(i, d, mode, padding), image, disp, g)
    gi, gd = emulated.warp_backward(g, image, disp, mode, padding, [True, True], *launch)
    torch.testing.assert_close(gi, ri, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gd, rd, rtol=1e-11, atol=1e-11)
    gi2, gd2 = emulated.warp_backward(g, image, disp, mode, padding, [True, False], *launch)
    assert gd2.numel() == 0
    torch.testing.assert_close(gi2, ri, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_kernels_under_emulator(dtype, emulated):
    """The CUDA build takes half/bfloat16 with float32 accumulation, as the CPU path does."""
    image, disp = random_inputs(1, 2, (6, 6, 6), (5, 5, 5), 1.5, dtype=torch.float32)
    ref = warp_reference(image.double(), disp.double())
    out = emulated.warp(image.to(dtype), disp.to(dtype), "linear", "zeros", 32, 4)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    gi, gd = emulated.warp_backward(g, image.to(dtype), disp.to(dtype), "linear", "zeros", [True, True], 32, 4)
    assert gi.dtype == dtype and gd.dtype == dtype
    ri, rd = backward_pair(warp_reference, image.double(), disp.to(dtype).double(), g.double())
    torch.testing.assert_close(gi.double(), ri, rtol=tol, atol=tol)


def test_cuda_launchers_keep_memory_formats_under_emulator(emulated):
    """The CUDA launchers give the CPU kernels' (and the fake kernels') strides: the output in
    the image's memory format, each gradient in its input's."""
    ops = torch.ops.deepatlas_fast
    image, disp = random_inputs(2, 3, (5, 6, 7), (4, 5, 6), 2.0)
    cl = torch.channels_last_3d
    for i, d in [(image.contiguous(memory_format=cl), disp), (image, disp.contiguous(memory_format=cl))]:
        out = emulated.warp(i, d, "linear", "zeros", 32, 3)
        assert out.stride() == ops.warp(i, d, "linear", "zeros").stride()
        g = torch.randn_like(out)
        emu = emulated.warp_backward(g, i, d, "linear", "zeros", [True, True], 32, 3)
        for e, c in zip(emu, ops.warp_backward(g, i, d, "linear", "zeros", [True, True])):
            assert e.stride() == c.stride()
            torch.testing.assert_close(e, c, rtol=1e-11, atol=1e-11)


# ---- CPU fast paths: AVX2 rows and the slab schedule of the image gradient ---------------

def smooth_disp(b, shape, magnitude, dtype=torch.float64, seed=0):
    """Smooth displacement (as a registration net gives): the slab schedule's usual input."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, 3, 3, 3, 3, generator=g, dtype=dtype) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def both_paths(image, disp, g, mode, padding, levels):
    """Forward and both gradients at each DEEPATLAS_FAST_SIMD level."""
    def run():
        out = da.warp(image, disp, mode=mode, padding=padding)
        return (out, *backward_pair(lambda i, d: da.warp(i, d, mode=mode, padding=padding), image, disp, g))
    return [at_simd_level(level, run) for level in levels]


@pytest.mark.parametrize("level", WARP_LEVELS)
@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("c, in_shape, out_shape", [(1, (9, 10, 21), (9, 10, 21)), (3, (7, 8, 17), (6, 9, 19)),
                                                    (2, (12, 11, 24), (10, 8, 16))])
def test_simd_level_bit_identical_to_scalar_and_close_to_float64(level, padding, c, in_shape, out_shape):
    """Row tails (W not a multiple of 8), blocks mixing interior and border voxels, NaN, C > 1,
    a broadcast gradient: each SIMD level must give the scalar path's bits, and every level
    (the scalar one too) float64's values to float32 rounding."""
    image = torch.randn(2, c, *in_shape, dtype=torch.float64)
    disp = smooth_disp(2, out_shape, 2.0) + 0.3 * torch.randn(2, 3, *out_shape, dtype=torch.float64)
    disp[0, 0, 1, 2, 3] = float("nan")
    disp[1, 2, 2, 3, 9] = float("nan")
    ref = warp_reference(image, disp, "linear", padding)
    g = torch.randn_like(ref)
    ri, rd = backward_pair(lambda i, d: warp_reference(i, d, "linear", padding), image, disp, g)
    if level != SCALAR:
        for grad in [g.float(), torch.ones(1).float().expand_as(g)]:
            (o0, i0, d0), (o1, i1, d1) = both_paths(image.float(), disp.float(), grad, "linear", padding, [SCALAR, level])
            assert torch.equal(o0.nan_to_num(7.0), o1.nan_to_num(7.0))
            assert torch.equal(i0, i1) and torch.equal(d0.nan_to_num(7.0), d1.nan_to_num(7.0))
    (o1, i1, d1), = both_paths(image.float(), disp.float(), g.float(), "linear", padding, [level])
    ok = disp.isfinite().all(1, keepdim=True)  # ours is NaN at NaN locations, grid_sample 0
    assert o1.isnan().sum() == c * (~ok).sum()
    torch.testing.assert_close(torch.where(ok, o1.double(), 0), torch.where(ok, ref, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i1.double(), ri, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.where(ok, d1.double(), 0), torch.where(ok, rd, 0), rtol=1e-4, atol=1e-4)


@st.composite
def simd_case(draw):
    # 16+ slices and a small d-displacement: the image gradient takes the slab schedule (whose
    # rows are the SIMD ones; the sort schedule is scalar); h and w displacements of any size.
    shape = (draw(st.integers(16, 24)), draw(st.integers(2, 6)), draw(st.integers(8, 40)))
    stretch = draw(st.sampled_from([0.0, 0.5, -0.4, 1.0]))  # w shift growing along w: cell steps 0, 1, 2
    noise = draw(st.sampled_from([0.0, 0.3, 1.5]))
    return (draw(st.integers(1, 2)), shape, stretch, noise, draw(st.integers(0, 2**16)),
            draw(st.sampled_from(PADS)), draw(st.booleans()))


@pytest.mark.parametrize("level", WARP_SIMD_LEVELS)
@given(case=simd_case())
@settings(max_examples=60, deadline=None)
def test_simd_level_bit_identical_on_random_fields(level, case):
    """Runs of every length and position in a block, cell steps of 0 to 2 along x, cell rows
    changing inside blocks, border voxels: the forward and the gradients give the scalar path's
    bits at each SIMD level."""
    c, shape, stretch, noise, seed, padding, image_grad = case
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, c, *shape, generator=g)
    disp = smooth_disp(1, shape, 0.5, dtype=torch.float32, seed=seed)
    disp[:, 1:] += noise * torch.randn(1, 2, *shape, generator=g)
    disp[:, 2] += stretch * torch.arange(shape[2], dtype=torch.float32)
    grad = torch.randn(1, c, *shape, generator=g)

    def run():
        i, d = image.clone().requires_grad_(image_grad), disp.clone().requires_grad_()
        out = da.warp(i, d, padding=padding)
        out.backward(grad)
        return out, d.grad, i.grad if image_grad else d.grad

    scalar, simd = at_simd_level(SCALAR, run), at_simd_level(level, run)
    assert all(torch.equal(a, b) for a, b in zip(scalar, simd))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("magnitude", [1.0, 4.0])
def test_slab_schedule_matches_grid_sample_and_is_deterministic(mode, magnitude):
    """Smooth displacements take the slab schedule (sort schedule for the random ones above):
    float64 equality with the reference, same bits with 1 and 2 threads."""
    image = torch.randn(2, 2, 40, 9, 10, dtype=torch.float64)
    disp = smooth_disp(2, (40, 9, 10), magnitude)
    g = torch.randn(2, 2, 40, 9, 10, dtype=torch.float64)
    ri, rd = backward_pair(lambda i, d: warp_reference(i, d, mode), image, disp, g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in [1, 2]:
            torch.set_num_threads(n)
            grads.append(backward_pair(lambda i, d: da.warp(i, d, mode=mode), image.float(), disp.float(), g.float()))
            gi, gd = backward_pair(lambda i, d: da.warp(i, d, mode=mode), image, disp, g)
            torch.testing.assert_close(gi, ri, rtol=1e-11, atol=1e-11)
            torch.testing.assert_close(gd, rd, rtol=1e-11, atol=1e-11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_slab_schedule_zeroes_image_slices_no_voxel_samples():
    """The slab schedule zeroes each image-gradient slice when a chunk first may write it, and
    the slices no chunk reaches beforehand. The buffer comes from the cache of freed outputs
    (here one left full of 7s), so a slice left out would show its old values."""
    # 4.6 MB: a cached size, unlike loc_grad (2.2 MB, another size class); slices 19.. unreached
    shape, out_shape = (100, 96, 120), (16, 96, 120)
    image = torch.randn(1, 1, *shape)
    disp = smooth_disp(1, out_shape, 0.5, dtype=torch.float32)
    g = torch.randn(1, 1, *out_shape)
    da.empty_cpu_cache()
    leftover = da.warp(torch.full((1, 1, *shape), 7.0), torch.zeros(1, 3, *shape))
    del leftover  # the next image-sized output takes its buffer
    gi, _ = backward_pair(lambda i, d: da.warp(i, d), image, disp, g)
    ri, _ = backward_pair(lambda i, d: warp_reference(i, d, "linear"), image.double(), disp.double(), g.double())
    assert gi[:, :, 19:].abs().max() == 0 and ri[:, :, 19:].abs().max() == 0
    torch.testing.assert_close(gi.double(), ri, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_border_padding_beyond_the_volume_along_d_does_not_race(mode):
    """Output slices whose locations lie beyond the image along D write its edge slice under
    "border" padding. A slab planner that took them for slices that write nothing would run
    them in parallel with each other and with the chunk that writes that edge: with 2 threads
    the image gradient would come out wrong at random."""
    image = torch.randn(1, 1, 4, 16, 16, dtype=torch.float64)
    disp = torch.zeros(1, 3, 24, 16, 16, dtype=torch.float64)  # output slices 4..23 clamp to slice 3
    disp[:, 1:] = 0.3 * torch.randn(1, 2, 24, 16, 16, dtype=torch.float64)
    g = torch.randn(1, 1, 24, 16, 16, dtype=torch.float64)
    ri, _ = backward_pair(lambda i, d: warp_reference(i, d, mode, "border"), image, disp, g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(5):
            gi, _ = backward_pair(lambda i, d: da.warp(i, d, mode=mode, padding="border"), image, disp, g)
            torch.testing.assert_close(gi, ri, rtol=1e-11, atol=1e-11)
    finally:
        torch.set_num_threads(threads)
