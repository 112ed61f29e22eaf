// Host-side argument checks and geometry for the warp op, shared by the CPU, CUDA and
// emulated launchers so every backend rejects bad input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include <c10/util/string_view.h>

#include "warp/warp_math.h"

namespace deepatlas_fast {
namespace warp {

inline Mode parse_mode(c10::string_view mode) {
  if (mode == "linear") return Mode::Linear;
  if (mode == "nearest") return Mode::Nearest;
  TORCH_CHECK_VALUE(false, "warp: mode must be 'linear' or 'nearest', got '", std::string(mode), "'");
}

inline Padding parse_padding(c10::string_view padding) {
  if (padding == "zeros") return Padding::Zeros;
  if (padding == "border") return Padding::Border;
  TORCH_CHECK_VALUE(false, "warp: padding must be 'zeros' or 'border', got '", std::string(padding),
                    "'");
}

inline Strides5 strides5(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Checks image [B, C, D, H, W] and disp [B, 3, D', H', W']; returns the geometry.
// Every backend takes float32/float64 and float16/bfloat16 (float32 accumulation);
// kernel_half = true: the CUDA kernels (also when run by the emulator), named in the messages.
inline Geometry check_inputs(const char* op, const at::Tensor& image, const at::Tensor& disp,
                             c10::string_view mode, c10::string_view padding,
                             bool kernel_half = false) {
  TORCH_CHECK_VALUE(image.dim() == 5, op, ": image must be 5-D [B, C, D, H, W], got shape ",
                    image.sizes());
  TORCH_CHECK_VALUE(disp.dim() == 5 && disp.size(1) == 3, op,
                    ": disp must be [B, 3, D, H, W] (displacement in voxels, channels d, h, w), "
                    "got shape ",
                    disp.sizes());
  TORCH_CHECK_VALUE(image.size(0) == disp.size(0), op, ": image and disp batch sizes differ (",
                    image.size(0), " vs ", disp.size(0), ")");
  TORCH_CHECK_VALUE(image.numel() > 0, op, ": image is empty, shape ", image.sizes());
  TORCH_CHECK_VALUE(disp.numel() > 0, op, ": disp is empty, shape ", disp.sizes());
  TORCH_CHECK_VALUE(image.device() == disp.device(), op, ": image is on ", image.device(),
                    " but disp is on ", disp.device());
  TORCH_CHECK_TYPE(image.scalar_type() == disp.scalar_type(), op, ": image is ",
                   image.scalar_type(), " but disp is ", disp.scalar_type(),
                   "; both must have one dtype");
  check_kernel_dtype(op, "tensors", image.scalar_type(), kernel_half);
  Geometry g;
  g.batch = image.size(0);
  g.channels = image.size(1);
  g.in_d = image.size(2);
  g.in_h = image.size(3);
  g.in_w = image.size(4);
  g.out_d = disp.size(2);
  g.out_h = disp.size(3);
  g.out_w = disp.size(4);
  g.mode = parse_mode(mode);
  g.padding = parse_padding(padding);
  return g;
}

// Checks that the tensor argument `name` of op has shape `sizes` (what the message says it
// must: `must`) and image's dtype and device.
inline void check_like_image(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                             const char* must, const at::Tensor& image) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must ", must, " ", sizes, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == image.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
                   " but image is ", image.scalar_type());
  TORCH_CHECK_VALUE(t.device() == image.device(), op, ": ", name, " is on ", t.device(),
                    " but image is on ", image.device());
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const Geometry& g,
                           const at::Tensor& image) {
  check_like_image(op, "grad_out", grad_out, {g.batch, g.channels, g.out_d, g.out_h, g.out_w},
                   "have the output's shape", image);
}

}  // namespace warp
}  // namespace deepatlas_fast
