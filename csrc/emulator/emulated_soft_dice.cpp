// The soft Dice CUDA kernel source (soft_dice/soft_dice_kernels.cuh) compiled for the host and
// run under the CUDA emulator, as ops deepatlas_fast_emulated::soft_dice_sums[_backward].
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "soft_dice/soft_dice_checks.h"
#include "soft_dice/soft_dice_math.h"
// After every ATen header: the emulator defines CUDA keywords as macros.
#include "emulator/emulated_launcher.h"
#include "soft_dice/soft_dice_kernels.cuh"

namespace deepatlas_fast {
namespace {

EmulatedLauncher dice_launcher(int64_t threads, int64_t max_blocks) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= soft_dice::kMaxThreads, "threads must be in [1, ",
                    soft_dice::kMaxThreads, "]");
  TORCH_CHECK_VALUE(max_blocks >= 1, "max_blocks must be >= 1");
  return EmulatedLauncher{static_cast<int>(threads), static_cast<int>(max_blocks)};
}

at::Tensor soft_dice_sums_emulated(const at::Tensor& probs, const at::Tensor& target,
                                   bool from_logits, int64_t threads, int64_t max_blocks) {
  return soft_dice::soft_dice_sums_device(dice_launcher(threads, max_blocks), probs, target,
                                          from_logits);
}

std::tuple<at::Tensor, at::Tensor> soft_dice_sums_backward_emulated(
    const at::Tensor& grad_sums, const at::Tensor& probs, const at::Tensor& target,
    bool from_logits, std::array<bool, 2> output_mask, int64_t threads, int64_t max_blocks) {
  return soft_dice::soft_dice_sums_backward_device(dice_launcher(threads, max_blocks), grad_sums,
                                                   probs, target, from_logits, output_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepatlas_fast_emulated, m) {
  m.def("soft_dice_sums(Tensor probs, Tensor target, bool from_logits, int threads, int max_blocks) -> Tensor");
  m.def("soft_dice_sums_backward(Tensor grad_sums, Tensor probs, Tensor target, bool from_logits, bool[2] output_mask, int threads, int max_blocks) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deepatlas_fast_emulated, CPU, m) {
  m.impl("soft_dice_sums", &soft_dice_sums_emulated);
  m.impl("soft_dice_sums_backward", &soft_dice_sums_backward_emulated);
}

}  // namespace deepatlas_fast
