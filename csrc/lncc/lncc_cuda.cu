// CUDA registration of the LNCC op: device guard + the real launcher; all else is shared.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launcher.cuh"
#include "lncc/lncc_kernels.cuh"

namespace deepatlas_fast {
namespace lncc {
namespace {

at::Tensor lncc_cuda(const at::Tensor& a, const at::Tensor& b, int64_t window, double eps) {
  const c10::cuda::CUDAGuard guard(a.device());
  return lncc_forward_device(CudaLauncher{}, a, b, window, eps);
}

std::tuple<at::Tensor, at::Tensor> lncc_backward_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& a, const at::Tensor& b,
                                                       int64_t window, double eps,
                                                       std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(a.device());
  return lncc_backward_device(CudaLauncher{}, grad_out, a, b, window, eps, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CUDA, m) {
  m.impl("lncc", &lncc_cuda);
  m.impl("lncc_backward", &lncc_backward_cuda);
}

}  // namespace lncc
}  // namespace deepatlas_fast
