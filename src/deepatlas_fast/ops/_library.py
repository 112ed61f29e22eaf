"""Loads the compiled kernels (deepatlas_fast._C) once; the ops then live in torch.ops."""
from __future__ import annotations

import torch  # first: loads libc10/libtorch, which _C links against
from torch._prims_common import suggest_memory_format  # Tensor.suggest_memory_format, for fake tensors too

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
# Of the instruction sets the CPU kernels' SIMD paths use, those this CPU has: "avx2", "fma",
# "avx512" (F, VL and DQ), as the kernels' own runtime checks see them.
cpu_instruction_sets: frozenset[str] = frozenset(_C.cpu_instruction_sets)


def check_one_device(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless all ``tensors`` (by argument name) are on one device, worded as the
    kernels' own checks. For the fake kernels: the dispatcher sends any call with a meta tensor
    to them, also one mixing meta and real tensors, which would otherwise return an
    uninitialised output on the first tensor's device."""
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {first} is on {t0.device} but {name} is on {t.device}; "
                             "all tensors must be on one device")


def empty_in_format_of(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``shape`` on ``like``'s device in ``like``'s suggested memory format
    (channels-last or contiguous), as the kernels allocate their outputs and gradients: the fake
    kernels must give the real kernels' strides. A shape of another rank (the empty stand-in of
    a gradient not asked for) is contiguous."""
    fmt = suggest_memory_format(like)
    if (fmt == torch.channels_last and len(shape) != 4) or (fmt == torch.channels_last_3d and len(shape) != 5):
        fmt = torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def traced() -> bool:
    """Inside torch.compile, torch.jit tracing or ONNX export: graphs that keep the plain ops
    (eager-only CPU shortcuts switch themselves off)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def functorch_active() -> bool:
    """Inside torch.func.grad / vjp / jacrev / vmap."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def for_transforms(op, setup_context, backward, name: str):
    """An autograd.Function calling ``op`` with the op's own setup_context and backward (those
    given to register_autograd), for torch.func transforms: they need forward and setup_context
    apart, which the Function that register_autograd generates does not have. functorch
    generates its vmap rule from those of the ops it calls (merge_batch_vmap). Not twice
    differentiable (the backward ops have no derivative)."""

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


def merge_batch_vmap(name: str, tensor_args: int) -> None:
    """torch.vmap rule for op ``name``, whose first ``tensor_args`` arguments are tensors with
    the batch first and whose outputs have the batch first (or are empty, for a gradient not
    asked for): the vmapped dimension is merged into the batch, so that the op runs once
    rather than once per sample (PyTorch's fallback). Inputs not vmapped are expanded."""
    op = getattr(ops, name)

    def rule(info, in_dims, *args):
        n = info.batch_size
        merged = list(args)
        for i in range(tensor_args):
            t, dim = args[i], in_dims[i]
            t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
            merged[i] = t.reshape(n * t.shape[1], *t.shape[2:])
        out = op(*merged)

        def split(o):
            if o.dim() == 1 and o.numel() == 0:  # a gradient not asked for (output_mask)
                return o, None
            return o.reshape(n, o.shape[0] // n, *o.shape[1:]), 0

        if isinstance(out, (tuple, list)):
            pairs = [split(o) for o in out]
            return tuple(o for o, _ in pairs), tuple(d for _, d in pairs)
        return split(out)

    torch.library.register_vmap(f"deepatlas_fast::{name}", rule)
