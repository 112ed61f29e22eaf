// parallel_pieces: at::parallel_for with work stealing. at::parallel_for (OpenMP) splits a
// range into one fixed part per thread, so a thread that starts late or runs slowly (on a
// virtual machine, a vCPU that was idle for a while can be slow to wake) holds up the whole
// call. Here each thread still starts on its own contiguous part (for cache locality), taking
// pieces from its front, and a thread that runs out takes pieces from the back of another's
// part.
// Use only where the pieces may run in any order: the results must not depend on it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace deepatlas_fast {

// Calls f(begin, end) for consecutive pieces of at most `grain` indices covering [0, n); on
// one thread, or inside a parallel region, f(0, n) once.
template <typename F>
void parallel_pieces(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t pieces = (n + grain - 1) / grain;
  const int64_t parts = std::min<int64_t>(pieces, at::in_parallel_region() ? 1 : at::get_num_threads());
  if (parts <= 1) {
    f(0, n);
    return;
  }
  // Part t: pieces [front, back) packed in one word, so that its owner (front) and a thief
  // (back) can never take the same piece.
  struct alignas(64) Part {
    std::atomic<uint64_t> range;
  };
  std::unique_ptr<Part[]> part(new Part[parts]);
  for (int64_t t = 0; t < parts; ++t) {
    const uint64_t front = static_cast<uint64_t>(pieces * t / parts), back = static_cast<uint64_t>(pieces * (t + 1) / parts);
    part[t].range.store(front << 32 | back, std::memory_order_relaxed);
  }
  auto run = [&](int64_t piece) { f(piece * grain, std::min(n, (piece + 1) * grain)); };
  // Takes one piece of part t from its front (owner) or back (thief); -1 when it is empty.
  auto take = [&](int64_t t, bool from_front) -> int64_t {
    uint64_t r = part[t].range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = r >> 32, back = r & 0xFFFFFFFFu;
      if (front >= back) return -1;
      const uint64_t next = from_front ? ((front + 1) << 32 | back) : (front << 32 | (back - 1));
      if (part[t].range.compare_exchange_weak(r, next, std::memory_order_relaxed))
        return static_cast<int64_t>(from_front ? front : back - 1);
    }
  };
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t p; (p = take(t, true)) >= 0;) run(p);
      for (int64_t k = 1; k < parts; ++k)  // then the other parts, nearest first
        for (int64_t p; (p = take((t + k) % parts, false)) >= 0;) run(p);
    }
  });
}

}  // namespace deepatlas_fast
