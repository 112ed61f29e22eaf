// CPU launchers of the LNCC op. Box sums are separable running sums (O(1) per voxel and axis,
// whatever the window), in float64. The volume is streamed slice by slice along D: a slice is
// box-summed in H and W (2D), kept in a ring of window + 1 slices, and the D-box is a running
// sum over that ring. So no volume-sized buffer is allocated besides the gradients: a stream
// holds 5 (window + 1) slices in the ring type (the input dtype; float32 for float16/bfloat16,
// whose 8 or 11 bits would not hold a box sum) and 5 float64 slices, plus 5 float64 scratch
// slices per task (forward 1 stream; backward 2 and 5 more slices: the box sums of the moments
// feed the per-voxel cc coefficients, whose box sums give the gradients).
// Inputs are read, and gradients written, through their strides (any layout, no copy); the
// gradients take the memory format of their input.
// Tasks are slabs along D (for_each_slab); every sum has a fixed order, so results are bitwise
// identical for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/cpu_memory.h"
#include "lncc/lncc_checks.h"
#include "lncc/lncc_math.h"

namespace deepatlas_fast {
namespace lncc {
namespace {

constexpr int K = kMoments;
constexpr int64_t kGrainVoxels = 4096;  // per task
constexpr int64_t kStrip = 64;          // columns per task of the H pass (vectorised)

// out[i] = sum of x[j], |j - i| <= r, 0 <= j < n (zero padding), as a running sum; the
// three loops keep the branches out of the inner ones.
inline void box_line(const double* x, int64_t n, int64_t r, double* out) {
  double s = 0;
  const int64_t lead = std::min(r, n - 1);
  for (int64_t j = 0; j <= lead; ++j) s += x[j];
  // i + 1 + r < n adds, i - r >= 0 drops.
  const int64_t add_end = std::max<int64_t>(0, n - 1 - r), drop_begin = std::min(r, n);
  int64_t i = 0;
  for (; i < std::min(add_end, drop_begin); ++i) {
    out[i] = s;
    s += x[i + 1 + r];
  }
  for (; i < add_end; ++i) {  // both (only when n > 2r + 1)
    out[i] = s;
    s += x[i + 1 + r] - x[i - r];
  }
  for (; i < drop_begin; ++i) out[i] = s;  // neither (only when n <= 2r + 1)
  for (; i < n; ++i) {
    out[i] = s;
    s -= x[i - r];
  }
}

inline int64_t row_grain(const Geometry& g) { return std::max<int64_t>(1, kGrainVoxels / g.w); }

// One (batch item, channel) volume of a 5-D tensor, through its strides.
template <typename T>
struct Volume {
  T* p;  // (b, c, 0, 0, 0)
  int64_t sd, sh, sw;
  Volume(T* data, const at::Tensor& t, int64_t bc)
      : p(data ? data + (bc / t.size(1)) * t.stride(0) + (bc % t.size(1)) * t.stride(1) : nullptr),
        sd(t.stride(2)), sh(t.stride(3)), sw(t.stride(4)) {}
  T* row(int64_t d, int64_t h) const { return p + d * sd + h * sh; }
};

// body(std::true_type) when every stride is 1 (the compiler then vectorises the row loops as
// for contiguous data), else body(std::false_type).
template <typename F>
void with_unit_stride(bool unit, const F& body) {
  if (unit)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// 2D box sums (H and W) of the K fields of one slice into dst [K, H, W].
// fill(h, row) writes the K rows (each of length W) of slice row h into row[K * W].
// tmp: [K, H, W] float64 scratch (W-pass result).
template <typename scalar_t, typename Fill>
void box2d(const Geometry& g, const Fill& fill, double* tmp, scalar_t* dst) {
  const int64_t H = g.h, W = g.w, hw = H * W, r = g.r;
  at::parallel_for(0, H, row_grain(g), [&](int64_t h0, int64_t h1) {
    std::vector<double> row(K * W);
    for (int64_t h = h0; h < h1; ++h) {
      fill(h, row.data());
      for (int k = 0; k < K; ++k) box_line(row.data() + k * W, W, r, tmp + k * hw + h * W);
    }
  });
  // H pass: running sums down the columns, a strip of columns at a time (inner loops over w).
  const int64_t strips = (W + kStrip - 1) / kStrip;
  at::parallel_for(0, K * strips, std::max<int64_t>(1, kGrainVoxels / (kStrip * H)),
                   [&](int64_t j0, int64_t j1) {
    double s[kStrip];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j / strips, w0 = (j % strips) * kStrip, n = std::min(kStrip, W - w0);
      const double* src = tmp + k * hw + w0;
      scalar_t* out = dst + k * hw + w0;
      for (int64_t w = 0; w < n; ++w) s[w] = 0;
      for (int64_t i = 0; i <= std::min(r, H - 1); ++i)
        for (int64_t w = 0; w < n; ++w) s[w] += src[i * W + w];
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < n; ++w) out[h * W + w] = static_cast<scalar_t>(s[w]);
        if (h + 1 + r < H)
          for (int64_t w = 0; w < n; ++w) s[w] += src[(h + 1 + r) * W + w];
        if (h - r >= 0)
          for (int64_t w = 0; w < n; ++w) s[w] -= src[(h - r) * W + w];
      }
    }
  });
}

// Running box sum along D of 2D-boxed slices, for the output slices [lo, ...). Step t (from
// `first` on) adds slice t (if t < D), drops slice t - window, and then holds the full 3D box
// sums of output slice t - r.
template <typename scalar_t>
struct Stream {
  const Geometry& g;
  int64_t hw, lo, first;
  std::vector<scalar_t> ring;  // window + 1 slices [K, H, W]
  std::vector<double> sum;     // [K, H, W]

  Stream(const Geometry& g_, int64_t lo_)
      : g(g_), hw(g_.h * g_.w), lo(lo_), first(std::max<int64_t>(0, lo_ - g_.r)),
        ring((g_.window + 1) * K * hw), sum(K * hw, 0.0) {}

  scalar_t* slot(int64_t t) { return ring.data() + (t % (g.window + 1)) * K * hw; }

  // emit_row(d, h, s) for every row h of output slice d = t - r when d >= lo; s points at
  // the row's sums, field k at s[k * hw + w].
  template <typename Emit>
  void step(int64_t t, const Emit& emit_row) {
    const scalar_t* add = t < g.d ? slot(t) : nullptr;
    const scalar_t* drop = t - g.window >= first ? slot(t - g.window) : nullptr;
    const int64_t d = t - g.r, W = g.w;
    at::parallel_for(0, g.h, row_grain(g), [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int k = 0; k < K; ++k) {
          double* s = sum.data() + k * hw + h * W;
          const int64_t o = k * hw + h * W;
          if (add && drop)
            for (int64_t w = 0; w < W; ++w)
              s[w] += static_cast<double>(add[o + w]) - static_cast<double>(drop[o + w]);
          else if (add)
            for (int64_t w = 0; w < W; ++w) s[w] += static_cast<double>(add[o + w]);
          else if (drop)
            for (int64_t w = 0; w < W; ++w) s[w] -= static_cast<double>(drop[o + w]);
        }
        if (d >= lo) emit_row(d, h, sum.data() + h * g.w);
      }
    });
  }
};

// Tasks: (volume, slab of output slices). A slab re-does the 2D boxes of r (backward: 2r)
// slices on each side, so slabs are long: a quarter of D, at least 32 slices. They depend on
// the shape only (not on the thread count), so the sums, and the bits, do not either. Each
// task streams its slab with its own slice buffers (so ~threads sets are alive); the inner
// parallel_for calls then run inline, and parallelise only when there is a single task.
inline int64_t slab_size(const Geometry& g) { return std::max<int64_t>(32, (g.d + 3) / 4); }
inline int64_t slab_count(const Geometry& g) { return (g.d + slab_size(g) - 1) / slab_size(g); }

template <typename F>
void for_each_slab(const Geometry& g, const F& task) {
  const int64_t slabs = slab_count(g), size = slab_size(g);
  // Small volumes run inline: waking threads costs more than the work (and, on a loaded
  // machine, a scheduler time slice).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (size * g.h * g.w));
  at::parallel_for(0, g.batch * g.channels * slabs, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t s = j % slabs;
      task(j, j / slabs, s * size, std::min(g.d, (s + 1) * size));
    }
  });
}

// Fill function of box2d for the moments of slice t of one (b, c) volume.
template <typename scalar_t>
auto moment_rows(const Geometry& g, const Volume<const scalar_t>& a, const Volume<const scalar_t>& b,
                 int64_t t) {
  return [=, &g](int64_t h, double* row) {
    const scalar_t* ar = a.row(t, h);
    const scalar_t* br = b.row(t, h);
    with_unit_stride(a.sw == 1 && b.sw == 1, [&](auto unit) {
      const int64_t sa = decltype(unit)::value ? 1 : a.sw, sb = decltype(unit)::value ? 1 : b.sw;
      for (int64_t w = 0; w < g.w; ++w) {
        double m[K];
        moments<double>(static_cast<double>(ar[w * sa]), static_cast<double>(br[w * sb]), m);
        for (int k = 0; k < K; ++k) row[k * g.w + w] = m[k];
      }
    });
  };
}

at::Tensor lncc_cpu(const at::Tensor& a_in, const at::Tensor& b_in, int64_t window, double eps) {
  const Geometry g = check_inputs("lncc", a_in, b_in, window, eps);
  const at::Tensor& a = a_in;
  const at::Tensor& b = b_in;
  const int64_t hw = g.h * g.w, vol = g.voxels();
  const double inv_n = 1.0 / static_cast<double>(window * window * window);
  const int64_t slabs = slab_count(g);
  std::vector<double> partial(g.batch * g.channels * slabs, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_cpu", [&] {
    using ring_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    for_each_slab(g, [&](int64_t task, int64_t bc, int64_t lo, int64_t hi) {
      std::vector<double> tmp(K * hw), row_sum(g.h);
      Stream<ring_t> st(g, lo);
      const Volume<const scalar_t> va(pa, a, bc), vb(pb, b, bc);
      double acc = 0;
      for (int64_t t = st.first; t < hi + g.r; ++t) {
        if (t < g.d) box2d(g, moment_rows(g, va, vb, t), tmp.data(), st.slot(t));
        st.step(t, [&](int64_t, int64_t h, const double* s) {
          double rs = 0;
          for (int64_t w = 0; w < g.w; ++w) {
            double m[K];
            for (int k = 0; k < K; ++k) m[k] = s[k * hw + w];
            rs += local_cc<double>(m, inv_n, eps);
          }
          row_sum[h] = rs;
        });
        if (t - g.r >= lo)
          for (int64_t h = 0; h < g.h; ++h) acc += row_sum[h];  // fixed order: deterministic
      }
      partial[task] = acc;
    });
  });
  std::vector<double> total(g.batch, 0.0);
  for (size_t j = 0; j < partial.size(); ++j) total[j / (g.channels * slabs)] += partial[j];
  at::Tensor out = at::empty({g.batch}, a.options().dtype(at::kDouble));
  const double denom = static_cast<double>(g.channels * vol);
  for (int64_t i = 0; i < g.batch; ++i) out.mutable_data_ptr<double>()[i] = total[i] / denom;
  return out.to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lncc_backward_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& a_in,
                                                      const at::Tensor& b_in, int64_t window,
                                                      double eps, std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("lncc_backward", a_in, b_in, window, eps);
  check_grad_out("lncc_backward", grad_out, a_in);
  const bool need_a = output_mask[0], need_b = output_mask[1];
  at::Tensor grad_a = empty_volume(need_a ? a_in.sizes() : at::IntArrayRef{0}, a_in.options(),
                                   a_in.suggest_memory_format());
  at::Tensor grad_b = empty_volume(need_b ? b_in.sizes() : at::IntArrayRef{0}, b_in.options(),
                                   b_in.suggest_memory_format());
  if (!need_a && !need_b) return {grad_a, grad_b};
  const at::Tensor& a = a_in;
  const at::Tensor& b = b_in;
  const at::Tensor go = grad_out.to(at::kDouble).contiguous();
  const int64_t hw = g.h * g.w, vol = g.voxels();
  const double inv_n = 1.0 / static_cast<double>(window * window * window);
  const double inv_count = 1.0 / static_cast<double>(g.channels * vol);  // lncc is a mean
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_backward_cpu", [&] {
    using ring_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* ga = need_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = need_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr;
    for_each_slab(g, [&](int64_t, int64_t bc, int64_t lo, int64_t hi) {
      const double scale = go.const_data_ptr<double>()[bc / g.channels] * inv_count;
      const Volume<const scalar_t> va(pa, a, bc), vb(pb, b, bc);
      // (a gradient not asked for: a null volume, never written)
      const Volume<scalar_t> vga(ga, need_a ? grad_a : a, bc), vgb(gb, need_b ? grad_b : b, bc);
      const bool unit = va.sw == 1 && vb.sw == 1 && (!ga || vga.sw == 1) && (!gb || vgb.sw == 1);
      std::vector<double> tmp(K * hw), coef(K * hw);
      // Stage 2 box-sums coefficient slices [lo - r, hi + r) into the gradients of [lo, hi);
      // stage 1 makes those coefficients from the moment sums of the same slices.
      Stream<ring_t> coef_st(g, lo), moments_st(g, coef_st.first);
      const int64_t coef_end = std::min(g.d, hi + g.r);
      auto coef_rows = [&](int64_t h, double* row) {
        for (int k = 0; k < K; ++k)
          std::copy_n(coef.data() + k * hw + h * g.w, g.w, row + k * g.w);
      };
      for (int64_t t = moments_st.first; t < hi + 2 * g.r; ++t) {
        if (t < g.d) box2d(g, moment_rows(g, va, vb, t), tmp.data(), moments_st.slot(t));
        if (t - g.r < coef_end) {
          moments_st.step(t, [&](int64_t, int64_t h, const double* s) {
            for (int64_t w = 0; w < g.w; ++w) {
              double m[K], c[K];
              for (int k = 0; k < K; ++k) m[k] = s[k * hw + w];
              cc_coefficients<double>(m, inv_n, eps, scale, c);
              for (int k = 0; k < K; ++k) coef[k * hw + h * g.w + w] = c[k];
            }
          });
        }
        const int64_t t2 = t - g.r;  // stage-2 step: coefficient slice t2 was just made
        if (t2 < coef_st.first) continue;
        if (t2 < g.d) box2d(g, coef_rows, tmp.data(), coef_st.slot(t2));
        coef_st.step(t2, [&](int64_t d, int64_t h, const double* s) {
          const scalar_t* ar = va.row(d, h);
          const scalar_t* br = vb.row(d, h);
          scalar_t* gar = ga ? vga.row(d, h) : nullptr;
          scalar_t* gbr = gb ? vgb.row(d, h) : nullptr;
          with_unit_stride(unit, [&](auto u) {
            constexpr bool kUnit = decltype(u)::value;
            const int64_t sa = kUnit ? 1 : va.sw, sb = kUnit ? 1 : vb.sw;
            const int64_t sga = kUnit ? 1 : vga.sw, sgb = kUnit ? 1 : vgb.sw;
            for (int64_t w = 0; w < g.w; ++w) {
              double tk[K], da, db;
              for (int k = 0; k < K; ++k) tk[k] = s[k * hw + w];
              input_gradients<double>(tk, static_cast<double>(ar[w * sa]), static_cast<double>(br[w * sb]), &da,
                                      &db);
              if (gar) gar[w * sga] = static_cast<scalar_t>(da);
              if (gbr) gbr[w * sgb] = static_cast<scalar_t>(db);
            }
          });
        });
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("lncc", &lncc_cpu);
  m.impl("lncc_backward", &lncc_backward_cpu);
}

}  // namespace lncc
}  // namespace deepatlas_fast
