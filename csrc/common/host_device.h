// Small host/device helpers shared by every kernel (CPU, CUDA and the CUDA emulator).
// Written without libm calls so the CPU hot loops inline and the CUDA side needs nothing extra.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

// Per-voxel helpers must inline into the launch loops: the compiler's size heuristics
// otherwise leave calls in the hot loop, which then runs much slower on the CPU.
#define DA_HD_INLINE C10_HOST_DEVICE C10_ALWAYS_INLINE

namespace deepatlas_fast {

// Finite test that needs no <cmath> overload on the device: x - x is NaN for NaN and +-inf.
template <typename T>
DA_HD_INLINE bool is_finite(T x) {
  return (x - x) == T(0);
}

template <typename T>
DA_HD_INLINE T clamp_value(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// floor for a value already clamped to a small range (the int cast is then defined).
template <typename T>
DA_HD_INLINE int64_t floor_index(T x) {
  const int64_t i = static_cast<int64_t>(x);  // truncates toward zero
  return (static_cast<T>(i) > x) ? i - 1 : i;
}

// Round half to even, as std::nearbyint in the default rounding mode (what grid_sample uses).
template <typename T>
DA_HD_INLINE int64_t round_half_even(T x) {
  const int64_t f = floor_index(x);
  const T frac = x - static_cast<T>(f);
  if (frac > T(0.5)) return f + 1;
  if (frac < T(0.5)) return f;
  return (f % 2 == 0) ? f : f + 1;
}

}  // namespace deepatlas_fast
