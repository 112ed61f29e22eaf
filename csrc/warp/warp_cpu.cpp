// CPU launchers of the warp op: parallel over output rows (parallel_pieces), per-voxel math
// from warp_math.h. The image gradient is a scatter; it is made deterministic and free of
// atomics by grouping voxels by the image slices they write (see warp_backward_cpu).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_memory.h"
#include "common/parallel.h"
#include "common/simd.h"
#include "warp/warp_checks.h"
#include "warp/warp_cpu_simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace {

constexpr int64_t kGrainVoxels = 8192;  // per task: amortises scheduling, keeps cores busy

// Output slices visited together (see for_each_row).
// 8: plain forward 13.4 -> 12.7 ms, location-gradient forward 16.6 -> 16.1 ms against 4
// (2 threads, benchmark field, 6 alternating processes each; 1 and 2 were slower, 6 and 12 alike).
constexpr int64_t kSliceBlock = 8;

// Calls row(b, d, h) for every output row (b, d, h, :), in parallel. Rows go by columns of
// kSliceBlock slices: (d0, h), (d0 + 1, h), ..., then h + 1. An image row is read by the
// output rows of neighbouring d and h; in plain row-major order the reuse across d is a
// whole slice (~1 MiB of traffic) away and misses L2, here it is a few rows away. Each
// thread takes pieces of its own range of columns, then the rest of another's (parallel_pieces).
template <typename F>
void for_each_row(const Geometry& g, const F& row) {
  const int64_t blocks = (g.out_d + kSliceBlock - 1) / kSliceBlock;
  const int64_t columns = g.batch * blocks * g.out_h;
  const int64_t grain = std::max<int64_t>(1, kGrainVoxels / (kSliceBlock * g.out_w));
  const auto body = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / (blocks * g.out_h), h = c % g.out_h;
      const int64_t d0 = (c / g.out_h) % blocks * kSliceBlock, d1 = std::min(g.out_d, d0 + kSliceBlock);
      for (int64_t d = d0; d < d1; ++d) row(b, d, h);
    }
  };
  parallel_pieces(columns, grain, body);
}

// Displacement channels of one row and the sampling location x + u(x) along it.
template <typename scalar_t>
struct Row {
  const scalar_t* uz;
  const scalar_t* uy;
  const scalar_t* ux;
  int64_t sw;
  scalar_t d, h;
  Row(const scalar_t* disp, const Strides5& s, int64_t b, int64_t d_, int64_t h_)
      : uz(disp + b * s.b + d_ * s.d + h_ * s.h), uy(uz + s.c), ux(uz + 2 * s.c), sw(s.w),
        d(static_cast<scalar_t>(d_)), h(static_cast<scalar_t>(h_)) {}
  inline void at(int64_t w, scalar_t* z, scalar_t* y, scalar_t* x) const {
    *z = d + uz[w * sw];
    *y = h + uy[w * sw];
    *x = static_cast<scalar_t>(w) + ux[w * sw];
  }
};

// The SIMD rows (warp_cpu_simd.h) serve float32, linear mode, W-contiguous image and disp, on
// CPUs that have AVX2 (AVX-512 for the backward's run scatter). DEEPATLAS_FAST_SIMD, read at
// every call, caps the level (the tests compare every level with the scalar path).

// Offsets along D, H, W inside one channel of a tensor with these strides fit in int32.
bool fits_int32(const Geometry& g, const Strides5& s) {
  const int64_t last = (g.in_d - 1) * s.d + (g.in_h - 1) * s.h + (g.in_w - 1) * s.w;
  return s.d >= 0 && s.h >= 0 && s.w >= 0 && last + 1 < std::numeric_limits<int32_t>::max();
}

// The row code for these inputs: None unless float32, linear mode, W-contiguous.
template <typename scalar_t>
SimdLevel row_simd(const Geometry& g, const Strides5& is, const Strides5& ds) {
  const bool fits = std::is_same<scalar_t, float>::value && g.mode == Mode::Linear && is.w == 1 &&
                    ds.w == 1 && fits_int32(g, is) && g.out_w < (int64_t(1) << 24);
  return fits ? simd_level() : SimdLevel::None;
}

// The SIMD rows prefetch the cells of output row (d, h + kAheadColumns) while they compute
// row (d, h): the image rows that row reads first are then fetched kAheadColumns columns
// early (see ahead_cell). 2, 4 and 8 measured alike here; 1 and the same row a few
// voxels ahead were slower.
constexpr int64_t kAheadColumns = 4;

// The forwards (for_each_row order) fetch the displacement of row (d, h + kAheadColumns + 1),
// which ahead_cell would otherwise be the first to touch, one column early; the
// location-gradient forward also the rows it writes in the next column (d, h + 1), and its
// backward (warp_backward_with_loc_grad) the grad_out and location-gradient rows of its next
// column. Measured (2 threads, benchmark field, builds switched in one process, alternating):
// location-gradient forward -0.4..-1.4 ms, its backward -1.0..-1.7 ms, plain forward about
// -0.5 ms (noise-level). Not taken: the displacement fetched ahead in the backwards (+0.8 ms),
// the plain backward's rows (mixed, within noise).
template <typename scalar_t>
void read_ahead_disp(const Geometry& g, const scalar_t* disp, const Strides5& ds, int64_t b, int64_t d, int64_t h,
                     RowArgs* r) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (h + kAheadColumns + 1 >= g.out_h) return;
    const Row<scalar_t> next(disp, ds, b, d, h + kAheadColumns + 1);
    r->read_ahead[0] = next.uz;
    r->read_ahead[1] = next.uy;
    r->read_ahead[2] = next.ux;
  }
}

template <typename scalar_t>
RowArgs simd_row(const Geometry& g, const scalar_t* img_b, const Strides5& is, const scalar_t* disp,
                 const Strides5& ds, int64_t b, int64_t d, int64_t h) {
  RowArgs r;
  if constexpr (std::is_same<scalar_t, float>::value) {
    const Row<scalar_t> row(disp, ds, b, d, h);
    r.img = img_b;
    r.uz = row.uz;
    r.uy = row.uy;
    r.ux = row.ux;
    r.d = row.d;
    r.h = row.h;
    r.lim = limits<float>(g);
    r.size_d = static_cast<int32_t>(g.in_d);
    r.size_h = static_cast<int32_t>(g.in_h);
    r.size_w = static_cast<int32_t>(g.in_w);
    r.border = g.padding == Padding::Border;
    if (h + kAheadColumns < g.out_h) {
      const Row<scalar_t> ahead(disp, ds, b, d, h + kAheadColumns);
      r.az = ahead.uz;
      r.ay = ahead.uy;
      r.ax = ahead.ux;
      r.ad = ahead.d;
      r.ah = ahead.h;
    }
  }
  r.isd = static_cast<int32_t>(is.d);
  r.ish = static_cast<int32_t>(is.h);
  r.isc = is.c;
  r.channels = g.channels;
  r.width = g.out_w;
  return r;
}

at::Tensor warp_cpu(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                    c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding);
  at::Tensor out = empty_volume({g.batch, g.channels, g.out_d, g.out_h, g.out_w}, image.options());
  const Strides5 is = strides5(image), ds = strides5(disp), os = strides5(out);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Limits<scalar_t> lim = limits<scalar_t>(g);
    const SimdLevel simd = row_simd<scalar_t>(g, is, ds);
    // Interior voxels of linear mode take the short path, single-channel images (the common
    // case) with the channel count fixed at compile time; the rest the general path.
    auto run = [&](auto channels) {
      for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
        const Row<scalar_t> row(u, ds, b, d, h);
        const scalar_t* ib = img + b * is.b;
        scalar_t* orow = o + b * os.b + d * os.d + h * os.h;
        auto voxel = [&](int64_t w) {
          scalar_t z, y, x;
          row.at(w, &z, &y, &x);
          if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
            sample_interior<decltype(channels)::value>(
                g, ib, is, interior_cell(z, y, x, is.d, is.h, is.w), orow + w * os.w, os.c);
          else
            sample_voxel<scalar_t, scalar_t>(g, ib, is, z, y, x, orow + w * os.w, os.c);
        };
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (simd != SimdLevel::None) {  // (the AVX-512 copy differs in the image-gradient scatter only)
            RowArgs r = simd_row(g, ib, is, u, ds, b, d, h);
            read_ahead_disp(g, u, ds, b, d, h, &r);
            return avx2::forward_row<decltype(channels)::value == 1 ? kOneChannel : 0>(r, orow, os.c, voxel);
          }
        }
        for (int64_t w = 0; w < g.out_w; ++w) voxel(w);
      });
    };
    if (g.channels == 1)
      run(std::integral_constant<int, 1>{});
    else
      run(std::integral_constant<int, 0>{});
  });
  return out;
}

// warp, and for a one-channel image in linear mode the location gradient loc_grad
// [B, 3, D', H', W'] = d out / d location: the disp gradient for grad_out = 1, from the
// corners the forward loads anyway (SIMD rows: backward_row with go = 1 and the output row;
// scalar path: sample_voxel and backward_voxel). A forward that will be differentiated with
// respect to disp takes this op, and its backward needs only grad_out * loc_grad (ops/warp.py)
// instead of a second pass over the displacement and the image.
std::tuple<at::Tensor, at::Tensor> warp_with_loc_grad_cpu(const at::Tensor& image, const at::Tensor& disp,
                                                          c10::string_view padding) {
  // (errors name warp: users reach this op through deepatlas_fast.warp)
  const Geometry g = check_inputs("warp", image, disp, "linear", padding);
  TORCH_CHECK_VALUE(g.channels == 1, "warp_with_loc_grad: image must have one channel, got ", g.channels);
  at::Tensor out = empty_volume({g.batch, 1, g.out_d, g.out_h, g.out_w}, image.options());
  at::Tensor loc = empty_volume({g.batch, 3, g.out_d, g.out_h, g.out_w}, image.options());
  const Strides5 is = strides5(image), ds = strides5(disp), os = strides5(out), ls = strides5(loc);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_with_loc_grad_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* l = loc.mutable_data_ptr<scalar_t>();
    const scalar_t one = 1;
    const SimdLevel simd = row_simd<scalar_t>(g, is, ds);
    for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
      const Row<scalar_t> row(u, ds, b, d, h);
      const scalar_t* ib = img + b * is.b;
      scalar_t* orow = o + b * os.b + d * os.d + h * os.h;
      scalar_t* lrow = l + b * ls.b + d * ls.d + h * ls.h;
      auto voxel = [&](int64_t w) {
        scalar_t z, y, x, tz, ty, tx;
        row.at(w, &z, &y, &x);
        sample_voxel<scalar_t, scalar_t>(g, ib, is, z, y, x, orow + w * os.w, os.c);
        NoAdd<scalar_t> none;
        backward_voxel<scalar_t, scalar_t>(g, ib, is, is, z, y, x, &one, 0, false, true, none, &tz, &ty, &tx);
        lrow[w * ls.w] = tz;
        lrow[ls.c + w * ls.w] = ty;
        lrow[2 * ls.c + w * ls.w] = tx;
      };
      if constexpr (std::is_same<scalar_t, float>::value) {
        // (casts: identity here, but this lambda is no template, so the branch is compiled
        // for double too; the AVX-512 copy differs in the image-gradient scatter only)
        if (simd != SimdLevel::None) {
          RowArgs r = simd_row(g, ib, is, u, ds, b, d, h);
          read_ahead_disp(g, u, ds, b, d, h, &r);
          if (h + 1 < g.out_h) {
            r.write_ahead[0] = reinterpret_cast<float*>(orow + os.h);
            for (int c = 0; c < 3; ++c) r.write_ahead[1 + c] = reinterpret_cast<float*>(lrow + c * ls.c + ls.h);
          }
          return avx2::backward_row<kDispGrad | kOutput | kOneChannel>(
              r, reinterpret_cast<const float*>(&one), 0, 0, nullptr, 0, 0, 0, reinterpret_cast<float*>(lrow), ls.c,
              reinterpret_cast<float*>(orow), voxel);
        }
      }
      for (int64_t w = 0; w < g.out_w; ++w) voxel(w);
    });
  });
  return {out, loc};
}

template <typename scalar_t>
struct PlainAdd {
  scalar_t* base;
  inline void operator()(int64_t off, scalar_t v) const { base[off] += v; }
};

// Schedule of the image-gradient scatter by blocks of output slices (see warp_backward_cpu).
struct SlabPlan {
  int64_t slices_per_chunk = 1, chunks = 0, phases = 0;  // phases == 0: no valid plan
  // first_writer[b * in_d + s]: the chunk that zeroes image slice s of batch item b just before
  // its rows: the first chunk run that may write it (-1: none may; zeroed first). Each slice is
  // zeroed once, just before the scatter reads it, rather than in a pass of its own from which
  // the scatter would read it back from memory.
  std::vector<int64_t> first_writer;
};

// SlabPlan::first_writer from the chunks' reach (per batch * chunks): chunks run phase by phase,
// so a slice's first writer is the first chunk of that order reaching it. Chunks of one phase
// reach disjoint slices, so no other chunk writes it while it is zeroed.
void plan_zeroing(const Geometry& g, const std::vector<std::pair<int64_t, int64_t>>& reach, SlabPlan* p) {
  p->first_writer.assign(g.batch * g.in_d, -1);
  for (int64_t phase = 0; phase < p->phases; ++phase)
    for (int64_t b = 0; b < g.batch; ++b)
      for (int64_t c = phase; c < p->chunks; c += p->phases) {
        const auto& r = reach[b * p->chunks + c];
        for (int64_t s = r.first; s <= r.second; ++s)
          if (p->first_writer[b * g.in_d + s] < 0) p->first_writer[b * g.in_d + s] = c;
      }
}

// Image slices [lo, hi] that output slice (b, d) may write: a superset computed from the
// extreme d-locations (the slices written are monotone in the location; NaN writes nothing).
template <typename scalar_t>
std::pair<int64_t, int64_t> slice_reach(const Geometry& g, const scalar_t* uz, const Strides5& ds,
                                        int64_t d, bool simd) {
  scalar_t lo = std::numeric_limits<scalar_t>::infinity(), hi = -lo;
  for (int64_t h = 0; h < g.out_h; ++h) {
    const scalar_t* p = uz + h * ds.h;
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (simd && ds.w == 1) {
        avx2::min_max(p, g.out_w, &lo, &hi);
        continue;
      }
    }
    for (int64_t w = 0; w < g.out_w; ++w) {
      const scalar_t v = p[w * ds.w];
      lo = v < lo ? v : lo;  // NaN compares false: skipped
      hi = v > hi ? v : hi;
    }
  }
  if (!(lo <= hi)) return {1, 0};  // nothing finite: writes nothing
  const scalar_t z0 = static_cast<scalar_t>(d) + lo, z1 = static_cast<scalar_t>(d) + hi;
  // "border" clamps locations into the volume first (they then write its edge slices: without
  // this clamp a chunk beyond the volume seemed to write nothing, was scheduled beside a chunk
  // writing the same edge slice, and the two raced); "zeros" writes nothing beyond -2 or
  // in_d + 1. Linear writes floor(z) and floor(z) + 1, nearest round(z) <= floor(z) + 1.
  const bool border = g.padding == Padding::Border;
  const scalar_t bottom = border ? scalar_t(0) : scalar_t(-2);
  const scalar_t top = static_cast<scalar_t>(border ? g.in_d - 1 : g.in_d + 1);
  const int64_t a = floor_index(clamp_value(z0, bottom, top));
  const int64_t b = floor_index(clamp_value(z1, bottom, top)) + 1;
  return {std::max<int64_t>(a, 0), std::min<int64_t>(b, g.in_d - 1)};
}

// Groups output slices into fixed-size chunks and finds a number of phases K such that chunks
// j and j' with j = j' (mod K) never write a common image slice (per batch item): the fewest,
// or a few more when that balances two threads better. Depends only on the data and shapes,
// never on the thread count.
template <typename scalar_t>
SlabPlan plan_slabs(const Geometry& g, const scalar_t* u, const Strides5& ds, bool simd) {
  SlabPlan p;
  // 16 chunks (10 slices at D' = 160): image gradient with loc_grad 21.8 -> 20.6 ms against 32
  // on the benchmark field, 28.0 -> 26.2 ms with twice its displacement, alike with a third of it
  // (2 threads, alternating processes). Fixed, as the bits depend on it; it caps the chunks one
  // phase runs at once near 16 / phases, which is plenty for the 2-core machines this targets.
  p.slices_per_chunk = std::max<int64_t>(1, (g.out_d + 15) / 16);
  p.chunks = (g.out_d + p.slices_per_chunk - 1) / p.slices_per_chunk;
  std::vector<std::pair<int64_t, int64_t>> reach(g.batch * g.out_d);
  at::parallel_for(0, g.batch * g.out_d, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b = s / g.out_d, d = s % g.out_d;
      reach[s] = slice_reach(g, u + b * ds.b + d * ds.d, ds, d, simd);
    }
  });
  std::vector<std::pair<int64_t, int64_t>> chunk(g.batch * p.chunks, {1, 0});
  for (int64_t s = 0; s < g.batch * g.out_d; ++s) {
    const auto& r = reach[s];
    if (r.first > r.second) continue;
    auto& c = chunk[(s / g.out_d) * p.chunks + (s % g.out_d) / p.slices_per_chunk];
    c = c.first > c.second ? r : std::make_pair(std::min(c.first, r.first), std::max(c.second, r.second));
  }
  auto disjoint = [](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
    return a.first > a.second || b.first > b.second || a.second < b.first || b.second < a.first;
  };
  auto valid = [&](int64_t k) {
    for (int64_t b = 0; b < g.batch; ++b)
      for (int64_t j = 0; j < p.chunks; ++j)
        for (int64_t j2 = j + k; j2 < p.chunks; j2 += k)
          if (!disjoint(chunk[b * p.chunks + j], chunk[b * p.chunks + j2])) return false;
    return true;
  };
  int64_t fewest = 1;
  while (fewest < p.chunks && !valid(fewest)) ++fewest;
  // Worth it with at least 2 chunks per phase on average; otherwise the sort schedule.
  if (2 * fewest > g.batch * p.chunks) return p;
  // A phase's chunks are indivisible tasks: with 11 chunks on 2 threads one thread idles for a
  // chunk at the phase's end (11 + 11 + 10 chunks in 3 phases cost 6 + 6 + 5 chunk times; 4
  // phases of 8 cost 4 x 4). Among the valid phase counts up to twice the fewest, take the one
  // with the least such cost for 2 threads (fixed, not the actual thread count: the phase
  // count decides the order of additions, and the bits must not depend on the thread count).
  auto cost = [&](int64_t k) {
    int64_t c = 0;
    for (int64_t phase = 0; phase < k; ++phase) c += (g.batch * ((p.chunks - phase + k - 1) / k) + 1) / 2;
    return c;
  };
  p.phases = fewest;
  for (int64_t k = fewest + 1; k <= 2 * fewest && 2 * k <= g.batch * p.chunks; ++k)
    if (cost(k) < cost(p.phases) && valid(k)) p.phases = k;
  plan_zeroing(g, chunk, &p);
  return p;
}

// Both gradients. The disp gradient alone is a plain parallel map over rows. The image
// gradient is a scatter, done without atomics and with bits independent of the thread count,
// each output voxel visited once (its disp gradient computed from the same stencil):
//  - slab schedule (smooth, moderate displacements: the usual case): output slices are cut
//    into fixed chunks; chunks are coloured with K phases such that chunks of one phase write
//    disjoint image slices (plan_slabs). Phases run one after the other, the chunks of a
//    phase in parallel, each chunk serially (h outer, d inner). No extra memory.
//  - sort schedule (when no K gives two chunks per phase, e.g. large random displacements):
//    1. key each output voxel by the lowest image slice its stencil writes (scatter_slab,
//       from the d-displacement only);
//    2. stable counting sort of the voxels by key (per-output-slice histograms, a serial
//       prefix sum, a parallel scatter of voxel indices);
//    3. two passes, even keys then odd keys: keys of one parity write disjoint slice pairs
//       {k, k + 1}, so their groups run in parallel, each group serially in voxel order.
//    Extra memory: one int32 per output voxel plus per-slice histograms.
//
// With loc_grad (warp_backward_with_loc_grad): the disp gradient is loc_grad * grad_out,
// written over loc_grad by the rows of the image-gradient scatter, which read grad_out anyway.
std::tuple<at::Tensor, at::Tensor> backward_cpu(const char* op, const at::Tensor& grad_out,
                                                const at::Tensor& image, const at::Tensor& disp,
                                                c10::string_view mode, c10::string_view padding,
                                                std::array<bool, 2> output_mask, const at::Tensor* loc_grad) {
  const Geometry g = check_inputs(op, image, disp, mode, padding);
  check_grad_out(op, grad_out, g, image);
  const bool need_image = output_mask[0], need_disp = output_mask[1];
  const bool scale = loc_grad != nullptr;  // need_disp then too
  at::Tensor grad_image = empty_volume(need_image ? image.sizes() : at::IntArrayRef{0}, image.options());
  at::Tensor grad_disp = scale ? *loc_grad
                               : empty_volume(need_disp ? at::IntArrayRef{g.batch, 3, g.out_d, g.out_h, g.out_w}
                                                        : at::IntArrayRef{0}, disp.options());
  // (grad_image is zeroed by the schedule below: slice by slice in the slab schedule)
  if (!need_image && !need_disp) return {grad_image, grad_disp};
  const Strides5 is = strides5(image), ds = strides5(disp), gs = strides5(grad_out);
  const Strides5 ris = need_image ? strides5(grad_image) : is;
  const Strides5 rds = need_disp ? strides5(grad_disp) : ds;

  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_backward_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gi = need_image ? grad_image.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gd = need_disp ? grad_disp.mutable_data_ptr<scalar_t>() : nullptr;

    const Limits<scalar_t> lim = limits<scalar_t>(g);
    // grad_image is ours (contiguous), grad_disp too; grad_out may be broadcast along W.
    const bool rows_fit = (gs.w == 0 || gs.w == 1) && (!need_image || (ris.w == 1 && fits_int32(g, ris))) &&
                          (!need_disp || rds.w == 1);
    const SimdLevel level = rows_fit ? row_simd<scalar_t>(g, is, ds) : SimdLevel::None;
    const bool simd = level != SimdLevel::None;
    // Backward of output voxel (b, d, h, w), with the adder of batch item b; interior voxels
    // of linear mode take the short path, with the channel count fixed for one channel.
    auto visit = [&](auto channels, const Row<scalar_t>& row, int64_t b, int64_t d, int64_t h,
                     int64_t w, PlainAdd<scalar_t>& add) {
      scalar_t z, y, x, tz, ty, tx;
      row.at(w, &z, &y, &x);
      const scalar_t* ib = img + b * is.b;
      const scalar_t* gv = go + b * gs.b + d * gs.d + h * gs.h + w * gs.w;
      const bool from_image = need_disp && !scale;
      if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
        backward_interior<decltype(channels)::value>(g, ib, is, ris, z, y, x, gv, gs.c,
                                                     need_image, from_image, add, &tz, &ty, &tx);
      else
        backward_voxel<scalar_t, scalar_t>(g, ib, is, ris, z, y, x, gv, gs.c, need_image,
                                           from_image, add, &tz, &ty, &tx);
      if (need_disp) {
        scalar_t* r = gd + b * rds.b + d * rds.d + h * rds.h + w * rds.w;
        if (scale)
          tz = r[0] * gv[0], ty = r[rds.c] * gv[0], tx = r[2 * rds.c] * gv[0];  // (one channel)
        r[0] = tz;
        r[rds.c] = ty;
        r[2 * rds.c] = tx;
      }
    };
    // One output row, voxels in W order (the scatter order the schedules rely on).
    auto backward_row = [&](auto channels, int64_t b, int64_t d, int64_t h) {
      const Row<scalar_t> row(u, ds, b, d, h);
      PlainAdd<scalar_t> add{need_image ? gi + b * ris.b : nullptr};
      auto voxel = [&](int64_t w) { visit(channels, row, b, d, h, w, add); };
      if constexpr (std::is_same<scalar_t, float>::value) {
        if (simd) {
          RowArgs r = simd_row(g, img + b * is.b, is, u, ds, b, d, h);
          const float* gorow = go + b * gs.b + d * gs.d + h * gs.h;
          const auto sd = static_cast<int32_t>(ris.d), sh = static_cast<int32_t>(ris.h);
          float* gdrow = need_disp ? gd + b * rds.b + d * rds.d + h * rds.h : nullptr;
          if (scale && h + 1 < g.out_h) {  // the next column's rows (see read_ahead_disp)
            if (gs.w == 1) r.read_ahead[0] = gorow + gs.h;  // (one channel)
            for (int c = 0; c < 3; ++c) r.write_ahead[c] = gdrow + c * rds.c + rds.h;
          }
          auto rows = [&](auto what) {
            constexpr int kWhat = decltype(what)::value | (decltype(channels)::value == 1 ? kOneChannel : 0);
            // The AVX-512 copy differs in the image-gradient scatter only (scatter_runs: backward
            // with both gradients 63 -> 43 ms, 2 threads, benchmark field); for the disp gradient
            // alone it measured a few % slower.
            if constexpr ((kWhat & kImageGrad) != 0) {
              if (level == SimdLevel::Avx512)
                return avx512::backward_row<kWhat>(r, gorow, gs.c, gs.w, add.base, sd, sh, ris.c, gdrow, rds.c,
                                                   nullptr, voxel);
            }
            return avx2::backward_row<kWhat>(r, gorow, gs.c, gs.w, add.base, sd, sh, ris.c, gdrow, rds.c, nullptr,
                                             voxel);
          };
          if (scale)  // (with the image gradient: warp_backward_with_loc_grad)
            return rows(std::integral_constant<int, kImageGrad | kScaleLocGrad>{});
          if (need_image && need_disp) return rows(std::integral_constant<int, kImageGrad | kDispGrad>{});
          if (need_image) return rows(std::integral_constant<int, kImageGrad>{});
          return rows(std::integral_constant<int, kDispGrad>{});
        }
      }
      for (int64_t w = 0; w < g.out_w; ++w) voxel(w);
    };
    auto with_channels = [&](auto body) {
      if (g.channels == 1)
        body(std::integral_constant<int, 1>{});
      else
        body(std::integral_constant<int, 0>{});
    };

    if (!need_image) {
      with_channels([&](auto channels) {
        for_each_row(g, [&](int64_t b, int64_t d, int64_t h) { backward_row(channels, b, d, h); });
      });
      return;
    }

    const SlabPlan plan = plan_slabs(g, u, ds, simd);
    if (plan.phases > 0) {
      auto zero_slice = [&](int64_t b, int64_t s) {
        for (int64_t c = 0; c < g.channels; ++c)
          std::memset(gi + b * ris.b + c * ris.c + s * ris.d, 0, sizeof(scalar_t) * g.in_h * g.in_w);
      };
      auto zero_slices_of = [&](int64_t b, int64_t chunk) {  // chunk -1: the slices no chunk writes
        for (int64_t s = 0; s < g.in_d; ++s)
          if (plan.first_writer[b * g.in_d + s] == chunk) zero_slice(b, s);
      };
      for (int64_t b = 0; b < g.batch; ++b) zero_slices_of(b, -1);
      with_channels([&](auto channels) {
        for (int64_t phase = 0; phase < plan.phases; ++phase) {
          // chunks phase, phase + K, ... of every batch item
          const int64_t per_batch = (plan.chunks - phase + plan.phases - 1) / plan.phases;
          auto body = [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t b = j / per_batch, c = phase + (j % per_batch) * plan.phases;
              zero_slices_of(b, c);
              // By columns of the chunk's slices, for cache reuse as in for_each_row.
              const int64_t d1 = std::min(g.out_d, (c + 1) * plan.slices_per_chunk);
              for (int64_t h = 0; h < g.out_h; ++h)
                for (int64_t d = c * plan.slices_per_chunk; d < d1; ++d) backward_row(channels, b, d, h);
            }
          };
          parallel_pieces(g.batch * per_batch, 1, body);
        }
      });
      return;
    }

    grad_image.zero_();
    const int64_t nvox = g.out_d * g.out_h * g.out_w;
    TORCH_CHECK(nvox < std::numeric_limits<int32_t>::max(),
                "warp_backward: more than 2^31 output voxels per batch item");
    // Keys: slab + 1 in [0, D]; voxels that scatter nothing (non-finite or far outside) go
    // to the last key D + 1, which writes no slice, so any parity may take it.
    const int64_t nkey = g.in_d + 2;
    const int64_t nslice = g.batch * g.out_d;  // histogram rows: one per output slice
    std::vector<int64_t> hist(nslice * nkey, 0);
    std::vector<int64_t> key_begin(g.batch * (nkey + 1));
    std::vector<int32_t> order(g.batch * nvox);
    // Calls f(h, w, key) along output slice (b, d), reading only the d-displacement.
    auto for_each_key = [&](int64_t b, int64_t d, auto f) {
      for (int64_t h = 0; h < g.out_h; ++h) {
        const scalar_t* uz = u + b * ds.b + d * ds.d + h * ds.h;
        for (int64_t w = 0; w < g.out_w; ++w) {
          const int64_t slab = scatter_slab(g, static_cast<scalar_t>(d) + uz[w * ds.w]);
          f(h, w, slab < -1 ? nkey - 1 : slab + 1);
        }
      }
    };
    // 1. histograms per output slice.
    at::parallel_for(0, nslice, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        int64_t* row = hist.data() + s * nkey;
        for_each_key(s / g.out_d, s % g.out_d, [&](int64_t, int64_t, int64_t k) { ++row[k]; });
      }
    });
    // 2. exclusive prefix sum, key-major then output-slice order: a stable sort.
    for (int64_t b = 0; b < g.batch; ++b) {
      int64_t pos = 0;
      for (int64_t k = 0; k < nkey; ++k) {
        key_begin[b * (nkey + 1) + k] = pos;
        for (int64_t d = 0; d < g.out_d; ++d) {
          int64_t& cell = hist[(b * g.out_d + d) * nkey + k];
          const int64_t count = cell;
          cell = pos;
          pos += count;
        }
      }
      key_begin[b * (nkey + 1) + nkey] = pos;
    }
    at::parallel_for(0, nslice, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        int64_t* next = hist.data() + s * nkey;
        const int64_t b = s / g.out_d, d = s % g.out_d;
        int32_t* ob = order.data() + b * nvox;
        for_each_key(b, d, [&](int64_t h, int64_t w, int64_t k) {
          ob[next[k]++] = static_cast<int32_t>((d * g.out_h + h) * g.out_w + w);
        });
      }
    });
    // 3. accumulate, even keys then odd keys.
    with_channels([&](auto channels) {
      for (int64_t parity = 0; parity < 2; ++parity) {
        const int64_t per_batch = (nkey - parity + 1) / 2;
        at::parallel_for(0, g.batch * per_batch, 1, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t b = j / per_batch, k = 2 * (j % per_batch) + parity;
            PlainAdd<scalar_t> add{gi + b * ris.b};
            const int32_t* ob = order.data() + b * nvox;
            const int64_t end = key_begin[b * (nkey + 1) + k + 1];
            for (int64_t i = key_begin[b * (nkey + 1) + k]; i < end; ++i) {
              const int64_t v = ob[i];
              const int64_t w = v % g.out_w, h = (v / g.out_w) % g.out_h,
                            d = v / (g.out_w * g.out_h);
              visit(channels, Row<scalar_t>(u, ds, b, d, h), b, d, h, w, add);
            }
          }
        });
      }
    });
  });
  return {grad_image, grad_disp};
}

std::tuple<at::Tensor, at::Tensor> warp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                                                      const at::Tensor& disp, c10::string_view mode,
                                                      c10::string_view padding, std::array<bool, 2> output_mask) {
  return backward_cpu("warp_backward", grad_out, image, disp, mode, padding, output_mask, nullptr);
}

// The image gradient, and loc_grad (from warp_with_loc_grad) multiplied by grad_out in place:
// the disp gradient.
at::Tensor warp_backward_with_loc_grad_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                                           const at::Tensor& disp, at::Tensor& loc_grad, c10::string_view padding) {
  const char* op = "warp_backward_with_loc_grad";
  const Geometry g = check_inputs(op, image, disp, "linear", padding);
  TORCH_CHECK_VALUE(g.channels == 1, op, ": image must have one channel, got ", g.channels);
  check_like_image(op, "loc_grad", loc_grad, {g.batch, 3, g.out_d, g.out_h, g.out_w}, "be", image);
  return std::get<0>(backward_cpu(op, grad_out, image, disp, "linear", padding, {true, true}, &loc_grad));
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("warp", &warp_cpu);
  m.impl("warp_backward", &warp_backward_cpu);
  m.impl("warp_with_loc_grad", &warp_with_loc_grad_cpu);
  m.impl("warp_backward_with_loc_grad", &warp_backward_with_loc_grad_cpu);
}

}  // namespace warp
}  // namespace deepatlas_fast
