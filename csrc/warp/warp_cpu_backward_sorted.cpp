// The sorted schedule of the CPU warp backward's image-gradient scatter, for displacements
// that reach too far along D for the slab schedule (no phase count leaves two chunks per
// phase, e.g. large random displacements):
//   1. key each output voxel by the lowest image slice its stencil writes (scatter_slab, from
//      the d-displacement only);
//   2. stable counting sort of the voxels by key (per-output-slice histograms, a serial prefix
//      sum, a parallel scatter of voxel indices);
//   3. two passes, even keys then odd keys: keys of one parity write disjoint slice pairs
//      {k, k + 1}, so their groups run in parallel, each group serially in voxel order.
// Every image-gradient value thus receives its additions in an order fixed by the data and
// shapes. Extra memory: one int32 per output voxel plus per-slice histograms. Scalar voxel
// code only (voxels of one group are scattered across rows). See warp_cpu_backward.h for the
// voxel code and the NOTE at the top of warp_cpu.cpp for the map of the CPU warp.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "warp/warp_cpu_backward.h"
#include "warp/warp_cpu_rows.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace cpu {

template <typename scalar_t>
void backward_by_sorted_keys(const BackwardRows<scalar_t>& rows) {
  const Geometry& g = rows.g;
  const scalar_t* u = rows.u;
  const Strides5& ds = rows.ds;
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
        using acc_t = typename BackwardRows<scalar_t>::acc_t;
        const int64_t slab = scatter_slab(g, static_cast<acc_t>(d) + static_cast<acc_t>(uz[w * ds.w]));
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
  rows.with_channels([&](auto channels) {
    constexpr int kChannels = decltype(channels)::value;
    for (int64_t parity = 0; parity < 2; ++parity) {
      const int64_t per_batch = (nkey - parity + 1) / 2;
      at::parallel_for(0, g.batch * per_batch, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t b = j / per_batch, k = 2 * (j % per_batch) + parity;
          PlainAdd<typename BackwardRows<scalar_t>::acc_t> add{rows.gi + b * rows.ris.b};
          const int32_t* ob = order.data() + b * nvox;
          const int64_t end = key_begin[b * (nkey + 1) + k + 1];
          for (int64_t i = key_begin[b * (nkey + 1) + k]; i < end; ++i) {
            const int64_t v = ob[i];
            const int64_t w = v % g.out_w, h = (v / g.out_w) % g.out_h,
                          d = v / (g.out_w * g.out_h);
            rows.template voxel<kChannels>(Row<scalar_t>(u, ds, b, d, h), b, d, h, w, add);
          }
        }
      });
    }
  });
}

template void backward_by_sorted_keys<float>(const BackwardRows<float>&);
template void backward_by_sorted_keys<double>(const BackwardRows<double>&);
template void backward_by_sorted_keys<c10::Half>(const BackwardRows<c10::Half>&);
template void backward_by_sorted_keys<c10::BFloat16>(const BackwardRows<c10::BFloat16>&);

}  // namespace cpu
}  // namespace warp
}  // namespace deepatlas_fast
