// A small CUDA execution emulator, so the project's CUDA kernel sources run (and are tested)
// on machines without a GPU. Include it AFTER every ATen/c10 header and BEFORE a kernel .cuh,
// in a host-compiled file only.
//
// Model: blocks run one after another (a legal CUDA schedule); the threads of a block are
// real std::threads, so __syncthreads is a real barrier and atomicAdd a real atomic. Because
// only one block is alive at a time, `__shared__` can be a function-static array.
// Supported: threadIdx/blockIdx/blockDim/gridDim, fixed-size __shared__ arrays, __syncthreads,
// atomicAdd (int, unsigned, long long, float, double). Not supported: dynamic shared memory,
// warp shuffles/votes, cooperative groups, streams and events.
#pragma once

#ifdef __CUDACC__
#error "cuda_emulator.h is for host compilation of kernel sources only"
#endif

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace da_emu {

// Reusable barrier for the threads of one block (std::barrier needs C++20).
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != generation_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, arrived_ = 0, generation_ = 0;
};

inline Barrier* current_barrier = nullptr;

// Compare-and-swap loop on the value's bits: a true atomic read-modify-write.
template <typename T, typename Bits>
inline T atomic_add_bits(T* address, T value) {
  static_assert(sizeof(T) == sizeof(Bits), "size mismatch");
  Bits* p = reinterpret_cast<Bits*>(address);
  Bits old_bits = __atomic_load_n(p, __ATOMIC_RELAXED), new_bits;
  T old_value;
  do {
    std::memcpy(&old_value, &old_bits, sizeof(T));
    const T sum = old_value + value;
    std::memcpy(&new_bits, &sum, sizeof(T));
  } while (!__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED));
  return old_value;
}

// Runs kernel<<<grid, block>>>(args...) on the host; returns when all blocks are done.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args... args) {
  static std::mutex one_launch_at_a_time;  // the globals above describe a single launch
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  blockDim = block;
  gridDim = grid;
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Barrier barrier(nthreads);
        current_barrier = &barrier;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              threads.emplace_back([=] {
                threadIdx = dim3(tx, ty, tz);
                blockIdx = dim3(bx, by, bz);
                kernel(args...);
              });
        for (auto& t : threads) t.join();
        current_barrier = nullptr;
      }
}

}  // namespace da_emu

inline void __syncthreads() { da_emu::current_barrier->wait(); }

inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* a, float v) { return da_emu::atomic_add_bits<float, uint32_t>(a, v); }
inline double atomicAdd(double* a, double v) {
  return da_emu::atomic_add_bits<double, uint64_t>(a, v);
}
