// Schema of the compiled kernels behind moe_kernels::sparse_moe_conv2d. Declared once here; each
// backend folder registers one dispatch key (cpu/ -> CPU, cuda/ -> CUDA). The Python custom op
// (moe_kernels/op.py) validates arguments and calls these through torch.ops.moe_kernels_C.
//
// x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k) int64 in [0, E);
// gate: (B, k) or None; bias: (E*w,) or None  ->  y: (B, k*w, H_out, W_out)
#include <torch/extension.h>

TORCH_LIBRARY(moe_kernels_C, m) {
  m.def(
      "sparse_moe_conv2d_fwd(Tensor x, Tensor weight, Tensor expert_idx, Tensor? gate, Tensor? bias, "
      "int num_experts, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "sparse_moe_conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor expert_idx, Tensor? gate, "
      "Tensor? bias, int num_experts, int[2] stride, int[2] padding, int[2] dilation, bool[4] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "advmoe compiled CPU kernels (registered as torch.ops.moe_kernels_C.*)";
}
