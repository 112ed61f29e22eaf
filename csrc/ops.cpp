// Schemas of every op of the package: the whole API surface of the C++ library in one place.
// Kernels register per backend in <op>/<op>_cpu.cpp and <op>/<op>_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY(deepatlas_fast, m) {
  // out[b, c, x] = image[b, c, x + disp[b, :, x]] (voxel units, channels d, h, w).
  // mode: "linear" | "nearest"; padding: "zeros" | "border".
  m.def("warp(Tensor image, Tensor disp, str mode=\"linear\", str padding=\"zeros\") -> Tensor");
  // Gradients (image, disp) of warp; output_mask says which to compute, the other comes back
  // as an empty tensor.
  m.def("warp_backward(Tensor grad_out, Tensor image, Tensor disp, str mode, str padding, bool[2] output_mask) -> (Tensor, Tensor)");
}
