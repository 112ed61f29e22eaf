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

#include <array>
#include <tuple>

#include "warp/warp_checks.h"
#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {

// Output voxel index -> (b, d, h, w) and its sampling location.
template <typename scalar_t, typename acc_t>
DA_HD_INLINE void locate(const Geometry& g, int64_t i, const scalar_t* disp,
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

// Atomic accumulation into an acc_t buffer: the order of additions, and so the last bits
// of the image gradient, vary from run to run on a GPU.
template <typename acc_t>
struct AtomicAdd {
  acc_t* base;
  __device__ inline void operator()(int64_t off, acc_t v) const { atomicAdd(base + off, v); }
};

// One thread per output voxel: the disp gradient is written directly, the image gradient is
// scattered with atomics. grad_image/grad_disp may be null when not requested.
template <typename scalar_t, typename acc_t>
__global__ void warp_backward_kernel(Geometry g, const scalar_t* __restrict__ image, Strides5 is,
                                     const scalar_t* __restrict__ disp, Strides5 ds,
                                     const scalar_t* __restrict__ grad_out, Strides5 gs,
                                     acc_t* __restrict__ grad_image, Strides5 ris,
                                     scalar_t* __restrict__ grad_disp, Strides5 rds) {
  const bool need_image = grad_image != nullptr, need_disp = grad_disp != nullptr;
  const int64_t n = g.batch * g.out_d * g.out_h * g.out_w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, d, h, w;
    acc_t z, y, x, gz, gy, gx;
    locate<scalar_t, acc_t>(g, i, disp, ds, &b, &d, &h, &w, &z, &y, &x);
    AtomicAdd<acc_t> add{need_image ? grad_image + b * ris.b : nullptr};
    backward_voxel<scalar_t, acc_t>(g, image + b * is.b, is, ris, z, y, x,
                                    grad_out + b * gs.b + d * gs.d + h * gs.h + w * gs.w, gs.c,
                                    need_image, need_disp, add, &gz, &gy, &gx);
    if (need_disp) {
      scalar_t* r = grad_disp + b * rds.b + d * rds.d + h * rds.h + w * rds.w;
      r[0] = static_cast<scalar_t>(gz);
      r[rds.c] = static_cast<scalar_t>(gy);
      r[2 * rds.c] = static_cast<scalar_t>(gx);
    }
  }
}

// ---- launch glue, shared by the CUDA build and the emulator --------------------------------
// A Launcher is callable as launch(n_items, kernel, args...) and runs a grid-stride kernel.

template <class Launcher>
at::Tensor warp_forward_device(const Launcher& launch, const at::Tensor& image,
                               const at::Tensor& disp, c10::string_view mode,
                               c10::string_view padding) {
  const Geometry g = check_inputs("warp", image, disp, mode, padding, true);
  // The output takes the image's memory format, the gradients their input's, as on the CPU
  // (the kernels read and write through strides).
  at::Tensor out = at::empty({g.batch, g.channels, g.out_d, g.out_h, g.out_w},
                             image.options().memory_format(image.suggest_memory_format()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(out.numel() / g.channels, warp_forward_kernel<scalar_t, acc_t>, g,
           image.const_data_ptr<scalar_t>(), strides5(image), disp.const_data_ptr<scalar_t>(),
           strides5(disp), out.mutable_data_ptr<scalar_t>(), strides5(out));
  });
  return out;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> warp_backward_device(const Launcher& launch,
                                                        const at::Tensor& grad_out,
                                                        const at::Tensor& image,
                                                        const at::Tensor& disp,
                                                        c10::string_view mode,
                                                        c10::string_view padding,
                                                        std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("warp_backward", image, disp, mode, padding, true);
  check_grad_out("warp_backward", grad_out, g, image);
  const bool need_image = output_mask[0], need_disp = output_mask[1];
  at::Tensor grad_image = at::empty({0}, image.options());
  at::Tensor grad_disp =
      need_disp ? at::empty({g.batch, 3, g.out_d, g.out_h, g.out_w},
                            disp.options().memory_format(disp.suggest_memory_format()))
                : at::empty({0}, disp.options());
  if (!need_image && !need_disp) return {grad_image, grad_disp};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Half/bfloat16 images accumulate in a float32 buffer, cast once at the end.
    // (same memory format as the image: `to` below keeps it; at::zeros takes no memory format)
    at::Tensor acc = need_image ? at::empty(image.sizes(), image.options().dtype(c10::CppTypeToScalarType<acc_t>::value),
                                            image.suggest_memory_format())
                                      .zero_()
                                : at::empty({0}, image.options());
    const Strides5 is = strides5(image);
    launch(g.batch * g.out_d * g.out_h * g.out_w, warp_backward_kernel<scalar_t, acc_t>, g,
           image.const_data_ptr<scalar_t>(), is, disp.const_data_ptr<scalar_t>(), strides5(disp),
           grad_out.const_data_ptr<scalar_t>(), strides5(grad_out),
           need_image ? acc.mutable_data_ptr<acc_t>() : static_cast<acc_t*>(nullptr),
           need_image ? strides5(acc) : is,
           need_disp ? grad_disp.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr),
           need_disp ? strides5(grad_disp) : strides5(disp));
    if (need_image)
      grad_image = acc.scalar_type() == image.scalar_type() ? acc : acc.to(image.scalar_type());
  });
  return {grad_image, grad_disp};
}

}  // namespace warp
}  // namespace deepatlas_fast
