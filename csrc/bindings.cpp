// The Python module deepatlas_fast._C: importing it loads the ops (TORCH_LIBRARY blocks run at
// load time). It only reports how the library was built; the ops live in torch.ops.
#include <pybind11/pybind11.h>

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
}
