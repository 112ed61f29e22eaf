// Volume-sized CPU outputs of the kernels (the warp's output and gradients, the LNCC and soft
// Dice gradients) come from empty_volume: buffers on transparent huge pages, reused from a
// cache of the package's recently freed outputs.
//  - Huge pages: a fresh buffer is first touched by our kernels; with 4 KiB pages its page
//    faults can cost more than the kernel itself; on 2 MiB pages (MADV_HUGEPAGE) it takes 512
//    times fewer.
//  - Cache: even on huge pages the OS clears every fresh page at its first touch, and glibc
//    returns a freed buffer above its mmap threshold (32 MiB at most) to the OS: the warp
//    backward's 79 MiB displacement gradient (160 x 192 x 224) would be fresh memory at every
//    call. A training loop frees and asks for the same sizes at every step, so freed buffers
//    are kept, up to DEEPATLAS_FAST_CPU_CACHE_MB (read once, at the first volume allocation;
//    default 512; 0: no cache) and handed out again for the same size, as PyTorch's CUDA
//    caching allocator does on GPUs, so that a step's outputs skip the clearing of fresh
//    pages. empty_cpu_cache() returns them to the OS.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace deepatlas_fast {

// Uninitialised CPU tensor in memory format `format` (the kernels give outputs and gradients
// the suggested memory format of the input they follow); those of 2 MiB or more come from the
// cache above.
at::Tensor empty_volume(at::IntArrayRef sizes, const at::TensorOptions& options,
                        c10::MemoryFormat format = c10::MemoryFormat::Contiguous);

// Bytes the cache holds (freed buffers, not in use), and returning them all to the OS.
int64_t cpu_cache_bytes();
void empty_cpu_cache();

}  // namespace deepatlas_fast
