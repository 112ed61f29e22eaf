// Row-level pieces shared by the CPU warp's forward (warp_cpu.cpp) and backward
// (warp_cpu_backward.h and the schedule files): the row order of the parallel loops, a row's
// sampling locations, and the arguments of the SIMD rows (warp_cpu_simd.h). See the NOTE at
// the top of warp_cpu.cpp for the map of the CPU warp.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/parallel.h"
#include "common/simd.h"
#include "warp/warp_cpu_simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace cpu {

constexpr int64_t kGrainVoxels = 8192;  // per task: amortises scheduling, keeps cores busy

// Output slices visited together (see for_each_row). Longer columns reuse more of each image
// row while it is cached, up to about this length; beyond it nothing more is gained. Only the
// speed depends on it, not the results.
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

// Displacement channels of one row and the sampling location x + u(x) along it, in acc_t
// (float32 for a float16/bfloat16 displacement: its values are loaded once, then computed on
// in float32, as the CUDA kernels do).
template <typename scalar_t>
struct Row {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* uz;
  const scalar_t* uy;
  const scalar_t* ux;
  int64_t sw;
  acc_t d, h;
  Row(const scalar_t* disp, const Strides5& s, int64_t b, int64_t d_, int64_t h_)
      : uz(disp + b * s.b + d_ * s.d + h_ * s.h), uy(uz + s.c), ux(uz + 2 * s.c), sw(s.w),
        d(static_cast<acc_t>(d_)), h(static_cast<acc_t>(h_)) {}
  inline void at(int64_t w, acc_t* z, acc_t* y, acc_t* x) const {
    *z = d + static_cast<acc_t>(uz[w * sw]);
    *y = h + static_cast<acc_t>(uy[w * sw]);
    *x = static_cast<acc_t>(w) + static_cast<acc_t>(ux[w * sw]);
  }
};

// The SIMD rows (warp_cpu_simd.h) serve float32, linear mode, W-contiguous image and disp, on
// CPUs that have AVX2 (AVX-512 for the backward's run scatter). DEEPATLAS_FAST_SIMD, read at
// every call, caps the level (the tests compare every level with the scalar path).

// Offsets along D, H, W inside one channel of a tensor with these strides fit in int32.
inline bool fits_int32(const Geometry& g, const Strides5& s) {
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
// early (see ahead_cell). Fewer columns ahead leave the fetch too little time (a few voxels
// ahead in the same row, even less); more gain nothing.
constexpr int64_t kAheadColumns = 4;

// RowArgs of output row (b, d, h) for the SIMD rows, with the row kAheadColumns columns later
// (its cells are prefetched). Only the strides and sizes for a non-float32 scalar_t, whose
// branch is compiled but never taken.
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

}  // namespace cpu
}  // namespace warp
}  // namespace deepatlas_fast
