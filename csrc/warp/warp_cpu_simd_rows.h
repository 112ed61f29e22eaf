// The SIMD rows of the float32 linear CPU warp (forward and backward): 8 voxels of a W row at
// a time, the corner pairs (x, x + 1) fetched with 64-bit loads (plain vector loads when the 8
// cells are one run along x). They perform the operations of warp_math.h in the same order and
// without FMA (the build passes -ffp-contract=off), so their results are bit-identical to the
// scalar path (the tests assert this). The voxels that are not strictly interior are computed
// in vector form too (border_lanes, Border); row tails go back to the scalar code through a
// callback.
//
// Included by warp_cpu_simd.h only, once per instruction set, inside namespace avx2 or
// avx512: DA_WARP_SIMD_ISA names the set (DA_WARP_ISA_AVX2 or DA_WARP_ISA_AVX512), DA_SIMD /
// DA_SIMD_INLINE give the functions its target attribute. The include guard below is one per
// instruction set. The AVX-512 copy differs in the scatter of full blocks (scatter_runs);
// each copy is called only after a runtime CPU check.
//
// Map, in file order:
// 1. Blocks of 8 voxels: locations8, interior_block (the strictly interior lanes and their
//    cells, Block), run_block (the 8 cells one run along x), offsets.
// 2. Corner loads and interpolation: pairs, corners (pair loads), run_corners (vector loads
//    for a run), lerp8.
// 3. Prefetching: AheadCell, ahead_cell and prefetch_cell (the image rows of the cells of the
//    row kAheadColumns columns later), fetch_next (RowArgs::read_ahead / write_ahead).
// 4. Voxels not strictly interior, in vector form: finite8, AxisV / axis8 (linear_axis),
//    Stencil8 / stencil8 / corner_offsets (make_stencil), lanes_not_in, border_lanes (their
//    forward), product4 and Border (their backward).
// 5. forward_row: the forward of one output row.
// 6. Scatter of the image gradient: kPairSlot, load_pair / store_pair, scatter_voxel (one
//    voxel), scatter_block (a block voxel by voxel, in registers where cells repeat).
// 7. AVX-512 only: run_starts, add_spans, scatter_runs (a block run by run, with masked adds;
//    empty stand-ins in the AVX2 copy).
// 8. backward_row: the backward of one output row (image gradient, disp gradient, or both;
//    the location-gradient variants).

#if !defined(DA_WARP_SIMD_ISA) || !defined(DA_SIMD) || !defined(DA_SIMD_INLINE)
#error "warp_cpu_simd_rows.h is included by warp_cpu_simd.h only, once per instruction set"
#endif

#if DA_WARP_SIMD_ISA == DA_WARP_ISA_AVX2 && !defined(DA_WARP_CPU_SIMD_ROWS_AVX2_H)
#define DA_WARP_CPU_SIMD_ROWS_AVX2_H
#define DA_WARP_CPU_SIMD_ROWS_BODY
#elif DA_WARP_SIMD_ISA == DA_WARP_ISA_AVX512 && !defined(DA_WARP_CPU_SIMD_ROWS_AVX512_H)
#define DA_WARP_CPU_SIMD_ROWS_AVX512_H
#define DA_WARP_CPU_SIMD_ROWS_BODY
#endif

#ifdef DA_WARP_CPU_SIMD_ROWS_BODY
#undef DA_WARP_CPU_SIMD_ROWS_BODY

// ---- 1. Blocks of 8 voxels ----------------------------------------------------------------------

// Locations of 8 voxels starting at w. Returns the bit mask of the strictly interior ones
// (as strictly_interior); the others get cell 0 so that the corner loads stay inside the
// volume, and the callers recompute them (border_lanes, Border).
struct Block {
  __m256 fz, fy, fx;
  __m256i iz, iy, ix;
};

// Sampling locations x + u(x) of voxels w..w+7 of the row (as Row::at).
DA_SIMD_INLINE void locations8(const RowArgs& r, int64_t w, __m256* z, __m256* y, __m256* x) {
  *z = _mm256_add_ps(_mm256_set1_ps(r.d), _mm256_loadu_ps(r.uz + w));
  *y = _mm256_add_ps(_mm256_set1_ps(r.h), _mm256_loadu_ps(r.uy + w));
  const __m256i wi = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  *x = _mm256_add_ps(_mm256_cvtepi32_ps(wi), _mm256_loadu_ps(r.ux + w));
}

DA_SIMD_INLINE int interior_block(const RowArgs& r, int64_t w, Block* k) {
  __m256 z, y, x;
  locations8(r, w, &z, &y, &x);
  const __m256 zero = _mm256_setzero_ps();
  // Ordered comparisons: NaN fails them, as in the scalar test.
  __m256 in = _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ),
                            _mm256_cmp_ps(z, _mm256_set1_ps(r.lim.d), _CMP_LT_OQ));
  in = _mm256_and_ps(in, _mm256_and_ps(_mm256_cmp_ps(y, zero, _CMP_GT_OQ),
                                       _mm256_cmp_ps(y, _mm256_set1_ps(r.lim.h), _CMP_LT_OQ)));
  in = _mm256_and_ps(in, _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ),
                                       _mm256_cmp_ps(x, _mm256_set1_ps(r.lim.w), _CMP_LT_OQ)));
  const int mask = _mm256_movemask_ps(in);
  if (mask == 0) {  // no interior voxel: k unused (set so that it is never read uninitialised)
    *k = Block();
    return 0;
  }
  // Positive values: truncation is floor (interior_cell).
  const __m256i keep = _mm256_castps_si256(in);
  k->iz = _mm256_and_si256(_mm256_cvttps_epi32(z), keep);
  k->iy = _mm256_and_si256(_mm256_cvttps_epi32(y), keep);
  k->ix = _mm256_and_si256(_mm256_cvttps_epi32(x), keep);
  k->fz = _mm256_sub_ps(z, _mm256_cvtepi32_ps(k->iz));
  k->fy = _mm256_sub_ps(y, _mm256_cvtepi32_ps(k->iy));
  k->fx = _mm256_sub_ps(x, _mm256_cvtepi32_ps(k->ix));
  return mask;
}

// True when the 8 (interior) cells are one run along x: same z and y cells, x cells x0..x0+7,
// the common case for smooth displacements. Their corners are then 4 image rows of 9
// consecutive values: plain vector loads replace the pair gathers, and the scatter becomes 4
// vector read-add-writes (same values, same additions in the same order: bit-identical).
DA_SIMD_INLINE bool run_block(const Block& k) {
  const __m256i first = _mm256_setzero_si256();  // permute index: broadcast lane 0
  const __m256i x0 = _mm256_permutevar8x32_epi32(k.ix, first);
  const __m256i run = _mm256_add_epi32(x0, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i eq = _mm256_and_si256(
      _mm256_and_si256(_mm256_cmpeq_epi32(k.iz, _mm256_permutevar8x32_epi32(k.iz, first)),
                       _mm256_cmpeq_epi32(k.iy, _mm256_permutevar8x32_epi32(k.iy, first))),
      _mm256_cmpeq_epi32(k.ix, run));
  return _mm256_movemask_ps(_mm256_castsi256_ps(eq)) == 0xFF;
}

DA_SIMD_INLINE __m256i offsets(const Block& k, int32_t sd, int32_t sh) {
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_mullo_epi32(k.iz, _mm256_set1_epi32(sd)),
                                           _mm256_mullo_epi32(k.iy, _mm256_set1_epi32(sh))),
                          k.ix);
}

// ---- 2. Corner loads and interpolation ----------------------------------------------------------

// Corner pairs (x, x + 1) of voxels a and b, as [a0 a1 b0 b1]: two 64-bit loads (cheaper than
// 64-bit gathers).
DA_SIMD_INLINE __m128 pairs(const float* p, int32_t a, int32_t b) {
  const __m128 lo = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p + a)));
  return _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(p + b));
}

// The 8 corners of 8 cells, v[i][j][k] as in load_corners; off: offsets of corner (0, 0, 0).
// Loading voxels (0 1 4 5) and (2 3 6 7) into the two vectors lets one shuffle of even/odd
// floats give voxels 0..7 in order.
DA_SIMD_INLINE void corners(const float* p, const int32_t* off, int32_t sd, int32_t sh,
                            __m256 (&v)[2][2][2]) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const float* q = p + i * sd + j * sh;
      const __m256 a = _mm256_set_m128(pairs(q, off[4], off[5]), pairs(q, off[0], off[1]));
      const __m256 b = _mm256_set_m128(pairs(q, off[6], off[7]), pairs(q, off[2], off[3]));
      v[i][j][0] = _mm256_shuffle_ps(a, b, 0x88);
      v[i][j][1] = _mm256_shuffle_ps(a, b, 0xDD);
    }
}

// corners() for a run block: off0 is the offset of voxel 0's corner (0, 0, 0).
DA_SIMD_INLINE void run_corners(const float* p, int32_t off0, int32_t sd, int32_t sh,
                                __m256 (&v)[2][2][2]) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const float* q = p + off0 + i * sd + j * sh;
      v[i][j][0] = _mm256_loadu_ps(q);
      v[i][j][1] = _mm256_loadu_ps(q + 1);
    }
}

DA_SIMD_INLINE __m256 lerp8(__m256 a, __m256 b, __m256 t) {
  return _mm256_add_ps(a, _mm256_mul_ps(t, _mm256_sub_ps(b, a)));
}

// ---- 3. Prefetching -----------------------------------------------------------------------------

// Cell (floors of the location) that voxel w of the row ahead (RowArgs::az) samples, if any
// and strictly interior. Each output row first reads the image rows its cells reach beyond
// those of the columns before; along a rough displacement field these rows change every few
// voxels, which the hardware prefetchers do not follow, and a prefetch a few voxels ahead in
// the same row comes too late: the rows prefetch this cell's image rows instead.
struct AheadCell {
  int32_t z, y, x;
};

// RowArgs::read_ahead / write_ahead at voxel w, a cache line per 16 voxels.
DA_SIMD_INLINE void fetch_next(const RowArgs& r, int64_t w) {
  if (w & 15) return;
  for (const float* p : r.read_ahead)
    if (p) _mm_prefetch(reinterpret_cast<const char*>(p + w), _MM_HINT_T0);
  for (float* p : r.write_ahead)
    if (p) __builtin_prefetch(p + w, 1, 3);
}

DA_SIMD_INLINE bool ahead_cell(const RowArgs& r, int64_t w, AheadCell* c) {
  if (!r.az) return false;
  const float z = r.ad + r.az[w], y = r.ah + r.ay[w], x = static_cast<float>(w) + r.ax[w];
  if (!strictly_interior(r.lim, z, y, x)) return false;
  *c = {static_cast<int32_t>(z), static_cast<int32_t>(y), static_cast<int32_t>(x)};
  return true;
}

// Prefetches the 4 rows of cell c in p (the image or its gradient; strides sd, sh).
DA_SIMD_INLINE void prefetch_cell(const float* p, int32_t sd, int32_t sh, const AheadCell& c) {
  const float* q = p + c.z * sd + c.y * sh + c.x;
  _mm_prefetch(reinterpret_cast<const char*>(q), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(q + sh), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(q + sd), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(q + sd + sh), _MM_HINT_T0);
}

// ---- 4. Voxels not strictly interior, in vector form --------------------------------------------

DA_SIMD_INLINE __m256 finite8(__m256 v) {  // v - v is 0 unless v is NaN or infinite
  return _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ);
}

// One axis of linear_axis (warp_math.h) for 8 finite coordinates: the same clamp, floor and
// weight; in0/in1: lanes whose corners i0/i0 + 1 are inside the volume.
struct AxisV {
  __m256i i0;
  __m256 w1, in0, in1;
  __m256 dsrc;  // linear_axis's d(clamped)/dx: 0 where "border" clamps, else 1
};

DA_SIMD_INLINE AxisV axis8(__m256 x, int32_t size, bool border) {
  // = linear_axis's clamps for finite x (max_ps(-0, +0) gives +0, as x <= 0 -> 0 does)
  const __m256 lo = _mm256_set1_ps(border ? 0.f : -2.f);
  const __m256 hi = _mm256_set1_ps(static_cast<float>(border ? size - 1 : size + 1));
  AxisV a;
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 unclamped = _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GT_OQ), _mm256_cmp_ps(x, hi, _CMP_LT_OQ));
  a.dsrc = border ? _mm256_and_ps(one, unclamped) : one;
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 f = _mm256_floor_ps(x);
  a.i0 = _mm256_cvttps_epi32(f);
  a.w1 = _mm256_sub_ps(x, f);
  const __m256i n = _mm256_set1_epi32(size), i1 = _mm256_add_epi32(a.i0, _mm256_set1_epi32(1));
  const __m256i minus1 = _mm256_set1_epi32(-1);
  a.in0 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(a.i0, minus1), _mm256_cmpgt_epi32(n, a.i0)));
  a.in1 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(i1, minus1), _mm256_cmpgt_epi32(n, i1)));
  return a;
}

// The trilinear stencils of voxels w..w+7 in sample_voxel's / backward_voxel's general linear
// form (make_stencil): per corner (i, j, k) the weight ((wz * wy) * wx) and the lanes where
// the corner is inside the volume and the location finite. Offsets: corner_offsets.
struct Stencil8 {
  __m256 z, y, x, fin;
  AxisV az, ay, ax;
  __m256 wz[2], wy[2], wx[2];
  __m256 wgt[2][2][2], valid[2][2][2];
};

DA_SIMD_INLINE Stencil8 stencil8(const RowArgs& r, int64_t w) {
  Stencil8 s;
  locations8(r, w, &s.z, &s.y, &s.x);
  s.fin = _mm256_and_ps(_mm256_and_ps(finite8(s.z), finite8(s.y)), finite8(s.x));
  s.az = axis8(s.z, r.size_d, r.border);
  s.ay = axis8(s.y, r.size_h, r.border);
  s.ax = axis8(s.x, r.size_w, r.border);
  const __m256 one = _mm256_set1_ps(1.f);
  s.wz[0] = _mm256_sub_ps(one, s.az.w1), s.wz[1] = s.az.w1;
  s.wy[0] = _mm256_sub_ps(one, s.ay.w1), s.wy[1] = s.ay.w1;
  s.wx[0] = _mm256_sub_ps(one, s.ax.w1), s.wx[1] = s.ax.w1;
  const __m256 inz[2] = {s.az.in0, s.az.in1}, iny[2] = {s.ay.in0, s.ay.in1}, inx[2] = {s.ax.in0, s.ax.in1};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) {
        s.wgt[i][j][k] = _mm256_mul_ps(_mm256_mul_ps(s.wz[i], s.wy[j]), s.wx[k]);
        s.valid[i][j][k] = _mm256_and_ps(_mm256_and_ps(_mm256_and_ps(inz[i], iny[j]), inx[k]), s.fin);
      }
  return s;
}

// Offsets of the corners (i, j, k) in an array with strides sd, sh (W stride 1).
DA_SIMD_INLINE void corner_offsets(const Stencil8& s, int32_t sd, int32_t sh, __m256i (&off)[2][2][2]) {
  const __m256i oz = _mm256_mullo_epi32(s.az.i0, _mm256_set1_epi32(sd));
  const __m256i oy = _mm256_mullo_epi32(s.ay.i0, _mm256_set1_epi32(sh));
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k)
        off[i][j][k] = _mm256_add_epi32(_mm256_add_epi32(oz, _mm256_set1_epi32(i * sd)),
                                        _mm256_add_epi32(_mm256_add_epi32(oy, _mm256_set1_epi32(j * sh)),
                                                         _mm256_add_epi32(s.ax.i0, _mm256_set1_epi32(k))));
}

DA_SIMD_INLINE __m256i lanes_not_in(int mask) {  // all-ones in the lanes whose bit is clear
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(~mask), lane_bits), lane_bits);
}

// The lanes of the block at w that are not strictly interior (bits clear in mask), every
// channel, written with a masked store: sample_voxel's general linear path, in its order
// (corners inside the volume summed as ((wz * wy) * wx) * v in (i, j, k) order; the others
// add +0, which leaves the sum unchanged: it starts at +0 and never becomes -0), corners
// fetched with masked gathers; non-finite locations give (z + y + x) * 0. Bit-identical to
// the scalar code it replaces: such voxels are few, but slow on the scalar path.
DA_SIMD_INLINE void border_lanes(const RowArgs& r, int64_t w, int mask, float* out, int64_t out_c, int64_t channels) {
  const Stencil8 s = stencil8(r, w);
  const __m256 zero = _mm256_setzero_ps();
  __m256i off[2][2][2];
  corner_offsets(s, r.isd, r.ish, off);
  const __m256 nan = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(s.z, s.y), s.x), zero);
  const float* p = r.img;
  for (int64_t c = 0; c < channels; ++c, p += r.isc) {
    __m256 acc = zero;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k) {
          const __m256 v = _mm256_mask_i32gather_ps(zero, p, off[i][j][k], s.valid[i][j][k], 4);
          acc = _mm256_add_ps(acc, _mm256_mul_ps(s.wgt[i][j][k], v));
        }
    _mm256_maskstore_ps(out + c * out_c + w, lanes_not_in(mask), _mm256_blendv_ps(nan, acc, s.fin));
  }
}

// ((a * b) * c) * d in the lanes of `valid`, +0 in the others.
DA_SIMD_INLINE __m256 product4(__m256 a, __m256 b, __m256 c, __m256 d, __m256 valid) {
  return _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(a, b), c), d), valid);
}

// backward_voxel's general linear path for the lanes of a block that are not strictly interior,
// channel by channel: the stencil once (init), then per channel (add) the disp
// gradient terms and the scatter weights, in the scalar code's order: per inside corner,
// tz += ((v * sign_i) * wy) * wx etc. with v = g * image value (an outside corner adds +0, as
// in border_lanes), the weight ((wz * wy) * wx) * g; finally (finish) times dsrc, and
// (z + y + x) * 0 at non-finite locations, which scatter nothing. The caller adds the scatter
// in voxel order: corner c = 4 i + 2 j + k of lane l adds wgt[c][l] at off[c][l] if bit l of
// valid[c] is set.
struct Border {
  Stencil8 s;
  __m256i img_off[2][2][2];
  alignas(32) int32_t off[8][8];  // in the image gradient
  alignas(32) float wgt[8][8];    // of the channel last added
  int valid[8];
  __m256 az, ay, ax;              // disp gradient sums over the channels so far

  DA_SIMD_INLINE void init(const RowArgs& r, int64_t w, int32_t gsd, int32_t gsh) {
    s = stencil8(r, w);
    corner_offsets(s, r.isd, r.ish, img_off);
    __m256i goff[2][2][2];
    corner_offsets(s, gsd, gsh, goff);
    for (int c = 0; c < 8; ++c) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(off[c]), goff[c >> 2][c >> 1 & 1][c & 1]);
      valid[c] = _mm256_movemask_ps(s.valid[c >> 2][c >> 1 & 1][c & 1]);
    }
    az = ay = ax = _mm256_setzero_ps();
  }

  // Channel image p, gradient g; the disp terms if need_disp, the weights if need_image.
  DA_SIMD_INLINE void add(const float* p, __m256 g, bool need_disp, bool need_image) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 sign[2] = {_mm256_set1_ps(-1.f), _mm256_set1_ps(1.f)};
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k) {
          const __m256 in = s.valid[i][j][k];
          if (need_disp) {
            const __m256 v = _mm256_mul_ps(g, _mm256_mask_i32gather_ps(zero, p, img_off[i][j][k], in, 4));
            az = _mm256_add_ps(az, product4(v, sign[i], s.wy[j], s.wx[k], in));
            ay = _mm256_add_ps(ay, product4(v, s.wz[i], sign[j], s.wx[k], in));
            ax = _mm256_add_ps(ax, product4(v, s.wz[i], s.wy[j], sign[k], in));
          }
          if (need_image) _mm256_store_ps(wgt[4 * i + 2 * j + k], _mm256_mul_ps(s.wgt[i][j][k], g));
        }
  }

  DA_SIMD_INLINE void finish(__m256* tz, __m256* ty, __m256* tx) const {
    const __m256 nan = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(s.z, s.y), s.x), _mm256_setzero_ps());
    *tz = _mm256_blendv_ps(nan, _mm256_mul_ps(az, s.az.dsrc), s.fin);
    *ty = _mm256_blendv_ps(nan, _mm256_mul_ps(ay, s.ay.dsrc), s.fin);
    *tx = _mm256_blendv_ps(nan, _mm256_mul_ps(ax, s.ax.dsrc), s.fin);
  }

  // Lane l's scatter of the channel last added into q (that channel of the image gradient).
  DA_SIMD_INLINE void scatter(float* q, int l) const {
    for (int c = 0; c < 8; ++c)
      if (valid[c] >> l & 1) q[off[c][l]] += wgt[c][l];
  }
};

// ---- 5. Forward of a row ------------------------------------------------------------------------

// Forward of one output row: out[c * out_c + w] for w in [0, width). fallback(w) computes one
// voxel with the scalar code (row tails). kWhat: kOneChannel or 0 (see RowOutputs).
template <int kWhat, typename Fallback>
DA_SIMD void forward_row(const RowArgs& r, float* out, int64_t out_c, const Fallback& fallback) {
  const int64_t channels = (kWhat & kOneChannel) ? 1 : r.channels;
  int64_t w = 0;
  for (; w + 8 <= r.width; w += 8) {
    fetch_next(r, w);
    AheadCell ahead;
    if (ahead_cell(r, w, &ahead)) prefetch_cell(r.img, r.isd, r.ish, ahead);
    Block k;
    const int mask = interior_block(r, w, &k);
    if (mask == 0) {
      border_lanes(r, w, mask, out, out_c, channels);
      continue;
    }
    alignas(32) int32_t o[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(o), offsets(k, r.isd, r.ish));
    const bool run = mask == 0xFF && run_block(k);
    const float* p = r.img;
    for (int64_t c = 0; c < channels; ++c, p += r.isc) {
      __m256 v[2][2][2];
      if (run)
        run_corners(p, o[0], r.isd, r.ish, v);
      else
        corners(p, o, r.isd, r.ish, v);
      const __m256 c0 = lerp8(lerp8(v[0][0][0], v[0][0][1], k.fx), lerp8(v[0][1][0], v[0][1][1], k.fx), k.fy);
      const __m256 c1 = lerp8(lerp8(v[1][0][0], v[1][0][1], k.fx), lerp8(v[1][1][0], v[1][1][1], k.fx), k.fy);
      _mm256_storeu_ps(out + c * out_c + w, lerp8(c0, c1, k.fz));
    }
    if (mask != 0xFF) border_lanes(r, w, mask, out, out_c, channels);  // overwrite the other lanes
  }
  for (; w < r.width; ++w) fallback(w);
}

// ---- 6. Scatter of the image gradient -----------------------------------------------------------

// Scatter of the image gradient. Weights of a block: voxel l's (x, x + 1) weight pair for
// image row (i, j) at pw[2 * i + j][2 * kPairSlot[l]] (the slots unpacklo/unpackhi of the x
// and x + 1 weights leave them in).
constexpr int kPairSlot[8] = {0, 1, 4, 5, 2, 3, 6, 7};

DA_SIMD_INLINE __m128 load_pair(const float* p) {
  return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
}

DA_SIMD_INLINE void store_pair(float* p, __m128 v) {
  _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(v));
}

// The 8 corners of voxel l, at s (its corner (0, 0, 0)): a 64-bit read-add-write per pair
// (its two lanes are the scalar code's two additions).
DA_SIMD_INLINE void scatter_voxel(float* s, int l, const float (&pw)[4][16], int32_t gsd, int32_t gsh) {
  const int32_t rows[4] = {0, gsh, gsd, gsd + gsh};
  for (int r = 0; r < 4; ++r)
    store_pair(s + rows[r], _mm_add_ps(load_pair(s + rows[r]), load_pair(&pw[r][2 * kPairSlot[l]])));
}

// The 8 voxels of a block in W order at q (og: offsets of their corner (0, 0, 0)). When voxel
// l's cell is voxel l - 1's, or follows it along x, the pair just written is taken from a
// register rather than reloaded (a load overlapping half of the previous store would wait for
// it to commit). Same additions in the same order per value: bit-identical to scatter_voxel.
DA_SIMD_INLINE void scatter_block(float* q, const int32_t* og, const float (&pw)[4][16], int32_t gsd, int32_t gsh) {
  float* const row[4] = {q, q + gsh, q + gsd, q + gsd + gsh};
  __m128 acc[4] = {};  // read only after a first write (prev starts at no offset); zeroed for the compiler
  int32_t prev = -2;
  for (int l = 0; l < 8; ++l) {
    const int32_t o = og[l];
    const int slot = 2 * kPairSlot[l];
    if (o == prev) {
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm_add_ps(acc[r], load_pair(&pw[r][slot]));
        store_pair(row[r] + o, acc[r]);
      }
    } else if (o == prev + 1) {  // (the previous x + 1 value, memory at x + 1)
      for (int r = 0; r < 4; ++r) {
        float* t = row[r] + o;
        const __m128 cur = _mm_insert_ps(_mm_movehdup_ps(acc[r]), _mm_load_ss(t + 1), 0x10);
        acc[r] = _mm_add_ps(cur, load_pair(&pw[r][slot]));
        store_pair(t, acc[r]);
      }
    } else {
      for (int r = 0; r < 4; ++r) {
        float* t = row[r] + o;
        acc[r] = _mm_add_ps(load_pair(t), load_pair(&pw[r][slot]));
        store_pair(t, acc[r]);
      }
    }
    prev = o;
  }
}

// ---- 7. AVX-512 only: the scatter of a block by runs --------------------------------------------

#if DA_WARP_SIMD_ISA == DA_WARP_ISA_AVX512
constexpr bool kScatterRuns = true;

// Lanes of a block that start a run: voxel l continues voxel l - 1's run when its corner
// (0, 0, 0) is the next value in memory (same cell row, x + 1).
DA_SIMD_INLINE unsigned run_starts(__m256i og) {
  const __m256i prev = _mm256_permutevar8x32_epi32(og, _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6));
  const __m256i cont = _mm256_cmpeq_epi32(og, _mm256_add_epi32(prev, _mm256_set1_epi32(1)));
  return ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(cont))) & 0xFFu;  // lane 0 always
}

// At base + rows[r] for each image row r: lanes of m1 add a[r], then lanes of m0 add b[r]
// (merge-masked, between one load and one store). The load and store are masked to the lanes
// of either unless `whole`: the 8 floats then lie inside one row of the image gradient, and
// the other lanes are written back as just read. (Safe: the backward rows run under the slab
// schedule, where the chunk writing this row owns its whole slice for the phase. Masked
// stores are slow: a whole store wherever one is safe.)
DA_SIMD_INLINE void add_spans(float* base, const int32_t (&rows)[4], unsigned m1, unsigned m0,
                              const __m256 (&a)[4], const __m256 (&b)[4], bool whole) {
  const __mmask8 k1 = static_cast<__mmask8>(m1), k0 = static_cast<__mmask8>(m0),
                 k = static_cast<__mmask8>(m1 | m0);
  for (int r = 0; r < 4; ++r) {
    float* t = base + rows[r];
    __m256 v = whole ? _mm256_loadu_ps(t) : _mm256_maskz_loadu_ps(k, t);
    v = _mm256_mask_add_ps(v, k1, v, a[r]);
    v = _mm256_mask_add_ps(v, k0, v, b[r]);
    if (whole)
      _mm256_storeu_ps(t, v);
    else
      _mm256_mask_storeu_ps(t, k, v);
  }
}

// Scatter of a block with 8 interior voxels that is not one run (run blocks take the
// backward's run path), run by run (runs: see run_starts; at least 2 here). Run s..e covers
// positions og[s] .. og[e] + 1 of each of the 4 image rows: run 0 as lanes 0..e + 1 of an
// 8-float vector at og[0] (e + 1 <= 7 as a second run follows), every later run (s >= 1) as
// lanes s - 1..e of one at og[s] - s + 1, which always fits. A position receives voxel l - 1's
// x + 1 weight (w1), then voxel l's x weight (w0), the scalar order, by two merge-masked adds
// between one load and one store. Runs go in lane order, so a position two runs share also
// receives its weights in voxel order: bit-identical to scatter_voxel, with 4 vector
// read-add-writes per run in place of 4 pair read-add-writes and a 3-way branch per voxel
// (scatter_block). 8-float vectors, not 16: a 64-byte access at an arbitrary offset always
// spans two cache lines. One form for all later runs (not the first form for all runs but the
// last, which ends at lane 8) saves a branch per run.
// ox: the lanes' x cells; width: the image's W.
DA_SIMD_INLINE void scatter_runs(float* q, const int32_t* og, const int32_t* ox, int32_t width, unsigned starts,
                                 const __m256 (&w0)[4], const __m256 (&w1)[4], int32_t gsd, int32_t gsh) {
  const __m256i up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);    // lane l takes lane l - 1
  const __m256i down = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7);  // lane l takes lane l + 1
  __m256 w1u[4], w0d[4];
  for (int r = 0; r < 4; ++r) {
    w1u[r] = _mm256_permutevar8x32_ps(w1[r], up);
    w0d[r] = _mm256_permutevar8x32_ps(w0[r], down);
  }
  const int32_t rows[4] = {0, gsh, gsd, gsd + gsh};
  // Starts of runs 1, 2, ...: run 1 exists, as 8 lanes of one run are a run block (og
  // continuing across image rows would need x cell W - 1, which is not interior).
  unsigned rest = starts & (starts - 1);
  int s = __builtin_ctz(rest);
  rest &= rest - 1;
  const unsigned first = (1u << s) - 1;  // run 0: lanes 0..s - 1
  add_spans(q + og[0], rows, first << 1, first, w1u, w0, ox[0] + 8 <= width);
  do {
    const int end = __builtin_ctz(rest | 0x100u);  // one past the run's last voxel (8: the last run)
    rest &= rest - 1;
    const unsigned lanes = ((1u << end) - 1) & ~((1u << s) - 1);
    const int32_t x = ox[s] - s + 1;  // of the 8-float window's first lane
    add_spans(q + og[s] - s + 1, rows, lanes, lanes >> 1, w1, w0d, x >= 0 && x + 8 <= width);
    s = end;
  } while (s < 8);
}
#else  // AVX2: full blocks go by scatter_block, or as one run (backward_row)
constexpr bool kScatterRuns = false;
DA_SIMD_INLINE unsigned run_starts(__m256i) { return 0; }
DA_SIMD_INLINE void scatter_runs(float*, const int32_t*, const int32_t*, int32_t, unsigned, const __m256 (&)[4],
                                 const __m256 (&)[4], int32_t, int32_t) {}
#endif

// ---- 8. Backward of a row -----------------------------------------------------------------------

// Backward of one output row (see backward_interior). go: grad_out row, channel stride go_c,
// W stride go_w (0 or 1). kWhat (RowOutputs) says what it computes; the pointers of the rest
// are unused. kImageGrad: the image gradient gi of this batch item, contiguous [C, D, H, W]
// with strides gsd, gsh, gsc, scattered voxel after voxel in W order, each voxel's 8 corners
// in the scalar order. kDispGrad: the disp gradient row gd, channel stride gd_c. kOutput (one
// channel, with kDispGrad): the forward's output row out too, from the same corners, with
// forward_row's operations (warp_with_loc_grad: gd is then the location gradient, go = 1).
// kScaleLocGrad (one channel; warp_backward_with_loc_grad): gd holds that location gradient
// and is multiplied by go in place. (Compile-time, so that each caller's loop carries only its
// own code.)
template <int kWhat, typename Fallback>
DA_SIMD void backward_row(const RowArgs& r, const float* go, int64_t go_c, int64_t go_w, float* gi,
                          int32_t gsd, int32_t gsh, int64_t gsc, float* gd, int64_t gd_c, float* out,
                          const Fallback& fallback) {
  constexpr bool kI = kWhat & kImageGrad, kD = kWhat & kDispGrad, kS = kWhat & kScaleLocGrad,
                 kO = kWhat & kOutput;
  const int64_t channels = (kWhat & kOneChannel) ? 1 : r.channels;
  alignas(32) float pw[4][16];  // scatter weights, see scatter_block
  alignas(32) int32_t og[8];    // grad-image offsets of corner (0, 0, 0)
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t w = 0;
  for (; w + 8 <= r.width; w += 8) {
    fetch_next(r, w);
    AheadCell ahead;
    if (ahead_cell(r, w, &ahead)) {  // the location once, its rows in each array read
      if constexpr (kI) prefetch_cell(gi, gsd, gsh, ahead);
      if constexpr (kD) prefetch_cell(r.img, r.isd, r.ish, ahead);
    }
    Block k;
    const int mask = interior_block(r, w, &k);
    const bool partial = mask != 0xFF;
    alignas(32) int32_t o[8];
    __m256i ogv = _mm256_setzero_si256();
    __m256 wz[2] = {}, wy[2] = {}, wx[2] = {};
    if (mask != 0) {
      if constexpr (kD) _mm256_store_si256(reinterpret_cast<__m256i*>(o), offsets(k, r.isd, r.ish));
      if constexpr (kI) {
        ogv = offsets(k, gsd, gsh);
        _mm256_store_si256(reinterpret_cast<__m256i*>(og), ogv);
        wz[0] = _mm256_sub_ps(one, k.fz), wz[1] = k.fz;
        wy[0] = _mm256_sub_ps(one, k.fy), wy[1] = k.fy;
        wx[0] = _mm256_sub_ps(one, k.fx), wx[1] = k.fx;
      }
    }
    const bool run = !partial && run_block(k);
    // The non-interior voxels (partial blocks): in vector form, their scatter added per
    // channel in voxel order between the interior voxels' (the scalar order within a channel).
    Border border;
    if (partial) border.init(r, w, gsd, gsh);
    __m256 tz = _mm256_setzero_ps(), ty = tz, tx = tz;
    const float* p = r.img;
    for (int64_t c = 0; c < channels; ++c, p += r.isc) {
      const float* gc = go + c * go_c + w * go_w;
      const __m256 g = go_w ? _mm256_loadu_ps(gc) : _mm256_set1_ps(*gc);
      if constexpr (kS) {
        tz = _mm256_mul_ps(_mm256_loadu_ps(gd + w), g);
        ty = _mm256_mul_ps(_mm256_loadu_ps(gd + gd_c + w), g);
        tx = _mm256_mul_ps(_mm256_loadu_ps(gd + 2 * gd_c + w), g);
      }
      if (kD && mask != 0) {
        __m256 v[2][2][2];
        if (run)
          run_corners(p, o[0], r.isd, r.ish, v);
        else
          corners(p, o, r.isd, r.ish, v);
        const __m256 a00 = lerp8(v[0][0][0], v[0][0][1], k.fx), a01 = lerp8(v[0][1][0], v[0][1][1], k.fx);
        const __m256 a10 = lerp8(v[1][0][0], v[1][0][1], k.fx), a11 = lerp8(v[1][1][0], v[1][1][1], k.fx);
        tz = _mm256_add_ps(tz, _mm256_mul_ps(g, _mm256_sub_ps(lerp8(a10, a11, k.fy), lerp8(a00, a01, k.fy))));
        ty = _mm256_add_ps(ty, _mm256_mul_ps(g, lerp8(_mm256_sub_ps(a01, a00), _mm256_sub_ps(a11, a10), k.fz)));
        const __m256 e0 = lerp8(_mm256_sub_ps(v[0][0][1], v[0][0][0]), _mm256_sub_ps(v[0][1][1], v[0][1][0]), k.fy);
        const __m256 e1 = lerp8(_mm256_sub_ps(v[1][0][1], v[1][0][0]), _mm256_sub_ps(v[1][1][1], v[1][1][0]), k.fy);
        tx = _mm256_add_ps(tx, _mm256_mul_ps(g, lerp8(e0, e1, k.fz)));
        if constexpr (kO) _mm256_storeu_ps(out + w, lerp8(lerp8(a00, a01, k.fy), lerp8(a10, a11, k.fy), k.fz));
      }
      if (partial) border.add(p, g, kD, kI);
      if constexpr (!kI) continue;
      float* q = gi + c * gsc;
      if (mask != 0) {
        __m256 w0[4], w1[4];  // image row (i, j) at 2 * i + j: x and x + 1 weights times g
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const __m256 wij = _mm256_mul_ps(_mm256_mul_ps(wz[i], wy[j]), g);
            w0[2 * i + j] = _mm256_mul_ps(wij, wx[0]);
            w1[2 * i + j] = _mm256_mul_ps(wij, wx[1]);
          }
        if (kScatterRuns && !partial && !run) {
          alignas(32) int32_t ox[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(ox), k.ix);
          scatter_runs(q, og, ox, r.size_w, run_starts(ogv), w0, w1, gsd, gsh);
        } else if (run) {
          // Position x0 + l of image row (i, j) receives, in the scalar order, voxel l - 1's
          // x + 1 weight, then voxel l's x weight; x0 + 8 only voxel 7's x + 1 weight.
          // (s + 0 == s: the sums start at +0 and never become -0.)
          const __m256i up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
          for (int r = 0; r < 4; ++r) {
            const __m256 prev = _mm256_blend_ps(_mm256_permutevar8x32_ps(w1[r], up), _mm256_setzero_ps(), 1);
            float* s = q + og[0] + (r >> 1) * gsd + (r & 1) * gsh;
            _mm256_storeu_ps(s, _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(s), prev), w0[r]));
            s[8] += _mm256_cvtss_f32(_mm256_permutevar8x32_ps(w1[r], _mm256_set1_epi32(7)));
          }
        } else {
          for (int r = 0; r < 4; ++r) {
            _mm256_store_ps(pw[r], _mm256_unpacklo_ps(w0[r], w1[r]));
            _mm256_store_ps(pw[r] + 8, _mm256_unpackhi_ps(w0[r], w1[r]));
          }
          if (!partial) scatter_block(q, og, pw, gsd, gsh);
        }
      }
      if (partial)  // this channel, in voxel order
        for (int l = 0; l < 8; ++l) {
          if (mask >> l & 1)
            scatter_voxel(q + og[l], l, pw, gsd, gsh);
          else
            border.scatter(q, l);
        }
    }
    if (kO && partial) border_lanes(r, w, mask, out, 0, 1);  // (as forward_row)
    if (kD && partial) {
      __m256 bz, by, bx;
      border.finish(&bz, &by, &bx);
      const __m256 other = _mm256_castsi256_ps(lanes_not_in(mask));
      tz = _mm256_blendv_ps(tz, bz, other);
      ty = _mm256_blendv_ps(ty, by, other);
      tx = _mm256_blendv_ps(tx, bx, other);
    }
    if constexpr (kD || kS) {
      _mm256_storeu_ps(gd + w, tz);
      _mm256_storeu_ps(gd + gd_c + w, ty);
      _mm256_storeu_ps(gd + 2 * gd_c + w, tx);
    }
  }
  for (; w < r.width; ++w) fallback(w);
}

#endif  // DA_WARP_CPU_SIMD_ROWS_BODY
