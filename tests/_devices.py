"""The devices of the op tests as pytest parameters, as pytorch/extension-cpp's tests have them:
the CPU always, CUDA where there is a device and the package was built with its CUDA kernels
(skipped otherwise, with the reason)."""
import itertools

import pytest
import torch

from deepatlas_fast.ops import _library


def _cuda_missing() -> str | None:
    if not _library.with_cuda:
        return "built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def on_cuda(*values, id=None):
    """A pytest parameter of a CUDA test: skipped without a device or CUDA kernels."""
    reason = _cuda_missing()
    marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=reason)] if reason else [])
    return pytest.param(*values, marks=marks, id=id)


DEVICES = ["cpu", on_cuda("cuda", id="cuda")]


def devices_and_dtypes(cpu, cuda):
    """(device, dtype) parameters: the CPU with each dtype of `cpu`, CUDA with each of `cuda`."""
    def name(dtype):
        return str(dtype).replace("torch.", "")
    return ([pytest.param("cpu", d, id=f"cpu-{name(d)}") for d in cpu]
            + [on_cuda("cuda", d, id=f"cuda-{name(d)}") for d in cuda])


def device_mixes(args, devices=("cpu", "meta")):
    """Copies of the argument tuple `args` with its tensors on every combination of `devices`
    that is not one device for all, each with the devices it used."""
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for combo in itertools.product(devices, repeat=len(slots)):
        if len(set(combo)) > 1:
            mixed = list(args)
            for i, d in zip(slots, combo):
                mixed[i] = args[i].to(d)
            yield tuple(mixed), combo


def assert_one_device(op, args):
    """The op `op` (an OpOverloadPacket of torch.ops) rejects every mix of CPU and meta tensors
    in `args`, both as called (a meta tensor sends it to its fake kernel) and in its CPU kernel,
    with a message naming two of the arguments and their devices; meta alone is fine."""
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for mixed, combo in device_mixes(args):
        for call in (op, lambda *a: op.default.redispatch(cpu_kernel, *a)):
            with pytest.raises(ValueError, match=r"\w+ is on (cpu|meta) but \w+ is on (cpu|meta)") as e:
                call(*mixed)
            assert "is on cpu" in str(e.value) and "is on meta" in str(e.value), (combo, str(e.value))
    out = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert all(o.device.type == "meta" for o in (out if isinstance(out, (tuple, list)) else [out]))
