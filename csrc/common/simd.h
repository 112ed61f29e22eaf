// The switch of the CPU kernels' SIMD paths, read at every call so that tests can compare the
// paths on one machine: DEEPATLAS_FAST_SIMD=0 forces the portable scalar/compiler-vectorised
// paths, DEEPATLAS_FAST_SIMD=avx2 allows AVX2 code but not AVX-512; unset (or anything else)
// lets each kernel take the best its CPU runs.
#pragma once

#include <cstdlib>
#include <cstring>

namespace deepatlas_fast {

enum class SimdLevel { None = 0, Avx2 = 1, Avx512 = 2 };

inline SimdLevel simd_level_by_env() {
  const char* env = std::getenv("DEEPATLAS_FAST_SIMD");
  if (env == nullptr) return SimdLevel::Avx512;
  if (std::strcmp(env, "0") == 0) return SimdLevel::None;
  if (std::strcmp(env, "avx2") == 0) return SimdLevel::Avx2;
  return SimdLevel::Avx512;
}

inline bool simd_enabled_by_env() { return simd_level_by_env() != SimdLevel::None; }

// The instruction sets the SIMD paths use, as this CPU reports them (whatever
// DEEPATLAS_FAST_SIMD says). False on compilers and ISAs without those paths.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
inline bool cpu_has_fma() { return __builtin_cpu_supports("fma"); }
// The AVX-512 subsets the warp rows use: F, VL and DQ.
inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
#else
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_fma() { return false; }
inline bool cpu_has_avx512() { return false; }
#endif

}  // namespace deepatlas_fast
