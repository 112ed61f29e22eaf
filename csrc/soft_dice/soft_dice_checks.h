// Host-side argument checks of the soft Dice sums op, shared by the CPU, CUDA and emulated
// launchers so every backend rejects bad input with the same message.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

#include "soft_dice/soft_dice_math.h"

namespace deepatlas_fast {
namespace soft_dice {

// probs [B, C, ...]; target integer labels [B, 1, ...] or probabilities [B, C, ...] of probs'
// dtype. Every backend takes float32/float64 and float16/bfloat16 (float32 sums on CUDA,
// float64 across chunks on the CPU); kernel_half: the CUDA kernels (also under the emulator).
inline Geometry check_inputs(const char* op, const at::Tensor& probs, const at::Tensor& target,
                             bool from_logits, bool kernel_half = false) {
  TORCH_CHECK_VALUE(probs.dim() >= 2, op, ": probs must be [B, C, ...], got shape ", probs.sizes());
  TORCH_CHECK_VALUE(probs.numel() > 0, op, ": probs is empty, shape ", probs.sizes());
  TORCH_CHECK_VALUE(probs.device() == target.device(), op, ": probs is on ", probs.device(),
                    " but target is on ", target.device());
  const auto dt = probs.scalar_type();
  check_kernel_dtype(op, "probs", dt, kernel_half);
  const bool labels = at::isIntegralType(target.scalar_type(), /*includeBool=*/false);
  TORCH_CHECK_TYPE(labels || target.scalar_type() == dt, op,
                   ": target must be integer labels or probabilities of probs' dtype (", dt,
                   "), got ", target.scalar_type());
  bool shape_ok = target.dim() == probs.dim() && target.size(0) == probs.size(0) &&
                  target.size(1) == (labels ? 1 : probs.size(1));
  for (int64_t i = 2; shape_ok && i < probs.dim(); ++i) shape_ok = target.size(i) == probs.size(i);
  TORCH_CHECK_VALUE(shape_ok, op, ": target must be ",
                    labels ? "integer labels [B, 1, ...]" : "probabilities [B, C, ...]",
                    " on probs' grid; probs has shape ", probs.sizes(), ", target ",
                    target.sizes());
  return {probs.size(0), probs.size(1), probs.numel() / (probs.size(0) * probs.size(1)), labels,
          from_logits};
}

inline void check_grad_sums(const char* op, const at::Tensor& grad_sums, const Geometry& g,
                            const at::Tensor& probs) {
  TORCH_CHECK_VALUE(grad_sums.dim() == 3 && grad_sums.size(0) == g.batch &&
                        grad_sums.size(1) == g.classes && grad_sums.size(2) == 3,
                    op, ": grad_sums must have the output's shape [", g.batch, ", ", g.classes,
                    ", 3], got ", grad_sums.sizes());
  TORCH_CHECK_TYPE(grad_sums.scalar_type() == probs.scalar_type(), op, ": grad_sums is ",
                   grad_sums.scalar_type(), " but probs is ", probs.scalar_type());
  TORCH_CHECK_VALUE(grad_sums.device() == probs.device(), op, ": grad_sums is on ",
                    grad_sums.device(), " but probs is on ", probs.device());
}

// Calls f(label_t{}) with the label map's integer type (int64_t, unused, for probabilities).
template <typename F>
void with_label_type(const Geometry& g, const at::Tensor& target, const F& f) {
  if (!g.labels) return f(int64_t{});
  AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "soft_dice_labels", [&] { f(scalar_t{}); });
}

}  // namespace soft_dice
}  // namespace deepatlas_fast
