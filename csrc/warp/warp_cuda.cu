// CUDA registration of the warp op: device guard + the real launcher; all else is shared.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launcher.cuh"
#include "warp/warp_kernels.cuh"

namespace deepatlas_fast {
namespace warp {
namespace {

at::Tensor warp_cuda(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                     c10::string_view padding) {
  const c10::cuda::CUDAGuard guard(image.device());
  return warp_forward_device(CudaLauncher{}, image, disp, mode, padding);
}

std::tuple<at::Tensor, at::Tensor> warp_backward_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& image,
                                                       const at::Tensor& disp,
                                                       c10::string_view mode,
                                                       c10::string_view padding,
                                                       std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(image.device());
  return warp_backward_device(CudaLauncher{}, grad_out, image, disp, mode, padding, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CUDA, m) {
  m.impl("warp", &warp_cuda);
  m.impl("warp_backward", &warp_backward_cuda);
}

}  // namespace warp
}  // namespace deepatlas_fast
