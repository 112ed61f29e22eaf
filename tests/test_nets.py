"""Networks: shapes, near-identity start, diffeomorphic integration, configuration errors."""
import pytest
import torch

from deepatlas_fast import warp
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
