// The real CUDA Launcher for the kernels' shared launch glue (see warp/warp_kernels.cuh).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace deepatlas_fast {

struct CudaLauncher {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int threads = 256;

  // Grid-stride kernels: a capped grid covers any n, and n == 0 launches nothing.
  template <typename... KArgs, typename... Args>
  void operator()(int64_t n, void (*kernel)(KArgs...), Args... args) const {
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
    kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace deepatlas_fast
