// Per-voxel math of local normalised cross-correlation (LNCC), shared verbatim by the CPU
// kernel, the CUDA kernels and the CUDA emulator. C10_HOST_DEVICE, no tensors, no threads.
//
// Definition (VoxelMorph's NCC): with box sums S over a window^3 neighbourhood (zero padding,
// as conv3d with padding = window // 2), n = window^3 and u = S / n,
//   cross = S(ab) - u_b S(a) - u_a S(b) + u_a u_b n = S(ab) - S(a) S(b) / n
//   var_a = S(aa) - 2 u_a S(a) + u_a^2 n           = S(aa) - S(a)^2 / n     (same for b)
//   cc    = cross^2 / (var_a var_b + eps).
// The right-hand forms are the same numbers with fewer operations.
#pragma once

#include "common/host_device.h"

namespace deepatlas_fast {
namespace lncc {

// The five moment fields, in this order everywhere: S(a), S(b), S(aa), S(bb), S(ab).
constexpr int kMoments = 5;
constexpr int kMaxWindow = 15;
constexpr int kMaxRadius = kMaxWindow / 2;

// Sizes of a volume [B, C, D, H, W] (the CUDA kernels read it contiguous, the CPU through its
// strides); r = window / 2.
struct Geometry {
  int64_t batch, channels, d, h, w;
  int64_t window, r;
  double eps;
  DA_HD_INLINE int64_t voxels() const { return d * h * w; }
};

template <typename acc_t>
DA_HD_INLINE void moments(acc_t a, acc_t b, acc_t m[kMoments]) {
  m[0] = a;
  m[1] = b;
  m[2] = a * a;
  m[3] = b * b;
  m[4] = a * b;
}

template <typename acc_t>
DA_HD_INLINE acc_t local_cc(const acc_t s[kMoments], acc_t inv_n, acc_t eps) {
  const acc_t cross = s[4] - s[0] * s[1] * inv_n;
  const acc_t va = s[2] - s[0] * s[0] * inv_n;
  const acc_t vb = s[3] - s[1] * s[1] * inv_n;
  return cross * cross / (va * vb + eps);
}

// d(scale * cc)/d(S_k) for the five moments, written to coef[k] (same order as moments()).
// The gradient of sum_x cc(x) with respect to a at voxel y is then, with Box the same box
// filter (the adjoint of a zero-padded box sum is itself):
//   Box(coef0)(y) + 2 a(y) Box(coef2)(y) + b(y) Box(coef4)(y)     (see input_gradients).
template <typename acc_t>
DA_HD_INLINE void cc_coefficients(const acc_t s[kMoments], acc_t inv_n, acc_t eps, acc_t scale,
                                  acc_t coef[kMoments]) {
  const acc_t cross = s[4] - s[0] * s[1] * inv_n;
  const acc_t va = s[2] - s[0] * s[0] * inv_n;
  const acc_t vb = s[3] - s[1] * s[1] * inv_n;
  const acc_t q = cross / (va * vb + eps);
  const acc_t alpha = acc_t(2) * q * scale;   // d/dS(ab)
  const acc_t beta_a = -q * q * vb * scale;   // d/dS(aa) = d/dvar_a
  const acc_t beta_b = -q * q * va * scale;   // d/dS(bb)
  coef[0] = -(alpha * s[1] + acc_t(2) * beta_a * s[0]) * inv_n;  // d/dS(a)
  coef[1] = -(alpha * s[0] + acc_t(2) * beta_b * s[1]) * inv_n;  // d/dS(b)
  coef[2] = beta_a;
  coef[3] = beta_b;
  coef[4] = alpha;
}

// Gradients at one voxel from the box-summed coefficients t[k] = Box(coef_k).
template <typename acc_t>
DA_HD_INLINE void input_gradients(const acc_t t[kMoments], acc_t a, acc_t b, acc_t* ga,
                                  acc_t* gb) {
  *ga = t[0] + acc_t(2) * a * t[2] + b * t[4];
  *gb = t[1] + acc_t(2) * b * t[3] + a * t[4];
}

}  // namespace lncc
}  // namespace deepatlas_fast
