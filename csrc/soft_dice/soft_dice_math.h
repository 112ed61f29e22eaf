// Per-voxel math of the soft Dice sums, shared by the CPU kernel, the CUDA kernels and the
// CUDA emulator. C10_HOST_DEVICE, no tensors, no threads.
//
// For batch item b and class c the op returns three sums over voxels x:
//   I = sum p_c(x) t_c(x),  P = sum p_c(x),  T = sum t_c(x)
// p: probabilities, or softmax over classes of logits (from_logits); t: probabilities, or the
// one-hot of an integer label map (t_c(x) = [y(x) == c], never materialised).
// soft Dice = (2 I + eps) / (P + T + eps) is then a [B, C] formula (deepatlas_fast/ops).
// Backward, with (gI, gP, gT) the gradient of the sums:
//   dL/dp_c = gI_c t_c + gP_c,   dL/dt_c = gI_c p_c + gT_c,
//   through the softmax: dL/dz_c = p_c (dL/dp_c - sum_k p_k dL/dp_k).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "common/host_device.h"

namespace deepatlas_fast {
namespace soft_dice {

struct Geometry {
  int64_t batch, classes, voxels;  // probs viewed as [B, C, voxels]
  bool labels;                     // target is an integer label map [B, 1, voxels]
  bool from_logits;
};

template <typename label_t>
DA_HD_INLINE bool label_ok(label_t y, int64_t classes) {
  return static_cast<int64_t>(y) >= 0 && static_cast<int64_t>(y) < classes;
}

// exp for softmax arguments x = z - max(z) <= 0. On the host, float uses a branch-free
// Cephes-style polynomial (~1 ulp) that the compiler vectorises (std::exp does not without
// -ffast-math); below -87 it returns 0 (exp(-87) = 1.6e-38 is below float's normal range).
// Its range reduction holds for |x| < 2^22 ln 2 only: beyond, as for logits far apart (1e30
// and 0; 3e38 and -3e38, whose difference is -inf), the polynomial overflows, and inf times
// the scale 0 was NaN. So wherever 2^n underflows the result is masked to 0, except for NaN
// x, which stays NaN (NaN logits). The range checks are integer ones: a float compare or
// clamp would keep the loop scalar. Double and the device use the math library.
template <typename acc_t>
DA_HD_INLINE acc_t exp_value(acc_t x) {
  return ::exp(x);
}

#ifndef __CUDA_ARCH__
template <>
DA_HD_INLINE float exp_value<float>(float x) {
  int32_t bits_x;
  std::memcpy(&bits_x, &x, sizeof(bits_x));
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;  // Cody-Waite: x - n ln 2 in two parts
  const float z = x * x;
  const float y = ((((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x +
                      4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f) * z) +
                  x + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // biased exponent of 2^n; x <= 0 so n <= 0
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float r = y * scale;
  // all ones where the result stands: 2^n is a normal float (e >= 0; e = 0 gives the scale
  // 0), or x is NaN
  const int32_t keep = -static_cast<int32_t>((e >= 0) | ((bits_x & 0x7fffffff) > 0x7f800000));
  int32_t bits_r;
  std::memcpy(&bits_r, &r, sizeof(bits_r));
  bits_r &= keep;
  float out;
  std::memcpy(&out, &bits_r, sizeof(out));
  return out;
}
#endif

}  // namespace soft_dice
}  // namespace deepatlas_fast
