// Native test (ctest) of the CUDA kernel sources run under the CUDA emulator: the emulated ops
// (deepatlas_fast_emulated::*, csrc/emulator) against the CPU ops, both called through the
// dispatcher, in float64, with launch configurations whose grids are smaller than the work
// (grid-stride loops) and blocks of odd sizes. The Python tests compare them with the float64
// references in more cases; this one keeps the CMake build's emulator library exercised.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

#define EXPECT(cond)                                                                  \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Mask = std::array<bool, 2>;
constexpr std::array<std::array<int64_t, 2>, 3> kLaunches = {{{32, 3}, {7, 5}, {64, 1}}};
const auto kDouble = at::TensorOptions().dtype(at::kDouble);

void test_warp() {
  using sv = c10::string_view;
  auto cpu = op<at::Tensor(const at::Tensor&, const at::Tensor&, sv, sv)>("deepatlas_fast::warp");
  auto cpu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, sv, sv, Mask)>(
      "deepatlas_fast::warp_backward");
  auto emu = op<at::Tensor(const at::Tensor&, const at::Tensor&, sv, sv, int64_t, int64_t)>(
      "deepatlas_fast_emulated::warp");
  auto emu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, sv, sv, Mask, int64_t, int64_t)>(
      "deepatlas_fast_emulated::warp_backward");
  const at::Tensor image = at::randn({2, 2, 5, 6, 7}, kDouble);
  const at::Tensor disp = at::randn({2, 3, 4, 5, 6}, kDouble) * 2;  // reaches outside on every side
  const at::Tensor g = at::randn({2, 2, 4, 5, 6}, kDouble);
  for (const char* mode : {"linear", "nearest"})
    for (const char* padding : {"zeros", "border"})
      for (const auto& l : kLaunches) {
        EXPECT(close(emu.call(image, disp, mode, padding, l[0], l[1]), cpu.call(image, disp, mode, padding), 1e-12));
        const auto [ri, rd] = cpu_bwd.call(g, image, disp, mode, padding, {true, true});
        const auto [gi, gd] = emu_bwd.call(g, image, disp, mode, padding, {true, true}, l[0], l[1]);
        EXPECT(close(gi, ri, 1e-11) && close(gd, rd, 1e-11));
      }
}

void test_lncc() {
  auto cpu = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>("deepatlas_fast::lncc");
  auto cpu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, Mask)>(
      "deepatlas_fast::lncc_backward");
  auto emu = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, int64_t)>(
      "deepatlas_fast_emulated::lncc");
  auto emu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, Mask, int64_t, int64_t)>(
      "deepatlas_fast_emulated::lncc_backward");
  const at::Tensor a = at::randn({2, 2, 5, 6, 9}, kDouble);
  const at::Tensor b = 0.7 * a + 0.5 * at::randn({2, 2, 5, 6, 9}, kDouble);
  const at::Tensor g = at::randn({2}, kDouble);
  for (int64_t window : {3, 7, 15})
    for (const auto& l : kLaunches) {
      EXPECT(close(emu.call(a, b, window, 1e-5, l[0], l[1]), cpu.call(a, b, window, 1e-5), 1e-10));
      const auto [ra, rb] = cpu_bwd.call(g, a, b, window, 1e-5, {true, true});
      const auto [ga, gb] = emu_bwd.call(g, a, b, window, 1e-5, {true, true}, l[0], l[1]);
      EXPECT(close(ga, ra, 1e-10) && close(gb, rb, 1e-10));
    }
}

void test_soft_dice() {
  auto cpu = op<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>("deepatlas_fast::soft_dice_sums");
  auto cpu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, Mask)>(
      "deepatlas_fast::soft_dice_sums_backward");
  auto emu = op<at::Tensor(const at::Tensor&, const at::Tensor&, bool, int64_t, int64_t)>(
      "deepatlas_fast_emulated::soft_dice_sums");
  auto emu_bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, Mask, int64_t, int64_t)>(
      "deepatlas_fast_emulated::soft_dice_sums_backward");
  const at::Tensor logits = at::randn({2, 3, 9, 10, 11}, kDouble) * 2;
  const at::Tensor labels = at::randint(0, 3, {2, 1, 9, 10, 11}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor probs_target = at::randn({2, 3, 9, 10, 11}, kDouble).softmax(1);
  const at::Tensor g = at::randn({2, 3, 3}, kDouble);
  for (const at::Tensor& target : {labels, probs_target})
    for (bool from_logits : {false, true}) {
      const at::Tensor p = from_logits ? logits : logits.softmax(1);
      for (const auto& l : kLaunches) {
        EXPECT(close(emu.call(p, target, from_logits, l[0], l[1]), cpu.call(p, target, from_logits), 1e-12));
        const auto [rp, rt] = cpu_bwd.call(g, p, target, from_logits, {true, true});
        const auto [gp, gt] = emu_bwd.call(g, p, target, from_logits, {true, true}, l[0], l[1]);
        EXPECT(close(gp, rp, 1e-12) && gt.numel() == rt.numel() && (rt.numel() == 0 || close(gt, rt, 1e-12)));
      }
    }
  bool threw = false;  // the emulated kernels check labels as the CUDA build does
  try {
    emu.call(logits, labels.clone().fill_(3), true, 32, 2);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("target labels must be in [0, 3)") != std::string::npos;
  }
  EXPECT(threw);
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_warp();
  test_lncc();
  test_soft_dice();
  std::printf("emulated kernel tests: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
