// Small host/device helpers shared by every kernel (CPU, CUDA and the CUDA emulator).
// Written without libm calls so the CPU hot loops inline and the CUDA side needs nothing extra.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace deepatlas_fast {

// Finite test that needs no <cmath> overload on the device: x - x is NaN for NaN and +-inf.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
  return (x - x) == T(0);
}

template <typename T>
C10_HOST_DEVICE inline T clamp_value(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// floor for a value already clamped to a small range (the int cast is then defined).
template <typename T>
C10_HOST_DEVICE inline int64_t floor_index(T x) {
  const int64_t i = static_cast<int64_t>(x);  // truncates toward zero
  return (static_cast<T>(i) > x) ? i - 1 : i;
}

// Round half to even, as std::nearbyint in the default rounding mode (what grid_sample uses).
template <typename T>
C10_HOST_DEVICE inline int64_t round_half_even(T x) {
  const int64_t f = floor_index(x);
  const T frac = x - static_cast<T>(f);
  if (frac > T(0.5)) return f + 1;
  if (frac < T(0.5)) return f;
  return (f % 2 == 0) ? f : f + 1;
}

}  // namespace deepatlas_fast
