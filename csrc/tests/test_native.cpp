// Native C++ tests (ctest): the shared host/device math on its own, and the ops through the
// dispatcher of the LibTorch library, against naive references. No test framework: each failed
// EXPECT prints what failed; the exit code is 1 if any failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "common/parallel.h"
#include "soft_dice/soft_dice_cpu_avx2.h"
#include "soft_dice/soft_dice_math.h"
#include "warp/warp_math.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                          \
    }                                                                      \
  } while (0)

using namespace deepatlas_fast;

void test_rounding_helpers() {
  EXPECT(floor_index(2.7) == 2 && floor_index(-0.5) == -1 && floor_index(-2.0) == -2);
  EXPECT(round_half_even(0.5) == 0 && round_half_even(1.5) == 2 && round_half_even(2.5) == 2);
  EXPECT(round_half_even(-0.5) == 0 && round_half_even(-1.5) == -2 && round_half_even(1.49) == 1);
  for (double x = -3.0; x <= 3.0; x += 0.125)
    EXPECT(round_half_even(x) == static_cast<int64_t>(std::nearbyint(x)));
  EXPECT(is_finite(1.0) && !is_finite(NAN) && !is_finite(INFINITY) && !is_finite(-INFINITY));
}

void test_linear_axis() {
  using warp::Padding;
  auto a = warp::linear_axis(2.25, 5, Padding::Zeros);
  EXPECT(a.i0 == 2 && std::abs(a.w1 - 0.25) < 1e-15 && a.in0 && a.in1 && a.dsrc == 1.0);
  a = warp::linear_axis(-0.5, 5, Padding::Zeros);  // half outside: lower corner out
  EXPECT(a.i0 == -1 && !a.in0 && a.in1);
  a = warp::linear_axis(1e30, 5, Padding::Zeros);  // far outside: defined and all out
  EXPECT(!a.in0 && !a.in1);
  a = warp::linear_axis(7.0, 5, Padding::Border);  // clipped to the edge, no gradient
  EXPECT(a.i0 == 4 && a.w1 == 0.0 && a.dsrc == 0.0);
}

void test_interpolation_is_exact_for_affine_functions() {
  // Trilinear interpolation reproduces any function linear in each axis.
  auto f = [](double z, double y, double x) { return 1.0 + 2.0 * z - 3.0 * y + 0.5 * x + z * y * x; };
  double v[2][2][2];
  const double z0 = 3, y0 = 1, x0 = 4;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) v[i][j][k] = f(z0 + i, y0 + j, x0 + k);
  const warp::Cell<double> c{0, 0.3, 0.6, 0.9};
  EXPECT(std::abs(warp::interpolate(v, c) - f(z0 + 0.3, y0 + 0.6, x0 + 0.9)) < 1e-12);
  double gz = 0, gy = 0, gx = 0;
  warp::interpolate_grad(v, c, 1.0, &gz, &gy, &gx);
  const double h = 1e-6;
  const warp::Cell<double> cz{0, 0.3 + h, 0.6, 0.9}, cy{0, 0.3, 0.6 + h, 0.9}, cx{0, 0.3, 0.6, 0.9 + h};
  EXPECT(std::abs(gz - (warp::interpolate(v, cz) - warp::interpolate(v, c)) / h) < 1e-5);
  EXPECT(std::abs(gy - (warp::interpolate(v, cy) - warp::interpolate(v, c)) / h) < 1e-5);
  EXPECT(std::abs(gx - (warp::interpolate(v, cx) - warp::interpolate(v, c)) / h) < 1e-5);
}

// Naive trilinear sampling with zero padding, straight from the definition.
double naive_sample(const at::Tensor& img, double z, double y, double x) {
  const auto a = img.accessor<double, 3>();
  double acc = 0;
  const int64_t z0 = std::floor(z), y0 = std::floor(y), x0 = std::floor(x);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 2; ++k) {
        const int64_t zi = z0 + i, yj = y0 + j, xk = x0 + k;
        if (zi < 0 || yj < 0 || xk < 0 || zi >= img.size(0) || yj >= img.size(1) || xk >= img.size(2)) continue;
        acc += (i ? z - z0 : 1 - (z - z0)) * (j ? y - y0 : 1 - (y - y0)) * (k ? x - x0 : 1 - (x - x0)) * a[zi][yj][xk];
      }
  return acc;
}

void test_warp_op_through_dispatcher() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("deepatlas_fast::warp", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view)>();
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor image = at::randn({1, 1, 5, 6, 7}, opts);
  at::Tensor disp = at::randn({1, 3, 4, 5, 6}, opts) * 2;
  at::Tensor out = op.call(image, disp, "linear", "zeros");
  EXPECT(out.sizes() == at::IntArrayRef({1, 1, 4, 5, 6}));
  const auto u = disp.accessor<double, 5>();
  const auto o = out.accessor<double, 5>();
  double worst = 0;
  for (int d = 0; d < 4; ++d)
    for (int h = 0; h < 5; ++h)
      for (int w = 0; w < 6; ++w) {
        const double ref = naive_sample(image[0][0], d + u[0][0][d][h][w], h + u[0][1][d][h][w], w + u[0][2][d][h][w]);
        worst = std::max(worst, std::abs(ref - o[0][0][d][h][w]));
      }
  EXPECT(worst < 1e-12);
  bool threw = false;
  try {
    op.call(image, disp.narrow(1, 0, 2), "linear", "zeros");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("disp must be [B, 3") != std::string::npos;
  }
  EXPECT(threw);
}

// The softmax exp of the soft Dice: scalar polynomial against the math library, and the
// AVX2 kernel's 8-lane version against the scalar one (the same polynomial, with FMA).
void test_softmax_exp() {
  double worst = 0;
  for (float x = -87.f; x <= 0.f; x += 0.01f) {
    const double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(soft_dice::exp_value<float>(x) - ref) / ref);
  }
  EXPECT(worst < 3e-7);
  EXPECT(soft_dice::exp_value<float>(-100.f) == 0.f && soft_dice::exp_value<float>(0.f) == 1.f);
  // beyond the range reduction (|x| >= 2^22 ln 2) too: 0, not NaN; NaN stays NaN
  for (float x : {-3e6f, -3e13f, -1e30f, -3e38f, -INFINITY}) EXPECT(soft_dice::exp_value<float>(x) == 0.f);
  EXPECT(std::isnan(soft_dice::exp_value<float>(NAN)) && std::isnan(soft_dice::exp_value<float>(-NAN)));
#ifdef DA_DICE_AVX2
  if (soft_dice::avx2::cpu_supported()) {
    alignas(32) float in[8], out[8];
    double lane_worst = 0;
    for (float x0 = -100.f; x0 <= 0.f; x0 += 0.08f) {
      for (int l = 0; l < 8; ++l) in[l] = x0 + 0.01f * l;
      soft_dice::avx2::exp8_store(in, out);
      for (int l = 0; l < 8; ++l) {
        const double s = soft_dice::exp_value<float>(in[l]);
        lane_worst = std::max(lane_worst, s == 0 ? std::abs(out[l]) : std::abs(out[l] - s) / s);
      }
    }
    EXPECT(lane_worst < 1e-6);
    const float extremes[8] = {-3e6f, -3e13f, -1e30f, -3e38f, -INFINITY, -88.f, -100.f, 0.f};
    soft_dice::avx2::exp8_store(extremes, out);
    for (int l = 0; l < 8; ++l) EXPECT(out[l] == soft_dice::exp_value<float>(extremes[l]));
    const float nans[8] = {NAN, -NAN, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    soft_dice::avx2::exp8_store(nans, out);
    EXPECT(std::isnan(out[0]) && std::isnan(out[1]));
  }
#endif
}

}  // namespace

// parallel_pieces hands out every index exactly once, in pieces of at most `grain`
// consecutive indices (the whole range at once on one thread), whatever the thread count; a
// slow piece makes the others steal.
void test_parallel_pieces() {
  const int threads = at::get_num_threads();
  for (int t : {1, 2, 3, 4})
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(100), int64_t(1001)})
      for (int64_t grain : {int64_t(1), int64_t(3), int64_t(64), int64_t(5000)}) {
        at::set_num_threads(t);
        std::vector<std::atomic<int>> seen(n);
        for (auto& s : seen) s = 0;
        std::atomic<bool> bad_piece{false};
        deepatlas_fast::parallel_pieces(n, grain, [&](int64_t b, int64_t e) {
          const bool whole = t == 1 && b == 0 && e == n;  // one thread: one call
          if (!(0 <= b && b < e && e <= n && (e - b <= grain || whole))) bad_piece = true;
          if (b == 0) {  // the first piece is slow: the rest of its part goes to other threads
            volatile double x = 0;
            for (int i = 0; i < 200000; ++i) x = x + 1;
          }
          for (int64_t i = b; i < e; ++i) ++seen[i];
        });
        EXPECT(!bad_piece);
        EXPECT(std::all_of(seen.begin(), seen.end(), [](const std::atomic<int>& s) { return s == 1; }));
      }
  at::set_num_threads(threads);
}

int main() {
  test_rounding_helpers();
  test_linear_axis();
  test_interpolation_is_exact_for_affine_functions();
  test_warp_op_through_dispatcher();
  test_softmax_exp();
  test_parallel_pieces();
  std::printf("native tests: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
