// AVX2 + FMA kernels of the CPU soft Dice for its main use, the supervised loss: float32
// logits (softmax fused) against an integer label map. 8 voxels at a time, all classes of a
// voxel in registers or L1, one pass over the logits (the generic path of soft_dice_cpu.cpp
// makes several passes over a chunk buffer and is vectorised only with SSE2 by the compiler).
// Same formulas as soft_dice_math.h (the same exp polynomial, with FMA), so results agree
// with the generic path to float32 rounding, not bit for bit. Compiled with a target attribute
// and called after a runtime CPU check, so the package still runs on CPUs without AVX2.
#pragma once

#include <cstdint>
#include <vector>

#include "common/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DA_DICE_AVX2 1
#include <immintrin.h>
#endif

namespace deepatlas_fast {
namespace soft_dice {
namespace avx2 {

#ifdef DA_DICE_AVX2

#define DA_AVX2 __attribute__((target("avx2,fma")))
#define DA_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

inline bool cpu_supported() { return cpu_has_avx2() && cpu_has_fma(); }

// exp_value<float> of soft_dice_math.h on 8 lanes (arguments <= 0; below -87 gives 0).
DA_AVX2_INLINE __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);  // as exp_value; max_ps returns x if it is NaN
  const __m256 big = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), big), big);
  x = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  e = _mm256_max_epi32(e, _mm256_setzero_si256());  // 2^n underflows: scale 0
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

// exp8 on memory (the native tests call it from code compiled without AVX2 flags).
DA_AVX2 inline void exp8_store(const float* in, float* out) { _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in))); }

// Lanes [0, valid) of a block (valid < 8 only at the end of a chunk).
DA_AVX2_INLINE __m256i lane_mask(int64_t valid) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Softmax of the block of 8 voxels at z (class stride zs) into p[c] (C vectors); invalid
// lanes get p = 0.
DA_AVX2_INLINE __m256 load_block(const float* z, __m256i valid, bool full) {
  return full ? _mm256_loadu_ps(z) : _mm256_maskload_ps(z, valid);
}

DA_AVX2_INLINE void softmax_block(const float* z, int64_t zs, int64_t C, __m256i valid, bool full,
                                  __m256* p) {
  __m256 m = load_block(z, valid, full);
  for (int64_t c = 1; c < C; ++c) m = _mm256_max_ps(m, load_block(z + c * zs, valid, full));
  __m256 s = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    p[c] = exp8(_mm256_sub_ps(load_block(z + c * zs, valid, full), m));
    s = _mm256_add_ps(s, p[c]);
  }
  __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), s);
  if (!full) r = _mm256_and_ps(r, _mm256_castsi256_ps(valid));
  for (int64_t c = 0; c < C; ++c) p[c] = _mm256_mul_ps(p[c], r);
}

// int64 labels of a chunk to int32 (vectorised chunk_labels of soft_dice_cpu.cpp). Returns
// false if any label is outside [0, C); the caller then finds and reports it.
DA_AVX2 inline bool labels_to_int32(const int64_t* y, int64_t n, int64_t C, int32_t* out) {
  const __m256i lo = _mm256_set1_epi64x(-1), hi = _mm256_set1_epi64x(C);
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  __m256i bad = _mm256_setzero_si256();
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + v));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + v + 4));
    const __m256i ok_a = _mm256_and_si256(_mm256_cmpgt_epi64(a, lo), _mm256_cmpgt_epi64(hi, a));
    const __m256i ok_b = _mm256_and_si256(_mm256_cmpgt_epi64(b, lo), _mm256_cmpgt_epi64(hi, b));
    bad = _mm256_or_si256(bad, _mm256_andnot_si256(_mm256_and_si256(ok_a, ok_b), _mm256_set1_epi64x(-1)));
    // low 32 bits of each int64 (labels in range fit), a's in lanes 0-3, b's in lanes 4-7
    const __m256i pa = _mm256_permutevar8x32_epi32(a, even), pb = _mm256_permutevar8x32_epi32(b, even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + v), _mm256_blend_epi32(pa, pb, 0xF0));
  }
  bool ok = _mm256_testz_si256(bad, bad);
  for (; v < n; ++v) {
    ok = ok && y[v] >= 0 && y[v] < C;
    out[v] = static_cast<int32_t>(y[v]);
  }
  return ok;
}

// Sums of one chunk of n voxels: I[c] = sum p_c [y == c], P[c] = sum p_c, T[c] = sum [y == c].
// z: logits at (b, 0, v0), class stride zs; y: the chunk's labels as int32 (-1: none);
// p: scratch of C vectors, acc: scratch of 3 C vectors.
DA_AVX2 inline void sums_logits_labels(const float* z, int64_t zs, const int32_t* y, int64_t n,
                                       int64_t C, __m256* p, __m256* acc, float* I, float* P,
                                       float* T) {
  for (int64_t k = 0; k < 3 * C; ++k) acc[k] = _mm256_setzero_ps();
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t v = 0; v < n; v += 8) {
    const bool full = v + 8 <= n;
    const __m256i valid = lane_mask(n - v);
    softmax_block(z + v, zs, C, valid, full, p);
    const __m256i lab = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + v))
                             : _mm256_or_si256(_mm256_maskload_epi32(y + v, valid),
                                               _mm256_andnot_si256(valid, _mm256_set1_epi32(-1)));
    for (int64_t c = 0; c < C; ++c) {
      const __m256 t = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lab, _mm256_set1_epi32(static_cast<int32_t>(c))));
      acc[3 * c] = _mm256_add_ps(acc[3 * c], _mm256_and_ps(p[c], t));
      acc[3 * c + 1] = _mm256_add_ps(acc[3 * c + 1], p[c]);
      acc[3 * c + 2] = _mm256_add_ps(acc[3 * c + 2], _mm256_and_ps(one, t));
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* out[3] = {I + c, P + c, T + c};
    for (int k = 0; k < 3; ++k) {
      alignas(32) float l[8];
      _mm256_store_ps(l, acc[3 * c + k]);
      *out[k] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
  }
}

// Logits gradient of one chunk: out_c = p_c (g_c - sum_k p_k g_k), g_c = gI_c [y == c] + gP_c.
// gs: [C, 3] gradient of the sums; p, g: scratch of C vectors each; out at (b, 0, v0), class
// stride zs.
DA_AVX2 inline void backward_logits_labels(const float* z, int64_t zs, const int32_t* y, int64_t n,
                                           int64_t C, const float* gs, __m256* p, __m256* g,
                                           float* out) {
  for (int64_t v = 0; v < n; v += 8) {
    const bool full = v + 8 <= n;
    const __m256i valid = lane_mask(n - v);
    softmax_block(z + v, zs, C, valid, full, p);
    const __m256i lab = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + v))
                             : _mm256_maskload_epi32(y + v, valid);
    __m256 dot = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m256 t = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lab, _mm256_set1_epi32(static_cast<int32_t>(c))));
      g[c] = _mm256_add_ps(_mm256_and_ps(_mm256_set1_ps(gs[3 * c]), t), _mm256_set1_ps(gs[3 * c + 1]));
      dot = _mm256_fmadd_ps(p[c], g[c], dot);
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m256 o = _mm256_mul_ps(p[c], _mm256_sub_ps(g[c], dot));
      if (full)
        _mm256_storeu_ps(out + c * zs + v, o);
      else
        _mm256_maskstore_ps(out + c * zs + v, valid, o);
    }
  }
}

// n vectors of 8 floats, 32-byte aligned (std::vector<__m256> does not promise it here).
struct VectorScratch {
  std::vector<float> buf;
  explicit VectorScratch(int64_t n) : buf(8 * n + 8) {}
  __m256* get() {
    const uintptr_t q = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<__m256*>((q + 31) & ~uintptr_t(31));
  }
};

#undef DA_AVX2
#undef DA_AVX2_INLINE

#else  // no AVX2 code on this compiler/ISA: never called (cpu_supported() is false), only compiled

inline bool cpu_supported() { return false; }
inline bool labels_to_int32(const int64_t*, int64_t, int64_t, int32_t*) { return false; }
struct VectorScratch {
  explicit VectorScratch(int64_t) {}
  float* get() { return nullptr; }
};
inline void sums_logits_labels(const float*, int64_t, const int32_t*, int64_t, int64_t, float*,
                               float*, float*, float*, float*) {}
inline void backward_logits_labels(const float*, int64_t, const int32_t*, int64_t, int64_t,
                                   const float*, float*, float*, float*) {}

#endif

}  // namespace avx2
}  // namespace soft_dice
}  // namespace deepatlas_fast
