// Host-side checks shared by every op, so every backend words its errors the same way.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace deepatlas_fast {

// Every kernel takes float32/float64 and float16/bfloat16, the last two with float32
// accumulation (the CPU's float64 sums stay float64). kernel_half: the CUDA kernels (also when
// run by the emulator), which only changes the backend the message names. `what` names the
// checked tensors in the message ("tensors", "probs", ...).
inline void check_kernel_dtype(const char* op, const char* what, c10::ScalarType dt,
                               bool kernel_half) {
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   op, ": ", kernel_half ? "CUDA " : "CPU ", what,
                   " must be float32, float64, float16 or bfloat16, got ", dt);
}

}  // namespace deepatlas_fast
