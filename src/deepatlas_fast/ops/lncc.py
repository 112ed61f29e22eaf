"""Local normalised cross-correlation (LNCC), VoxelMorph's NCC, as a fused op.

Python side of ``torch.ops.deepatlas_fast.lncc``: fake kernels (torch.compile, export) and
autograd. The kernels are in csrc/lncc/.
"""
from __future__ import annotations

import operator

import torch

from ._library import check_one_device, empty_in_format_of, for_transforms, functorch_active, merge_batch_vmap, ops


def lncc(a: torch.Tensor, b: torch.Tensor, *, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean local squared correlation of ``a`` and ``b`` per batch item -> Tensor[B].

    With box sums S over a window^3 neighbourhood (zero padding, as conv3d with
    padding=window//2), n = window^3 and u = S / n:
    cross = S(ab) - u_b S(a) - u_a S(b) + u_a u_b n, var_a = S(aa) - 2 u_a S(a) + u_a^2 n,
    cc = cross^2 / (var_a var_b + eps), averaged over channels and voxels (VoxelMorph's NCC;
    the loss is ``1 - lncc``).

    Args:
        a, b: [B, C, D, H, W], one shape and dtype; any spatial size (also below the window).
        window: odd, 3..15.
        eps: added to var_a var_b.

    Gradients flow to both inputs, exactly (no approximation).

    Memory, CPU: the kernel streams each volume along D in slabs (one per thread at a time)
    and allocates no volume-sized buffer besides the two gradients. Per thread: forward
    5 (window + 1) slices of H x W in the input dtype (float32 for float16/bfloat16) plus
    10 float64 slices; backward about twice that. At 160x192x224, window 9, float32 that is ~0.45 volumes per thread forward and
    ~0.9 backward, so forward+backward on 2 threads peaks at ~2 volumes + the 2 gradients.
    CUDA: 5 volume-sized float32 buffers (float64 for float64 input) besides the gradients.

    float32, float64, float16 and bfloat16; the gradients take their input's memory format.
    CPU: float64 sums (2D box sums kept in the input dtype, float32 for float16/bfloat16), any
    strides read in place (no copy), bitwise deterministic for any thread count. CUDA: float32 sums (float64 for
    float64); deterministic (no atomics), no host sync.
    """
    # bool is an int, and int() would truncate 3.5 to 3: neither is a window
    try:
        if isinstance(window, bool):
            raise TypeError
        window = operator.index(window)
    except TypeError:
        raise TypeError(f"lncc: window must be an integer, got {window!r}") from None
    if window < 3 or window > 15 or window % 2 == 0:
        raise ValueError(f"lncc: window must be odd and in [3, 15], got {window}")
    if functorch_active():  # torch.func transforms need setup_context (see for_transforms)
        return _LnccForTransforms.apply(a, b, window, float(eps))
    return ops.lncc(a, b, window, float(eps))


@torch.library.register_fake("deepatlas_fast::lncc")
def _lncc_fake(a, b, window=9, eps=1e-5):
    check_one_device("lncc", a=a, b=b)
    torch._check(a.dim() == 5, lambda: "lncc: a must be 5-D [B, C, D, H, W]")
    torch._check(a.shape == b.shape, lambda: "lncc: a and b must have one shape")
    return a.new_empty((a.shape[0],))


@torch.library.register_fake("deepatlas_fast::lncc_backward")
def _lncc_backward_fake(grad_out, a, b, window, eps, output_mask):
    check_one_device("lncc_backward", a=a, b=b, grad_out=grad_out)
    return (empty_in_format_of(a, a.shape if output_mask[0] else (0,)),
            empty_in_format_of(b, b.shape if output_mask[1] else (0,)))


def _setup_context(ctx, inputs, output):
    a, b, window, eps = inputs
    ctx.window, ctx.eps = window, eps
    ctx.save_for_backward(a, b)


def _backward(ctx, grad_out):
    a, b = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    ga, gb = ops.lncc_backward(grad_out, a, b, ctx.window, ctx.eps, need)
    return (ga if need[0] else None), (gb if need[1] else None), None, None


torch.library.register_autograd("deepatlas_fast::lncc", _backward, setup_context=_setup_context)
_LnccForTransforms = for_transforms(ops.lncc, _setup_context, _backward, "_LnccForTransforms")
merge_batch_vmap("lncc", 2)
merge_batch_vmap("lncc_backward", 3)
