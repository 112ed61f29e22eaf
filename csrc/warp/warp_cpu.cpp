// CPU launchers of the warp op: parallel over output voxels (at::parallel_for), per-voxel
// math from warp_math.h. The image gradient is a scatter; it is made deterministic and free
// of atomics by grouping voxels by the image slices they write (see warp_backward_image_cpu).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "warp/warp_checks.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace {

constexpr int64_t kGrain = 4096;  // voxels per task: amortises scheduling, keeps 2+ cores busy

// Calls f(b, d, h, w) for the output voxels [begin, end) in memory order, one division up front.
template <typename F>
inline void for_each_voxel(const Geometry& g, int64_t begin, int64_t end, const F& f) {
  int64_t w = begin % g.out_w, t = begin / g.out_w;
  int64_t h = t % g.out_h;
  t /= g.out_h;
  int64_t d = t % g.out_d, b = t / g.out_d;
  for (int64_t i = begin; i < end; ++i) {
    f(b, d, h, w);
    if (++w == g.out_w) {
      w = 0;
      if (++h == g.out_h) {
        h = 0;
        if (++d == g.out_d) {
          d = 0;
          ++b;
        }
      }
    }
  }
}

// Sampling location of output voxel (b, d, h, w): the voxel plus its displacement.
template <typename scalar_t>
struct Locator {
  const scalar_t* disp;
  Strides5 s;
  inline void operator()(int64_t b, int64_t d, int64_t h, int64_t w, scalar_t* z, scalar_t* y,
                         scalar_t* x) const {
    const scalar_t* u = disp + b * s.b + d * s.d + h * s.h + w * s.w;
    *z = static_cast<scalar_t>(d) + u[0];
    *y = static_cast<scalar_t>(h) + u[s.c];
    *x = static_cast<scalar_t>(w) + u[2 * s.c];
  }
};

int64_t n_out(const Geometry& g) { return g.batch * g.out_d * g.out_h * g.out_w; }

at::Tensor warp_cpu(const at::Tensor& image, const at::Tensor& disp, c10::string_view mode,
                    c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding);
  at::Tensor out = at::empty({g.batch, g.channels, g.out_d, g.out_h, g.out_w}, image.options());
  const Strides5 is = strides5(image), os = strides5(out);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Locator<scalar_t> loc{disp.const_data_ptr<scalar_t>(), strides5(disp)};
    at::parallel_for(0, n_out(g), kGrain, [&](int64_t begin, int64_t end) {
      for_each_voxel(g, begin, end, [&](int64_t b, int64_t d, int64_t h, int64_t w) {
        scalar_t z, y, x;
        loc(b, d, h, w, &z, &y, &x);
        sample_voxel<scalar_t, scalar_t>(g, img + b * is.b, is, z, y, x,
                                         o + b * os.b + d * os.d + h * os.h + w * os.w, os.c);
      });
    });
  });
  return out;
}

at::Tensor warp_backward_disp_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                                  const at::Tensor& disp, c10::string_view mode,
                                  c10::string_view padding) {
  const Geometry g = check_inputs("warp_backward_disp", image, disp, mode, padding);
  check_grad_out("warp_backward_disp", grad_out, g, image);
  at::Tensor grad_disp = at::empty({g.batch, 3, g.out_d, g.out_h, g.out_w}, disp.options());
  const Strides5 is = strides5(image), gs = strides5(grad_out), rs = strides5(grad_disp);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_backward_disp_cpu", [&] {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    scalar_t* r = grad_disp.mutable_data_ptr<scalar_t>();
    const Locator<scalar_t> loc{disp.const_data_ptr<scalar_t>(), strides5(disp)};
    at::parallel_for(0, n_out(g), kGrain, [&](int64_t begin, int64_t end) {
      for_each_voxel(g, begin, end, [&](int64_t b, int64_t d, int64_t h, int64_t w) {
        scalar_t z, y, x;
        loc(b, d, h, w, &z, &y, &x);
        scalar_t* rv = r + b * rs.b + d * rs.d + h * rs.h + w * rs.w;
        location_grad_voxel<scalar_t, scalar_t>(
            g, img + b * is.b, is, z, y, x, go + b * gs.b + d * gs.d + h * gs.h + w * gs.w, gs.c,
            rv, rv + rs.c, rv + 2 * rs.c);
      });
    });
  });
  return grad_disp;
}

template <typename scalar_t>
struct PlainAdd {
  scalar_t* base;
  inline void operator()(int64_t off, scalar_t v) const { base[off] += v; }
};

// Image gradient without atomics and with bits independent of the thread count:
//  1. key each output voxel by the lowest image slice its stencil writes (scatter_slab);
//  2. stable counting sort of the voxels by key (per output-slice histograms, a serial
//     prefix sum, a parallel scatter of voxel indices);
//  3. two passes, even keys then odd keys: keys of one parity write disjoint slice pairs
//     {k, k+1}, so their groups run in parallel, each group serially in voxel order.
// Extra memory: one int32 per output voxel plus small histograms.
at::Tensor warp_backward_image_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                                   const at::Tensor& disp, c10::string_view mode,
                                   c10::string_view padding) {
  const Geometry g = check_inputs("warp_backward_image", image, disp, mode, padding);
  check_grad_out("warp_backward_image", grad_out, g, image);
  at::Tensor grad_image = at::zeros(image.sizes(), image.options());
  const int64_t nvox = g.out_d * g.out_h * g.out_w;
  TORCH_CHECK(nvox < std::numeric_limits<int32_t>::max(),
              "warp_backward_image: more than 2^31 output voxels per batch item");
  const int64_t nkey = g.in_d + 1;          // key + 1 in [0, D]
  const int64_t nslice = g.batch * g.out_d; // histogram rows: one per output slice
  std::vector<int64_t> hist(nslice * nkey, 0);
  std::vector<int64_t> key_begin(g.batch * (nkey + 1));
  std::vector<int32_t> order(g.batch * nvox);
  const Strides5 gs = strides5(grad_out), rs = strides5(grad_image);

  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "warp_backward_image_cpu", [&] {
    const Locator<scalar_t> loc{disp.const_data_ptr<scalar_t>(), strides5(disp)};
    auto key_of = [&](int64_t b, int64_t d, int64_t h, int64_t w) {
      scalar_t z, y, x;
      loc(b, d, h, w, &z, &y, &x);
      return scatter_slab(g, z, y, x) + 1;  // -1: writes nothing
    };
    // 1. histograms per output slice.
    at::parallel_for(0, nslice, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        int64_t* row = hist.data() + s * nkey;
        const int64_t b = s / g.out_d, d = s % g.out_d;
        for (int64_t h = 0; h < g.out_h; ++h)
          for (int64_t w = 0; w < g.out_w; ++w) {
            const int64_t k = key_of(b, d, h, w);
            if (k >= 0) ++row[k];
          }
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
        for (int64_t h = 0; h < g.out_h; ++h)
          for (int64_t w = 0; w < g.out_w; ++w) {
            const int64_t k = key_of(b, d, h, w);
            if (k >= 0) ob[next[k]++] = static_cast<int32_t>((d * g.out_h + h) * g.out_w + w);
          }
      }
    });
    // 3. accumulate, even keys then odd keys.
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_image.mutable_data_ptr<scalar_t>();
    for (int64_t parity = 0; parity < 2; ++parity) {
      const int64_t per_batch = (nkey - parity + 1) / 2;
      at::parallel_for(0, g.batch * per_batch, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t b = j / per_batch, k = 2 * (j % per_batch) + parity;
          PlainAdd<scalar_t> add{gi + b * rs.b};
          const int32_t* ob = order.data() + b * nvox;
          for (int64_t i = key_begin[b * (nkey + 1) + k]; i < key_begin[b * (nkey + 1) + k + 1];
               ++i) {
            const int64_t v = ob[i];
            const int64_t w = v % g.out_w, h = (v / g.out_w) % g.out_h, d = v / (g.out_w * g.out_h);
            scalar_t z, y, x;
            loc(b, d, h, w, &z, &y, &x);
            scatter_voxel<scalar_t, scalar_t>(g, rs, z, y, x,
                                              go + b * gs.b + d * gs.d + h * gs.h + w * gs.w,
                                              gs.c, add);
          }
        }
      });
    }
  });
  return grad_image;
}

}  // namespace

TORCH_LIBRARY_IMPL(deepatlas_fast, CPU, m) {
  m.impl("warp", &warp_cpu);
  m.impl("warp_backward_image", &warp_backward_image_cpu);
  m.impl("warp_backward_disp", &warp_backward_disp_cpu);
}

}  // namespace warp
}  // namespace deepatlas_fast
