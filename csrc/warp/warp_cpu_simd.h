// SIMD specialisations of the float32 linear path of the CPU warp. The rows themselves are in
// warp_cpu_simd_rows.h, compiled twice here (as Highway's per-target re-inclusion does): for
// AVX2 (namespace avx2) and for AVX-512 (namespace avx512: the same code plus the backward's
// masked run scatter). Functions carry a target attribute and are called only after a runtime
// CPU check, so the package still runs on CPUs without AVX2 and on other ISAs.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DA_WARP_SIMD 1
#include <immintrin.h>
#endif

#include "common/simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {

// Row of the SIMD paths: contiguous along W for the image, disp and output (gradients).
// Offsets inside one channel must fit in int32 (checked by the caller).
struct RowArgs {
  const float* img;      // (b, 0, 0, 0, 0)
  int32_t isd, ish;      // image strides along D and H (W stride is 1)
  int64_t isc;           // image channel stride
  int64_t channels;
  const float* uz;       // displacement row, channels d, h, w
  const float* uy;
  const float* ux;
  float d, h;            // row coordinates
  int64_t width;
  Limits<float> lim;
  int32_t size_d, size_h, size_w;  // image sizes, for border_lanes
  bool border;                     // padding "border" (else "zeros")
  // Displacement row (channels d, h, w) and coordinates of the output row visited a few
  // columns later, whose cells are prefetched (ahead_cell); az null: none.
  const float* az = nullptr;
  const float* ay = nullptr;
  const float* ax = nullptr;
  float ad = 0, ah = 0;
  // Rows of later output rows that their first access would miss, because the column order
  // (for_each_row) interleaves more streams than the hardware prefetchers follow: fetched one
  // cache line per 16 voxels of this row (fetch_next), those to be written for writing.
  // Null: none.
  const float* read_ahead[3] = {};
  float* write_ahead[4] = {};
};

// What a backward_row instantiation computes (its template argument, a sum of these; forward_row
// takes kOneChannel or 0).
enum RowOutputs : int {
  kImageGrad = 1,      // the image gradient (scatter)
  kDispGrad = 2,       // the disp gradient, from the image's corners
  kScaleLocGrad = 4,   // the disp gradient as location gradient * grad_out, in place
  kOutput = 8,         // the forward's output too (with kDispGrad)
  kOneChannel = 16,    // a one-channel image
};

// The best row code this CPU runs, capped by DEEPATLAS_FAST_SIMD (common/simd.h).
inline SimdLevel simd_level() {
#ifdef DA_WARP_SIMD
  const SimdLevel allowed = simd_level_by_env();
  if (allowed >= SimdLevel::Avx512 && cpu_has_avx512() && cpu_has_avx2()) return SimdLevel::Avx512;
  if (allowed >= SimdLevel::Avx2 && cpu_has_avx2()) return SimdLevel::Avx2;
#endif
  return SimdLevel::None;
}

#ifdef DA_WARP_SIMD

// Values of DA_WARP_SIMD_ISA: the instruction set of a copy of warp_cpu_simd_rows.h.
#define DA_WARP_ISA_AVX2 1
#define DA_WARP_ISA_AVX512 2

namespace avx2 {
#define DA_WARP_SIMD_ISA DA_WARP_ISA_AVX2
#define DA_SIMD __attribute__((target("avx2")))
#define DA_SIMD_INLINE __attribute__((target("avx2"), always_inline)) inline
#include "warp/warp_cpu_simd_rows.h"

// Folds the n values at p into [*lo, *hi], skipping NaN (min/max_ps return their second
// operand when either is NaN), as the scalar loop of slice_reach.
DA_SIMD inline void min_max(const float* p, int64_t n, float* lo, float* hi) {
  __m256 mn = _mm256_set1_ps(*lo), mx = _mm256_set1_ps(*hi);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    mn = _mm256_min_ps(v, mn);
    mx = _mm256_max_ps(v, mx);
  }
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, mn);
  _mm256_store_ps(b, mx);
  for (int l = 0; l < 8; ++l) {
    *lo = a[l] < *lo ? a[l] : *lo;
    *hi = b[l] > *hi ? b[l] : *hi;
  }
  for (; i < n; ++i) {
    *lo = p[i] < *lo ? p[i] : *lo;
    *hi = p[i] > *hi ? p[i] : *hi;
  }
}

#undef DA_SIMD
#undef DA_SIMD_INLINE
#undef DA_WARP_SIMD_ISA
}  // namespace avx2

namespace avx512 {
#define DA_WARP_SIMD_ISA DA_WARP_ISA_AVX512
#define DA_SIMD __attribute__((target("avx2,avx512f,avx512vl,avx512dq")))
#define DA_SIMD_INLINE __attribute__((target("avx2,avx512f,avx512vl,avx512dq"), always_inline)) inline
#include "warp/warp_cpu_simd_rows.h"
#undef DA_SIMD
#undef DA_SIMD_INLINE
#undef DA_WARP_SIMD_ISA
}  // namespace avx512

#else  // no SIMD code on this compiler/ISA: simd_level() is None, callers take the scalar path

namespace avx2 {
template <int kWhat, typename Fallback>
void forward_row(const RowArgs&, float*, int64_t, const Fallback&) {}
template <int kWhat, typename Fallback>
void backward_row(const RowArgs&, const float*, int64_t, int64_t, float*, int32_t, int32_t,
                  int64_t, float*, int64_t, float*, const Fallback&) {}
inline void min_max(const float*, int64_t, float*, float*) {}
}  // namespace avx2
namespace avx512 {
using avx2::backward_row;
using avx2::forward_row;
}  // namespace avx512

#endif

}  // namespace warp
}  // namespace deepatlas_fast
