// The Python module deepatlas_fast._C: importing it loads the ops (TORCH_LIBRARY blocks run at
// load time). It only reports how the library was built and which of the instruction sets of
// the CPU kernels' SIMD paths this CPU has; the ops live in torch.ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/simd.h"

#ifndef DEEPATLAS_CUDA_ARCHS
#define DEEPATLAS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepatlas_fast kernels (ops registered in torch.ops.deepatlas_fast)";
#ifdef DEEPATLAS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = DEEPATLAS_CUDA_ARCHS;
  // "avx2", "fma", "avx512" (F, VL and DQ), as the kernels' runtime checks see them.
  std::vector<std::string> sets;
  if (deepatlas_fast::cpu_has_avx2()) sets.push_back("avx2");
  if (deepatlas_fast::cpu_has_fma()) sets.push_back("fma");
  if (deepatlas_fast::cpu_has_avx512()) sets.push_back("avx512");
  m.attr("cpu_instruction_sets") = sets;
}
