"""The soft Dice op against the float64 one_hot reference on every device, autograd (to probs,
logits and probability targets), opcheck, bad input, determinism, the CPU's AVX2 kernel, and
the CUDA kernel source run under the CUDA emulator."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepatlas_fast as da
from _devices import DEVICES, assert_one_device
from _simd import DICE_LEVELS
from _layouts import relayout
from reference import soft_dice_reference, soft_dice_sums_reference



def inputs(b, c, spatial, labels, dtype=torch.float64, label_dtype=torch.int64):
    logits = torch.randn(b, c, *spatial, dtype=dtype) * 2
    if labels:
        target = torch.randint(0, c, (b, 1, *spatial)).to(label_dtype)
    else:
        target = torch.randn(b, c, *spatial, dtype=dtype).softmax(1)
    return logits, target


def sample_inputs(device, *, requires_grad=False):
    """Argument tuples (probs, target, from_logits) of the soft_dice_sums op, float64 on
    `device`: probabilities or logits, against integer labels [B, 1, ...] or probability
    targets [B, C, ...] (which take a gradient too)."""
    samples = []
    for labels in (True, False):
        for from_logits in (True, False):
            logits, target = inputs(2, 5, (4, 5, 6), labels)
            probs = (logits if from_logits else logits.softmax(1)).to(device).requires_grad_(requires_grad)
            target = target.to(device)
            if not labels:
                target.requires_grad_(requires_grad)
            samples.append((probs, target, from_logits))
    return samples


def differentiable(probs, target):
    return (probs, target) if target.is_floating_point() else (probs,)


@pytest.mark.parametrize("device", DEVICES)
def test_correctness(device):
    for probs, target, from_logits in sample_inputs(device):
        out = da.soft_dice(probs, target, from_logits=from_logits)
        assert out.device == probs.device and out.shape == probs.shape[:2]
        ref = soft_dice_reference(probs.cpu(), target.cpu(), from_logits=from_logits)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    for probs, target, from_logits in sample_inputs(device, requires_grad=True):
        out = da.soft_dice(probs, target, from_logits=from_logits)
        g = torch.randn_like(out)
        ours = torch.autograd.grad(out, differentiable(probs, target), g)
        rp = probs.detach().cpu().requires_grad_()
        rt = target.detach().cpu().requires_grad_() if target.is_floating_point() else target.cpu()
        ref = soft_dice_reference(rp, rt, from_logits=from_logits)
        theirs = torch.autograd.grad(ref, differentiable(rp, rt), g.cpu())
        for o, r in zip(ours, theirs):
            assert o.device == probs.device
            torch.testing.assert_close(o.cpu(), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for probs, target, from_logits in sample_inputs(device, requires_grad=True):
        if target.is_floating_point():
            f = lambda p, t: da.soft_dice(p, t, from_logits=from_logits)  # noqa: E731
        else:
            f = lambda p, t=target: da.soft_dice(p, t, from_logits=from_logits)  # noqa: E731
        assert torch.autograd.gradcheck(f, differentiable(probs, target))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in sample_inputs(device, requires_grad=True) + sample_inputs(device):
        torch.library.opcheck(torch.ops.deepatlas_fast.soft_dice_sums.default, args)


def grads(fn, probs, target, g):
    p = probs.clone().requires_grad_()
    t = target.clone().requires_grad_() if target.is_floating_point() else target
    torch.autograd.backward(fn(p, t), g)
    return p.grad, (t.grad if target.is_floating_point() else None)


@st.composite
def dice_case(draw):
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(draw(st.integers(0, 3))))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 6)), spatial, draw(st.booleans()), draw(st.booleans()))


@given(dice_case())
def test_forward_backward_match_reference(case):
    """Any number of classes and spatial dims (0 to 3), labels or probabilities, with and
    without the fused softmax; gradients to both sides."""
    b, c, spatial, labels, from_logits = case
    logits, target = inputs(b, c, spatial, labels)
    probs = logits if from_logits else logits.softmax(1)
    out = da.soft_dice(probs, target, from_logits=from_logits)
    ref = soft_dice_reference(probs, target, from_logits=from_logits)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    ours = grads(lambda p, t: da.soft_dice(p, t, from_logits=from_logits), probs, target, g)
    theirs = grads(lambda p, t: soft_dice_reference(p, t, from_logits=from_logits), probs, target, g)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    if not labels:
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)


# rtol of float16/bfloat16 results against the float64 reference evaluated on the same rounded
# inputs: the kernel computes in float32 (chunk sums added in float64) and rounds each result
# to the dtype once, half an ulp (2^-8 of the value for bfloat16's 8 significant bits, 2^-11
# for float16's 11). atol: float32 rounding where a logit gradient cancels to near 0. Sums in
# the dtype itself would stop growing once they reach 2^8 (bfloat16) times the addend.
REDUCED_RTOL = {torch.bfloat16: 2 ** -8 + 1e-5, torch.float16: 2 ** -11 + 1e-5}


@given(dice_case(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_reduced_precision_matches_the_reference_on_the_rounded_inputs(case, dtype):
    """The sums op and its gradients, for any classes and spatial dims, labels or
    probabilities, with and without the fused softmax."""
    b, c, spatial, labels, from_logits = case
    logits, target = inputs(b, c, spatial, labels, dtype=torch.float32)
    probs = (logits if from_logits else logits.softmax(1)).to(dtype)
    target = target if labels else target.to(dtype)
    op = lambda p, t: torch.ops.deepatlas_fast.soft_dice_sums(p, t, from_logits)  # noqa: E731
    ref = lambda p, t: soft_dice_sums_reference(p, t, from_logits)  # noqa: E731
    as64 = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    sums = op(probs, target)
    assert sums.dtype == dtype
    rtol = REDUCED_RTOL[dtype]
    torch.testing.assert_close(sums.double(), ref(probs.double(), as64(target)), rtol=rtol, atol=1e-5)
    g = torch.randn(b, c, 3).to(dtype)
    ours = grads(op, probs, target, g)
    theirs = grads(ref, probs.double(), as64(target), g.double())
    for o, r in zip(ours, theirs):
        if r is not None:
            assert o.dtype == dtype
            torch.testing.assert_close(o.double(), r, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("spatial", [(5, 6, 7), (9, 300)])  # channels_last_3d, channels_last
@pytest.mark.parametrize("layout", ["channels_last", "class_sliced", "sliced", "spatial_sliced", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_layouts_give_the_contiguous_bits(layout, dtype, spatial, volume_copies):
    """Channels-last (class-minor) probabilities and every layout whose spatial dims form one
    axis of voxels (a slice of the classes, a step along the last dim) are read through their
    strides, with the same bits as contiguous inputs (the same arithmetic in the same order, on
    the AVX2 path too); other layouts (a slice along an outer spatial dim, a permutation of the
    spatial dims) are copied once, contiguous. Each gradient takes its input's memory format."""
    ops = torch.ops.deepatlas_fast
    fmt = {"channels_last": torch.channels_last_3d if len(spatial) == 3 else torch.channels_last,
           "permuted": torch.contiguous_format}.get(layout, torch.contiguous_format)
    copied = layout in ("spatial_sliced", "permuted")
    for labels in (True, False):
        logits, target = inputs(2, 4, spatial, labels, dtype=torch.float32)
        logits = logits.to(dtype)
        target = target if labels else target.to(dtype)
        logits_l, target_l = relayout(logits, layout), relayout(target, layout) if not labels else target
        g = torch.randn(2, 4, 3).to(dtype)
        for from_logits in (True, False):
            assert torch.equal(ops.soft_dice_sums(logits_l, target_l, from_logits),
                               ops.soft_dice_sums(logits, target, from_logits))
            ours = ops.soft_dice_sums_backward(g, logits_l, target_l, from_logits, [True, True])
            theirs = ops.soft_dice_sums_backward(g, logits, target, from_logits, [True, True])
            for o, t in zip(ours, theirs):
                assert torch.equal(o, t) and (o.numel() == 0 or o.is_contiguous(memory_format=fmt))
        if dtype == torch.float32:
            def run():
                ops.soft_dice_sums(logits_l, target_l, True)
                ops.soft_dice_sums_backward(g, logits_l, target_l, True, [True, True])
            copies = volume_copies(run, logits.shape)
            assert (copies != []) == copied, copies
    # label maps in any layout (their one class: a channels-last map is contiguous)
    logits, target = inputs(2, 4, spatial, True, dtype=torch.float32)
    assert torch.equal(ops.soft_dice_sums(logits, relayout(target, layout), True), ops.soft_dice_sums(logits, target, True))


def test_opcheck_reduced_precision_and_channels_last():
    """The fake kernels give the real kernels' dtypes and strides (opcheck compares them)."""
    cl = torch.channels_last_3d
    for labels in (True, False):
        logits, target = inputs(2, 3, (4, 5, 6), labels, dtype=torch.float32)
        pairs = [(logits.bfloat16(), target if labels else target.bfloat16()),
                 (logits.half(), target if labels else target.half()),
                 (logits.contiguous(memory_format=cl), target.contiguous(memory_format=cl)),
                 (logits, target.contiguous(memory_format=cl)),
                 (logits.contiguous(memory_format=cl).bfloat16(), target if labels else target.bfloat16())]
        for p, t in pairs:
            for requires_grad in (True, False):
                args = (p.clone().requires_grad_(requires_grad),
                        t.clone().requires_grad_(requires_grad and not labels))
                torch.library.opcheck(torch.ops.deepatlas_fast.soft_dice_sums.default, (*args, True))
            torch.library.opcheck(torch.ops.deepatlas_fast.soft_dice_sums_backward.default,
                                  (torch.randn(2, 3, 3, dtype=p.dtype), p, t, False, [True, True]))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    logits, target = inputs(2, 5, (4, 5, 6), True, label_dtype=label_dtype)
    ref = soft_dice_reference(logits, target.long(), from_logits=True)
    torch.testing.assert_close(da.soft_dice(logits, target, from_logits=True), ref)


def test_many_classes_and_chunks():
    """32 classes (DeepAtlas brain) and more voxels than one chunk per batch item."""
    logits, target = inputs(2, 32, (9, 20, 31), True)
    torch.testing.assert_close(da.soft_dice(logits, target, from_logits=True),
                               soft_dice_reference(logits, target, from_logits=True), rtol=1e-12, atol=1e-12)


def test_known_values():
    target = torch.randint(0, 3, (1, 1, 6, 7, 8))
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    assert torch.equal(da.soft_dice(perfect, target), torch.ones(1, 3, dtype=torch.float64))
    assert torch.allclose(da.soft_dice(perfect, perfect), torch.ones(1, 3, dtype=torch.float64))
    wrong = perfect.roll(1, dims=1)  # every voxel in another class
    assert da.soft_dice(wrong, target).max() < 1e-6
    # an absent class predicted absent: (0 + eps) / (0 + eps) = 1
    absent = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    absent[:, 0] = 1
    assert torch.equal(da.soft_dice(absent, torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))[0, 1:], torch.ones(2, dtype=torch.float64))


def test_float32_close_to_float64():
    logits, target = inputs(2, 4, (10, 9, 8), True)
    ref = soft_dice_reference(logits, target, from_logits=True)
    out = da.soft_dice(logits.float(), target, from_logits=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    big = logits * 40  # saturated softmax: the fast exp must not overflow or lose the max
    torch.testing.assert_close(da.soft_dice(big.float(), target, from_logits=True).double(),
                               soft_dice_reference(big, target, from_logits=True), rtol=1e-5, atol=1e-6)
    g = torch.randn(2, 4)
    ours = grads(lambda p, t: da.soft_dice(p, t, from_logits=True), logits.float(), target, g)
    theirs = grads(lambda p, t: soft_dice_reference(p, t, from_logits=True), logits, target, g.double())
    torch.testing.assert_close(ours[0].double(), theirs[0], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("simd", DICE_LEVELS)
@pytest.mark.parametrize("classes, spatial", [(5, (9, 10, 11)), (32, (13, 17, 19)), (1, (3, 3, 3))])
def test_float32_logits_with_labels_on_both_cpu_paths(monkeypatch, simd, classes, spatial):
    """float32 logits + labels take the AVX2 kernel at DEEPATLAS_FAST_SIMD=avx2 (skipped on CPUs
    without AVX2 and FMA), the generic path at DEEPATLAS_FAST_SIMD=0. Both against float64: tails of 8-voxel blocks, several chunks (13*17*19
    voxels), 32 classes with uint8 labels, one saturated batch item, one class."""
    monkeypatch.setenv("DEEPATLAS_FAST_SIMD", simd)
    logits, target = inputs(2, classes, spatial, True, label_dtype=torch.uint8)
    logits[0] *= 40
    ref = soft_dice_reference(logits, target, from_logits=True)
    torch.testing.assert_close(da.soft_dice(logits.float(), target, from_logits=True).double(), ref,
                               rtol=1e-5, atol=1e-6)
    g = torch.randn(2, classes, dtype=torch.float64)
    ours = grads(lambda p, t: da.soft_dice(p, t, from_logits=True), logits.float(), target, g.float())
    theirs = grads(lambda p, t: soft_dice_reference(p, t, from_logits=True), logits, target, g)
    torch.testing.assert_close(ours[0].double(), theirs[0], rtol=1e-4, atol=1e-7)


EXTREMES = (3e13, -3e13, 1e30, -1e30, 3e38, -3e38, float("-inf"))


def extreme_logits(dtype, labels):
    """Logits [2, 4, 5, 6, 7] of `dtype` whose voxels mix ordinary values with extremes: one or two
    classes at a huge or very negative value, or every class at the same extreme; and a target."""
    logits, target = inputs(2, 4, (5, 6, 7), labels)
    z = logits.view(2, 4, -1)
    n = len(EXTREMES)
    for v in range(z.shape[-1]):
        if v % 4 == 1:  # one class
            z[:, v % 3, v] = EXTREMES[v % n]
        elif v % 4 == 2:  # two classes
            z[:, 0, v], z[:, 3, v] = EXTREMES[v % n], EXTREMES[(v // 4) % n]
        elif v % 8 == 7:  # every class alike (not -inf, where torch.softmax gives NaN too)
            z[:, :, v] = EXTREMES[(v // 8) % (n - 1)]
    z[:, 1, 0], z[:, 2, 0] = 3e38, -3e38  # their difference overflows float32
    logits = logits.to(dtype)
    return logits, (target if labels else target.to(dtype))


def assert_extremes_match_reference(sums_and_grads, dtype, labels):
    logits, target = extreme_logits(dtype, labels)
    ref_target = target if labels else target.double()
    ref = soft_dice_reference(logits.double(), ref_target, from_logits=True)
    g = torch.randn(2, 4, dtype=torch.float64)
    theirs = grads(lambda p, t: soft_dice_reference(p, t, from_logits=True), logits.double(), ref_target, g)
    out, ours = sums_and_grads(logits, target, g.to(dtype))
    assert torch.isfinite(out).all() and all(torch.isfinite(o).all() for o in ours if o is not None)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.double(), ref, **tol)
    for o, t in zip(ours, theirs):
        if t is not None:
            torch.testing.assert_close(o.double(), t, **tol)


@pytest.mark.parametrize("simd", DICE_LEVELS)
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_match_softmax(monkeypatch, simd, labels, dtype):
    """Huge and very negative logits (+-1e30, +-3e38, -inf), mixed with ordinary ones: the fused
    softmax saturates as torch.softmax does, forward and backward, on both CPU paths."""
    monkeypatch.setenv("DEEPATLAS_FAST_SIMD", simd)

    def run(logits, target, g):
        return (da.soft_dice(logits, target, from_logits=True),
                grads(lambda p, t: da.soft_dice(p, t, from_logits=True), logits, target, g))
    assert_extremes_match_reference(run, dtype, labels)


def test_only_requested_gradient():
    logits, target = inputs(1, 3, (4, 4, 4), False)
    p, t = logits.clone().requires_grad_(), target.clone().requires_grad_(False)
    da.soft_dice(p, t).sum().backward()
    assert p.grad is not None and t.grad is None
    gp, gt = torch.ops.deepatlas_fast.soft_dice_sums_backward(
        torch.ones(1, 3, 3, dtype=torch.float64), logits, target, False, [False, True])
    assert gp.numel() == 0 and gt.shape == target.shape


def test_non_contiguous_inputs():
    logits, target = inputs(2, 3, (5, 6, 7), True)
    lt = logits.transpose(2, 4).contiguous().transpose(2, 4)
    yt = target.transpose(3, 4).contiguous().transpose(3, 4)
    assert not lt.is_contiguous() and not yt.is_contiguous()
    torch.testing.assert_close(da.soft_dice(lt, yt, from_logits=True),
                               soft_dice_reference(logits, target, from_logits=True))


@pytest.mark.parametrize("labels", [False, True])  # labels: the AVX2 kernel
def test_deterministic_across_runs_and_thread_counts(labels):
    logits, target = inputs(2, 4, (20, 30, 40), labels, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in [1, 2, 1, 2]:
        torch.set_num_threads(n)
        f = lambda p, t: da.soft_dice(p, t, from_logits=True)  # noqa: E731
        results.append((f(logits, target), *grads(f, logits, target, torch.ones(2, 4))))
    torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(r, results[0]))


@pytest.mark.filterwarnings("error:There is a performance drop")  # vmap must not fall back to a loop
@pytest.mark.parametrize("labels", [True, False])
def test_torch_func_transforms(labels):
    """torch.func.grad and vmap(grad) over da.soft_dice equal plain autograd through the op."""
    logits, target = inputs(2, 3, (3, 4, 5), labels)

    def loss(p, t):
        return (1 - da.soft_dice(p, t, from_logits=True)).sum()

    g = torch.func.grad(loss)(logits, target)
    assert torch.equal(g, grads(loss, logits, target, None)[0])
    per_sample = torch.func.vmap(torch.func.grad(loss))(logits[:, None], target[:, None])
    for k in range(2):
        assert torch.equal(per_sample[k], grads(loss, logits[k : k + 1], target[k : k + 1], None)[0])


def test_torch_compile_traces_the_op():
    logits, target = inputs(1, 3, (4, 4, 4), True)
    compiled = torch.compile(lambda p, t: 1 - da.soft_dice(p, t, from_logits=True), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, target), 1 - soft_dice_reference(logits, target, from_logits=True))


@pytest.mark.parametrize("device", DEVICES)
def test_labels_outside_the_classes_raise(device):
    logits = torch.randn(1, 3, 4, 4, 4, device=device)
    for bad in (3, -1, 200):
        y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
        y[0, 0, 1, 2, 3] = bad
        y = y.to(device)
        with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\).*found " + str(bad)):
            da.soft_dice(logits, y)
        with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\).*found " + str(bad)):
            da.soft_dice(logits, y, from_logits=True)  # on the CPU, the AVX2 kernel's path


@pytest.mark.parametrize(
    "probs_shape, target_shape, target_dtype, match",
    [
        ((3,), (3,), torch.long, "probs must be"),
        ((1, 3, 0, 4), (1, 1, 0, 4), torch.long, "probs is empty"),
        ((1, 3, 4, 4), (1, 3, 4, 4), torch.long, r"integer labels \[B, 1, ...\]"),
        ((1, 3, 4, 4), (1, 1, 4, 4), torch.float32, r"probabilities \[B, C, ...\]"),
        ((1, 3, 4, 4), (1, 1, 4, 5), torch.long, "on probs' grid"),
        ((2, 3, 4, 4), (1, 1, 4, 4), torch.long, "on probs' grid"),
    ],
)
def test_bad_shapes(probs_shape, target_shape, target_dtype, match):
    with pytest.raises(ValueError, match=match):
        da.soft_dice(torch.rand(probs_shape), torch.zeros(target_shape, dtype=target_dtype))


def test_bad_dtypes_and_devices():
    p = torch.rand(1, 3, 4, 4)
    with pytest.raises(TypeError, match="target must be integer labels or probabilities"):
        da.soft_dice(p, p.double())
    with pytest.raises(TypeError, match="target must be integer labels or probabilities"):
        da.soft_dice(p, torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="CPU probs must be float32, float64, float16 or bfloat16"):
        da.soft_dice(p.int(), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="is on meta"):
        torch.ops.deepatlas_fast.soft_dice_sums.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), p, p.to("meta"), False)


@pytest.mark.parametrize("name", ["soft_dice_sums", "soft_dice_sums_backward"])
@pytest.mark.parametrize("labels", [False, True])
def test_every_tensor_on_one_device(name, labels):
    logits, target = inputs(2, 3, (4, 5), labels)
    args = {"soft_dice_sums": (logits, target, True),
            "soft_dice_sums_backward": (torch.rand(2, 3, 3, dtype=torch.float64), logits, target, True,
                                        [True, True])}[name]
    assert_one_device(getattr(torch.ops.deepatlas_fast, name), args)


# ---- the CUDA kernel source, executed by the CUDA emulator ------------------------------

@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("launch", [(32, 3), (7, 5)])
def test_cuda_kernels_under_emulator(labels, from_logits, launch, emulated):
    """Block reductions of any size, capped grids, and more than one chunk per class."""
    logits, target = inputs(2, 3, (9, 30, 31), labels)
    probs = logits if from_logits else logits.softmax(1)
    ref = soft_dice_reference(probs, target, from_logits=from_logits)
    sums = emulated.soft_dice_sums(probs, target, from_logits, *launch)
    torch.testing.assert_close((2 * sums[..., 0] + 1e-6) / (sums[..., 1] + sums[..., 2] + 1e-6), ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(2, 3, 3, dtype=torch.float64)
    ours = torch.ops.deepatlas_fast.soft_dice_sums_backward(g, probs, target, from_logits, [True, True])
    emu = emulated.soft_dice_sums_backward(g, probs, target, from_logits, [True, True], *launch)
    for o, e in zip(ours, emu):
        torch.testing.assert_close(e, o, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("labels", [True, False])
def test_extreme_logits_under_emulator(labels, emulated):
    def run(logits, target, g):
        sums = emulated.soft_dice_sums(logits, target, True, 32, 3).requires_grad_()
        dice = (2 * sums[..., 0] + 1e-6) / (sums[..., 1] + sums[..., 2] + 1e-6)
        grad_sums, = torch.autograd.grad(dice, sums, g)
        gp, gt = emulated.soft_dice_sums_backward(grad_sums, logits, target, True, [True, True], 32, 3)
        return dice.detach(), (gp, None if labels else gt)
    assert_extremes_match_reference(run, torch.float32, labels)


def test_labels_outside_the_classes_raise_under_emulator(emulated):
    logits = torch.randn(1, 3, 4, 4, 4)
    for bad in (3, -1, 200):
        y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
        y[0, 0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\).*found " + str(bad)):
            emulated.soft_dice_sums(logits, y, True, 32, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_under_emulator(dtype, emulated):
    logits, target = inputs(1, 4, (5, 6, 7), True, dtype=torch.float32)
    logits = logits.to(dtype)
    ref = soft_dice_reference(logits.double(), target, from_logits=True)
    sums = emulated.soft_dice_sums(logits, target, True, 32, 4)
    assert sums.dtype == dtype
    dice = (2 * sums[..., 0].double() + 1e-6) / (sums[..., 1].double() + sums[..., 2].double() + 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dice, ref, rtol=tol, atol=tol)


def test_cuda_launchers_keep_memory_formats_under_emulator(emulated):
    """The CUDA launchers give each gradient its input's memory format, as the CPU kernel (and
    the fake kernel) does."""
    logits, target = inputs(2, 3, (5, 6, 7), False)
    logits = logits.contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(2, 3, 3, dtype=torch.float64)
    emu = emulated.soft_dice_sums_backward(g, logits, target, True, [True, True], 32, 3)
    cpu = torch.ops.deepatlas_fast.soft_dice_sums_backward(g, logits, target, True, [True, True])
    for e, c in zip(emu, cpu):
        assert e.stride() == c.stride()
        torch.testing.assert_close(e, c, rtol=1e-12, atol=1e-14)
