// CPU launchers of the soft Dice sums. Tasks are (batch item, chunk of kChunk voxels), fixed
// by the shape, so the partial sums, summed in task order in float64, give the same bits for
// any thread count. Inside a chunk the loops run class by class over contiguous voxels
// (vectorised); the softmax is recomputed from the logits, never stored for the volume.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cpu_memory.h"
#include "common/simd.h"
#include "soft_dice/soft_dice_checks.h"
#include "soft_dice/soft_dice_cpu_avx2.h"
#include "soft_dice/soft_dice_math.h"

namespace deepatlas_fast {
namespace soft_dice {
namespace {

constexpr int64_t kChunk = 2048;

template <typename F>
void for_each_chunk(const Geometry& g, const F& task) {
  const int64_t chunks = (g.voxels + kChunk - 1) / kChunk;
  // grain: small inputs run inline (waking threads costs more than the work).
  at::parallel_for(0, g.batch * chunks, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / chunks, v0 = (j % chunks) * kChunk;
      task(j, b, v0, std::min(kChunk, g.voxels - v0));
    }
  });
}

// Probabilities of a chunk, class-major with class stride *stride: the input itself, or
// from logits the softmax over classes written to p[c * n + v] (tmp: 2 n scratch).
template <typename scalar_t>
const scalar_t* chunk_probs(const Geometry& g, const scalar_t* z, int64_t n, scalar_t* p,
                            scalar_t* tmp, int64_t* stride) {
  const int64_t C = g.classes, N = g.voxels;
  *stride = N;
  if (!g.from_logits) return z;
  *stride = n;
  scalar_t* m = tmp;
  std::copy_n(z, n, m);
  for (int64_t c = 1; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) m[v] = std::max(m[v], z[c * N + v]);
  scalar_t* s = tmp + n;
  std::fill_n(s, n, scalar_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* zc = z + c * N;
    scalar_t* pc = p + c * n;
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      pc[v] = exp_value<scalar_t>(zc[v] - m[v]);
      s[v] += pc[v];
    }
  }
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) s[v] = scalar_t(1) / s[v];
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) p[c * n + v] *= s[v];
  return p;
}

// Whether the AVX2 code may run (DEEPATLAS_FAST_SIMD=0 forbids it); read once per call.
bool simd_wanted() { return simd_enabled_by_env() && avx2::cpu_supported(); }

// Labels of a chunk as int32 (vectorisable compares); out-of-range ones reported. int64 labels
// (the default dtype) take the AVX2 converter when simd; it only tells whether all labels are in
// range, so a chunk with a bad one goes through the scalar loop, which finds it.
template <typename label_t>
void chunk_labels(const label_t* y, int64_t n, int64_t classes, int32_t* out,
                  std::atomic<int64_t>* bad_label, bool simd) {
  if constexpr (std::is_same<label_t, int64_t>::value) {
    if (simd && avx2::labels_to_int32(y, n, classes, out)) return;
  }
  for (int64_t v = 0; v < n; ++v) {
    if (bad_label && !label_ok(y[v], classes)) *bad_label = static_cast<int64_t>(y[v]);
    out[v] = static_cast<int32_t>(label_ok(y[v], classes) ? y[v] : -1);
  }
}

// The AVX2 kernels (soft_dice_cpu_avx2.h) serve float32 logits with integer labels.
template <typename scalar_t>
bool use_avx2(const Geometry& g, bool simd) {
  return std::is_same<scalar_t, float>::value && g.from_logits && g.labels && simd;
}

// Per-chunk sums (I, P, T per class) into partial[task]; label_t is unused for prob targets.
// (Kernel bodies live outside the dispatch macros: OpenMP pragmas cannot be macro arguments.)
template <typename scalar_t, typename label_t>
void sums_impl(const Geometry& g, const at::Tensor& probs, const at::Tensor& target,
               double* partial, std::atomic<int64_t>* bad_label) {
  const int64_t C = g.classes, N = g.voxels;
  const bool simd = simd_wanted();
  const scalar_t* pz = probs.const_data_ptr<scalar_t>();
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_avx2<scalar_t>(g, simd)) {
      for_each_chunk(g, [&](int64_t task, int64_t b, int64_t v0, int64_t n) {
        std::vector<int32_t> labels(n);
        avx2::VectorScratch scratch(4 * C);
        std::vector<float> sums(3 * C);
        chunk_labels(target.const_data_ptr<label_t>() + b * N + v0, n, C, labels.data(), bad_label, simd);
        avx2::sums_logits_labels(pz + b * C * N + v0, N, labels.data(), n, C, scratch.get(),
                                 scratch.get() + C, sums.data(), sums.data() + C, sums.data() + 2 * C);
        double* out = partial + task * C * 3;
        for (int64_t c = 0; c < C; ++c)
          out[c * 3] = sums[c], out[c * 3 + 1] = sums[C + c], out[c * 3 + 2] = sums[2 * C + c];
      });
      return;
    }
  }
  for_each_chunk(g, [&](int64_t task, int64_t b, int64_t v0, int64_t n) {
    std::vector<scalar_t> p(g.from_logits ? C * n : 0), tmp(2 * n);
    std::vector<int32_t> labels(g.labels ? n : 0);
    int64_t ps;
    const scalar_t* p0 = chunk_probs(g, pz + b * C * N + v0, n, p.data(), tmp.data(), &ps);
    double* out = partial + task * C * 3;
    const int32_t* y = g.labels ? labels.data() : nullptr;
    if (y) chunk_labels(target.const_data_ptr<label_t>() + b * N + v0, n, C, labels.data(), bad_label, simd);
    const scalar_t* t0 = g.labels ? nullptr : target.const_data_ptr<scalar_t>() + b * C * N + v0;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* pc = p0 + c * ps;
      const int32_t ci = static_cast<int32_t>(c);
      scalar_t I = 0, P = 0, T = 0;
      if (y) {
#pragma omp simd reduction(+ : I, P, T)
        for (int64_t v = 0; v < n; ++v) {
          const scalar_t t = y[v] == ci ? scalar_t(1) : scalar_t(0);
          I += pc[v] * t;
          P += pc[v];
          T += t;
        }
      } else {
        const scalar_t* tc = t0 + c * N;
#pragma omp simd reduction(+ : I, P, T)
        for (int64_t v = 0; v < n; ++v) {
          I += pc[v] * tc[v];
          P += pc[v];
          T += tc[v];
        }
      }
      out[c * 3] = I, out[c * 3 + 1] = P, out[c * 3 + 2] = T;
    }
  });
}

template <typename scalar_t, typename label_t>
void backward_impl(const Geometry& g, const at::Tensor& grad_sums, const at::Tensor& probs,
                   const at::Tensor& target, scalar_t* gp_out, scalar_t* gt_out) {
  const int64_t C = g.classes, N = g.voxels;
  const bool simd = simd_wanted();
  const scalar_t* pz = probs.const_data_ptr<scalar_t>();
  const scalar_t* gsum = grad_sums.const_data_ptr<scalar_t>();
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_avx2<scalar_t>(g, simd) && gp_out) {  // labels: no target gradient
      for_each_chunk(g, [&](int64_t, int64_t b, int64_t v0, int64_t n) {
        std::vector<int32_t> labels(n);
        avx2::VectorScratch scratch(2 * C);
        chunk_labels(target.const_data_ptr<label_t>() + b * N + v0, n, C, labels.data(), nullptr, simd);
        avx2::backward_logits_labels(pz + b * C * N + v0, N, labels.data(), n, C, gsum + b * C * 3,
                                     scratch.get(), scratch.get() + C, gp_out + b * C * N + v0);
      });
      return;
    }
  }
  for_each_chunk(g, [&](int64_t, int64_t b, int64_t v0, int64_t n) {
    std::vector<scalar_t> p(g.from_logits ? C * n : 0), tmp(2 * n);
    std::vector<int32_t> labels(g.labels ? n : 0);
    int64_t ps;
    const scalar_t* p0 = chunk_probs(g, pz + b * C * N + v0, n, p.data(), tmp.data(), &ps);
    const scalar_t* gb = gsum + b * C * 3;
    const int32_t* y = g.labels ? labels.data() : nullptr;
    if (y) chunk_labels(target.const_data_ptr<label_t>() + b * N + v0, n, C, labels.data(), nullptr, simd);
    const scalar_t* t0 = g.labels ? nullptr : target.const_data_ptr<scalar_t>() + b * C * N + v0;
    if (gp_out) {
      // dL/dp_c = gI_c t_c + gP_c (recomputed where needed rather than stored);
      // through the softmax dL/dz_c = p_c (dL/dp_c - sum_k p_k dL/dp_k).
      scalar_t* out = gp_out + b * C * N + v0;
      scalar_t* dot = tmp.data();
      if (g.from_logits) std::fill_n(dot, n, scalar_t(0));
      for (int pass = g.from_logits ? 0 : 1; pass < 2; ++pass) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t gi = gb[c * 3], gpc = gb[c * 3 + 1];
          const scalar_t* pc = p0 + c * ps;
          const scalar_t* tc = t0 ? t0 + c * N : nullptr;
          const int32_t ci = static_cast<int32_t>(c);
          scalar_t* oc = out + c * N;
          if (pass == 0 && y) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) dot[v] += pc[v] * ((y[v] == ci ? gi : scalar_t(0)) + gpc);
          } else if (pass == 0) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) dot[v] += pc[v] * (gi * tc[v] + gpc);
          } else if (y && g.from_logits) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = pc[v] * ((y[v] == ci ? gi : scalar_t(0)) + gpc - dot[v]);
          } else if (g.from_logits) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = pc[v] * (gi * tc[v] + gpc - dot[v]);
          } else if (y) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = (y[v] == ci ? gi : scalar_t(0)) + gpc;
          } else {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = gi * tc[v] + gpc;
          }
        }
      }
    }
    if (gt_out) {  // dL/dt_c = gI_c p_c + gT_c
      scalar_t* out = gt_out + b * C * N + v0;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t gi = gb[c * 3], gtc = gb[c * 3 + 2];
#pragma omp simd
        for (int64_t v = 0; v < n; ++v) out[c * N + v] = gi * p0[c * ps + v] + gtc;
      }
    }
  });
}

at::Tensor soft_dice_sums_cpu(const at::Tensor& probs_in, const at::Tensor& target_in,
                              bool from_logits) {
  const Geometry g = check_inputs("soft_dice", probs_in, target_in, from_logits);
  const at::Tensor probs = probs_in.contiguous(), target = target_in.contiguous();
  const int64_t C = g.classes, chunks = (g.voxels + kChunk - 1) / kChunk;
  std::vector<double> partial(g.batch * chunks * C * 3);
  std::atomic<int64_t> bad_label{std::numeric_limits<int64_t>::min()};  // any offending value
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "soft_dice_cpu", [&] {
    with_label_type(g, target, [&](auto label) {
      sums_impl<scalar_t, decltype(label)>(g, probs, target, partial.data(), &bad_label);
    });
  });
  TORCH_CHECK_VALUE(bad_label.load() == std::numeric_limits<int64_t>::min(),
                    "soft_dice: target labels must be in [0, ", C, ") (the number of classes), "
                    "found ", bad_label.load());
  at::Tensor sums = at::zeros({g.batch, C, 3}, probs.options().dtype(at::kDouble));
  double* s = sums.mutable_data_ptr<double>();
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t j = 0; j < chunks; ++j)  // fixed order: deterministic
      for (int64_t k = 0; k < C * 3; ++k) s[b * C * 3 + k] += partial[(b * chunks + j) * C * 3 + k];
  return sums.to(probs.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> soft_dice_sums_backward_cpu(
    const at::Tensor& grad_sums, const at::Tensor& probs_in, const at::Tensor& target_in,
    bool from_logits, std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("soft_dice_backward", probs_in, target_in, from_logits);
  check_grad_sums("soft_dice_backward", grad_sums, g, probs_in);
  const bool need_p = output_mask[0], need_t = output_mask[1] && !g.labels;
  at::Tensor grad_p = empty_volume(need_p ? probs_in.sizes() : at::IntArrayRef{0}, probs_in.options());
  at::Tensor grad_t = empty_volume(need_t ? target_in.sizes() : at::IntArrayRef{0}, probs_in.options());
  if (!need_p && !need_t) return {grad_p, grad_t};
  const at::Tensor probs = probs_in.contiguous(), target = target_in.contiguous();
  const at::Tensor gs = grad_sums.contiguous();
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "soft_dice_backward_cpu", [&] {
    scalar_t* gp = need_p ? grad_p.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = need_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    with_label_type(g, target, [&](auto label) {
      backward_impl<scalar_t, decltype(label)>(g, gs, probs, target, gp, gt);
    });
  });
  return {grad_p, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("soft_dice_sums", &soft_dice_sums_cpu);
  m.impl("soft_dice_sums_backward", &soft_dice_sums_backward_cpu);
}

}  // namespace soft_dice
}  // namespace deepatlas_fast
