// CUDA kernels of the soft Dice sums and their launch glue. Compiled by nvcc
// (soft_dice_cuda.cu) and, for tests without a GPU, by the host compiler under the CUDA
// emulator (emulator/emulated_soft_dice.cpp): fixed-size __shared__ arrays, __syncthreads,
// int atomicAdd and grid-stride loops only.
//
// Forward: with logits, one thread per voxel first stores the softmax statistics (max and
// 1 / sum exp, 2 / C of the logits' size); then one block per (batch item, class, chunk of
// voxels) reduces (sum p t, sum p, sum t) in shared memory to a partial, and at::sum adds the
// partials (deterministic: no float atomics). Backward: one thread per voxel loops over the
// classes (softmax recomputed), writing every class's gradient; no host sync.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <tuple>

#include "soft_dice/soft_dice_checks.h"
#include "soft_dice/soft_dice_math.h"

namespace deepatlas_fast {
namespace soft_dice {

constexpr int kMaxThreads = 256;  // shared reduction buffer size
constexpr int64_t kChunkVoxels = 8192;

template <typename scalar_t, typename acc_t>
DA_HD_INLINE void softmax_stats(const Geometry& g, const scalar_t* z, acc_t* m, acc_t* inv_s) {
  acc_t mx = static_cast<acc_t>(z[0]);
  for (int64_t c = 1; c < g.classes; ++c) {
    const acc_t v = static_cast<acc_t>(z[c * g.voxels]);
    mx = v > mx ? v : mx;
  }
  acc_t s = acc_t(0);
  for (int64_t c = 0; c < g.classes; ++c) s += exp_value<acc_t>(static_cast<acc_t>(z[c * g.voxels]) - mx);
  *m = mx;
  *inv_s = acc_t(1) / s;
}

// stats[i] = max over classes, stats[n + i] = 1 / sum exp, for voxel i = b * voxels + v.
template <typename scalar_t, typename acc_t>
__global__ void softmax_stats_kernel(Geometry g, const scalar_t* __restrict__ z,
                                     acc_t* __restrict__ stats) {
  const int64_t n = g.batch * g.voxels;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = i / g.voxels, v = i % g.voxels;
    softmax_stats<scalar_t, acc_t>(g, z + b * g.classes * g.voxels + v, stats + i, stats + n + i);
  }
}

// One block per tile (b, c, chunk); partial[tile * 3 + j]. labels or target is null.
// bad[0] counts labels outside [0, C) (checked on class 0 only), bad[1] holds one of them.
template <typename scalar_t, typename acc_t, typename label_t>
__global__ void sums_kernel(Geometry g, const scalar_t* __restrict__ z,
                            const acc_t* __restrict__ stats, const label_t* __restrict__ labels,
                            const scalar_t* __restrict__ target, acc_t* __restrict__ partial,
                            int64_t chunks, int* __restrict__ bad) {
  __shared__ acc_t red[3][kMaxThreads];
  const int64_t tiles = g.batch * g.classes * chunks, n = g.batch * g.voxels;
  const unsigned tid = threadIdx.x;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t chunk = tile % chunks, bc = tile / chunks, c = bc % g.classes, b = bc / g.classes;
    const int64_t v0 = chunk * kChunkVoxels;
    const int64_t v1 = v0 + kChunkVoxels < g.voxels ? v0 + kChunkVoxels : g.voxels;
    acc_t I = acc_t(0), P = acc_t(0), T = acc_t(0);
    for (int64_t v = v0 + tid; v < v1; v += blockDim.x) {
      const int64_t i = b * g.voxels + v;
      acc_t p = static_cast<acc_t>(z[bc * g.voxels + v]);
      if (g.from_logits) p = exp_value<acc_t>(p - stats[i]) * stats[n + i];
      acc_t t;
      if (labels) {
        const label_t y = labels[i];
        if (c == 0 && !label_ok(y, g.classes)) {
          atomicAdd(bad, 1);
          bad[1] = static_cast<int>(y);  // any offending value will do
        }
        t = static_cast<int64_t>(y) == c ? acc_t(1) : acc_t(0);
      } else {
        t = static_cast<acc_t>(target[bc * g.voxels + v]);
      }
      I += p * t;
      P += p;
      T += t;
    }
    red[0][tid] = I;
    red[1][tid] = P;
    red[2][tid] = T;
    __syncthreads();
    for (unsigned s = 1; s < blockDim.x; s *= 2) {  // tree, any block size, fixed order
      if (tid % (2 * s) == 0 && tid + s < blockDim.x)
        for (int j = 0; j < 3; ++j) red[j][tid] += red[j][tid + s];
      __syncthreads();
    }
    if (tid == 0)
      for (int j = 0; j < 3; ++j) partial[tile * 3 + j] = red[j][0];
    __syncthreads();
  }
}

// One thread per voxel, all classes: gp = dL/d(probs or logits), gt = dL/dtarget (either null).
template <typename scalar_t, typename acc_t, typename label_t>
__global__ void backward_kernel(Geometry g, const scalar_t* __restrict__ z,
                                const label_t* __restrict__ labels,
                                const scalar_t* __restrict__ target,
                                const scalar_t* __restrict__ grad_sums, scalar_t* __restrict__ gp,
                                scalar_t* __restrict__ gt) {
  const int64_t n = g.batch * g.voxels;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = i / g.voxels, v = i % g.voxels;
    const scalar_t* zv = z + b * g.classes * g.voxels + v;
    const scalar_t* tv = target ? target + b * g.classes * g.voxels + v : nullptr;
    const scalar_t* gs = grad_sums + b * g.classes * 3;
    const int64_t y = labels ? static_cast<int64_t>(labels[i]) : -1;
    acc_t m = acc_t(0), inv_s = acc_t(1);
    if (g.from_logits) softmax_stats<scalar_t, acc_t>(g, zv, &m, &inv_s);
    auto prob = [&](int64_t c) {
      const acc_t x = static_cast<acc_t>(zv[c * g.voxels]);
      return g.from_logits ? exp_value<acc_t>(x - m) * inv_s : x;
    };
    auto dprob = [&](int64_t c) {  // dL/dp_c = gI_c t_c + gP_c
      const acc_t t = tv ? static_cast<acc_t>(tv[c * g.voxels]) : (y == c ? acc_t(1) : acc_t(0));
      return static_cast<acc_t>(gs[c * 3]) * t + static_cast<acc_t>(gs[c * 3 + 1]);
    };
    acc_t dot = acc_t(0);
    if (gp && g.from_logits)
      for (int64_t c = 0; c < g.classes; ++c) dot += prob(c) * dprob(c);
    for (int64_t c = 0; c < g.classes; ++c) {
      const acc_t p = prob(c);
      const int64_t o = b * g.classes * g.voxels + c * g.voxels + v;
      if (gp) gp[o] = static_cast<scalar_t>(g.from_logits ? p * (dprob(c) - dot) : dprob(c));
      if (gt)
        gt[o] = static_cast<scalar_t>(static_cast<acc_t>(gs[c * 3]) * p +
                                      static_cast<acc_t>(gs[c * 3 + 2]));
    }
  }
}

// ---- launch glue, shared by the CUDA build and the emulator --------------------------------

template <class Launcher>
at::Tensor soft_dice_sums_device(const Launcher& launch, const at::Tensor& probs_in,
                                 const at::Tensor& target_in, bool from_logits) {
  const Geometry g = check_inputs("soft_dice", probs_in, target_in, from_logits, true);
  TORCH_CHECK(launch.threads >= 1 && launch.threads <= kMaxThreads, "soft_dice: 1 to ",
              kMaxThreads, " threads per block, got ", launch.threads);
  const at::Tensor probs = probs_in.contiguous(), target = target_in.contiguous();
  const int64_t chunks = (g.voxels + kChunkVoxels - 1) / kChunkVoxels;
  at::Tensor bad = at::zeros({2}, probs.options().dtype(at::kInt));
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "soft_dice", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor stats = at::empty({from_logits ? 2 * g.batch * g.voxels : 0}, probs.options().dtype(acc_type));
    if (from_logits)
      launch(g.batch * g.voxels, softmax_stats_kernel<scalar_t, acc_t>, g,
             probs.const_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    at::Tensor partial = at::empty({g.batch, g.classes, chunks, 3}, probs.options().dtype(acc_type));
    with_label_type(g, target, [&](auto label) {
      using label_t = decltype(label);
      launch(g.batch * g.classes * chunks * launch.threads, sums_kernel<scalar_t, acc_t, label_t>, g,
             probs.const_data_ptr<scalar_t>(), static_cast<const acc_t*>(stats.const_data_ptr<acc_t>()),
             g.labels ? target.const_data_ptr<label_t>() : static_cast<const label_t*>(nullptr),
             g.labels ? static_cast<const scalar_t*>(nullptr) : target.const_data_ptr<scalar_t>(),
             partial.mutable_data_ptr<acc_t>(), chunks, bad.mutable_data_ptr<int>());
    });
    sums = partial.sum(2).to(probs.scalar_type());
  });
  if (g.labels) {  // a clear error needs the flag on the host: one sync, forward only
    const at::Tensor flag = bad.cpu();
    TORCH_CHECK_VALUE(flag.const_data_ptr<int>()[0] == 0, "soft_dice: target labels must be in [0, ",
                      g.classes, ") (the number of classes), found ", flag.const_data_ptr<int>()[1]);
  }
  return sums;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> soft_dice_sums_backward_device(
    const Launcher& launch, const at::Tensor& grad_sums, const at::Tensor& probs_in,
    const at::Tensor& target_in, bool from_logits, std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("soft_dice_backward", probs_in, target_in, from_logits, true);
  check_grad_sums("soft_dice_backward", grad_sums, g, probs_in);
  const bool need_p = output_mask[0], need_t = output_mask[1] && !g.labels;
  at::Tensor grad_p = at::empty(need_p ? probs_in.sizes() : at::IntArrayRef{0}, probs_in.options());
  at::Tensor grad_t = at::empty(need_t ? target_in.sizes() : at::IntArrayRef{0}, probs_in.options());
  if (!need_p && !need_t) return {grad_p, grad_t};
  const at::Tensor probs = probs_in.contiguous(), target = target_in.contiguous();
  const at::Tensor gs = grad_sums.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "soft_dice_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_label_type(g, target, [&](auto label) {
      using label_t = decltype(label);
      launch(g.batch * g.voxels, backward_kernel<scalar_t, acc_t, label_t>, g,
             probs.const_data_ptr<scalar_t>(),
             g.labels ? target.const_data_ptr<label_t>() : static_cast<const label_t*>(nullptr),
             g.labels ? static_cast<const scalar_t*>(nullptr) : target.const_data_ptr<scalar_t>(),
             gs.const_data_ptr<scalar_t>(),
             need_p ? grad_p.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr),
             need_t ? grad_t.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
    });
  });
  // The kernels write contiguous gradients; as on the CPU, each takes its input's memory format
  // (a copy for a channels-last input).
  if (need_p) grad_p = grad_p.contiguous(probs_in.suggest_memory_format());
  if (need_t) grad_t = grad_t.contiguous(target_in.suggest_memory_format());
  return {grad_p, grad_t};
}

}  // namespace soft_dice
}  // namespace deepatlas_fast
