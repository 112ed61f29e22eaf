// The LNCC CUDA kernel source (lncc/lncc_kernels.cuh) compiled for the host and run under the
// CUDA emulator, as ops deepatlas_fast_emulated::lncc / lncc_backward (CPU tensors).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "lncc/lncc_checks.h"
#include "lncc/lncc_math.h"
// After every ATen header: the emulator defines CUDA keywords as macros.
#include "emulator/emulated_launcher.h"
#include "lncc/lncc_kernels.cuh"

namespace deepatlas_fast {
namespace {

EmulatedLauncher lncc_launcher(int64_t threads, int64_t max_blocks) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= lncc::kMaxTile, "threads must be in [1, ",
                    lncc::kMaxTile, "]");
  TORCH_CHECK_VALUE(max_blocks >= 1, "max_blocks must be >= 1");
  return EmulatedLauncher{static_cast<int>(threads), static_cast<int>(max_blocks)};
}

at::Tensor lncc_emulated(const at::Tensor& a, const at::Tensor& b, int64_t window, double eps,
                         int64_t threads, int64_t max_blocks) {
  return lncc::lncc_forward_device(lncc_launcher(threads, max_blocks), a, b, window, eps);
}

std::tuple<at::Tensor, at::Tensor> lncc_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, int64_t window,
    double eps, std::array<bool, 2> output_mask, int64_t threads, int64_t max_blocks) {
  return lncc::lncc_backward_device(lncc_launcher(threads, max_blocks), grad_out, a, b, window,
                                    eps, output_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepatlas_fast_emulated, m) {
  m.def("lncc(Tensor a, Tensor b, int window, float eps, int threads, int max_blocks) -> Tensor");
  m.def("lncc_backward(Tensor grad_out, Tensor a, Tensor b, int window, float eps, bool[2] output_mask, int threads, int max_blocks) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deepatlas_fast_emulated, CPU, m) {
  m.impl("lncc", &lncc_emulated);
  m.impl("lncc_backward", &lncc_backward_emulated);
}

}  // namespace deepatlas_fast
