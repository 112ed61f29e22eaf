// The switch of the CPU kernels' SIMD paths: DEEPATLAS_FAST_SIMD=0 (read at every call) forces
// the portable scalar/compiler-vectorised paths, so tests can compare both on one machine.
#pragma once

#include <cstdlib>
#include <cstring>

namespace deepatlas_fast {

inline bool simd_enabled_by_env() {
  const char* env = std::getenv("DEEPATLAS_FAST_SIMD");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

}  // namespace deepatlas_fast
