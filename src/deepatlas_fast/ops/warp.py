"""3D warp op: ``out(x) = image(x + disp(x))``, trilinear or nearest, in voxel units.

Python side of ``torch.ops.deepatlas_fast.warp``: fake kernels (torch.compile, export) and
autograd. The kernels are in csrc/warp/.
"""
from __future__ import annotations

import torch

from ._library import (check_one_device, empty_in_format_of, for_transforms, functorch_active, merge_batch_vmap, ops,
                       traced)

MODES = ("linear", "nearest")
PADDINGS = ("zeros", "border")


def warp(image: torch.Tensor, disp: torch.Tensor, *, mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` at ``x + disp(x)``.

    Args:
        image: [B, C, D, H, W].
        disp: [B, 3, D', H', W'] displacement in voxels of ``image``, channels (d, h, w).
            The output takes the grid of ``disp`` (which may differ from the image's).
        mode: "linear" (trilinear) or "nearest" (labels; no gradient to ``disp``).
        padding: "zeros" (outside is 0) or "border" (outside takes the nearest edge value).

    Returns:
        [B, C, D', H', W'], equal to VoxelMorph's SpatialTransformer and to
        ``grid_sample(image, normalise(identity + disp)[..., [2, 1, 0]], align_corners=True)``.
        A non-finite displacement gives NaN at that voxel. In ``image``'s memory format
        (channels_last_3d in, channels_last_3d out); the gradients take their input's.

    Gradients flow to both inputs (only to those that require them); torch.func transforms
    (grad, vjp, jacrev, vmap) work too. float32, float64, float16 and bfloat16 (the last two
    with float32 accumulation), any strides (read in place, no copy). CPU: deterministic.
    CUDA: the image gradient uses atomics and is not bitwise deterministic.

    On the CPU, when autograd will differentiate a one-channel linear warp with respect to
    ``disp`` (registration training), the forward also computes d out / d location from the
    corners it loads (``warp_with_loc_grad``) and keeps it, 3 volumes, for the backward, whose
    disp gradient is then ``grad_out * loc_grad`` in that buffer (computed by the rows of the
    image-gradient scatter when the image needs a gradient too: ``warp_backward_with_loc_grad``).
    """
    if mode not in MODES:
        raise ValueError(f"warp: mode must be one of {MODES}, got {mode!r}")
    if padding not in PADDINGS:
        raise ValueError(f"warp: padding must be one of {PADDINGS}, got {padding!r}")
    if functorch_active():  # (the Functions below have no setup_context, which transforms need)
        return _WarpForTransforms.apply(image, disp, mode, padding)
    if _saves_loc_grad(image, disp, mode):
        return _WarpSavingLocGrad.apply(image, disp, padding)
    return ops.warp(image, disp, mode, padding)


def _saves_loc_grad(image, disp, mode) -> bool:
    """Eager CPU forwards of a one-channel image that autograd will differentiate with respect
    to disp (registration training) compute the location gradient with the output
    (ops.warp_with_loc_grad): the corners are loaded once, and the backward's disp gradient
    is grad_out * loc_grad. Traced calls (torch.compile, export, ONNX) keep the plain op."""
    return (mode == "linear" and torch.is_grad_enabled() and disp.requires_grad
            and image.dim() == 5 and image.shape[1] == 1
            and image.device.type == "cpu" and disp.device.type == "cpu" and not traced())


class _WarpSavingLocGrad(torch.autograd.Function):
    """warp whose forward also computed d out / d location (loc_grad, 3 volumes, held until
    the backward: the memory the backward's disp gradient would take anyway)."""

    @staticmethod
    def forward(ctx, image, disp, padding):
        out, loc_grad = ops.warp_with_loc_grad(image, disp, padding)
        ctx.save_for_backward(image, disp)
        ctx.padding = padding
        # Not in save_for_backward: no one else holds this buffer, so the backward turns it into
        # the disp gradient in place; a second backward through the graph (retain_graph=True)
        # finds it gone and recomputes from image and disp.
        ctx.loc_grad = loc_grad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        image, disp = ctx.saved_tensors
        need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
        loc_grad, ctx.loc_grad = ctx.loc_grad, None
        if loc_grad is None:  # a second backward: loc_grad was consumed by the first
            grad_image, grad_disp = ops.warp_backward(grad_out, image, disp, "linear", ctx.padding, need)
        elif need[0]:  # the image gradient, its rows also turning loc_grad into the disp gradient
            grad_image = ops.warp_backward_with_loc_grad(grad_out, image, disp, loc_grad, ctx.padding)
            grad_disp = loc_grad
        else:
            grad_image, grad_disp = None, loc_grad.mul_(grad_out)  # grad_out broadcasts over (d, h, w)
        return (grad_image if need[0] else None), (grad_disp if need[1] else None), None


def _out_shape(image, disp):
    return (image.shape[0], image.shape[1], *disp.shape[2:])


@torch.library.register_fake("deepatlas_fast::warp")
def _warp_fake(image, disp, mode="linear", padding="zeros"):
    check_one_device("warp", image=image, disp=disp)
    torch._check(image.dim() == 5, lambda: "warp: image must be 5-D [B, C, D, H, W]")
    torch._check(disp.dim() == 5 and disp.shape[1] == 3, lambda: "warp: disp must be [B, 3, D, H, W]")
    return empty_in_format_of(image, _out_shape(image, disp))


@torch.library.register_fake("deepatlas_fast::warp_with_loc_grad")
def _warp_with_loc_grad_fake(image, disp, padding="zeros"):
    check_one_device("warp", image=image, disp=disp)
    torch._check(image.dim() == 5 and image.shape[1] == 1, lambda: "warp_with_loc_grad: image must be [B, 1, D, H, W]")
    torch._check(disp.dim() == 5 and disp.shape[1] == 3, lambda: "warp_with_loc_grad: disp must be [B, 3, D, H, W]")
    return (empty_in_format_of(image, _out_shape(image, disp)),
            empty_in_format_of(disp, (disp.shape[0], 3, *disp.shape[2:]), image.dtype))


@torch.library.register_fake("deepatlas_fast::warp_backward_with_loc_grad")
def _warp_backward_with_loc_grad_fake(grad_out, image, disp, loc_grad, padding):
    check_one_device("warp_backward_with_loc_grad", image=image, disp=disp, grad_out=grad_out, loc_grad=loc_grad)
    return empty_in_format_of(image, image.shape)


@torch.library.register_fake("deepatlas_fast::warp_backward")
def _warp_backward_fake(grad_out, image, disp, mode, padding, output_mask):
    check_one_device("warp_backward", image=image, disp=disp, grad_out=grad_out)
    grad_image = empty_in_format_of(image, image.shape if output_mask[0] else (0,))
    grad_disp = empty_in_format_of(disp, (disp.shape[0], 3, *disp.shape[2:]) if output_mask[1] else (0,))
    return grad_image, grad_disp


def _setup_context(ctx, inputs, output):
    image, disp, mode, padding = inputs
    ctx.mode, ctx.padding = mode, padding
    ctx.save_for_backward(image, disp)


def _backward(ctx, grad_out):
    image, disp = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_image, grad_disp = ops.warp_backward(grad_out, image, disp, ctx.mode, ctx.padding, need)
    return (grad_image if need[0] else None), (grad_disp if need[1] else None), None, None


torch.library.register_autograd("deepatlas_fast::warp", _backward, setup_context=_setup_context)
_WarpForTransforms = for_transforms(ops.warp, _setup_context, _backward, "_WarpForTransforms")
merge_batch_vmap("warp", 2)
merge_batch_vmap("warp_backward", 3)
