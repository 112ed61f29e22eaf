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
DA_HD_INLINE Axis<acc_t> linear_axis(acc_t x, int64_t size, Padding padding) {
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
DA_HD_INLINE int64_t nearest_index(acc_t x, int64_t size, Padding padding) {
  x = padding == Padding::Border
          ? clamp_value(x, acc_t(0), static_cast<acc_t>(size - 1))
          : clamp_value(x, acc_t(-2), static_cast<acc_t>(size + 1));
  return round_half_even(x);
}

template <typename acc_t>
DA_HD_INLINE bool finite3(acc_t z, acc_t y, acc_t x) {
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
DA_HD_INLINE Stencil<acc_t> make_stencil(const Geometry& g, int64_t sd, int64_t sh,
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
DA_HD_INLINE bool corner_inside(const Stencil<acc_t>& s, int i, int j, int k) {
  return (i ? s.z.in1 : s.z.in0) && (j ? s.y.in1 : s.y.in0) && (k ? s.x.in1 : s.x.in0);
}

// ---- interior fast path ---------------------------------------------------------------
// Strictly inside (0, size - 1) on every axis: all 8 corners are inside, no padding rule
// applies (border clipping only acts at <= 0), truncation is floor, and NaN fails the test.
template <typename acc_t>
struct Limits {  // (size - 1) per axis, converted once per launch, not per voxel
  acc_t d, h, w;
};

template <typename acc_t>
DA_HD_INLINE Limits<acc_t> limits(const Geometry& g) {
  return {static_cast<acc_t>(g.in_d - 1), static_cast<acc_t>(g.in_h - 1),
          static_cast<acc_t>(g.in_w - 1)};
}

template <typename acc_t>
DA_HD_INLINE bool strictly_interior(const Limits<acc_t>& l, acc_t z, acc_t y, acc_t x) {
  return z > acc_t(0) && z < l.d && y > acc_t(0) && y < l.h && x > acc_t(0) && x < l.w;
}

template <typename acc_t>
struct Cell {
  int64_t offset;  // of corner (0, 0, 0) inside one channel
  acc_t fz, fy, fx;
};

template <typename acc_t>
DA_HD_INLINE Cell<acc_t> interior_cell(acc_t z, acc_t y, acc_t x, int64_t sd, int64_t sh,
                                       int64_t sw) {
  const int64_t iz = static_cast<int64_t>(z), iy = static_cast<int64_t>(y),
                ix = static_cast<int64_t>(x);
  return {iz * sd + iy * sh + ix * sw, z - static_cast<acc_t>(iz), y - static_cast<acc_t>(iy),
          x - static_cast<acc_t>(ix)};
}

template <typename acc_t>
DA_HD_INLINE acc_t lerp(acc_t a, acc_t b, acc_t t) {
  return a + t * (b - a);
}

// The 8 corner values of one channel; v[i][j][k] is corner (z0 + i, y0 + j, x0 + k).
template <typename scalar_t, typename acc_t>
DA_HD_INLINE void load_corners(const scalar_t* p, int64_t sd, int64_t sh, int64_t sw,
                               acc_t (&v)[2][2][2]) {
  v[0][0][0] = acc_t(p[0]);
  v[0][0][1] = acc_t(p[sw]);
  v[0][1][0] = acc_t(p[sh]);
  v[0][1][1] = acc_t(p[sh + sw]);
  v[1][0][0] = acc_t(p[sd]);
  v[1][0][1] = acc_t(p[sd + sw]);
  v[1][1][0] = acc_t(p[sd + sh]);
  v[1][1][1] = acc_t(p[sd + sh + sw]);
}

template <typename acc_t>
DA_HD_INLINE acc_t interpolate(const acc_t (&v)[2][2][2], const Cell<acc_t>& c) {
  const acc_t c0 = lerp(lerp(v[0][0][0], v[0][0][1], c.fx), lerp(v[0][1][0], v[0][1][1], c.fx), c.fy);
  const acc_t c1 = lerp(lerp(v[1][0][0], v[1][0][1], c.fx), lerp(v[1][1][0], v[1][1][1], c.fx), c.fy);
  return lerp(c0, c1, c.fz);
}

// Derivative of interpolate() with respect to (z, y, x), scaled by go.
template <typename acc_t>
DA_HD_INLINE void interpolate_grad(const acc_t (&v)[2][2][2], const Cell<acc_t>& c, acc_t go,
                                   acc_t* gz, acc_t* gy, acc_t* gx) {
  const acc_t a00 = lerp(v[0][0][0], v[0][0][1], c.fx), a01 = lerp(v[0][1][0], v[0][1][1], c.fx);
  const acc_t a10 = lerp(v[1][0][0], v[1][0][1], c.fx), a11 = lerp(v[1][1][0], v[1][1][1], c.fx);
  *gz += go * (lerp(a10, a11, c.fy) - lerp(a00, a01, c.fy));
  *gy += go * lerp(a01 - a00, a11 - a10, c.fz);
  const acc_t e0 = lerp(v[0][0][1] - v[0][0][0], v[0][1][1] - v[0][1][0], c.fy);
  const acc_t e1 = lerp(v[1][0][1] - v[1][0][0], v[1][1][1] - v[1][1][0], c.fy);
  *gx += go * lerp(e0, e1, c.fz);
}

// Linear sample of every channel at an interior location. kChannels > 0 fixes the channel
// count at compile time (the CPU's single-channel loop is then much shorter), 0 reads g.channels.
template <int kChannels, typename scalar_t, typename acc_t>
DA_HD_INLINE void sample_interior(const Geometry& g, const scalar_t* img, const Strides5& is,
                                  const Cell<acc_t>& cell, scalar_t* out, int64_t out_c) {
  const int64_t channels = kChannels > 0 ? kChannels : g.channels;
  const scalar_t* p = img + cell.offset;
  for (int64_t c = 0; c < channels; ++c, p += is.c) {
    acc_t v[2][2][2];
    load_corners(p, is.d, is.h, is.w, v);
    out[c * out_c] = static_cast<scalar_t>(interpolate(v, cell));
  }
}

// Backward at an interior location (see backward_voxel for the contract).
template <int kChannels, typename scalar_t, typename acc_t, typename Adder>
DA_HD_INLINE void backward_interior(const Geometry& g, const scalar_t* img, const Strides5& is,
                                    const Strides5& gs, acc_t z, acc_t y, acc_t x,
                                    const scalar_t* gout, int64_t gout_c, bool need_image,
                                    bool need_disp, Adder& add, acc_t* gz, acc_t* gy, acc_t* gx) {
  const int64_t channels = kChannels > 0 ? kChannels : g.channels;
  const Cell<acc_t> ci = interior_cell(z, y, x, is.d, is.h, is.w);
  const int64_t og = interior_cell(z, y, x, gs.d, gs.h, gs.w).offset;
  const acc_t wz[2] = {acc_t(1) - ci.fz, ci.fz}, wy[2] = {acc_t(1) - ci.fy, ci.fy},
              wx[2] = {acc_t(1) - ci.fx, ci.fx};
  acc_t tz = 0, ty = 0, tx = 0;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t go = acc_t(gout[c * gout_c]);
    if (need_disp) {
      acc_t v[2][2][2];
      load_corners(img + c * is.c + ci.offset, is.d, is.h, is.w, v);
      interpolate_grad(v, ci, go, &tz, &ty, &tx);
    }
    if (need_image) {
      const int64_t o = c * gs.c + og;
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          const acc_t wij = wz[i] * wy[j] * go;
          const int64_t oij = o + i * gs.d + j * gs.h;
          add(oij, wij * wx[0]);
          add(oij + gs.w, wij * wx[1]);
        }
    }
  }
  *gz = tz;
  *gy = ty;
  *gx = tx;
}

// ---- general path (any location, both paddings, both modes) ----------------------------

// Forward: sample every channel of one batch item's image at (z, y, x).
// img points at (b, 0, 0, 0, 0); out at (b, 0, voxel); channel c is at c * out_c.
template <typename scalar_t, typename acc_t>
DA_HD_INLINE void sample_voxel(const Geometry& g, const scalar_t* img, const Strides5& is,
                               acc_t z, acc_t y, acc_t x, scalar_t* out, int64_t out_c) {
  if (g.mode == Mode::Linear && strictly_interior(limits<acc_t>(g), z, y, x)) {
    sample_interior<0>(g, img, is, interior_cell(z, y, x, is.d, is.h, is.w), out, out_c);
    return;
  }
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

// Backward at one voxel, both gradients from one stencil:
//  - if need_disp, *gz/*gy/*gx receive the gradient with respect to the location (= disp);
//  - if need_image, gout(voxel) * weight is scattered to the corners through add(offset, v),
//    offsets in the grad-image layout gs (plain += on the CPU's conflict-free schedule,
//    atomicAdd on CUDA).
// img/is: the image (for need_disp); gout points at (b, 0, voxel), channel stride gout_c.
template <typename scalar_t, typename acc_t, typename Adder>
DA_HD_INLINE void backward_voxel(const Geometry& g, const scalar_t* img, const Strides5& is,
                                 const Strides5& gs, acc_t z, acc_t y, acc_t x,
                                 const scalar_t* gout, int64_t gout_c, bool need_image,
                                 bool need_disp, Adder& add, acc_t* gz, acc_t* gy, acc_t* gx) {
  if (g.mode == Mode::Linear && strictly_interior(limits<acc_t>(g), z, y, x)) {
    backward_interior<0>(g, img, is, gs, z, y, x, gout, gout_c, need_image, need_disp, add, gz,
                         gy, gx);
    return;
  }
  acc_t tz = 0, ty = 0, tx = 0;
  if (!finite3(z, y, x)) {
    *gz = *gy = *gx = (z + y + x) * acc_t(0);  // NaN, and nothing scattered
    return;
  }
  if (g.mode == Mode::Nearest) {  // piecewise constant: no location gradient (as grid_sample)
    *gz = *gy = *gx = acc_t(0);
    if (!need_image) return;
    const int64_t iz = nearest_index(z, g.in_d, g.padding);
    const int64_t iy = nearest_index(y, g.in_h, g.padding);
    const int64_t ix = nearest_index(x, g.in_w, g.padding);
    if (iz < 0 || iz >= g.in_d || iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) return;
    const int64_t off = iz * gs.d + iy * gs.h + ix * gs.w;
    for (int64_t c = 0; c < g.channels; ++c) add(c * gs.c + off, acc_t(gout[c * gout_c]));
    return;
  }
  const Stencil<acc_t> s = make_stencil(g, is.d, is.h, is.w, z, y, x);
  const Stencil<acc_t> sg = make_stencil(g, gs.d, gs.h, gs.w, z, y, x);
  const acc_t sign[2] = {acc_t(-1), acc_t(1)};  // d w_i / d coordinate
  for (int64_t c = 0; c < g.channels; ++c) {
    const acc_t go = acc_t(gout[c * gout_c]);
    const scalar_t* p = img + c * is.c;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k) {
          if (!corner_inside(s, i, j, k)) continue;
          if (need_disp) {
            const acc_t v = go * acc_t(p[s.oz[i] + s.oy[j] + s.ox[k]]);
            tz += v * sign[i] * s.wy[j] * s.wx[k];
            ty += v * s.wz[i] * sign[j] * s.wx[k];
            tx += v * s.wz[i] * s.wy[j] * sign[k];
          }
          if (need_image)
            add(c * gs.c + sg.oz[i] + sg.oy[j] + sg.ox[k], s.wz[i] * s.wy[j] * s.wx[k] * go);
        }
  }
  *gz = tz * s.z.dsrc;
  *gy = ty * s.y.dsrc;
  *gx = tx * s.x.dsrc;
}

// Adder for backward_voxel when only the location gradient is wanted.
template <typename acc_t>
struct NoAdd {
  DA_HD_INLINE void operator()(int64_t, acc_t) const {}
};

// Lowest image slice (along D) that backward_voxel scatters to for location z, or -2 if it writes
// none. Linear writes slices key and key + 1, nearest only key. The CPU backward groups
// voxels by this key so that groups of equal parity never write the same slice.
// Depends on z only, so the CPU reads one displacement channel to sort.
template <typename acc_t>
DA_HD_INLINE int64_t scatter_slab(const Geometry& g, acc_t z) {
  if (!is_finite(z)) return -2;
  if (g.mode == Mode::Nearest) {
    const int64_t iz = nearest_index(z, g.in_d, g.padding);
    return (iz >= 0 && iz < g.in_d) ? iz : -2;
  }
  const acc_t hi = static_cast<acc_t>(g.in_d - 1);
  z = g.padding == Padding::Border ? clamp_value(z, acc_t(0), hi)
                                   : clamp_value(z, acc_t(-2), hi + acc_t(2));
  const int64_t i0 = floor_index(z);  // as linear_axis
  return (i0 >= -1 && i0 < g.in_d) ? i0 : -2;
}

}  // namespace warp
}  // namespace deepatlas_fast
