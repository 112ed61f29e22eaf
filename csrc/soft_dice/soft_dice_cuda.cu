// CUDA registration of the soft Dice sums: device guard + the real launcher; all else shared.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launcher.cuh"
#include "soft_dice/soft_dice_kernels.cuh"

namespace deepatlas_fast {
namespace soft_dice {
namespace {

at::Tensor soft_dice_sums_cuda(const at::Tensor& probs, const at::Tensor& target, bool from_logits) {
  const c10::cuda::CUDAGuard guard(probs.device());
  return soft_dice_sums_device(CudaLauncher{}, probs, target, from_logits);
}

std::tuple<at::Tensor, at::Tensor> soft_dice_sums_backward_cuda(
    const at::Tensor& grad_sums, const at::Tensor& probs, const at::Tensor& target,
    bool from_logits, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(probs.device());
  return soft_dice_sums_backward_device(CudaLauncher{}, grad_sums, probs, target, from_logits,
                                        output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CUDA, m) {
  m.impl("soft_dice_sums", &soft_dice_sums_cuda);
  m.impl("soft_dice_sums_backward", &soft_dice_sums_backward_cuda);
}

}  // namespace soft_dice
}  // namespace deepatlas_fast
