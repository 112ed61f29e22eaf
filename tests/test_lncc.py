"""The LNCC op against the float64 conv3d reference on every device, autograd, opcheck, bad
input, determinism, and the CUDA kernel source run under the CUDA emulator."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepatlas_fast as da
from _devices import DEVICES, assert_one_device, devices_and_dtypes
from _layouts import relayout
from reference import lncc_reference



def pair(shape, dtype=torch.float64, related=True):
    a = torch.randn(shape, dtype=dtype)
    # b correlated with a, so cc spans (0, 1) rather than sitting near 0
    b = (0.7 * a + 0.5 * torch.randn(shape, dtype=dtype)) if related else torch.randn(shape, dtype=dtype)
    return a, b


def sample_inputs(device, *, requires_grad=False):
    """Argument tuples (a, b, window, eps) of the lncc op, float64 on `device`: windows 3, 9 and
    15 (the last two wider than the volume along some axes), one and two channels, b related
    to a."""
    def make(shape):
        a, b = pair(shape)
        return a.to(device).requires_grad_(requires_grad), b.to(device).requires_grad_(requires_grad)

    return [(*make((2, 2, 4, 5, 6)), 3, 1e-5), (*make((2, 1, 5, 6, 7)), 9, 1e-5), (*make((1, 2, 6, 4, 5)), 15, 1e-5)]


@pytest.mark.parametrize("device", DEVICES)
def test_correctness(device):
    for a, b, window, eps in sample_inputs(device):
        out = da.lncc(a, b, window=window, eps=eps)
        assert out.device == a.device and out.shape == (a.shape[0],)
        torch.testing.assert_close(out.cpu(), lncc_reference(a.cpu(), b.cpu(), window, eps), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    for a, b, window, eps in sample_inputs(device, requires_grad=True):
        out = da.lncc(a, b, window=window, eps=eps)
        g = torch.randn_like(out)
        ours = torch.autograd.grad(out, (a, b), g)
        ra, rb = a.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
        theirs = torch.autograd.grad(lncc_reference(ra, rb, window, eps), (ra, rb), g.cpu())
        for o, r in zip(ours, theirs):
            assert o.device == a.device
            torch.testing.assert_close(o.cpu(), r, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for a, b, window, eps in sample_inputs(device, requires_grad=True):
        f = lambda x, y: da.lncc(x, y, window=window, eps=eps)  # noqa: E731
        assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in sample_inputs(device, requires_grad=True) + sample_inputs(device):
        torch.library.opcheck(torch.ops.deepatlas_fast.lncc.default, args)


@pytest.mark.parametrize("device, dtype", devices_and_dtypes(cpu=[torch.float32, torch.float16, torch.bfloat16],
                                                             cuda=[torch.float32, torch.float16, torch.bfloat16]))
def test_dtypes(device, dtype):
    """float32, float16 and bfloat16 everywhere (float64 sums on the CPU, float32 on CUDA)."""
    a = torch.randn(1, 1, 12, 12, 12)
    b = 0.6 * a + torch.randn_like(a)
    out = da.lncc(a.to(device, dtype), b.to(device, dtype))
    assert out.dtype == dtype and out.device.type == device
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), lncc_reference(a.double(), b.double()), rtol=tol, atol=tol)


def grads(fn, a, b, g):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    torch.autograd.backward(fn(a, b), g)
    return a.grad, b.grad


@st.composite
def lncc_case(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), *(draw(st.integers(1, 8)) for _ in range(3)))
    return shape, draw(st.sampled_from([3, 5, 7, 9, 15]))


@given(lncc_case())
def test_forward_backward_match_reference(case):
    """Any size, including sizes below the window (zero padding everywhere)."""
    shape, window = case
    a, b = pair(shape)
    out = da.lncc(a, b, window=window)
    ref = lncc_reference(a, b, window)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn(shape[0], dtype=torch.float64)
    ours = grads(lambda x, y: da.lncc(x, y, window=window), a, b, g)
    theirs = grads(lambda x, y: lncc_reference(x, y, window), a, b, g)
    for o, r in zip(ours, theirs):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-12)


def test_several_slabs_and_channels():
    """D > 32: the CPU kernel splits the volume into slabs along D with halos."""
    a, b = pair((1, 2, 70, 5, 4))
    for window in (3, 9):
        torch.testing.assert_close(da.lncc(a, b, window=window), lncc_reference(a, b, window), rtol=1e-10, atol=0)
        g = torch.tensor([-1.2], dtype=torch.float64)
        ours = grads(lambda x, y: da.lncc(x, y, window=window), a, b, g)
        theirs = grads(lambda x, y: lncc_reference(x, y, window), a, b, g)
        for o, r in zip(ours, theirs):
            torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-13)


def test_known_values():
    a, _ = pair((1, 1, 8, 9, 10))
    assert torch.all(da.lncc(a, a) > 0.999)          # identical images: cc = 1 (up to eps)
    assert torch.all(da.lncc(a, -3 * a) > 0.999)  # scaled (zero padding: no offset)
    assert torch.all(da.lncc(a, torch.zeros_like(a)) == 0)  # blank image: no correlation


def test_float32_close_to_float64():
    a, b = pair((2, 1, 12, 10, 9))
    ref = lncc_reference(a, b, 9)
    out = da.lncc(a.float(), b.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.ones(2, dtype=torch.float64)
    ours = grads(da.lncc, a.float(), b.float(), g.float())
    theirs = grads(lambda x, y: lncc_reference(x, y, 9), a, b, g)
    for o, r in zip(ours, theirs):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-7)


# rtol of float16/bfloat16 results against the float64 reference evaluated on the same rounded
# inputs: the sums are float64 (the ring of 2D box sums float32) and each result is rounded to
# the dtype once, half an ulp (2^-8 of the value for bfloat16's 8 significant bits, 2^-11 for
# float16's 11). atol of the gradients: the error of the float32 ring, which float32 inputs
# share (measured on the float32 kernel with the same values: where the gradient cancels, as
# in volumes smaller than the window, it is far above the rounding), and one subnormal step
# (such gradients fall below float16's normal range). Sums in the dtype itself would lose most
# of the cc.
REDUCED_RTOL = {torch.bfloat16: 2 ** -8 + 1e-5, torch.float16: 2 ** -11 + 1e-5}


@given(lncc_case(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_reduced_precision_matches_the_reference_on_the_rounded_inputs(case, dtype):
    shape, window = case
    a, b = (x.to(dtype) for x in pair(shape, dtype=torch.float32))
    out = da.lncc(a, b, window=window)
    assert out.dtype == dtype
    rtol = REDUCED_RTOL[dtype]
    torch.testing.assert_close(out.double(), lncc_reference(a.double(), b.double(), window), rtol=rtol, atol=1e-6)
    g = torch.randn(shape[0]).to(dtype)
    ours = grads(lambda x, y: da.lncc(x, y, window=window), a, b, g)
    theirs = grads(lambda x, y: lncc_reference(x, y, window), a.double(), b.double(), g.double())
    as_float32 = grads(lambda x, y: da.lncc(x, y, window=window), a.float(), b.float(), g.float())
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    for o, r, f in zip(ours, theirs, as_float32):
        assert o.dtype == dtype
        ring = (f.double() - r).abs().max().item()
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=ring + subnormal)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_layouts_give_the_contiguous_bits_without_a_copy(layout, dtype, volume_copies):
    """Any layout is read through its strides (no copy of a volume), with the same bits as
    contiguous inputs (the same sums in the same order). Each gradient takes its input's
    memory format: channels_last_3d for channels-last inputs, contiguous otherwise."""
    ops = torch.ops.deepatlas_fast
    a, b = (x.to(dtype) for x in pair((2, 3, 9, 6, 7), dtype=torch.float32))
    a_l, b_l = relayout(a, layout), relayout(b, layout)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    g = torch.randn(2).to(dtype)
    assert torch.equal(ops.lncc(a_l, b_l, 5, 1e-5), ops.lncc(a, b, 5, 1e-5))
    for needs in ([True, True], [True, False], [False, True]):
        for ours, theirs in zip(ops.lncc_backward(g, a_l, b_l, 5, 1e-5, needs), ops.lncc_backward(g, a, b, 5, 1e-5, needs)):
            assert torch.equal(ours, theirs) and (ours.numel() == 0 or ours.is_contiguous(memory_format=fmt))
    # one channels-last input, one contiguous: each gradient in its own format
    ga, gb = ops.lncc_backward(g, a_l, b, 5, 1e-5, [True, True])
    assert ga.is_contiguous(memory_format=fmt) and gb.is_contiguous()
    if dtype == torch.float32:  # (float16/bfloat16 results are converted from float64: _to_copy)
        def run():
            ops.lncc(a_l, b_l, 5, 1e-5)
            ops.lncc_backward(g, a_l, b_l, 5, 1e-5, [True, True])
        assert volume_copies(run, a.shape) == []


def test_opcheck_reduced_precision_and_channels_last():
    """The fake kernels give the real kernels' dtypes and strides (opcheck compares them)."""
    a, b = pair((2, 2, 5, 6, 7), dtype=torch.float32)
    cl = torch.channels_last_3d
    for x, y in [(a.bfloat16(), b.bfloat16()), (a.half(), b.half()),
                 (a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)), (a, b.contiguous(memory_format=cl)),
                 (a.contiguous(memory_format=cl).bfloat16(), b.bfloat16())]:
        for requires_grad in (True, False):
            args = (x.clone().requires_grad_(requires_grad), y.clone().requires_grad_(requires_grad))
            torch.library.opcheck(torch.ops.deepatlas_fast.lncc.default, (*args, 3, 1e-5))
        torch.library.opcheck(torch.ops.deepatlas_fast.lncc_backward.default,
                              (torch.ones(2, dtype=x.dtype), x, y, 3, 1e-5, [True, True]))


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_requested_gradient(needs):
    a, b = pair((1, 1, 5, 6, 7))
    x, y = a.clone().requires_grad_(needs[0]), b.clone().requires_grad_(needs[1])
    da.lncc(x, y).sum().backward()
    assert (x.grad is not None) == needs[0] and (y.grad is not None) == needs[1]
    ga, gb = torch.ops.deepatlas_fast.lncc_backward(torch.ones(1, dtype=torch.float64), a, b, 9, 1e-5, list(needs))
    assert (ga.numel() > 0) == needs[0] and (gb.numel() > 0) == needs[1]


def test_non_contiguous_inputs():
    a, b = pair((2, 2, 6, 7, 5))
    at = a.transpose(2, 4).contiguous().transpose(2, 4)
    bt = b[:, [1, 0]].contiguous()[:, [1, 0]]  # same values, other memory
    at2 = at.permute(0, 1, 2, 3, 4)
    assert not at.is_contiguous()
    torch.testing.assert_close(da.lncc(at2, b, window=5), lncc_reference(a, b, 5))
    torch.testing.assert_close(da.lncc(a, bt, window=5), lncc_reference(a, b, 5))
    ours = grads(lambda x, y: da.lncc(x, y, window=5), at, b, torch.ones(2, dtype=torch.float64).expand(2))
    theirs = grads(lambda x, y: lncc_reference(x, y, 5), a, b, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ours[0], theirs[0])


def test_deterministic_across_runs_and_thread_counts():
    a, b = pair((1, 2, 70, 12, 11), dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in [1, 2, 1, 2]:
        torch.set_num_threads(n)
        results.append((da.lncc(a, b), *grads(da.lncc, a, b, torch.ones(1))))
    torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(r, results[0]))


@pytest.mark.filterwarnings("error:There is a performance drop")  # vmap must not fall back to a loop
def test_torch_func_transforms():
    """torch.func.grad and vmap(grad) over da.lncc equal plain autograd through the op."""
    a, b = pair((2, 1, 4, 5, 6))

    def loss(x, y):
        return (1 - da.lncc(x, y, window=3)).sum()

    ga, gb = torch.func.grad(loss, argnums=(0, 1))(a, b)
    assert all(torch.equal(x, y) for x, y in zip((ga, gb), grads(loss, a, b, None)))
    per_sample = torch.func.vmap(torch.func.grad(loss))(a[:, None], b[:, None])
    for k in range(2):
        assert torch.equal(per_sample[k], grads(loss, a[k : k + 1], b[k : k + 1], None)[0])


def test_torch_compile_traces_the_op():
    a, b = pair((1, 1, 5, 5, 5))
    compiled = torch.compile(lambda x, y: 1 - da.lncc(x, y, window=3), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, b), 1 - lncc_reference(a, b, 3))


@pytest.mark.parametrize(
    "a_shape, b_shape, kwargs, error, match",
    [
        ((1, 4, 4, 4), (1, 4, 4, 4), {}, ValueError, "a must be 5-D"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 5), {}, ValueError, "must have one shape"),
        ((1, 1, 0, 4, 4), (1, 1, 0, 4, 4), {}, ValueError, "a is empty"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": 4}, ValueError, "window must be odd"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": 17}, ValueError, "window must be odd"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": 3.5}, TypeError, "window must be an integer, got 3.5"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": 9.0}, TypeError, "window must be an integer"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": True}, TypeError, "window must be an integer"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"window": "9"}, TypeError, "window must be an integer"),
        ((1, 1, 4, 4, 4), (1, 1, 4, 4, 4), {"eps": -1.0}, ValueError, "eps must be"),
    ],
)
def test_bad_shapes_and_options(a_shape, b_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.lncc(torch.zeros(a_shape), torch.zeros(b_shape), **kwargs)


def test_bad_dtypes_and_devices():
    a = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(TypeError, match="both must have one dtype"):
        da.lncc(a, a.double())
    with pytest.raises(TypeError, match="CPU tensors must be float32, float64, float16 or bfloat16"):
        da.lncc(a.int(), a.int())
    with pytest.raises(ValueError, match="is on meta"):
        torch.ops.deepatlas_fast.lncc.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), a, a.to("meta"), 9, 1e-5)


@pytest.mark.parametrize("name", ["lncc", "lncc_backward"])
def test_every_tensor_on_one_device(name):
    a, b = torch.rand(2, 1, 5, 5, 5), torch.rand(2, 1, 5, 5, 5)
    args = {"lncc": (a, b, 3, 1e-5), "lncc_backward": (torch.ones(2), a, b, 3, 1e-5, [True, True])}[name]
    assert_one_device(getattr(torch.ops.deepatlas_fast, name), args)


# ---- the CUDA kernel source, executed by the CUDA emulator ------------------------------

@pytest.mark.parametrize("window", [3, 7, 15])
@pytest.mark.parametrize("launch", [(32, 3), (7, 5)])
def test_cuda_kernels_under_emulator(window, launch, emulated):
    """Row tiles narrower than a row (and than the halo), capped grids (grid-stride loops)."""
    a, b = pair((2, 2, 5, 6, 9))
    ref = lncc_reference(a, b, window)
    torch.testing.assert_close(emulated.lncc(a, b, window, 1e-5, *launch), ref, rtol=1e-10, atol=1e-12)
    g = torch.randn(2, dtype=torch.float64)
    ra, rb = grads(lambda x, y: lncc_reference(x, y, window), a, b, g)
    ga, gb = emulated.lncc_backward(g, a, b, window, 1e-5, [True, True], *launch)
    torch.testing.assert_close(ga, ra, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-8, atol=1e-12)
    ga2, gb2 = emulated.lncc_backward(g, a, b, window, 1e-5, [False, True], *launch)
    assert ga2.numel() == 0
    torch.testing.assert_close(gb2, rb, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_under_emulator(dtype, emulated):
    """The CUDA build takes half/bfloat16 with float32 sums (the CPU path: float64 sums)."""
    a, b = pair((1, 1, 6, 5, 7), dtype=torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    ref = lncc_reference(a.double(), b.double(), 5)
    out = emulated.lncc(a, b, 5, 1e-5, 32, 4)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.ones(1, dtype=dtype)
    ga, gb = emulated.lncc_backward(g, a, b, 5, 1e-5, [True, True], 32, 4)
    assert ga.dtype == dtype
    ra, rb = grads(lambda x, y: lncc_reference(x, y, 5), a.double(), b.double(), g.double())
    scale = ra.abs().max()
    torch.testing.assert_close(ga.double() / scale, ra / scale, rtol=0, atol=tol * 5)


def test_cuda_launchers_keep_memory_formats_under_emulator(emulated):
    """The CUDA launchers give each gradient its input's memory format, as the CPU kernel (and
    the fake kernel) does."""
    a, b = pair((2, 2, 5, 6, 7))
    a = a.contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(2, dtype=torch.float64)
    emu = emulated.lncc_backward(g, a, b, 5, 1e-5, [True, True], 32, 4)
    for e, c in zip(emu, torch.ops.deepatlas_fast.lncc_backward(g, a, b, 5, 1e-5, [True, True])):
        assert e.stride() == c.stride()
        torch.testing.assert_close(e, c, rtol=1e-10, atol=1e-12)
