// CPU launchers of the soft Dice sums. Tasks are (batch item, chunk of kChunk voxels), fixed
// by the shape, so the partial sums, summed in task order in float64, give the same bits for
// any thread count. Inside a chunk the loops run class by class over contiguous voxels
// (vectorised); the softmax is recomputed from the logits, never stored for the volume.
// Inputs are read through their strides: float32/float64 with voxel stride 1 in place, others
// (channels-last, float16/bfloat16, converted to float32) loaded chunk by chunk into a
// class-major buffer; gradients, in their input's memory format, are stored the same way.
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
#include <utility>
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

// A [B, C, ...] tensor read as [B, C, voxels] through three strides. Channels-last
// probabilities (class-minor: voxel stride C, class stride 1) are read in place, as any layout
// whose spatial dims form one axis (see voxel_stride).
struct View3 {
  int64_t b, c, v;
};

// The stride of t's spatial dims (2, ...) read as one axis of voxels, or -1 when they do not
// form one (a permutation or a slice of the spatial dims).
int64_t voxel_stride(const at::Tensor& t) {
  int64_t stride = -1, next = 0;  // next: the stride the next outer dim must have
  for (int64_t i = t.dim() - 1; i >= 2; --i) {
    if (t.size(i) == 1) continue;
    if (stride < 0)
      stride = t.stride(i), next = stride * t.size(i);
    else if (t.stride(i) != next)
      return -1;
    else
      next *= t.size(i);
  }
  return stride < 0 ? 1 : stride;
}

// t itself when its spatial dims form one axis, else a contiguous copy (the only copy left:
// the kernels walk voxels in one index).
at::Tensor as_voxel_axis(const at::Tensor& t) { return voxel_stride(t) < 0 ? t.contiguous() : t; }

View3 view3(const at::Tensor& t) { return {t.stride(0), t.stride(1), voxel_stride(t)}; }

// n voxels of C classes at x (strides xs) to buf [C, n] as acc_t, in the order of the smaller
// stride (class-minor inputs voxel by voxel).
template <typename scalar_t, typename acc_t>
void load_chunk(const scalar_t* x, const View3& xs, int64_t C, int64_t n, acc_t* buf) {
  if (xs.c < xs.v) {
    for (int64_t v = 0; v < n; ++v)
      for (int64_t c = 0; c < C; ++c) buf[c * n + v] = static_cast<acc_t>(x[c * xs.c + v * xs.v]);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t v = 0; v < n; ++v) buf[c * n + v] = static_cast<acc_t>(x[c * xs.c + v * xs.v]);
  }
}

// The inverse of load_chunk: buf [C, n] to x (strides xs), converted to scalar_t once.
template <typename scalar_t, typename acc_t>
void store_chunk(const acc_t* buf, int64_t C, int64_t n, scalar_t* x, const View3& xs) {
  if (xs.c < xs.v) {
    for (int64_t v = 0; v < n; ++v)
      for (int64_t c = 0; c < C; ++c) x[c * xs.c + v * xs.v] = static_cast<scalar_t>(buf[c * n + v]);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t v = 0; v < n; ++v) x[c * xs.c + v * xs.v] = static_cast<scalar_t>(buf[c * n + v]);
  }
}

// Whether a chunk of x is used in place: acc_t data with voxel stride 1 (the rest is loaded
// into a chunk buffer by load_chunk).
template <typename scalar_t, typename acc_t>
bool in_place(const View3& xs) {
  return std::is_same<scalar_t, acc_t>::value && xs.v == 1;
}

// Values of a chunk (x at its first voxel), class-major with class stride *stride: x itself
// (in_place), else loaded into buf [C, n].
template <typename scalar_t, typename acc_t>
const acc_t* chunk_values(const Geometry& g, const scalar_t* x, const View3& xs, int64_t n, acc_t* buf,
                          int64_t* stride) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if (xs.v == 1) {
      *stride = xs.c;
      return x;
    }
  }
  load_chunk(x, xs, g.classes, n, buf);
  *stride = n;
  return buf;
}

// Probabilities of a chunk, class-major with class stride *stride: the values themselves
// (chunk_values), or from logits the softmax over classes written to p[c * n + v] (p may be
// the buffer the logits were loaded into; tmp: 2 n scratch).
template <typename scalar_t, typename acc_t>
const acc_t* chunk_probs(const Geometry& g, const scalar_t* x, const View3& xs, int64_t n, acc_t* p,
                         acc_t* tmp, int64_t* stride) {
  const int64_t C = g.classes;
  int64_t zs;
  const acc_t* z = chunk_values(g, x, xs, n, p, &zs);
  *stride = zs;
  if (!g.from_logits) return z;
  *stride = n;
  acc_t* m = tmp;
  std::copy_n(z, n, m);
  for (int64_t c = 1; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) m[v] = std::max(m[v], z[c * zs + v]);
  acc_t* s = tmp + n;
  std::fill_n(s, n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* zc = z + c * zs;
    acc_t* pc = p + c * n;
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      pc[v] = exp_value<acc_t>(zc[v] - m[v]);
      s[v] += pc[v];
    }
  }
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) s[v] = acc_t(1) / s[v];
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) p[c * n + v] *= s[v];
  return p;
}

// Whether the AVX2 code may run (DEEPATLAS_FAST_SIMD=0 forbids it); read once per call.
bool simd_wanted() { return simd_enabled_by_env() && avx2::cpu_supported(); }

// Labels of a chunk (voxel stride ys) as int32 (vectorisable compares); out-of-range ones
// reported. Contiguous int64 labels (the default dtype) take the AVX2 converter when simd; it
// only tells whether all labels are in range, so a chunk with a bad one goes through the scalar
// loop, which finds it.
template <typename label_t>
void chunk_labels(const label_t* y, int64_t ys, int64_t n, int64_t classes, int32_t* out,
                  std::atomic<int64_t>* bad_label, bool simd) {
  if constexpr (std::is_same<label_t, int64_t>::value) {
    if (simd && ys == 1 && avx2::labels_to_int32(y, n, classes, out)) return;
  }
  for (int64_t v = 0; v < n; ++v) {
    const label_t l = y[v * ys];
    if (bad_label && !label_ok(l, classes)) *bad_label = static_cast<int64_t>(l);
    out[v] = static_cast<int32_t>(label_ok(l, classes) ? l : -1);
  }
}

// The AVX2 kernels (soft_dice_cpu_avx2.h) serve float32 logits with integer labels.
template <typename scalar_t>
bool use_avx2(const Geometry& g, bool simd) {
  return std::is_same<scalar_t, float>::value && g.from_logits && g.labels && simd;
}

// The inputs of one call: probs and target as [B, C, voxels] views (ps, ts; a label map has
// one class), with the first element of each.
template <typename scalar_t>
struct Inputs {
  const scalar_t* pz;
  View3 ps;
  const void* target;
  View3 ts;
  template <typename T>
  const T* target_at(int64_t b, int64_t v0) const {
    return static_cast<const T*>(target) + b * ts.b + v0 * ts.v;
  }
  const scalar_t* probs_at(int64_t b, int64_t v0) const { return pz + b * ps.b + v0 * ps.v; }
};

// Per-chunk sums (I, P, T per class) into partial[task]; label_t is unused for prob targets.
// Arithmetic in acc_t (float32 for float16/bfloat16), chunk totals added in float64.
// (Kernel bodies live outside the dispatch macros: OpenMP pragmas cannot be macro arguments.)
template <typename scalar_t, typename label_t>
void sums_impl(const Geometry& g, const Inputs<scalar_t>& in, double* partial, std::atomic<int64_t>* bad_label) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.classes;
  const bool simd = simd_wanted();
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_avx2<scalar_t>(g, simd)) {
      for_each_chunk(g, [&](int64_t task, int64_t b, int64_t v0, int64_t n) {
        std::vector<int32_t> labels(n);
        std::vector<float> z(in.ps.v == 1 ? 0 : C * n);
        avx2::VectorScratch scratch(4 * C);
        std::vector<float> sums(3 * C);
        chunk_labels(in.template target_at<label_t>(b, v0), in.ts.v, n, C, labels.data(), bad_label, simd);
        int64_t zs;
        const float* zc = chunk_values(g, in.probs_at(b, v0), in.ps, n, z.data(), &zs);
        avx2::sums_logits_labels(zc, zs, labels.data(), n, C, scratch.get(), scratch.get() + C, sums.data(),
                                 sums.data() + C, sums.data() + 2 * C);
        double* out = partial + task * C * 3;
        for (int64_t c = 0; c < C; ++c)
          out[c * 3] = sums[c], out[c * 3 + 1] = sums[C + c], out[c * 3 + 2] = sums[2 * C + c];
      });
      return;
    }
  }
  for_each_chunk(g, [&](int64_t task, int64_t b, int64_t v0, int64_t n) {
    const bool probs_buffer = g.from_logits || !in_place<scalar_t, acc_t>(in.ps);
    const bool target_buffer = !g.labels && !in_place<scalar_t, acc_t>(in.ts);
    std::vector<acc_t> p(probs_buffer ? C * n : 0), t(target_buffer ? C * n : 0), tmp(2 * n);
    std::vector<int32_t> labels(g.labels ? n : 0);
    int64_t ps, ts = 0;
    const acc_t* p0 = chunk_probs(g, in.probs_at(b, v0), in.ps, n, p.data(), tmp.data(), &ps);
    double* out = partial + task * C * 3;
    const int32_t* y = g.labels ? labels.data() : nullptr;
    if (y) chunk_labels(in.template target_at<label_t>(b, v0), in.ts.v, n, C, labels.data(), bad_label, simd);
    const acc_t* t0 = g.labels ? nullptr : chunk_values(g, in.template target_at<scalar_t>(b, v0), in.ts, n, t.data(), &ts);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* pc = p0 + c * ps;
      const int32_t ci = static_cast<int32_t>(c);
      acc_t I = 0, P = 0, T = 0;
      if (y) {
#pragma omp simd reduction(+ : I, P, T)
        for (int64_t v = 0; v < n; ++v) {
          const acc_t t = y[v] == ci ? acc_t(1) : acc_t(0);
          I += pc[v] * t;
          P += pc[v];
          T += t;
        }
      } else {
        const acc_t* tc = t0 + c * ts;
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

// The gradients (null when not asked for) as [B, C, voxels] views.
template <typename scalar_t>
struct Grads {
  scalar_t* gp;
  View3 gps;
  scalar_t* gt;
  View3 gts;
};

template <typename scalar_t, typename label_t>
void backward_impl(const Geometry& g, const at::Tensor& grad_sums, const Inputs<scalar_t>& in,
                   const Grads<scalar_t>& out_grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.classes;
  const bool simd = simd_wanted();
  const scalar_t* gsum = grad_sums.const_data_ptr<scalar_t>();
  scalar_t* gp_out = out_grads.gp;
  scalar_t* gt_out = out_grads.gt;
  const View3& gps = out_grads.gps;
  const View3& gts = out_grads.gts;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_avx2<scalar_t>(g, simd) && gp_out) {  // labels: no target gradient
      // The kernel writes the gradient with the logits' class stride: in place when both have
      // it with voxel stride 1, else through chunk buffers.
      const bool direct = in.ps.v == 1 && gps.v == 1 && in.ps.c == gps.c;
      for_each_chunk(g, [&](int64_t, int64_t b, int64_t v0, int64_t n) {
        std::vector<int32_t> labels(n);
        std::vector<float> z(direct ? 0 : C * n), o(direct ? 0 : C * n);
        avx2::VectorScratch scratch(2 * C);
        chunk_labels(in.template target_at<label_t>(b, v0), in.ts.v, n, C, labels.data(), nullptr, simd);
        scalar_t* gout = gp_out + b * gps.b + v0 * gps.v;
        if (direct) {
          avx2::backward_logits_labels(in.probs_at(b, v0), in.ps.c, labels.data(), n, C, gsum + b * C * 3,
                                       scratch.get(), scratch.get() + C, gout);
        } else {
          load_chunk(in.probs_at(b, v0), in.ps, C, n, z.data());
          avx2::backward_logits_labels(z.data(), n, labels.data(), n, C, gsum + b * C * 3, scratch.get(),
                                       scratch.get() + C, o.data());
          store_chunk(o.data(), C, n, gout, gps);
        }
      });
      return;
    }
  }
  for_each_chunk(g, [&](int64_t, int64_t b, int64_t v0, int64_t n) {
    const bool probs_buffer = g.from_logits || !in_place<scalar_t, acc_t>(in.ps);
    const bool target_buffer = !g.labels && !in_place<scalar_t, acc_t>(in.ts);
    // Gradients are computed into a chunk buffer [C, n] unless written in place (acc_t data
    // with voxel stride 1), then stored through their strides.
    const bool gp_buffer = gp_out && !in_place<scalar_t, acc_t>(gps);
    const bool gt_buffer = gt_out && !in_place<scalar_t, acc_t>(gts);
    std::vector<acc_t> p(probs_buffer ? C * n : 0), t(target_buffer ? C * n : 0), tmp(2 * n);
    std::vector<acc_t> gpb(gp_buffer ? C * n : 0), gtb(gt_buffer ? C * n : 0);
    std::vector<int32_t> labels(g.labels ? n : 0);
    // (chunk pointer, class stride) a gradient is computed into: the output itself, or its buffer
    auto destination = [&](bool buffered, std::vector<acc_t>& buffer, scalar_t* grad,
                           const View3& s) -> std::pair<acc_t*, int64_t> {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        if (!buffered) return {grad + b * s.b + v0 * s.v, s.c};
      }
      return {buffer.data(), n};
    };
    int64_t ps, ts = 0;
    const acc_t* p0 = chunk_probs(g, in.probs_at(b, v0), in.ps, n, p.data(), tmp.data(), &ps);
    std::vector<acc_t> gb_acc(C * 3);
    for (int64_t k = 0; k < C * 3; ++k) gb_acc[k] = static_cast<acc_t>(gsum[b * C * 3 + k]);
    const acc_t* gb = gb_acc.data();
    const int32_t* y = g.labels ? labels.data() : nullptr;
    if (y) chunk_labels(in.template target_at<label_t>(b, v0), in.ts.v, n, C, labels.data(), nullptr, simd);
    const acc_t* t0 = g.labels ? nullptr : chunk_values(g, in.template target_at<scalar_t>(b, v0), in.ts, n, t.data(), &ts);
    if (gp_out) {
      // dL/dp_c = gI_c t_c + gP_c (recomputed where needed rather than stored);
      // through the softmax dL/dz_c = p_c (dL/dp_c - sum_k p_k dL/dp_k).
      const auto [out, os] = destination(gp_buffer, gpb, gp_out, gps);
      acc_t* dot = tmp.data();
      if (g.from_logits) std::fill_n(dot, n, acc_t(0));
      for (int pass = g.from_logits ? 0 : 1; pass < 2; ++pass) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gi = gb[c * 3], gpc = gb[c * 3 + 1];
          const acc_t* pc = p0 + c * ps;
          const acc_t* tc = t0 ? t0 + c * ts : nullptr;
          const int32_t ci = static_cast<int32_t>(c);
          acc_t* oc = out + c * os;
          if (pass == 0 && y) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) dot[v] += pc[v] * ((y[v] == ci ? gi : acc_t(0)) + gpc);
          } else if (pass == 0) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) dot[v] += pc[v] * (gi * tc[v] + gpc);
          } else if (y && g.from_logits) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = pc[v] * ((y[v] == ci ? gi : acc_t(0)) + gpc - dot[v]);
          } else if (g.from_logits) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = pc[v] * (gi * tc[v] + gpc - dot[v]);
          } else if (y) {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = (y[v] == ci ? gi : acc_t(0)) + gpc;
          } else {
#pragma omp simd
            for (int64_t v = 0; v < n; ++v) oc[v] = gi * tc[v] + gpc;
          }
        }
      }
      if (gp_buffer) store_chunk(gpb.data(), C, n, gp_out + b * gps.b + v0 * gps.v, gps);
    }
    if (gt_out) {  // dL/dt_c = gI_c p_c + gT_c
      const auto [out, os] = destination(gt_buffer, gtb, gt_out, gts);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gi = gb[c * 3], gtc = gb[c * 3 + 2];
        acc_t* oc = out + c * os;
        const acc_t* pc = p0 + c * ps;
#pragma omp simd
        for (int64_t v = 0; v < n; ++v) oc[v] = gi * pc[v] + gtc;
      }
      if (gt_buffer) store_chunk(gtb.data(), C, n, gt_out + b * gts.b + v0 * gts.v, gts);
    }
  });
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& probs, const at::Tensor& target) {
  return {probs.const_data_ptr<scalar_t>(), view3(probs), target.const_data_ptr(), view3(target)};
}

at::Tensor soft_dice_sums_cpu(const at::Tensor& probs_in, const at::Tensor& target_in,
                              bool from_logits) {
  const Geometry g = check_inputs("soft_dice", probs_in, target_in, from_logits);
  const at::Tensor probs = as_voxel_axis(probs_in), target = as_voxel_axis(target_in);
  const int64_t C = g.classes, chunks = (g.voxels + kChunk - 1) / kChunk;
  std::vector<double> partial(g.batch * chunks * C * 3);
  std::atomic<int64_t> bad_label{std::numeric_limits<int64_t>::min()};  // any offending value
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "soft_dice_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(probs, target);
    with_label_type(g, target, [&](auto label) {
      sums_impl<scalar_t, decltype(label)>(g, in, partial.data(), &bad_label);
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
  // Each gradient takes the memory format of its input (torch's convention).
  at::Tensor grad_p = empty_volume(need_p ? probs_in.sizes() : at::IntArrayRef{0}, probs_in.options(),
                                   probs_in.suggest_memory_format());
  at::Tensor grad_t = empty_volume(need_t ? target_in.sizes() : at::IntArrayRef{0}, probs_in.options(),
                                   target_in.suggest_memory_format());
  if (!need_p && !need_t) return {grad_p, grad_t};
  const at::Tensor probs = as_voxel_axis(probs_in), target = as_voxel_axis(target_in);
  const at::Tensor gs = grad_sums.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "soft_dice_backward_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(probs, target);
    const Grads<scalar_t> out{need_p ? grad_p.mutable_data_ptr<scalar_t>() : nullptr, need_p ? view3(grad_p) : View3{},
                              need_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr, need_t ? view3(grad_t) : View3{}};
    with_label_type(g, target, [&](auto label) {
      backward_impl<scalar_t, decltype(label)>(g, gs, in, out);
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
