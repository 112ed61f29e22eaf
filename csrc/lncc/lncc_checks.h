// Host-side argument checks of the LNCC op, shared by the CPU, CUDA and emulated launchers so
// every backend rejects bad input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

#include "lncc/lncc_math.h"

namespace deepatlas_fast {
namespace lncc {

// Checks a, b [B, C, D, H, W] (one shape, dtype and device), window and eps; returns the
// geometry. Every backend takes float32/float64 and float16/bfloat16 (float32 sums on CUDA,
// float64 on the CPU); kernel_half = true: the CUDA kernels (also under the emulator).
inline Geometry check_inputs(const char* op, const at::Tensor& a, const at::Tensor& b,
                             int64_t window, double eps, bool kernel_half = false) {
  TORCH_CHECK_VALUE(a.dim() == 5, op, ": a must be 5-D [B, C, D, H, W], got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 5, op, ": b must be 5-D [B, C, D, H, W], got shape ", b.sizes());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": a and b must have one shape, got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_VALUE(a.numel() > 0, op, ": a is empty, shape ", a.sizes());
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": a is on ", a.device(), " but b is on ",
                    b.device());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": a is ", a.scalar_type(),
                   " but b is ", b.scalar_type(), "; both must have one dtype");
  check_kernel_dtype(op, "tensors", a.scalar_type(), kernel_half);
  TORCH_CHECK_VALUE(window >= 3 && window <= kMaxWindow && window % 2 == 1, op,
                    ": window must be odd and in [3, ", kMaxWindow, "], got ", window);
  TORCH_CHECK_VALUE(eps >= 0 && eps < 1e30, op, ": eps must be finite and >= 0, got ", eps);
  return {a.size(0), a.size(1), a.size(2), a.size(3), a.size(4), window, window / 2, eps};
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& a) {
  TORCH_CHECK_VALUE(grad_out.dim() == 1 && grad_out.size(0) == a.size(0), op,
                    ": grad_out must have the output's shape [", a.size(0), "], got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == a.scalar_type(), op, ": grad_out is ",
                   grad_out.scalar_type(), " but a is ", a.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == a.device(), op, ": grad_out is on ", grad_out.device(),
                    " but a is on ", a.device());
}

}  // namespace lncc
}  // namespace deepatlas_fast
