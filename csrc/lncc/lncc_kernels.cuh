// CUDA kernels of the LNCC op and their launch glue. Compiled by nvcc (lncc_cuda.cu) and, for
// tests on machines without a GPU, by the host compiler under the CUDA emulator
// (emulator/emulated_lncc.cpp), so kernels use only what the emulator provides (fixed-size
// __shared__ arrays, __syncthreads, grid-stride loops).
//
// Design: the five moment fields live in one [5, N] float32 (float64 for double input)
// buffer, box-summed in place one axis at a time: W with shared-memory tiles (a row segment
// and its halo per block), then H and D by one thread per line walking it with a running sum
// and a ring of the last window values (O(1) per voxel, coalesced across W). Forward maps the
// sums to cc in place and reduces with at::sum (deterministic); backward maps them to the
// cc coefficients, box-sums those along D and H in place, and the W pass (shared tiles again)
// writes the gradients. 5 volume-sized float32 buffers besides the gradients; no host sync.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <array>
#include <tuple>

#include "lncc/lncc_checks.h"
#include "lncc/lncc_math.h"

namespace deepatlas_fast {
namespace lncc {

constexpr int kMaxTile = 256;  // max threads per block: one output per thread in row tiles

// Moments of a and b box-summed along W: M[k * n + i]. Tiles are row segments of blockDim.x
// voxels; the block stages the segment and its halo of r voxels each side in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void moments_w_kernel(Geometry g, const scalar_t* __restrict__ a,
                                 const scalar_t* __restrict__ b, acc_t* __restrict__ M, int64_t n) {
  __shared__ acc_t sa[kMaxTile + 2 * kMaxRadius];
  __shared__ acc_t sb[kMaxTile + 2 * kMaxRadius];
  const int64_t tw = blockDim.x, per_row = (g.w + tw - 1) / tw, tiles = (n / g.w) * per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / per_row, w0 = (tile % per_row) * tw;
    for (int64_t j = threadIdx.x; j < tw + 2 * g.r; j += blockDim.x) {
      const int64_t w = w0 - g.r + j;
      const bool inside = w >= 0 && w < g.w;
      sa[j] = inside ? static_cast<acc_t>(a[row * g.w + w]) : acc_t(0);
      sb[j] = inside ? static_cast<acc_t>(b[row * g.w + w]) : acc_t(0);
    }
    __syncthreads();
    const int64_t w = w0 + threadIdx.x;
    if (w < g.w) {
      acc_t s[kMoments] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t j = threadIdx.x; j <= threadIdx.x + 2 * g.r; ++j) {
        acc_t m[kMoments];
        moments<acc_t>(sa[j], sb[j], m);
        for (int k = 0; k < kMoments; ++k) s[k] += m[k];
      }
      for (int k = 0; k < kMoments; ++k) M[k * n + row * g.w + w] = s[k];
    }
    __syncthreads();  // the next tile overwrites the stage
  }
}

// In-place box sum (zero padding) of the K fields along one axis: line l of field k starts at
// M[k * n + o * len * inner + i] and has stride inner (the product of the sizes after the axis).
// The running sum needs the value that leaves the window after it was overwritten, so the last
// window + 1 inputs are kept in a per-thread ring.
template <typename acc_t>
__global__ void box_lines_kernel(acc_t* __restrict__ M, int64_t n, int64_t len, int64_t inner,
                                 int64_t window) {
  const int64_t r = window / 2, per_field = n / len, lines = kMoments * per_field;
  for (int64_t l = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; l < lines;
       l += int64_t(blockDim.x) * gridDim.x) {
    const int64_t k = l / per_field, o = (l % per_field) / inner, i = (l % per_field) % inner;
    acc_t* p = M + k * n + o * len * inner + i;
    acc_t ring[kMaxWindow + 1];
    acc_t s = acc_t(0);
    for (int64_t t = 0; t < len + r; ++t) {
      if (t < len) {
        const acc_t x = p[t * inner];
        ring[t % (window + 1)] = x;
        s += x;
      }
      if (t >= window) s -= ring[(t - window) % (window + 1)];
      if (t >= r) p[(t - r) * inner] = s;
    }
  }
}

template <typename acc_t>
__global__ void cc_kernel(acc_t* __restrict__ M, int64_t n, acc_t inv_n, acc_t eps) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    acc_t s[kMoments];
    for (int k = 0; k < kMoments; ++k) s[k] = M[k * n + i];
    M[i] = local_cc<acc_t>(s, inv_n, eps);
  }
}

// Moment sums -> d(grad_out[b] * lncc[b])/d(sums), in place. per_batch = C * D * H * W.
template <typename scalar_t, typename acc_t>
__global__ void coefficients_kernel(acc_t* __restrict__ M, int64_t n, int64_t per_batch,
                                    const scalar_t* __restrict__ grad_out, acc_t inv_n, acc_t eps) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const acc_t scale = static_cast<acc_t>(grad_out[i / per_batch]) / static_cast<acc_t>(per_batch);
    acc_t s[kMoments], c[kMoments];
    for (int k = 0; k < kMoments; ++k) s[k] = M[k * n + i];
    cc_coefficients<acc_t>(s, inv_n, eps, scale, c);
    for (int k = 0; k < kMoments; ++k) M[k * n + i] = c[k];
  }
}

// Last W pass of the coefficients (shared tiles as moments_w_kernel), fused with the
// gradients; ga / gb may be null when not requested.
template <typename scalar_t, typename acc_t>
__global__ void gradients_w_kernel(Geometry g, const acc_t* __restrict__ F, int64_t n,
                                   const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  __shared__ acc_t sf[kMoments][kMaxTile + 2 * kMaxRadius];
  const int64_t tw = blockDim.x, per_row = (g.w + tw - 1) / tw, tiles = (n / g.w) * per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / per_row, w0 = (tile % per_row) * tw;
    for (int64_t j = threadIdx.x; j < tw + 2 * g.r; j += blockDim.x) {
      const int64_t w = w0 - g.r + j;
      const bool inside = w >= 0 && w < g.w;
      for (int k = 0; k < kMoments; ++k) sf[k][j] = inside ? F[k * n + row * g.w + w] : acc_t(0);
    }
    __syncthreads();
    const int64_t w = w0 + threadIdx.x;
    if (w < g.w) {
      acc_t t[kMoments] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t j = threadIdx.x; j <= threadIdx.x + 2 * g.r; ++j)
        for (int k = 0; k < kMoments; ++k) t[k] += sf[k][j];
      const int64_t i = row * g.w + w;
      acc_t da, db;
      input_gradients<acc_t>(t, static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), &da, &db);
      if (ga) ga[i] = static_cast<scalar_t>(da);
      if (gb) gb[i] = static_cast<scalar_t>(db);
    }
    __syncthreads();
  }
}

// ---- launch glue, shared by the CUDA build and the emulator --------------------------------
// A Launcher is callable as launch(n_items, kernel, args...) (grid-stride, launch.threads per
// block). Tile kernels get n_tiles * threads items: one block per tile, up to the grid cap.

template <class Launcher>
void check_launcher(const Launcher& launch) {
  TORCH_CHECK(launch.threads >= 1 && launch.threads <= kMaxTile,
              "lncc: the row kernels need 1 to ", kMaxTile, " threads per block, got ",
              launch.threads);
}

template <class Launcher, typename acc_t>
void box_lines(const Launcher& launch, const Geometry& g, acc_t* M, int64_t n, bool d_first) {
  const int64_t hw = g.h * g.w;
  for (int pass = 0; pass < 2; ++pass) {
    const bool along_d = (pass == 0) == d_first;
    const int64_t len = along_d ? g.d : g.h, inner = along_d ? hw : g.w;
    launch(kMoments * (n / len), box_lines_kernel<acc_t>, M, n, len, inner, g.window);
  }
}

// M = [5, n] moment sums over the full 3D box.
template <class Launcher, typename scalar_t, typename acc_t>
void moment_sums(const Launcher& launch, const Geometry& g, const at::Tensor& a,
                 const at::Tensor& b, acc_t* M, int64_t n) {
  launch((n / g.w) * ((g.w + launch.threads - 1) / launch.threads) * launch.threads,
         moments_w_kernel<scalar_t, acc_t>, g, a.const_data_ptr<scalar_t>(),
         b.const_data_ptr<scalar_t>(), M, n);
  box_lines(launch, g, M, n, /*d_first=*/false);
}

template <class Launcher>
at::Tensor lncc_forward_device(const Launcher& launch, const at::Tensor& a_in,
                               const at::Tensor& b_in, int64_t window, double eps) {
  const Geometry g = check_inputs("lncc", a_in, b_in, window, eps, true);
  check_launcher(launch);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.numel(), per_batch = n / g.batch;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor M = at::empty({kMoments, n}, a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* m = M.mutable_data_ptr<acc_t>();
    moment_sums<Launcher, scalar_t, acc_t>(launch, g, a, b, m, n);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(window * window * window);
    launch(n, cc_kernel<acc_t>, m, n, inv_n, static_cast<acc_t>(eps));
    out = M[0].view({g.batch, per_batch}).sum(1).div_(static_cast<double>(per_batch))
              .to(a.scalar_type());
  });
  return out;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> lncc_backward_device(const Launcher& launch,
                                                        const at::Tensor& grad_out,
                                                        const at::Tensor& a_in,
                                                        const at::Tensor& b_in, int64_t window,
                                                        double eps,
                                                        std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("lncc_backward", a_in, b_in, window, eps, true);
  check_grad_out("lncc_backward", grad_out, a_in);
  check_launcher(launch);
  const bool need_a = output_mask[0], need_b = output_mask[1];
  at::Tensor grad_a = at::empty(need_a ? a_in.sizes() : at::IntArrayRef{0}, a_in.options());
  at::Tensor grad_b = at::empty(need_b ? b_in.sizes() : at::IntArrayRef{0}, b_in.options());
  if (!need_a && !need_b) return {grad_a, grad_b};
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), go = grad_out.contiguous();
  const int64_t n = a.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor M = at::empty({kMoments, n}, a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* m = M.mutable_data_ptr<acc_t>();
    moment_sums<Launcher, scalar_t, acc_t>(launch, g, a, b, m, n);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(window * window * window);
    launch(n, coefficients_kernel<scalar_t, acc_t>, m, n, n / g.batch,
           go.const_data_ptr<scalar_t>(), inv_n, static_cast<acc_t>(eps));
    box_lines(launch, g, m, n, /*d_first=*/true);
    launch((n / g.w) * ((g.w + launch.threads - 1) / launch.threads) * launch.threads,
           gradients_w_kernel<scalar_t, acc_t>, g, static_cast<const acc_t*>(m), n,
           a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
           need_a ? grad_a.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr),
           need_b ? grad_b.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
  });
  // The kernels write contiguous gradients; as on the CPU, each takes its input's memory format
  // (a copy for a channels-last input).
  if (need_a) grad_a = grad_a.contiguous(a_in.suggest_memory_format());
  if (need_b) grad_b = grad_b.contiguous(b_in.suggest_memory_format());
  return {grad_a, grad_b};
}

}  // namespace lncc
}  // namespace deepatlas_fast
