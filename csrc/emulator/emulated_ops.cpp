// The CUDA kernel sources compiled for the host and run under the CUDA emulator, registered
// as ops of the namespace deepatlas_fast_emulated (CPU tensors). Tests compare them with the
// CPU kernels and the float64 references, so the .cuh code is executed, not only compiled.
// Test-only, like everything in csrc/emulator: a library of its own, built by the Python tests
// (tests/_emulator.py) and by CMake's tests, never part of the wheel or of deepatlas_fast_ops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "warp/warp_checks.h"
#include "warp/warp_math.h"
// After every ATen header: the emulator defines CUDA keywords as macros.
#include "emulator/emulated_launcher.h"
#include "warp/warp_kernels.cuh"

namespace deepatlas_fast {
namespace {

EmulatedLauncher launcher(int64_t threads, int64_t max_blocks) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024, "threads must be in [1, 1024]");
  TORCH_CHECK_VALUE(max_blocks >= 1, "max_blocks must be >= 1");
  return EmulatedLauncher{static_cast<int>(threads), static_cast<int>(max_blocks)};
}

at::Tensor warp_emulated(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                         c10::string_view padding, int64_t threads, int64_t max_blocks) {
  return warp::warp_forward_device(launcher(threads, max_blocks), image, disp, mode, padding);
}

std::tuple<at::Tensor, at::Tensor> warp_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& disp,
    c10::string_view mode, c10::string_view padding, std::array<bool, 2> output_mask,
    int64_t threads, int64_t max_blocks) {
  return warp::warp_backward_device(launcher(threads, max_blocks), grad_out, image, disp, mode,
                                    padding, output_mask);
}

}  // namespace

TORCH_LIBRARY(deepatlas_fast_emulated, m) {
  m.def("warp(Tensor image, Tensor disp, str mode, str padding, int threads, int max_blocks) -> Tensor");
  m.def("warp_backward(Tensor grad_out, Tensor image, Tensor disp, str mode, str padding, bool[2] output_mask, int threads, int max_blocks) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deepatlas_fast_emulated, CPU, m) {
  m.impl("warp", &warp_emulated);
  m.impl("warp_backward", &warp_backward_emulated);
}

}  // namespace deepatlas_fast
