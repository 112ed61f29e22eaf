"""Loads the compiled kernels (deepatlas_fast._C) once; the ops then live in torch.ops."""
from __future__ import annotations

import torch  # first: loads libc10/libtorch, which _C links against

try:
    from .. import _C  # noqa: F401  (loading registers torch.ops.deepatlas_fast.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "deepatlas_fast: the compiled extension deepatlas_fast._C is missing or does not load "
        f"({e}). Install the package with `pip install --no-build-isolation .` after torch."
    ) from e

ops = torch.ops.deepatlas_fast
with_cuda: bool = bool(_C.with_cuda)
cuda_archs: str = str(_C.cuda_archs)


def functorch_active() -> bool:
    """Inside torch.func.grad / vjp / jacrev / vmap."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def for_transforms(op, setup_context, backward, name: str):
    """An autograd.Function calling ``op`` with the op's own setup_context and backward (those
    given to register_autograd), for torch.func transforms: they need forward and setup_context
    apart, which the Function that register_autograd generates does not have. Its vmap rule is
    generated (the op then runs sample by sample). Not twice differentiable (the backward ops
    have no derivative)."""

    def forward(*args):
        return op(*args)

    @torch.autograd.function.once_differentiable
    def backward_fn(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_fn),
    })
