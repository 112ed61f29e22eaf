// The volume cache of empty_volume (see cpu_memory.h).
#include "common/cpu_memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <deque>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace deepatlas_fast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

size_t limit_from_env() {
  const char* v = std::getenv("DEEPATLAS_FAST_CPU_CACHE_MB");
  if (!v || !*v) return size_t(512) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end && *end == '\0' && mb >= 0, "DEEPATLAS_FAST_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

void madvise_huge(void* p, size_t bytes) {  // honoured in the kernel's default THP mode, "madvise"
#ifdef __linux__
  madvise(p, bytes, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Block {
  void* ptr;
  size_t bytes;  // a multiple of kHuge
};

class VolumeCache final : public c10::Allocator {
 public:
  static VolumeCache& get() {
    static VolumeCache* cache = new VolumeCache();  // never destroyed: tensors may outlive exit order
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return c10::DataPtr(nullptr, c10::Device(c10::DeviceType::CPU));
    const size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    void* p = take(bytes);
    if (!p) {
      p = std::aligned_alloc(kHuge, bytes);
      if (!p) {  // the cache may hold what is missing
        empty();
        p = std::aligned_alloc(kHuge, bytes);
      }
      TORCH_CHECK_WITH(OutOfMemoryError, p, "deepatlas_fast: out of memory allocating ", bytes, " bytes");
      madvise_huge(p, bytes);
    }
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() const { return limit_ > 0; }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

  void empty() {
    std::deque<Block> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      held_ = 0;
    }
    for (const Block& b : all) std::free(b.ptr);
  }

 private:
  VolumeCache() : limit_(limit_from_env()) {}

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->bytes == bytes) {
        void* p = it->ptr;
        held_ -= bytes;
        free_.erase(it);
        return p;
      }
    return nullptr;
  }

  // Deleter: the buffer goes to the front of the cache; the oldest ones leave it (to the OS)
  // while the cache holds more than its limit.
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    const Block block = *b;
    delete b;
    get().put(block);
  }

  void put(const Block& block) {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_front(block);
      held_ += block.bytes;
      while (held_ > limit_ && !free_.empty()) {
        held_ -= free_.back().bytes;
        evicted.push_back(free_.back());
        free_.pop_back();
      }
    }
    for (const Block& b : evicted) std::free(b.ptr);
  }

  std::mutex mutex_;
  std::deque<Block> free_;  // most recently freed first
  size_t held_ = 0;
  const size_t limit_;
};

// MADV_HUGEPAGE on the 2 MiB-aligned interior of a buffer from PyTorch's allocator.
void advise_huge_pages(void* p, size_t bytes) {
#ifdef __linux__
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise_huge(reinterpret_cast<void*>(lo), hi - lo);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

at::Tensor empty_volume(at::IntArrayRef sizes, const at::TensorOptions& options, c10::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  // (the empty [0] stand-in for a gradient not asked for has no channels-last form)
  if ((format == c10::MemoryFormat::ChannelsLast && sizes.size() != 4) ||
      (format == c10::MemoryFormat::ChannelsLast3d && sizes.size() != 5))
    format = c10::MemoryFormat::Contiguous;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kHuge) return at::empty(sizes, options, format);
  VolumeCache& cache = VolumeCache::get();
  if (!cache.enabled()) {  // PyTorch's allocator, huge pages asked for on the 2 MiB-aligned interior
    at::Tensor t = at::empty(sizes, options, format);
    advise_huge_pages(t.data_ptr(), bytes);
    return t;
  }
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), format);
}

int64_t cpu_cache_bytes() { return VolumeCache::get().held(); }

void empty_cpu_cache() { VolumeCache::get().empty(); }

}  // namespace deepatlas_fast
