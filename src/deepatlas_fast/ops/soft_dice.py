"""Per-class soft Dice on a fused reduction op.

``torch.ops.deepatlas_fast.soft_dice_sums`` reduces the volume to three sums per batch item
and class (sum p t, sum p, sum t), with the softmax fused (``from_logits``) and integer labels
read directly (never expanded to one-hot); the Dice ratio is then a [B, C] formula here.
Kernels in csrc/soft_dice/.
"""
from __future__ import annotations

import torch

from ._library import check_one_device, empty_in_format_of, for_transforms, functorch_active, merge_batch_vmap, ops


def soft_dice(probs: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-6, from_logits: bool = False) -> torch.Tensor:
    """(2 sum(p t) + eps) / (sum p + sum t + eps) per batch item and class -> Tensor[B, C].

    Args:
        probs: [B, C, ...] probabilities, or logits with ``from_logits=True`` (softmax over C).
        target: integer labels [B, 1, ...] with values in [0, C) (anything else raises
            ValueError), or probabilities [B, C, ...] of probs' dtype; then both receive
            gradients (the anatomy loss of DeepAtlas, where both sides come from networks).
        eps: smoothing of numerator and denominator.

    Memory: no [B, C, ...] temporary (no one-hot, no stored softmax). float32, float64,
    float16 and bfloat16 (float32 sums); the gradients take their input's memory format.
    CPU: deterministic for any thread count; channels-last (and any layout whose spatial dims
    form one axis) read in place, other layouts copied once. CUDA: integer labels are
    range-checked on the host (one sync in forward).
    """
    if functorch_active():  # torch.func transforms need setup_context (see for_transforms)
        sums = _SumsForTransforms.apply(probs, target, bool(from_logits))
    else:
        sums = ops.soft_dice_sums(probs, target, bool(from_logits))
    inter, p_sum, t_sum = sums.unbind(-1)
    return (2 * inter + eps) / (p_sum + t_sum + eps)


@torch.library.register_fake("deepatlas_fast::soft_dice_sums")
def _sums_fake(probs, target, from_logits=False):
    check_one_device("soft_dice", probs=probs, target=target)
    torch._check(probs.dim() >= 2, lambda: "soft_dice: probs must be [B, C, ...]")
    return probs.new_empty((probs.shape[0], probs.shape[1], 3))


@torch.library.register_fake("deepatlas_fast::soft_dice_sums_backward")
def _sums_backward_fake(grad_sums, probs, target, from_logits, output_mask):
    check_one_device("soft_dice_backward", probs=probs, target=target, grad_sums=grad_sums)
    need_t = output_mask[1] and target.is_floating_point()
    return (empty_in_format_of(probs, probs.shape if output_mask[0] else (0,)),
            empty_in_format_of(target, target.shape if need_t else (0,), probs.dtype))


def _setup_context(ctx, inputs, output):
    probs, target, from_logits = inputs
    ctx.from_logits = from_logits
    ctx.save_for_backward(probs, target)


def _backward(ctx, grad_sums):
    probs, target = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    gp, gt = ops.soft_dice_sums_backward(grad_sums, probs, target, ctx.from_logits, need)
    return (gp if need[0] else None), (gt if need[1] else None), None


torch.library.register_autograd("deepatlas_fast::soft_dice_sums", _backward, setup_context=_setup_context)
_SumsForTransforms = for_transforms(ops.soft_dice_sums, _setup_context, _backward, "_SumsForTransforms")
merge_batch_vmap("soft_dice_sums", 2)
merge_batch_vmap("soft_dice_sums_backward", 3)
