// CUDA kernels of the warp op and their launch glue. Compiled by nvcc (warp_cuda.cu) and, for
// tests on machines without a GPU, by the host compiler under the CUDA emulator
// (emulator/emulated_ops.cpp). Kernels therefore use only what the emulator provides:
// threadIdx/blockIdx/blockDim/gridDim, __shared__ arrays of fixed size, __syncthreads and
// atomicAdd. The glue is templated on a Launcher so both builds share dispatch and allocation.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "warp/warp_checks.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {

// Output voxel index -> (b, d, h, w) and its sampling location.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void locate(const Geometry& g, int64_t i, const scalar_t* disp,
                                   const Strides5& ds, int64_t* b, int64_t* d, int64_t* h,
                                   int64_t* w, acc_t* z, acc_t* y, acc_t* x) {
  *w = i % g.out_w;
  i /= g.out_w;
  *h = i % g.out_h;
  i /= g.out_h;
  *d = i % g.out_d;
  *b = i / g.out_d;
  const scalar_t* u = disp + *b * ds.b + *d * ds.d + *h * ds.h + *w * ds.w;
  *z = static_cast<acc_t>(*d) + static_cast<acc_t>(u[0]);
  *y = static_cast<acc_t>(*h) + static_cast<acc_t>(u[ds.c]);
  *x = static_cast<acc_t>(*w) + static_cast<acc_t>(u[2 * ds.c]);
}

template <typename scalar_t, typename acc_t>
__global__ void warp_forward_kernel(Geometry g, const scalar_t* __restrict__ image, Strides5 is,
                                    const scalar_t* __restrict__ disp, Strides5 ds,
                                    scalar_t* __restrict__ out, Strides5 os) {
  const int64_t n = g.batch * g.out_d * g.out_h * g.out_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, d, h, w;
    acc_t z, y, x;
    locate<scalar_t, acc_t>(g, i, disp, ds, &b, &d, &h, &w, &z, &y, &x);
    sample_voxel<scalar_t, acc_t>(g, image + b * is.b, is, z, y, x,
                                  out + b * os.b + d * os.d + h * os.h + w * os.w, os.c);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void warp_backward_disp_kernel(Geometry g, const scalar_t* __restrict__ image,
                                          Strides5 is, const scalar_t* __restrict__ disp,
                                          Strides5 ds, const scalar_t* __restrict__ grad_out,
                                          Strides5 gs, scalar_t* __restrict__ grad_disp,
                                          Strides5 rs) {
  const int64_t n = g.batch * g.out_d * g.out_h * g.out_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, d, h, w;
    acc_t z, y, x, gz, gy, gx;
    locate<scalar_t, acc_t>(g, i, disp, ds, &b, &d, &h, &w, &z, &y, &x);
    location_grad_voxel<scalar_t, acc_t>(g, image + b * is.b, is, z, y, x,
                                         grad_out + b * gs.b + d * gs.d + h * gs.h + w * gs.w,
                                         gs.c, &gz, &gy, &gx);
    scalar_t* r = grad_disp + b * rs.b + d * rs.d + h * rs.h + w * rs.w;
    r[0] = static_cast<scalar_t>(gz);
    r[rs.c] = static_cast<scalar_t>(gy);
    r[2 * rs.c] = static_cast<scalar_t>(gx);
  }
}

// Atomic accumulation into an acc_t buffer: the order of additions, and so the last bits
// of the image gradient, vary from run to run on a GPU.
template <typename acc_t>
struct AtomicAdd {
  acc_t* base;
  __device__ inline void operator()(int64_t off, acc_t v) const { atomicAdd(base + off, v); }
};

template <typename scalar_t, typename acc_t>
__global__ void warp_backward_image_kernel(Geometry g, const scalar_t* __restrict__ disp,
                                           Strides5 ds, const scalar_t* __restrict__ grad_out,
                                           Strides5 gs, acc_t* __restrict__ grad_image,
                                           Strides5 rs) {
  const int64_t n = g.batch * g.out_d * g.out_h * g.out_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, d, h, w;
    acc_t z, y, x;
    locate<scalar_t, acc_t>(g, i, disp, ds, &b, &d, &h, &w, &z, &y, &x);
    AtomicAdd<acc_t> add{grad_image + b * rs.b};
    scatter_voxel<scalar_t, acc_t>(g, rs, z, y, x,
                                   grad_out + b * gs.b + d * gs.d + h * gs.h + w * gs.w, gs.c,
                                   add);
  }
}

// ---- launch glue, shared by the CUDA build and the emulator --------------------------------
// A Launcher is callable as launch(n_items, kernel, args...) and runs a grid-stride kernel.

template <class Launcher>
at::Tensor warp_forward_device(const Launcher& launch, const at::Tensor& image,
                               const at::Tensor& disp, c10::string_view mode,
                               c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding);
  at::Tensor out = at::empty({g.batch, g.channels, g.out_d, g.out_h, g.out_w}, image.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(out.numel() / g.channels, warp_forward_kernel<scalar_t, acc_t>, g,
           image.const_data_ptr<scalar_t>(), strides5(image), disp.const_data_ptr<scalar_t>(),
           strides5(disp), out.mutable_data_ptr<scalar_t>(), strides5(out));
  });
  return out;
}

template <class Launcher>
at::Tensor warp_backward_disp_device(const Launcher& launch, const at::Tensor& grad_out,
                                     const at::Tensor& image, const at::Tensor& disp,
                                     c10::string_view mode, c10::string_view padding) {
  const Geometry g = check_inputs("warp_backward_disp", image, disp, mode, padding);
  check_grad_out("warp_backward_disp", grad_out, g, image);
  at::Tensor grad_disp = at::empty({g.batch, 3, g.out_d, g.out_h, g.out_w}, disp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "warp_backward_disp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(grad_disp.numel() / 3, warp_backward_disp_kernel<scalar_t, acc_t>, g,
           image.const_data_ptr<scalar_t>(), strides5(image), disp.const_data_ptr<scalar_t>(),
           strides5(disp), grad_out.const_data_ptr<scalar_t>(), strides5(grad_out),
           grad_disp.mutable_data_ptr<scalar_t>(), strides5(grad_disp));
  });
  return grad_disp;
}

template <class Launcher>
at::Tensor warp_backward_image_device(const Launcher& launch, const at::Tensor& grad_out,
                                      const at::Tensor& image, const at::Tensor& disp,
                                      c10::string_view mode, c10::string_view padding) {
  const Geometry g = check_inputs("warp_backward_image", image, disp, mode, padding);
  check_grad_out("warp_backward_image", grad_out, g, image);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "warp_backward_image", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Half/bfloat16 images accumulate in a float32 buffer, cast once at the end.
    at::Tensor acc = at::zeros(image.sizes(),
                               image.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    launch(g.batch * g.out_d * g.out_h * g.out_w, warp_backward_image_kernel<scalar_t, acc_t>, g,
           disp.const_data_ptr<scalar_t>(), strides5(disp), grad_out.const_data_ptr<scalar_t>(),
           strides5(grad_out), acc.mutable_data_ptr<acc_t>(), strides5(acc));
    result = acc.scalar_type() == image.scalar_type() ? acc : acc.to(image.scalar_type());
  });
  return result;
}

}  // namespace warp
}  // namespace deepatlas_fast
