"""The devices of the op tests as pytest parameters, as pytorch/extension-cpp's tests have them:
the CPU always, CUDA where there is a device and the package was built with its CUDA kernels
(skipped otherwise, with the reason)."""
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
