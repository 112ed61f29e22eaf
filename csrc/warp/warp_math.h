// Per-voxel math of the 3D warp, shared verbatim by the CPU kernel, the CUDA kernel and the
// CUDA emulator (pattern of ATen's GridSampler.h). Everything here is C10_HOST_DEVICE and
// free of tensors, allocation and threading: launchers own those.
//
// Convention (VoxelMorph's SpatialTransformer, grid_sample with align_corners=True): output
// voxel (d, h, w) samples the image at (d + u_d, h + u_h, w + u_w), in image voxel indices.
#pragma once

#include "common/host_device.h"

namespace deepatlas_fast {
namespace warp {

enum class Mode : int32_t { Linear = 0, Nearest = 1 };
enum class Padding : int32_t { Zeros = 0, Border = 1 };

// Element strides of a 5-D tensor [B, C, D, H, W]; any layout works.
struct Strides5 {
  int64_t b, c, d, h, w;
};

struct Geometry {
  int64_t batch, channels;
  int64_t in_d, in_h, in_w;     // image grid
  int64_t out_d, out_h, out_w;  // displacement (= output) grid
  Mode mode;
  Padding padding;
};

// One axis of linear interpolation at a coordinate.
template <typename acc_t>
struct Axis {
  int64_t i0;     // lower corner index
  acc_t w1;       // weight of i0 + 1 (i0 has 1 - w1)
  bool in0, in1;  // corners inside the volume
  acc_t dsrc;     // d(used coordinate)/d(location): 0 where border clipping is active
};

template <typename acc_t>
C10_HOST_DEVICE inline Axis<acc_t> linear_axis(acc_t x, int64_t size, Padding padding) {
  Axis<acc_t> a;
  a.dsrc = acc_t(1);
  if (padding == Padding::Border) {
    // grid_sample's clip_coordinates_set_grad: the gradient is 0 at and beyond the clip.
    const acc_t hi = static_cast<acc_t>(size - 1);
    if (x <= acc_t(0)) {
      x = acc_t(0);
      a.dsrc = acc_t(0);
    } else if (x >= hi) {
      x = hi;
      a.dsrc = acc_t(0);
    }
  } else {
    // More than one voxel outside, every corner is out whatever x is: clamping changes no
    // value or gradient and keeps the integer cast defined for huge displacements.
    x = clamp_value(x, acc_t(-2), static_cast<acc_t>(size + 1));
  }
  a.i0 = floor_index(x);
  a.w1 = x - static_cast<acc_t>(a.i0);
  a.in0 = a.i0 >= 0 && a.i0 < size;
  a.in1 = a.i0 + 1 >= 0 && a.i0 + 1 < size;
  return a;
}

template <typename acc_t>
C10_HOST_DEVICE inline int64_t nearest_index(acc_t x, int64_t size, Padding padding) {
  x = padding == Padding::Border
          ? clamp_value(x, acc_t(0), static_cast<acc_t>(size - 1))
          : clamp_value(x, acc_t(-2), static_cast<acc_t>(size + 1));
  return round_half_even(x);
}

template <typename acc_t>
C10_HOST_DEVICE inline bool finite3(acc_t z, acc_t y, acc_t x) {
  return is_finite(z) && is_finite(y) && is_finite(x);
}

// The 8 corners of a trilinear stencil: per-axis weights, offsets inside one channel, masks.
template <typename acc_t>
struct Stencil {
  Axis<acc_t> z, y, x;
  int64_t oz[2], oy[2], ox[2];
  acc_t wz[2], wy[2], wx[2];
  bool interior;  // all 8 corners inside: the fast path with no per-corner test
};

template <typename acc_t>
C10_HOST_DEVICE inline Stencil<acc_t> make_stencil(const Geometry& g, int64_t sd, int64_t sh,
                                                   int64_t sw, acc_t z, acc_t y, acc_t x) {
  Stencil<acc_t> s;
  s.z = linear_axis(z, g.in_d, g.padding);
  s.y = linear_axis(y, g.in_h, g.padding);
  s.x = linear_axis(x, g.in_w, g.padding);
  s.oz[0] = s.z.i0 * sd;
  s.oz[1] = s.oz[0] + sd;
  s.oy[0] = s.y.i0 * sh;
  s.oy[1] = s.oy[0] + sh;
  s.ox[0] = s.x.i0 * sw;
  s.ox[1] = s.ox[0] + sw;
  s.wz[0] = acc_t(1) - s.z.w1;
  s.wz[1] = s.z.w1;
  s.wy[0] = acc_t(1) - s.y.w1;
  s.wy[1] = s.y.w1;
  s.wx[0] = acc_t(1) - s.x.w1;
  s.wx[1] = s.x.w1;
  s.interior = s.z.in0 && s.z.in1 && s.y.in0 && s.y.in1 && s.x.in0 && s.x.in1;
  return s;
}

template <typename acc_t>
C10_HOST_DEVICE inline bool corner_inside(const Stencil<acc_t>& s, int i, int j, int k) {
  return (i ? s.z.in1 : s.z.in0) && (j ? s.y.in1 : s.y.in0) && (k ? s.x.in1 : s.x.in0);
}

// Forward: sample every channel of one batch item's image at (z, y, x).
// img points at (b, 0, 0, 0, 0); out at (b, 0, voxel); channel c is at c * out_c.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void sample_voxel(const Geometry& g, const scalar_t* img, const Strides5& is,
                                         acc_t z, acc_t y, acc_t x, scalar_t* out, int64_t out_c) {
  if (!finite3(z, y, x)) {
    const acc_t nan = (z + y + x) * acc_t(0);  // NaN for any NaN/inf input: make it visible
    for (int64_t c = 0; c < g.channels; ++c) out[c * out_c] = static_cast<scalar_t>(nan);
    return;
  }
  if (g.mode == Mode::Nearest) {
    const int64_t iz = nearest_index(z, g.in_d, g.padding);
    const int64_t iy = nearest_index(y, g.in_h, g.padding);
    const int64_t ix = nearest_index(x, g.in_w, g.padding);
    const bool inside = iz >= 0 && iz < g.in_d && iy >= 0 && iy < g.in_h && ix >= 0 && ix < g.in_w;
    const int64_t off = iz * is.d + iy * is.h + ix * is.w;
    for (int64_t c = 0; c < g.channels; ++c)
      out[c * out_c] = inside ? img[c * is.c + off] : static_cast<scalar_t>(0);
    return;
  }
  const Stencil<acc_t> s = make_stencil(g, is.d, is.h, is.w, z, y, x);
  if (s.interior) {
    const int64_t o = s.oz[0] + s.oy[0] + s.ox[0];
    for (int64_t c = 0; c < g.channels; ++c) {
      const scalar_t* p = img + c * is.c + o;
      const acc_t v0 = s.wy[0] * (s.wx[0] * acc_t(p[0]) + s.wx[1] * acc_t(p[is.w])) +
                       s.wy[1] * (s.wx[0] * acc_t(p[is.h]) + s.wx[1] * acc_t(p[is.h + is.w]));
      p += is.d;
      const acc_t v1 = s.wy[0] * (s.wx[0] * acc_t(p[0]) + s.wx[1] * acc_t(p[is.w])) +
                       s.wy[1] * (s.wx[0] * acc_t(p[is.h]) + s.wx[1] * acc_t(p[is.h + is.w]));
      out[c * out_c] = static_cast<scalar_t>(s.wz[0] * v0 + s.wz[1] * v1);
    }
    return;
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    const scalar_t* p = img + c * is.c;
    acc_t acc = 0;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k)
          if (corner_inside(s, i, j, k))
            acc += s.wz[i] * s.wy[j] * s.wx[k] * acc_t(p[s.oz[i] + s.oy[j] + s.ox[k]]);
    out[c * out_c] = static_cast<scalar_t>(acc);
  }
}

// Gradient with respect to the sampling location (= the displacement) at one voxel.
// gout points at (b, 0, voxel) of the output gradient, channel stride gout_c.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void location_grad_voxel(const Geometry& g, const scalar_t* img,
                                                const Strides5& is, acc_t z, acc_t y, acc_t x,
                                                const scalar_t* gout, int64_t gout_c,
                                                acc_t* gz, acc_t* gy, acc_t* gx) {
  if (!finite3(z, y, x)) {
    *gz = *gy = *gx = (z + y + x) * acc_t(0);
    return;
  }
  if (g.mode == Mode::Nearest) {  // piecewise constant: zero almost everywhere (as grid_sample)
    *gz = *gy = *gx = acc_t(0);
    return;
  }
  const Stencil<acc_t> s = make_stencil(g, is.d, is.h, is.w, z, y, x);
  const acc_t sign[2] = {acc_t(-1), acc_t(1)};  // d w_i / d coordinate
  acc_t tz = 0, ty = 0, tx = 0;
  for (int64_t c = 0; c < g.channels; ++c) {
    const acc_t go = acc_t(gout[c * gout_c]);
    const scalar_t* p = img + c * is.c;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k) {
          if (!s.interior && !corner_inside(s, i, j, k)) continue;
          const acc_t v = go * acc_t(p[s.oz[i] + s.oy[j] + s.ox[k]]);
          tz += v * sign[i] * s.wy[j] * s.wx[k];
          ty += v * s.wz[i] * sign[j] * s.wx[k];
          tx += v * s.wz[i] * s.wy[j] * sign[k];
        }
  }
  *gz = tz * s.z.dsrc;
  *gy = ty * s.y.dsrc;
  *gx = tx * s.x.dsrc;
}

// Gradient with respect to the image: scatters gout(voxel) * weight to the stencil corners
// through add(offset, value), offsets in the grad-image layout gs. The adder decides how
// (plain += on the CPU's conflict-free schedule, atomicAdd on CUDA).
template <typename scalar_t, typename acc_t, typename Adder>
C10_HOST_DEVICE inline void scatter_voxel(const Geometry& g, const Strides5& gs, acc_t z, acc_t y,
                                          acc_t x, const scalar_t* gout, int64_t gout_c,
                                          Adder& add) {
  if (!finite3(z, y, x)) return;
  if (g.mode == Mode::Nearest) {
    const int64_t iz = nearest_index(z, g.in_d, g.padding);
    const int64_t iy = nearest_index(y, g.in_h, g.padding);
    const int64_t ix = nearest_index(x, g.in_w, g.padding);
    if (iz < 0 || iz >= g.in_d || iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) return;
    const int64_t off = iz * gs.d + iy * gs.h + ix * gs.w;
    for (int64_t c = 0; c < g.channels; ++c) add(c * gs.c + off, acc_t(gout[c * gout_c]));
    return;
  }
  const Stencil<acc_t> s = make_stencil(g, gs.d, gs.h, gs.w, z, y, x);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) {
        if (!s.interior && !corner_inside(s, i, j, k)) continue;
        const acc_t w = s.wz[i] * s.wy[j] * s.wx[k];
        const int64_t off = s.oz[i] + s.oy[j] + s.ox[k];
        for (int64_t c = 0; c < g.channels; ++c) add(c * gs.c + off, w * acc_t(gout[c * gout_c]));
      }
}

// Lowest image slice (along D) that scatter_voxel writes for location z, or -2 if it writes
// none. Linear writes slices key and key + 1, nearest only key. The CPU backward groups
// voxels by this key so that groups of equal parity never write the same slice.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t scatter_slab(const Geometry& g, acc_t z, acc_t y, acc_t x) {
  if (!finite3(z, y, x)) return -2;
  if (g.mode == Mode::Nearest) {
    const int64_t iz = nearest_index(z, g.in_d, g.padding);
    return (iz >= 0 && iz < g.in_d) ? iz : -2;
  }
  const int64_t i0 = linear_axis(z, g.in_d, g.padding).i0;
  return (i0 >= -1 && i0 < g.in_d) ? i0 : -2;
}

}  // namespace warp
}  // namespace deepatlas_fast
