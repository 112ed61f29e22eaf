"""Build of deepatlas_fast._C (torch cpp_extension).

    pip install torch==2.14.1
    pip install --no-build-isolation .          # CPU kernels; CUDA too when a GPU/nvcc is found
    FORCE_CUDA=1 pip install --no-build-isolation .   # also compile the CUDA kernels

Environment: FORCE_CUDA=1 builds CUDA without a visible GPU; TORCH_CUDA_ARCH_LIST picks the
architectures (default "8.0;9.0" when no GPU is visible); MAX_JOBS bounds parallel compiles;
DEEPATLAS_DEBUG=1 keeps debug info.
"""
import glob
import os

# torch guesses CUDA_HOME from the first nvcc on PATH; a /usr/local/bin/nvcc wrapper makes
# it pick /usr/local and the link fails (-lcudart). Prefer the real toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def cuda_archs() -> list[str]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return [a for a in env.replace(",", ";").replace(" ", ";").split(";") if a]
    if torch.cuda.is_available():
        return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ["8.0", "9.0"]


def gencode_flags(archs: list[str]) -> list[str]:
    # Explicit -gencode flags: cpp_extension ignores TORCH_CUDA_ARCH_LIST as soon as any flag
    # mentions "arch", and raises with no GPU and no list.
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def extension():
    with_cuda = want_cuda()
    debug = os.environ.get("DEEPATLAS_DEBUG", "0") == "1"
    # Test-only code stays out of the wheel: csrc/tests (native ctest tests) and csrc/emulator
    # (the CUDA emulator's ops, built by the test suite and by CMake's tests).
    test_only = tuple(os.path.join("csrc", d, "") for d in ("tests", "emulator"))
    sources = sorted(f for f in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if not f.startswith(test_only))
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp: without it at::parallel_for silently runs on one thread. -ffp-contract=off: the
    # SIMD rows (AVX-512 implies FMA) must not fuse multiply-adds, to keep the scalar code's bits.
    cxx = opt + ["-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    macros = []
    kwargs = dict(include_dirs=[CSRC], extra_link_args=["-fopenmp"])
    if with_cuda:
        archs = cuda_archs()
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        macros += [("DEEPATLAS_WITH_CUDA", None), ("DEEPATLAS_CUDA_ARCHS", '"%s"' % ";".join(archs))]
        nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-Xcompiler=-g0"]) + gencode_flags(archs)
        return CUDAExtension("deepatlas_fast._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("deepatlas_fast._C", sources, define_macros=macros,
                        extra_compile_args={"cxx": cxx}, **kwargs)


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_data={"deepatlas_fast.data.demo_data": ["*", "**/*"]},
    include_package_data=True,
)
