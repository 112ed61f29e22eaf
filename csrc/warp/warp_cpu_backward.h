// The CPU warp backward's per-voxel and per-row code, shared by the driver (backward_cpu in
// warp_cpu.cpp) and the two schedules of the image-gradient scatter, each in a file of its own:
//   warp_cpu_backward_slabs.cpp   chunks of output slices coloured into phases (the usual case)
//   warp_cpu_backward_sorted.cpp  voxels counting-sorted by the image slices they write
// Both visit every output voxel once, in an order fixed by the data and shapes alone, so the
// image gradient's bits do not depend on the thread count. See the NOTE at the top of
// warp_cpu.cpp for the map of the CPU warp.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/simd.h"
#include "warp/warp_cpu_rows.h"
#include "warp/warp_cpu_simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace cpu {

// The adder of the image-gradient scatter: each schedule guarantees that no two threads write
// one image slice at a time, so a plain addition suffices.
template <typename scalar_t>
struct PlainAdd {
  scalar_t* base;
  inline void operator()(int64_t off, scalar_t v) const { base[off] += v; }
};

// The inputs, outputs and options of one backward call, and the backward of one voxel or one
// output row. need_image: the image gradient gi (ours, contiguous or channels-last) is wanted;
// need_disp: the disp gradient gd; scale (warp_backward_with_loc_grad): gd holds loc_grad on
// entry and becomes loc_grad * grad_out, written by the rows of the image-gradient scatter.
// acc_t: the arithmetic type (float32 for float16/bfloat16 tensors), also that of gi: the
// scatter adds many values into each image-gradient voxel, and rounding every partial sum to
// bfloat16's 8 (float16's 11) bits would lose the small ones.
template <typename scalar_t>
struct BackwardRows {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry g;
  Limits<acc_t> lim;
  const scalar_t* img;
  const scalar_t* u;   // disp
  const scalar_t* go;  // grad_out (may be broadcast along W: gs.w == 0)
  acc_t* gi;           // image gradient (float16/bfloat16 images: a float32 buffer), or null
  scalar_t* gd;        // disp gradient, or null
  Strides5 is, ds, gs, ris, rds;  // image, disp, grad_out, image gradient, disp gradient
  bool need_image, need_disp, scale;
  SimdLevel level;  // of the rows (None: the scalar voxel loop)

  // Backward of output voxel (b, d, h, w), with the adder of batch item b; interior voxels of
  // linear mode take the short path, with the channel count fixed for one channel.
  template <int kChannels>
  inline void voxel(const Row<scalar_t>& row, int64_t b, int64_t d, int64_t h, int64_t w,
                    PlainAdd<acc_t>& add) const {
    acc_t z, y, x, tz, ty, tx;
    row.at(w, &z, &y, &x);
    const scalar_t* ib = img + b * is.b;
    const scalar_t* gv = go + b * gs.b + d * gs.d + h * gs.h + w * gs.w;
    const bool from_image = need_disp && !scale;
    if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
      backward_interior<kChannels>(g, ib, is, ris, z, y, x, gv, gs.c, need_image, from_image, add, &tz, &ty,
                                   &tx);
    else
      backward_voxel<scalar_t, acc_t>(g, ib, is, ris, z, y, x, gv, gs.c, need_image, from_image, add, &tz,
                                      &ty, &tx);
    if (need_disp) {
      scalar_t* r = gd + b * rds.b + d * rds.d + h * rds.h + w * rds.w;
      if (scale) {  // (one channel)
        const acc_t g0 = static_cast<acc_t>(gv[0]);
        tz = static_cast<acc_t>(r[0]) * g0, ty = static_cast<acc_t>(r[rds.c]) * g0,
        tx = static_cast<acc_t>(r[2 * rds.c]) * g0;
      }
      r[0] = static_cast<scalar_t>(tz);
      r[rds.c] = static_cast<scalar_t>(ty);
      r[2 * rds.c] = static_cast<scalar_t>(tx);
    }
  }

  // One output row, voxels in W order (the scatter order the schedules rely on): the SIMD rows
  // when `level` allows, else voxel() along the row.
  template <int kChannels>
  inline void row(int64_t b, int64_t d, int64_t h) const {
    const Row<scalar_t> r0(u, ds, b, d, h);
    PlainAdd<acc_t> add{need_image ? gi + b * ris.b : nullptr};
    auto fallback = [&](int64_t w) { voxel<kChannels>(r0, b, d, h, w, add); };
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (level != SimdLevel::None) {
        RowArgs r = simd_row(g, img + b * is.b, is, u, ds, b, d, h);
        const float* gorow = go + b * gs.b + d * gs.d + h * gs.h;
        const auto sd = static_cast<int32_t>(ris.d), sh = static_cast<int32_t>(ris.h);
        float* gdrow = need_disp ? gd + b * rds.b + d * rds.d + h * rds.h : nullptr;
        if (scale && h + 1 < g.out_h) {  // the next column's rows (see read_ahead_disp)
          if (gs.w == 1) r.read_ahead[0] = gorow + gs.h;  // (one channel)
          for (int c = 0; c < 3; ++c) r.write_ahead[c] = gdrow + c * rds.c + rds.h;
        }
        auto rows = [&](auto what) {
          constexpr int kWhat = decltype(what)::value | (kChannels == 1 ? kOneChannel : 0);
          // The AVX-512 copy differs in the image-gradient scatter only (scatter_runs); for the
          // disp gradient alone the AVX2 copy is faster.
          if constexpr ((kWhat & kImageGrad) != 0) {
            if (level == SimdLevel::Avx512)
              return avx512::backward_row<kWhat>(r, gorow, gs.c, gs.w, add.base, sd, sh, ris.c, gdrow, rds.c,
                                                 nullptr, fallback);
          }
          return avx2::backward_row<kWhat>(r, gorow, gs.c, gs.w, add.base, sd, sh, ris.c, gdrow, rds.c, nullptr,
                                           fallback);
        };
        if (scale)  // (with the image gradient: warp_backward_with_loc_grad)
          return rows(std::integral_constant<int, kImageGrad | kScaleLocGrad>{});
        if (need_image && need_disp) return rows(std::integral_constant<int, kImageGrad | kDispGrad>{});
        if (need_image) return rows(std::integral_constant<int, kImageGrad>{});
        return rows(std::integral_constant<int, kDispGrad>{});
      }
    }
    for (int64_t w = 0; w < g.out_w; ++w) fallback(w);
  }

  // body(std::integral_constant<int, kChannels>): 1 for a one-channel image, else 0 (any).
  template <typename F>
  void with_channels(const F& body) const {
    if (g.channels == 1)
      body(std::integral_constant<int, 1>{});
    else
      body(std::integral_constant<int, 0>{});
  }
};

// The image gradient (and the disp gradient, if asked) by the slab schedule; gi is zeroed by
// it, slice by slice. Returns false, having written nothing, when the displacement reaches too
// far along D for it (no phase count leaves two chunks per phase): the sorted schedule then.
template <typename scalar_t>
bool backward_by_slabs(const BackwardRows<scalar_t>& rows);

// The image gradient (and the disp gradient, if asked) by the sorted schedule, for any
// displacement; gi must be zero on entry.
template <typename scalar_t>
void backward_by_sorted_keys(const BackwardRows<scalar_t>& rows);

extern template bool backward_by_slabs<float>(const BackwardRows<float>&);
extern template bool backward_by_slabs<double>(const BackwardRows<double>&);
extern template bool backward_by_slabs<c10::Half>(const BackwardRows<c10::Half>&);
extern template bool backward_by_slabs<c10::BFloat16>(const BackwardRows<c10::BFloat16>&);
extern template void backward_by_sorted_keys<float>(const BackwardRows<float>&);
extern template void backward_by_sorted_keys<double>(const BackwardRows<double>&);
extern template void backward_by_sorted_keys<c10::Half>(const BackwardRows<c10::Half>&);
extern template void backward_by_sorted_keys<c10::BFloat16>(const BackwardRows<c10::BFloat16>&);

}  // namespace cpu
}  // namespace warp
}  // namespace deepatlas_fast
