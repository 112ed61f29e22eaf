// The slab schedule of the CPU warp backward's image-gradient scatter (the usual case: smooth,
// moderate displacements). Output slices are cut into fixed chunks; chunks are coloured with K
// phases such that chunks of one phase write disjoint image slices (plan_slabs). Phases run one
// after the other, the chunks of a phase in parallel, each chunk serially (h outer, d inner),
// so every image-gradient value receives its additions in an order fixed by the data and
// shapes. Each image slice is zeroed by the first chunk that may write it, just before its
// rows. No extra memory. See warp_cpu_backward.h for the rows and the NOTE at the top of
// warp_cpu.cpp for the map of the CPU warp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/parallel.h"
#include "warp/warp_cpu_backward.h"
#include "warp/warp_cpu_rows.h"
#include "warp/warp_cpu_simd.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {
namespace cpu {
namespace {

// The plan of the slab schedule for one call.
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
  using acc_t = at::opmath_type<scalar_t>;  // (the locations' type in the rows)
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
  for (int64_t h = 0; h < g.out_h; ++h) {
    const scalar_t* p = uz + h * ds.h;
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (simd && ds.w == 1) {
        avx2::min_max(p, g.out_w, &lo, &hi);
        continue;
      }
    }
    for (int64_t w = 0; w < g.out_w; ++w) {
      const acc_t v = static_cast<acc_t>(p[w * ds.w]);
      lo = v < lo ? v : lo;  // NaN compares false: skipped
      hi = v > hi ? v : hi;
    }
  }
  if (!(lo <= hi)) return {1, 0};  // nothing finite: writes nothing
  const acc_t z0 = static_cast<acc_t>(d) + lo, z1 = static_cast<acc_t>(d) + hi;
  // "border" clamps locations into the volume first: they write its edge slices, so a chunk
  // whose locations all lie beyond the volume must not be taken for one that writes nothing
  // (it could then run beside the chunk writing the same edge slice: a race). "zeros" writes
  // nothing beyond -2 or in_d + 1. Linear writes floor(z) and floor(z) + 1, nearest
  // round(z) <= floor(z) + 1.
  const bool border = g.padding == Padding::Border;
  const acc_t bottom = border ? acc_t(0) : acc_t(-2);
  const acc_t top = static_cast<acc_t>(border ? g.in_d - 1 : g.in_d + 1);
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
  // 16 chunks: shorter ones reuse less of the image rows that neighbouring slices share while
  // these are cached. Fixed, as the bits depend on it; a phase then runs about 16 / phases
  // chunks at once, enough for a few cores.
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

}  // namespace

template <typename scalar_t>
bool backward_by_slabs(const BackwardRows<scalar_t>& rows) {
  const Geometry& g = rows.g;
  const SlabPlan plan = plan_slabs(g, rows.u, rows.ds, rows.level != SimdLevel::None);
  if (plan.phases == 0) return false;
  using acc_t = typename BackwardRows<scalar_t>::acc_t;
  acc_t* gi = rows.gi;
  const Strides5& ris = rows.ris;
  // The image gradient is ours: contiguous (a slice of a channel is one block) or channels-last
  // (a slice of all channels is one block).
  const bool channels_last = g.channels > 1 && ris.c == 1;
  auto zero_slice = [&](int64_t b, int64_t s) {
    if (channels_last)
      std::memset(gi + b * ris.b + s * ris.d, 0, sizeof(acc_t) * g.channels * g.in_h * g.in_w);
    else
      for (int64_t c = 0; c < g.channels; ++c)
        std::memset(gi + b * ris.b + c * ris.c + s * ris.d, 0, sizeof(acc_t) * g.in_h * g.in_w);
  };
  auto zero_slices_of = [&](int64_t b, int64_t chunk) {  // chunk -1: the slices no chunk writes
    for (int64_t s = 0; s < g.in_d; ++s)
      if (plan.first_writer[b * g.in_d + s] == chunk) zero_slice(b, s);
  };
  for (int64_t b = 0; b < g.batch; ++b) zero_slices_of(b, -1);
  rows.with_channels([&](auto channels) {
    constexpr int kChannels = decltype(channels)::value;
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
            for (int64_t d = c * plan.slices_per_chunk; d < d1; ++d) rows.template row<kChannels>(b, d, h);
        }
      };
      parallel_pieces(g.batch * per_batch, 1, body);
    }
  });
  return true;
}

template bool backward_by_slabs<float>(const BackwardRows<float>&);
template bool backward_by_slabs<double>(const BackwardRows<double>&);
template bool backward_by_slabs<c10::Half>(const BackwardRows<c10::Half>&);
template bool backward_by_slabs<c10::BFloat16>(const BackwardRows<c10::BFloat16>&);

}  // namespace cpu
}  // namespace warp
}  // namespace deepatlas_fast
