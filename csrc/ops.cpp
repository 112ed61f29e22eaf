// Schemas of every op of the package: the whole API surface of the C++ library in one place.
// Kernels register per backend in <op>/<op>_cpu.cpp and <op>/<op>_cuda.cu.
#include <torch/library.h>

#include "common/cpu_memory.h"

TORCH_LIBRARY(deepatlas_fast, m) {
  // out[b, c, x] = image[b, c, x + disp[b, :, x]] (voxel units, channels d, h, w).
  // mode: "linear" | "nearest"; padding: "zeros" | "border".
  m.def("warp(Tensor image, Tensor disp, str mode=\"linear\", str padding=\"zeros\") -> Tensor");
  // Gradients (image, disp) of warp; output_mask says which to compute, the other comes back
  // as an empty tensor.
  m.def("warp_backward(Tensor grad_out, Tensor image, Tensor disp, str mode, str padding, bool[2] output_mask) -> (Tensor, Tensor)");
  // warp of a one-channel image in linear mode, and loc_grad [B, 3, D', H', W'] = d out / d
  // location at every voxel (the disp gradient for grad_out = 1), computed from the same
  // corners: the backward of a forward that took this op is grad_out * loc_grad. CPU only.
  m.def("warp_with_loc_grad(Tensor image, Tensor disp, str padding=\"zeros\") -> (Tensor, Tensor)");
  // Its backward: returns the image gradient and turns loc_grad into the disp gradient in
  // place (loc_grad * grad_out), in one pass. CPU only.
  m.def("warp_backward_with_loc_grad(Tensor grad_out, Tensor image, Tensor disp, Tensor(a!) loc_grad, str padding) -> Tensor");
  // Mean over channels and voxels of the local squared correlation of a and b, per batch item
  // -> [B] (VoxelMorph's NCC with a window^3 box, zero padding). Loss: 1 - lncc.
  m.def("lncc(Tensor a, Tensor b, int window=9, float eps=1e-5) -> Tensor");
  // Gradients (a, b) of lncc for grad_out [B]; output_mask as for warp_backward.
  m.def("lncc_backward(Tensor grad_out, Tensor a, Tensor b, int window, float eps, bool[2] output_mask) -> (Tensor, Tensor)");
  // Per batch item and class: [B, C, 3] = (sum p t, sum p, sum t) over voxels, p = probs (or
  // softmax over classes of logits when from_logits), t = one-hot of integer labels
  // [B, 1, ...] (never materialised) or probabilities [B, C, ...]. soft Dice is built on it.
  m.def("soft_dice_sums(Tensor probs, Tensor target, bool from_logits=False) -> Tensor");
  // Gradients (probs, target) of soft_dice_sums for grad_sums [B, C, 3]; an integer target
  // gets no gradient (empty tensor).
  m.def("soft_dice_sums_backward(Tensor grad_sums, Tensor probs, Tensor target, bool from_logits, bool[2] output_mask) -> (Tensor, Tensor)");
  // The cache of freed volume-sized CPU outputs (common/cpu_memory.h): bytes it holds, and
  // returning them to the OS.
  m.def("cpu_cache_bytes() -> int", &deepatlas_fast::cpu_cache_bytes);
  m.def("empty_cpu_cache() -> ()", &deepatlas_fast::empty_cpu_cache);
}
