"""The two networks of DeepAtlas: registration F_R and segmentation F_S (3D U-Nets).

Both are plain ``nn.Module``s with no data-dependent control flow in ``forward`` so that
``torch.onnx.export`` can trace them; the only custom op is ``deepatlas_fast.warp`` (diffeomorphic
integration). Input sizes must be multiples of ``net.multiple`` (``Preprocessing`` pads to it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import warp
from ..ops._library import traced


class _ChannelsLast:
    """Optionally run a net in channels_last_3d: weights and activations stored channel-minor,
    which PyTorch's CPU convolutions (oneDNN) handle much faster than the default layout, for
    the backward above all. Inputs are converted on the way in, outputs come back contiguous;
    a traced export (ONNX) switches it off (``use_channels_last(False)``)."""

    channels_last = False

    def use_channels_last(self, on: bool = True):
        self.channels_last = bool(on)
        return self.to(memory_format=torch.channels_last_3d if on else torch.contiguous_format)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous() if self.channels_last else x


# PyTorch's CPU convolution takes oneDNN for float32 only when the batch is > 1 or
# batch x channels x D x H exceeds this; below it, its native kernel, several times slower for a
# batch of 1 (the first layer of both nets at 2 mm, the coarse levels of F_R) (ConvParams::
# use_mkldnn in ATen's Convolution.cpp).
_NATIVE_CONV_LIMIT = 20480


class Conv3d(nn.Conv3d):
    """nn.Conv3d (3x3x3, padding 1) that hands a batch of one volume to oneDNN on the CPU where
    PyTorch would take its slow native kernel: the volume goes in as two overlapping slabs
    along D (a batch of two: the output rows of each half plus a one-row halo), and the halves
    of the output are joined (``_SlabConv``). The same sums, so the same result to float32
    rounding, gradients included. ``slabs = False`` turns it off."""

    slabs = True

    def _conv_forward(self, x, weight, bias):
        if not (self.slabs and _slabs_pay(x, self)):
            return super()._conv_forward(x, weight, bias)
        return _SlabConv.apply(x, weight, bias, self.stride[0])


class _SlabConv(torch.autograd.Function):
    """conv3d(x, weight, bias, stride, padding 1) of x [1, C, D, H, W] as one convolution of
    two D slabs [2, C, rows, H, W] cut from x with its zero padding along D, then joined. One
    copy of x in, one of the output out (and the same in the backward), instead of the pad,
    slice and cat copies (and zero-filled gradients) autograd would make of the same steps."""

    @staticmethod
    def forward(ctx, x, weight, bias, s):
        d = x.shape[2]
        d_out = (d - 1) // s + 1
        half = (d_out + 1) // 2  # output rows per slab; they overlap by one when d_out is odd
        rows = (half - 1) * s + 3  # input rows a slab reads, D padding included
        lo = (d_out - half) * s - 1  # first row of x in slab 1 (slab 0 starts with the zero pad)
        hi = min(lo + rows, d)  # slab 1 ends past x (the zero pad) when stride 1
        fmt = _memory_format(x, weight)
        slabs = torch.empty((2, x.shape[1], rows, *x.shape[3:]), dtype=x.dtype, memory_format=fmt)
        slabs[0, :, 0].zero_()
        slabs[0, :, 1:].copy_(x[0, :, :rows - 1])
        slabs[1, :, :hi - lo].copy_(x[0, :, lo:hi])
        slabs[1, :, hi - lo:].zero_()
        y = torch.ops.aten.convolution(slabs, weight, bias, [s] * 3, [0, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)
        skip = 2 * half - d_out
        out = torch.empty((1, y.shape[1], d_out, *y.shape[3:]), dtype=y.dtype, memory_format=fmt)
        out[0, :, :half].copy_(y[0])
        out[0, :, half:].copy_(y[1, :, skip:])
        ctx.save_for_backward(slabs, weight)
        ctx.geometry = (s, d, half, rows, lo, hi, skip, y.shape, bias is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        slabs, weight = ctx.saved_tensors
        s, d, half, rows, lo, hi, skip, y_shape, has_bias = ctx.geometry
        fmt = _memory_format(slabs, weight)
        gy = torch.empty(y_shape, dtype=grad.dtype, memory_format=fmt)
        gy[0].copy_(grad[0, :, :half])
        gy[1, :, :skip].zero_()
        gy[1, :, skip:].copy_(grad[0, :, half:])
        need = ctx.needs_input_grad
        gs, gw, gb = torch.ops.aten.convolution_backward(
            gy, slabs, weight, [weight.shape[0]] if has_bias else None, [s] * 3, [0, 1, 1], [1, 1, 1], False,
            [0, 0, 0], 1, [need[0], need[1], has_bias and need[2]])
        gx = None
        if need[0]:
            gx = torch.empty((1, slabs.shape[1], d, *slabs.shape[3:]), dtype=grad.dtype, memory_format=fmt)
            gx[0, :, :rows - 1].copy_(gs[0, :, 1:])
            gx[0, :, rows - 1:].copy_(gs[1, :, rows - 1 - lo:hi - lo])
            gx[0, :, lo:rows - 1].add_(gs[1, :, :rows - 1 - lo])  # rows both slabs read
        return gx, gw, gb, None


def _memory_format(*tensors):
    """channels_last_3d if any of the tensors is (as PyTorch's convolutions choose), else contiguous."""
    cl = any(t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous() for t in tensors)
    return torch.channels_last_3d if cl else torch.contiguous_format


def _slabs_pay(x, conv) -> bool:
    return (x.dim() == 5 and x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.stride[0] == conv.stride[1] == conv.stride[2]
            and x.shape[1] * x.shape[2] * x.shape[3] <= _NATIVE_CONV_LIMIT and x.shape[2] >= 8
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")  # (bf16 convolutions take oneDNN anyway)
            and not traced())


def _conv(cin, cout, stride=1):
    conv = Conv3d(cin, cout, 3, stride=stride, padding=1)
    # He init (as VoxelMorph's Keras code): PyTorch's default shrinks activations ~3x per layer,
    # which leaves the flow head almost no signal and makes training start very slowly
    nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(0.2))


class RegNet(_ChannelsLast, nn.Module):
    """VoxelMorph-style U-Net: (moving, target) -> displacement [B, 3, D, H, W] in voxels (d, h, w).

    Encoder: ``enc[0]`` at full resolution, then one stride-2 conv per further entry (16, 32, 32,
    32, 32 -> 4 halvings). Decoder: ``dec[0]`` on the bottleneck, then for each level upsample x2,
    concatenate the encoder skip and conv (32, 32, 32, 8, 8); extra ``dec`` entries are full-resolution
    convs. A final 3x3x3 conv with N(0, 1e-5) weights and zero bias makes training start near identity.

    ``diffeomorphic=True``: the output is a stationary velocity field integrated by scaling and
    squaring (``int_steps`` compositions with ``warp``), which gives an invertible map.
    """

    def __init__(self, enc=(16, 32, 32, 32, 32), dec=(32, 32, 32, 8, 8), *, diffeomorphic: bool = False,
                 int_steps: int = 7, in_channels: int = 2):
        super().__init__()
        enc, dec = list(enc), list(dec)
        if len(enc) < 2 or len(dec) < len(enc):
            raise ValueError(f"RegNet needs >= 2 encoder widths and at least as many decoder widths, got {enc}, {dec}")
        self.levels = len(enc) - 1
        self.multiple = 2 ** self.levels
        self.diffeomorphic = bool(diffeomorphic)
        self.int_steps = int(int_steps)
        self.enc = nn.ModuleList([_conv(in_channels, enc[0])] +
                                 [_conv(enc[i - 1], enc[i], stride=2) for i in range(1, len(enc))])
        self.dec = nn.ModuleList([_conv(enc[-1], dec[0])])
        for i in range(1, self.levels + 1):
            self.dec.append(_conv(dec[i - 1] + enc[self.levels - i], dec[i]))
        self.extra = nn.ModuleList([_conv(dec[i - 1], dec[i]) for i in range(self.levels + 1, len(dec))])
        self.flow = Conv3d(dec[-1], 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self._in(torch.cat([moving, target], 1))
        skips = []
        for layer in self.enc:
            x = layer(x)
            skips.append(x)
        x = self.dec[0](skips.pop())
        for layer in self.dec[1:]:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = layer(torch.cat([x, skips.pop()], 1))
        for layer in self.extra:
            x = layer(x)
        flow = self._out(self.flow(x)).float()  # float32 under bf16 autocast too (nn/precision.py)
        if self.diffeomorphic:
            flow = integrate_velocity(flow, self.int_steps)
        return flow


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp(v) ~ (x + v / 2^n) composed with itself n times -> displacement."""
    disp = velocity / (2 ** steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, mode="linear", padding="border")
    return disp


class BatchNorm3d(nn.BatchNorm3d):
    """nn.BatchNorm3d whose training-mode CPU float32 pass over a channels_last_3d volume is
    written on its [voxels, channels] view: per-channel sums over rows, then one multiply-add
    per element (forward and backward). PyTorch's own channels-last kernel is several times
    slower than that for the few channels of F_S's full-resolution level. The same
    statistics, running-stat updates and gradients (to float32 rounding); elsewhere (eval,
    other dtypes and layouts, tracing) nn.BatchNorm3d's forward. ``rows = False`` turns it off."""

    rows = True

    def forward(self, x):
        if not (self.rows and self.training and self.track_running_stats and self.momentum is not None and self.affine
                and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
                and x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] > 1 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last_3d) and not traced()):
            return super().forward(x)
        y, mean, var = _ChannelsLastBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        return y


def _rows(x):  # [N, C, D, H, W] in channels_last_3d -> its [N * D * H * W, C] view
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


class _ChannelsLastBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = _rows(x)
        var, mean = torch.var_mean(x2, 0, correction=0)
        invstd = (var + eps).rsqrt()
        scale = weight * invstd
        y2 = torch.addcmul(bias - mean * scale, x2, scale)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        n, c, d, h, w = x.shape
        return y2.view(n, d, h, w, c).permute(0, 4, 1, 2, 3), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _mean, _var):
        x, weight, mean, invstd = ctx.saved_tensors
        g2, x2 = _rows(grad.contiguous(memory_format=torch.channels_last_3d)), _rows(x)
        m = x2.shape[0]
        sum_g = g2.sum(0)
        sum_gxhat = ((g2 * x2).sum(0) - mean * sum_g) * invstd  # sum of grad * normalised x
        scale = weight * invstd
        # dx = scale (g - mean(g) - xhat mean(g xhat)), written as g a + x b + c per channel
        b = -scale * invstd * sum_gxhat / m
        c = -scale * sum_g / m - b * mean
        gx2 = torch.addcmul(c, x2, b).addcmul_(g2, scale)
        n, ch, d, h, w = x.shape
        return gx2.view(n, d, h, w, ch).permute(0, 4, 1, 2, 3), sum_gxhat, sum_g, None


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return BatchNorm3d(channels)
    if kind == "instance":
        # instance normalisation with a learnt scale and shift per channel, written as a
        # GroupNorm with one group per channel: the same function and parameters as
        # InstanceNorm3d(affine=True), but PyTorch's CPU kernel keeps channels_last_3d
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"norm must be 'batch' or 'instance', got {kind!r}")


class _Block(nn.Sequential):
    def __init__(self, cin, cout, norm):
        super().__init__(Conv3d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.LeakyReLU(0.01),
                         Conv3d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.LeakyReLU(0.01))


class SegNet(_ChannelsLast, nn.Module):
    """Light 3D U-Net: image [B, 1, D, H, W] -> class logits [B, num_classes, D, H, W].

    Two conv-norm-LeakyReLU per level; widths ``enc`` (8, 16, 32, 64), max-pool between levels
    (3 halvings); decoder mirrors it with transposed convs (``upsample="transpose"``) or trilinear
    upsampling + 1x1x1 conv (``"trilinear"``), then a 1x1x1 conv to the class logits.
    """

    def __init__(self, num_classes: int, enc=(8, 16, 32, 64), *, norm: str = "batch", upsample: str = "transpose",
                 in_channels: int = 1):
        super().__init__()
        enc = list(enc)
        if num_classes < 2:
            raise ValueError(f"SegNet needs at least 2 classes (background + 1), got {num_classes}")
        if upsample not in ("transpose", "trilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'trilinear', got {upsample!r}")
        self.multiple = 2 ** (len(enc) - 1)
        self.num_classes = num_classes
        self.down = nn.ModuleList([_Block(in_channels, enc[0], norm)] +
                                  [_Block(enc[i - 1], enc[i], norm) for i in range(1, len(enc))])
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in range(len(enc) - 1, 0, -1):
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose3d(enc[i], enc[i - 1], 2, stride=2))
            else:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="trilinear", align_corners=False),
                                             nn.Conv3d(enc[i], enc[i - 1], 1)))
            self.dec.append(_Block(2 * enc[i - 1], enc[i - 1], norm))
        self.head = nn.Conv3d(enc[0], num_classes, 1)

    @torch.no_grad()
    def init_class_prior(self, freq: torch.Tensor, floor: float = 1e-4) -> None:
        """Start the head's biases at the log class frequencies: the first softmax is the class
        prior instead of uniform, so training starts from a low cross-entropy and does not
        spend its first hundreds of steps learning that most voxels are background."""
        b = torch.log(torch.as_tensor(freq, dtype=torch.float64).clamp_min(floor))
        self.head.bias.copy_((b - b.mean()).to(self.head.bias))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self._in(image)
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        skips.pop()
        for up, block in zip(self.up, self.dec):
            x = block(torch.cat([up(x), skips.pop()], 1))
        return self._out(self.head(x)).float()  # float32 under bf16 autocast too (nn/precision.py)


def build_nets(model_cfg: dict, num_classes: int):
    """(RegNet, SegNet) from the ``model`` section of a config."""
    reg = RegNet(model_cfg["reg_enc"], model_cfg["reg_dec"], diffeomorphic=model_cfg["diffeomorphic"],
                 int_steps=model_cfg["int_steps"])
    seg = SegNet(num_classes, model_cfg["seg_enc"], norm=model_cfg["seg_norm"], upsample=model_cfg["seg_upsample"])
    if model_cfg.get("channels_last"):
        reg.use_channels_last(), seg.use_channels_last()
    return reg, seg
