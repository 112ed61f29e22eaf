// Fresh volume-sized CPU outputs (at::empty) come from mmap and are first touched by our
// kernels; with 4 KiB pages the page faults can cost more than the kernel (measured here, a
// 2-core VM: filling a fresh 138 MiB tensor took 77 ms with 4 KiB pages, 16 ms after
// MADV_HUGEPAGE, the cost of the fill itself). Asks for transparent huge pages on the 2 MiB-
// aligned interior of a new tensor's buffer, before its first touch (honoured in the kernel's
// default THP "madvise" mode; a no-op elsewhere).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace deepatlas_fast {

inline void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.defined() || t.nbytes() < kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace deepatlas_fast
