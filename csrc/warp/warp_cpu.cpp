// NOTE [ Warp CPU kernels ]
//
// The CPU kernels of the warp ops (schemas in csrc/ops.cpp; per-voxel math in warp_math.h,
// shared with the CUDA kernels) are divided into these parts:
//
// 1. This file: the launchers of the four ops, and their registration.
//    + warp_cpu                        the forward
//    + warp_with_loc_grad_cpu          the forward of a one-channel linear warp, plus the
//                                      location gradient d out / d location from the same
//                                      corners (what the disp gradient needs, ops/warp.py)
//    + backward_cpu                    both backwards: checks, outputs, and the schedule
//    + warp_backward_cpu,              the two backward ops, on backward_cpu
//      warp_backward_with_loc_grad_cpu
// 2. warp_cpu_rows.h: what the forward and the backward share.
//    + for_each_row                    the parallel loop over output rows (order: below)
//    + Row                             a row's displacement and sampling locations
//    + row_simd, simd_row              whether the SIMD rows serve a call; their arguments
// 3. warp_cpu_backward.h: BackwardRows, the backward of one voxel (voxel) and of one output
//    row (row: the SIMD rows or voxel after voxel), used by both schedules.
// 4. warp_cpu_backward_slabs.cpp, warp_cpu_backward_sorted.cpp: the two schedules of the
//    image-gradient scatter (below).
// 5. warp_cpu_simd.h, warp_cpu_simd_rows.h: the SIMD rows (below), each with a map of its own.
//
// Schedules. The forward and the disp gradient are maps: each output voxel writes its own
// values. Their rows run in parallel in columns of kSliceBlock output slices, (d0, h),
// (d0 + 1, h), ..., then h + 1, so that the image rows neighbouring output rows share are
// still cached; threads take pieces of their own range of columns, then steal from the others
// (parallel_pieces). The image gradient is a scatter, done without atomics:
//  - slab schedule (smooth, moderate displacements: the usual case): chunks of output slices,
//    coloured into phases whose chunks write disjoint image slices; phases one after the
//    other, a phase's chunks in parallel, each chunk serially;
//  - sorted schedule (when no phase count leaves two chunks per phase): voxels counting-sorted
//    by the lowest image slice they write, even keys then odd keys, each key's voxels serially.
// backward_cpu tries the slab plan first. Without the image gradient the backward is a map.
//
// Dtypes and layouts. float16/bfloat16 values are loaded into float32 (at::opmath_type),
// computed on by the scalar code (the math of warp_math.h, as on CUDA) and stored once; the
// image gradient accumulates in a float32 buffer of the image's layout, converted at the end.
// Inputs of any strides are read in place. The output takes the image's memory format, each
// gradient its input's (channels_last_3d in, channels_last_3d out), as torch's own ops do.
//
// SIMD rows. float32, linear mode, W-contiguous image, displacement and outputs: 8 voxels of
// a row at a time, in an AVX2 copy and an AVX-512 copy of one source (the AVX-512 copy differs
// in the scatter of full blocks, by runs of consecutive cells). Called after a runtime CPU check;
// DEEPATLAS_FAST_SIMD (read at every call) caps the level. Voxels that are not strictly
// interior are computed in vector form too; row tails go to the scalar code.
//
// Prefetching. The column order interleaves more memory streams than the hardware
// prefetchers follow, so the rows fetch ahead what they would otherwise be the first to touch:
//  - the SIMD rows fetch the image (and image-gradient) rows of the cells of the output row
//    kAheadColumns columns later (ahead_cell, prefetch_cell);
//  - the forwards fetch that row's displacement one column earlier still (read_ahead_disp);
//    the location-gradient forward also the rows it writes in the next column, its backward
//    the grad_out and location-gradient rows of the next column (RowArgs::read_ahead,
//    write_ahead).
//
// Determinism. The results are bitwise identical for any thread count and at every SIMD level:
//  - each value of a map is computed by one thread, by the same code, whatever the order;
//  - each image-gradient value receives its additions in an order that the schedules fix from
//    the data and shapes alone (the slab planner balances its phases for 2 threads, whatever
//    the actual count);
//  - the SIMD rows perform warp_math.h's operations in the scalar code's order, without FMA
//    (the build passes -ffp-contract=off); the tests compare every level with the scalar code.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/cpu_memory.h"
#include "common/simd.h"
#include "warp/warp_checks.h"
#include "warp/warp_cpu_backward.h"
#include "warp/warp_cpu_rows.h"
#include "warp/warp_cpu_simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace cpu {
namespace {

// The forwards (for_each_row order) fetch the displacement of row (d, h + kAheadColumns + 1),
// which ahead_cell would otherwise be the first to touch, one column early; the
// location-gradient forward also the rows it writes in the next column (d, h + 1), and its
// backward (warp_backward_with_loc_grad) the grad_out and location-gradient rows of its next
// column. The backwards do not fetch the displacement ahead, nor the plain backward its rows:
// there it does not pay.
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

at::Tensor warp_cpu(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                    c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding);
  // The output takes the image's memory format (as elementwise ops do): a channels-last image
  // gives a channels-last output, written through its strides.
  at::Tensor out = empty_volume({g.batch, g.channels, g.out_d, g.out_h, g.out_w}, image.options(),
                                image.suggest_memory_format());
  const Strides5 is = strides5(image), ds = strides5(disp), os = strides5(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Limits<acc_t> lim = limits<acc_t>(g);
    const SimdLevel simd = os.w == 1 ? row_simd<scalar_t>(g, is, ds) : SimdLevel::None;
    // Interior voxels of linear mode take the short path, single-channel images (the common
    // case) with the channel count fixed at compile time; the rest the general path.
    auto run = [&](auto channels) {
      for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
        const Row<scalar_t> row(u, ds, b, d, h);
        const scalar_t* ib = img + b * is.b;
        scalar_t* orow = o + b * os.b + d * os.d + h * os.h;
        auto voxel = [&](int64_t w) {
          acc_t z, y, x;
          row.at(w, &z, &y, &x);
          if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
            sample_interior<decltype(channels)::value>(
                g, ib, is, interior_cell(z, y, x, is.d, is.h, is.w), orow + w * os.w, os.c);
          else
            sample_voxel<scalar_t, acc_t>(g, ib, is, z, y, x, orow + w * os.w, os.c);
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
  // out as warp's; loc_grad, which becomes the disp gradient, takes disp's memory format.
  at::Tensor out = empty_volume({g.batch, 1, g.out_d, g.out_h, g.out_w}, image.options(),
                                image.suggest_memory_format());
  at::Tensor loc = empty_volume({g.batch, 3, g.out_d, g.out_h, g.out_w}, image.options(),
                                disp.suggest_memory_format());
  const Strides5 is = strides5(image), ds = strides5(disp), os = strides5(out), ls = strides5(loc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_with_loc_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* l = loc.mutable_data_ptr<scalar_t>();
    const scalar_t one = 1;
    const SimdLevel simd = os.w == 1 && ls.w == 1 ? row_simd<scalar_t>(g, is, ds) : SimdLevel::None;
    for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
      const Row<scalar_t> row(u, ds, b, d, h);
      const scalar_t* ib = img + b * is.b;
      scalar_t* orow = o + b * os.b + d * os.d + h * os.h;
      scalar_t* lrow = l + b * ls.b + d * ls.d + h * ls.h;
      auto voxel = [&](int64_t w) {
        acc_t z, y, x, tz, ty, tx;
        row.at(w, &z, &y, &x);
        sample_voxel<scalar_t, acc_t>(g, ib, is, z, y, x, orow + w * os.w, os.c);
        NoAdd<acc_t> none;
        backward_voxel<scalar_t, acc_t>(g, ib, is, is, z, y, x, &one, 0, false, true, none, &tz, &ty, &tx);
        lrow[w * ls.w] = static_cast<scalar_t>(tz);
        lrow[ls.c + w * ls.w] = static_cast<scalar_t>(ty);
        lrow[2 * ls.c + w * ls.w] = static_cast<scalar_t>(tx);
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

// Both gradients, each output voxel visited once (its disp gradient computed from the same
// stencil as its image-gradient scatter). The disp gradient alone is a map over rows
// (for_each_row); with the image gradient, the slab schedule when it has a plan, else the
// sorted schedule (see the NOTE above).
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
  // Each gradient takes the memory format of its input (torch's convention).
  const c10::MemoryFormat image_format = image.suggest_memory_format();
  at::Tensor grad_image =
      empty_volume(need_image ? image.sizes() : at::IntArrayRef{0}, image.options(), image_format);
  at::Tensor grad_disp = scale ? *loc_grad
                               : empty_volume(need_disp ? at::IntArrayRef{g.batch, 3, g.out_d, g.out_h, g.out_w}
                                                        : at::IntArrayRef{0}, disp.options(),
                                              disp.suggest_memory_format());
  // (grad_image is zeroed by the schedule below: slice by slice in the slab schedule)
  if (!need_image && !need_disp) return {grad_image, grad_disp};
  // A float16/bfloat16 image gradient is accumulated in a float32 buffer of the same layout,
  // converted once at the end.
  const bool reduced = image.scalar_type() == at::kHalf || image.scalar_type() == at::kBFloat16;
  at::Tensor acc_image = need_image && reduced
                             ? empty_volume(image.sizes(), image.options().dtype(at::kFloat), image_format)
                             : grad_image;
  const Strides5 is = strides5(image), ds = strides5(disp), gs = strides5(grad_out);
  const Strides5 ris = need_image ? strides5(acc_image) : is;
  const Strides5 rds = need_disp ? strides5(grad_disp) : ds;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // grad_image is ours (contiguous or channels-last), grad_disp too; grad_out may be
    // broadcast along W.
    const bool rows_fit = (gs.w == 0 || gs.w == 1) && (!need_image || (ris.w == 1 && fits_int32(g, ris))) &&
                          (!need_disp || rds.w == 1);
    BackwardRows<scalar_t> rows;
    rows.g = g;
    rows.lim = limits<acc_t>(g);
    rows.img = image.const_data_ptr<scalar_t>();
    rows.u = disp.const_data_ptr<scalar_t>();
    rows.go = grad_out.const_data_ptr<scalar_t>();
    rows.gi = need_image ? acc_image.mutable_data_ptr<acc_t>() : nullptr;
    rows.gd = need_disp ? grad_disp.mutable_data_ptr<scalar_t>() : nullptr;
    rows.is = is, rows.ds = ds, rows.gs = gs, rows.ris = ris, rows.rds = rds;
    rows.need_image = need_image, rows.need_disp = need_disp, rows.scale = scale;
    rows.level = rows_fit ? row_simd<scalar_t>(g, is, ds) : SimdLevel::None;

    if (!need_image) {
      rows.with_channels([&](auto channels) {
        constexpr int kChannels = decltype(channels)::value;
        for_each_row(g, [&](int64_t b, int64_t d, int64_t h) { rows.template row<kChannels>(b, d, h); });
      });
      return;
    }
    if (!backward_by_slabs(rows)) {
      acc_image.zero_();
      backward_by_sorted_keys(rows);
    }
    if (reduced) grad_image.copy_(acc_image);
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
}  // namespace cpu

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("warp", &cpu::warp_cpu);
  m.impl("warp_backward", &cpu::warp_backward_cpu);
  m.impl("warp_with_loc_grad", &cpu::warp_with_loc_grad_cpu);
  m.impl("warp_backward_with_loc_grad", &cpu::warp_backward_with_loc_grad_cpu);
}

}  // namespace warp
}  // namespace deepatlas_fast
