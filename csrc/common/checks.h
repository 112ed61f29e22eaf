// Host-side checks shared by every op, so every backend words its errors the same way.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace deepatlas_fast {

// The CPU kernels take float32/float64; the CUDA kernels (kernel_half = true, also when run by
// the emulator) float16/bfloat16 too, with float32 accumulation. `what` names the checked
// tensors in the message ("tensors", "probs", ...).
inline void check_kernel_dtype(const char* op, const char* what, c10::ScalarType dt,
                               bool kernel_half) {
  if (kernel_half) {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                     op, ": CUDA ", what, " must be float32, float64, float16 or bfloat16, got ", dt);
  } else {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, op, ": CPU ", what,
                     " must be float32 or float64, got ", dt);
  }
}

}  // namespace deepatlas_fast
