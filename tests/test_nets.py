"""Networks: shapes, near-identity start, diffeomorphic integration, configuration errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from deepatlas_fast import warp
from deepatlas_fast.nn import nets
from deepatlas_fast.nn.nets import RegNet, SegNet, build_nets, integrate_velocity
from deepatlas_fast.training.config import default_config


def test_regnet_default_widths_shape_and_small_init():
    torch.manual_seed(0)
    net = RegNet()  # paper widths 16,32,32,32,32 / 32,32,32,8,8
    assert net.multiple == 16
    enc_out = [layer[0].out_channels for layer in net.enc]
    dec_out = [layer[0].out_channels for layer in net.dec] + [layer[0].out_channels for layer in net.extra]
    assert enc_out == [16, 32, 32, 32, 32] and dec_out == [32, 32, 32, 8, 8]
    m, t = torch.rand(2, 1, 16, 32, 16), torch.rand(2, 1, 16, 32, 16)
    disp = net(m, t)
    assert disp.shape == (2, 3, 16, 32, 16)
    assert 0 < disp.abs().max() < 1e-2  # starts near identity but not exactly zero (gradients flow)


def test_regnet_gradients_reach_first_layer():
    net = RegNet([4, 8, 8], [8, 8, 8])
    m, t = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    warp(m, net(m, t)).sub(t).pow(2).mean().backward()
    assert net.enc[0][0].weight.grad.abs().sum() > 0


def test_integrate_velocity_zero_and_inverse():
    assert integrate_velocity(torch.zeros(1, 3, 8, 8, 8)).abs().max() == 0
    # a smooth velocity field: exp(v) composed with exp(-v) is close to the identity
    g = torch.stack(torch.meshgrid(*[torch.linspace(0, 3.14, 16)] * 3, indexing="ij"))
    v = 1.5 * torch.sin(g)[None]
    fwd, bwd = integrate_velocity(v), integrate_velocity(-v)
    comp = fwd + warp(bwd, fwd, padding="border")
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert fwd.abs().max() > 0.8  # a real deformation ...
    assert comp[inner].abs().max() < 0.1  # ... that the negated velocity undoes


def test_regnet_diffeomorphic_mode_runs():
    net = RegNet([4, 8, 8], [8, 8, 8], diffeomorphic=True, int_steps=4)
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.1)
    disp = net(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    assert disp.shape == (1, 3, 8, 8, 8) and torch.isfinite(disp).all() and disp.abs().max() > 0


@pytest.mark.parametrize("norm,up", [("batch", "transpose"), ("instance", "trilinear")])
def test_segnet_shapes_and_training_signal(norm, up):
    torch.manual_seed(0)
    net = SegNet(5, norm=norm, upsample=up)
    assert net.multiple == 8
    x = torch.rand(2, 1, 16, 8, 24)
    logits = net(x)
    assert logits.shape == (2, 5, 16, 8, 24)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="norm"):
        SegNet(3, norm="group")
    with pytest.raises(ValueError, match="upsample"):
        SegNet(3, upsample="pixelshuffle")
    with pytest.raises(ValueError, match="classes"):
        SegNet(1)
    with pytest.raises(ValueError, match="decoder"):
        RegNet([16, 32, 32], [32])


def test_build_nets_from_default_config():
    reg, seg = build_nets(default_config()["model"], 4)
    assert isinstance(reg, RegNet) and isinstance(seg, SegNet) and seg.num_classes == 4
    assert isinstance(seg.down[0][1], torch.nn.BatchNorm3d)


@pytest.mark.parametrize("kind", ["reg", "seg"])
def test_channels_last_gives_the_same_outputs_and_gradients(kind):
    torch.manual_seed(0)
    cfg = default_config()["model"]
    cfg.update(reg_enc=[4, 8, 8], reg_dec=[8, 8, 8, 4], seg_enc=[4, 8, 8], seg_norm="instance")
    a = build_nets(cfg, 3)[kind == "seg"].double()
    b = build_nets(dict(cfg, channels_last=True), 3)[kind == "seg"].double()
    b.load_state_dict(a.state_dict())
    assert b.channels_last and next(p for p in b.parameters() if p.dim() == 5).is_contiguous(
        memory_format=torch.channels_last_3d)
    x = [torch.rand(2, 1, 8, 8, 8, dtype=torch.float64) for _ in range(2 if kind == "reg" else 1)]
    ya, yb = a(*x), b(*x)
    assert yb.is_contiguous()  # outputs come back in the default layout
    torch.testing.assert_close(yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    b.use_channels_last(False)
    assert not b.channels_last and all(p.is_contiguous() for p in b.parameters())


# ---- slab convolutions (nets.Conv3d): a batch-1 volume goes to oneDNN as two D slabs

@settings(max_examples=12, deadline=None)
@given(d=st.integers(8, 21), h=st.integers(2, 9), w=st.integers(2, 9), cin=st.integers(1, 4),
       stride=st.sampled_from([1, 2]), channels_last=st.booleans(), bias=st.booleans())
def test_slab_conv_equals_conv3d_against_float64(d, h, w, cin, stride, channels_last, bias):
    torch.manual_seed(d * 100 + h * 10 + w)
    conv = nets.Conv3d(cin, 5, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(1, cin, d, h, w)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    calls = []
    apply = nets._SlabConv.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets._SlabConv, "apply", lambda *a: calls.append(1) or apply(*a))
        y = conv(x)
    assert calls == [1]  # the slab path was taken (small volume, batch 1, float32)
    # the layout oneDNN keeps (with one input channel the two layouts are the same tensor)
    cl = channels_last and cin > 1
    assert y.is_contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    conv3d = torch.nn.functional.conv3d
    g = torch.randn_like(y)
    y.backward(g)
    # float64 reference: the plain convolution, its gradients by autograd
    x64 = x.detach().double().requires_grad_(True)
    w64 = conv.weight.detach().double().requires_grad_(True)
    b64 = None if conv.bias is None else conv.bias.detach().double().requires_grad_(True)
    ref = conv3d(x64, w64, b64, stride, 1)
    ref.backward(g.double())
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(conv.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["batch 2", "float64", "large", "off"])
def test_slab_conv_only_where_pytorch_would_take_its_native_kernel(case, monkeypatch):
    conv = nets.Conv3d(2, 4, 3, padding=1)
    x = {"batch 2": torch.randn(2, 2, 8, 8, 8), "float64": torch.randn(1, 2, 8, 8, 8, dtype=torch.float64),
         "large": torch.randn(1, 2, 104, 104, 4), "off": torch.randn(1, 2, 8, 8, 8)}[case]
    conv = conv.to(x.dtype)
    conv.slabs = case != "off"
    calls = []
    apply = nets._SlabConv.apply
    monkeypatch.setattr(nets._SlabConv, "apply", lambda *a: calls.append(1) or apply(*a))
    y = conv(x)
    assert calls == []  # nn.Conv3d's own call (large: 2 x 104 x 104 is above the limit)
    torch.testing.assert_close(y, torch.nn.functional.conv3d(x, conv.weight, conv.bias, 1, 1))


def test_nets_trace_without_slabs():
    """Traced graphs (ONNX export) keep the plain convolution: the slabs are an eager CPU choice."""
    net = RegNet([4, 8, 8], [8, 8, 8])
    m = torch.rand(1, 1, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(net, (m, m))
    assert "aten::pad" not in str(traced.graph) and "constant_pad_nd" not in str(traced.graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(m, m), net(m, m), rtol=1e-5, atol=1e-6)


# ---- channels-last batch norm (nets.BatchNorm3d)

@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 9), d=st.integers(1, 7), h=st.integers(1, 7), w=st.integers(2, 7),
       offset=st.floats(-50, 50), spread=st.floats(0.01, 20))
def test_channels_last_batch_norm_against_float64(n, c, d, h, w, offset, spread):
    torch.manual_seed(c * 7 + d)
    bn = nets.BatchNorm3d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(n, c, d, h, w) * spread + offset).contiguous(memory_format=torch.channels_last_3d)
    if x.is_contiguous():  # (one channel or one voxel: the layouts coincide; nn.BatchNorm3d's path)
        return
    x.requires_grad_(True)
    ref = {k: v.double().clone() for k, v in bn.state_dict().items()}
    y = bn(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = ref["weight"].requires_grad_(True), ref["bias"].requires_grad_(True)
    rm, rv = ref["running_mean"], ref["running_var"]
    y64 = torch.nn.functional.batch_norm(x64, rm, rv, w64, b64, training=True, momentum=bn.momentum, eps=bn.eps)
    y64.backward(g.double())
    scale = 1 + spread  # gradients with respect to x scale as 1 / spread
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double() * spread, x64.grad * spread, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, rtol=1e-3, atol=1e-3 * scale)
    torch.testing.assert_close(bn.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bn.running_mean.double(), rm, rtol=1e-5, atol=1e-5 * (1 + abs(offset)))
    torch.testing.assert_close(bn.running_var.double(), rv, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked.item() == 1


def test_channels_last_batch_norm_is_taken_and_eval_is_unchanged():
    bn = nets.BatchNorm3d(4)
    x = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    calls = []
    apply = nets._ChannelsLastBatchNorm.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets._ChannelsLastBatchNorm, "apply", lambda *a: calls.append(1) or apply(*a))
        bn(x)
        bn(x.contiguous())  # contiguous: nn.BatchNorm3d's kernel
        bn.eval()
        y = bn(x)
    assert calls == [1]
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
