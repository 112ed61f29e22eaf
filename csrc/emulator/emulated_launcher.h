// Launcher for the kernels' shared launch glue that runs them under the CUDA emulator, with a
// launch configuration the tests choose (small blocks and a capped grid exercise the
// grid-stride loops and cross-thread atomics).
#pragma once

#include <algorithm>
#include <cstdint>

#include "emulator/cuda_emulator.h"

namespace deepatlas_fast {

struct EmulatedLauncher {
  int threads = 32;
  int max_blocks = 4;

  template <typename... KArgs, typename... Args>
  void operator()(int64_t n, void (*kernel)(KArgs...), Args... args) const {
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, max_blocks);
    da_emu::launch(dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
                   kernel, args...);
  }
};

}  // namespace deepatlas_fast
