// CPU launchers of the warp op: parallel over output rows (at::parallel_for), per-voxel math
// from warp_math.h. The image gradient is a scatter; it is made deterministic and free of
// atomics by grouping voxels by the image slices they write (see warp_backward_cpu).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "warp/warp_checks.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace {

constexpr int64_t kGrainVoxels = 8192;  // per task: amortises scheduling, keeps cores busy

// Calls row(b, d, h) for every output row (b, d, h, :), in parallel.
template <typename F>
void for_each_row(const Geometry& g, const F& row) {
  const int64_t rows = g.batch * g.out_d * g.out_h;
  const int64_t grain = std::max<int64_t>(1, kGrainVoxels / g.out_w);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r / (g.out_d * g.out_h), (r / g.out_h) % g.out_d, r % g.out_h);
  });
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

at::Tensor warp_cpu(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                    c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding);
  at::Tensor out = at::empty({g.batch, g.channels, g.out_d, g.out_h, g.out_w}, image.options());
  const Strides5 is = strides5(image), ds = strides5(disp), os = strides5(out);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* u = disp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Limits<scalar_t> lim = limits<scalar_t>(g);
    // Interior voxels of linear mode take the short path, single-channel images (the common
    // case) with the channel count fixed at compile time; the rest the general path.
    auto run = [&](auto channels) {
      for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
        const Row<scalar_t> row(u, ds, b, d, h);
        const scalar_t* ib = img + b * is.b;
        scalar_t* orow = o + b * os.b + d * os.d + h * os.h;
        for (int64_t w = 0; w < g.out_w; ++w) {
          scalar_t z, y, x;
          row.at(w, &z, &y, &x);
          if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
            sample_interior<decltype(channels)::value>(
                g, ib, is, interior_cell(z, y, x, is.d, is.h, is.w), orow + w * os.w, os.c);
          else
            sample_voxel<scalar_t, scalar_t>(g, ib, is, z, y, x, orow + w * os.w, os.c);
        }
      });
    };
    if (g.channels == 1)
      run(std::integral_constant<int, 1>{});
    else
      run(std::integral_constant<int, 0>{});
  });
  return out;
}

template <typename scalar_t>
struct PlainAdd {
  scalar_t* base;
  inline void operator()(int64_t off, scalar_t v) const { base[off] += v; }
};

// Both gradients. The disp gradient alone is a plain parallel map. The image gradient is a
// scatter, done without atomics and with bits independent of the thread count:
//  1. key each output voxel by the lowest image slice its stencil writes (scatter_slab, from
//     the d-displacement only);
//  2. stable counting sort of the voxels by key (per-output-slice histograms, a serial
//     prefix sum, a parallel scatter of voxel indices);
//  3. two passes, even keys then odd keys: keys of one parity write disjoint slice pairs
//     {k, k + 1}, so their groups run in parallel, each group serially in voxel order.
//     The disp gradient of each voxel is computed in the same visit (one stencil).
// Extra memory: one int32 per output voxel plus per-slice histograms.
// Every voxel is visited exactly once, so its disp gradient is written exactly once.
std::tuple<at::Tensor, at::Tensor> warp_backward_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& image,
                                                      const at::Tensor& disp,
                                                      c10::string_view mode,
                                                      c10::string_view padding,
                                                      std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("warp_backward", image, disp, mode, padding);
  check_grad_out("warp_backward", grad_out, g, image);
  const bool need_image = output_mask[0], need_disp = output_mask[1];
  at::Tensor grad_image = need_image ? at::zeros(image.sizes(), image.options())
                                     : at::empty({0}, image.options());
  at::Tensor grad_disp = need_disp ? at::empty({g.batch, 3, g.out_d, g.out_h, g.out_w}, disp.options())
                                   : at::empty({0}, disp.options());
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
    // Backward of output voxel (b, d, h, w), with the adder of batch item b; interior voxels
    // of linear mode take the short path, with the channel count fixed for one channel.
    auto visit = [&](auto channels, int64_t b, int64_t d, int64_t h, int64_t w,
                     PlainAdd<scalar_t>& add) {
      const Row<scalar_t> row(u, ds, b, d, h);
      scalar_t z, y, x, tz, ty, tx;
      row.at(w, &z, &y, &x);
      const scalar_t* ib = img + b * is.b;
      const scalar_t* gv = go + b * gs.b + d * gs.d + h * gs.h + w * gs.w;
      if (g.mode == Mode::Linear && strictly_interior(lim, z, y, x))
        backward_interior<decltype(channels)::value>(g, ib, is, ris, z, y, x, gv, gs.c,
                                                     need_image, need_disp, add, &tz, &ty, &tx);
      else
        backward_voxel<scalar_t, scalar_t>(g, ib, is, ris, z, y, x, gv, gs.c, need_image,
                                           need_disp, add, &tz, &ty, &tx);
      if (need_disp) {
        scalar_t* r = gd + b * rds.b + d * rds.d + h * rds.h + w * rds.w;
        r[0] = tz;
        r[rds.c] = ty;
        r[2 * rds.c] = tx;
      }
    };
    auto with_channels = [&](auto body) {
      if (g.channels == 1)
        body(std::integral_constant<int, 1>{});
      else
        body(std::integral_constant<int, 0>{});
    };

    if (!need_image) {
      with_channels([&](auto channels) {
        for_each_row(g, [&](int64_t b, int64_t d, int64_t h) {
          PlainAdd<scalar_t> none{nullptr};  // never called: need_image is false
          for (int64_t w = 0; w < g.out_w; ++w) visit(channels, b, d, h, w, none);
        });
      });
      return;
    }

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
              visit(channels, b, d, h, w, add);
            }
          }
        });
      }
    });
  });
  return {grad_image, grad_disp};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("warp", &warp_cpu);
  m.impl("warp_backward", &warp_backward_cpu);
}

}  // namespace warp
}  // namespace deepatlas_fast
