// CUDA dispatch of moe_kernels_C::sparse_moe_conv2d_{fwd,bwd} (schema: csrc/sparse_moe_conv2d.cpp).
//
// Design: route (stable counting sort of the B*k slots by expert, on device, one sync to read the
// per-expert counts) -> gather the samples into expert order -> one cuDNN convolution per expert with
// the expert's weight slice (a view) -> fused epilogue kernel (bias, gate, scatter into the compact
// output). Backward: gather grad_out rows (and gate-scaled rows) into expert order -> per expert
// at::convolution_backward for the weight/bias gradients and for the unscaled input gradient -> kernels
// for the gate gradient (adjoint identity, no forward recompute) and the scatter(-add) into grad_x.
//
// x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k) in [0, E); gate: (B, k) or None;
// bias: (E*w,) or None  ->  y: (B, k*w, H_out, W_out)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "sparse_moe_conv2d_kernel.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define MOE_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                  \
    const cudaError_t moe_err_ = (expr);                                                                \
    TORCH_CHECK(moe_err_ == cudaSuccess, "sparse_moe_conv2d (cuda): ", #expr, " failed: ",              \
                cudaGetErrorString(moe_err_));                                                          \
  } while (0)

moe_dtype_t moe_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MOE_FLOAT32;
    case at::kHalf: return MOE_FLOAT16;
    case at::kBFloat16: return MOE_BFLOAT16;
    case at::kDouble: return MOE_FLOAT64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "x must be float16, bfloat16, float32 or float64, got ", t);
  return MOE_FLOAT32;  // unreachable
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() && t->defined() ? t->data_ptr() : nullptr; }

// Shapes of one call; filled by check_args.
struct Geometry {
  int64_t batch, top_k, c_in, height, width_in, experts, expert_width, h_out, w_out;
  int64_t slots() const { return batch * top_k; }
  int64_t plane() const { return h_out * w_out; }
};

void check_pair(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must have 2 entries, got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, name, " entries must be >= ", min, ", got ", v);
}

// Validates everything the kernels rely on except the expert index values (checked on device by moe_route).
Geometry check_args(const Tensor& x, const Tensor& weight, const Tensor& expert_idx, const OptTensor& gate,
                    const OptTensor& bias, int64_t num_experts, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must have shape (B, C_in, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must have shape (E * w, C_in, kh, kw), got ", weight.sizes());
  moe_dtype(x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
                   " does not match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), " but x on ", x.device());
  TORCH_CHECK_VALUE(expert_idx.device() == x.device(), "expert_idx is on ", expert_idx.device(), " but x on ",
                    x.device());
  TORCH_CHECK_TYPE(expert_idx.scalar_type() == at::kLong || expert_idx.scalar_type() == at::kInt,
                   "expert_idx must be int64 (or int32), got ", expert_idx.scalar_type());
  TORCH_CHECK_VALUE(expert_idx.dim() == 2 && expert_idx.size(0) == x.size(0) && expert_idx.size(1) >= 1,
                    "expert_idx must have shape (B, k) with B = ", x.size(0), " and k >= 1, got ", expert_idx.sizes());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= MOE_MAX_EXPERTS, "num_experts must be in [1, ",
                    MOE_MAX_EXPERTS, "] on the CUDA backend, got ", num_experts);
  TORCH_CHECK_VALUE(weight.size(0) % num_experts == 0 && weight.size(0) > 0, "weight rows (", weight.size(0),
                    ") must be a positive multiple of num_experts (", num_experts, ")");
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight has C_in = ", weight.size(1), " but x has ", x.size(1),
                    " channels");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  Geometry g{x.size(0), expert_idx.size(1), x.size(1), x.size(2), x.size(3), num_experts,
             weight.size(0) / num_experts, 0, 0};
  g.h_out = (g.height + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  g.w_out = (g.width_in + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(g.h_out >= 1 && g.w_out >= 1, "output size (", g.h_out, ", ", g.w_out,
                    ") is below 1: input too small for this kernel, padding and dilation");
  TORCH_CHECK_VALUE(g.slots() <= std::numeric_limits<int32_t>::max(), "B * k = ", g.slots(), " exceeds 2^31 - 1");
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK_VALUE(gate->device() == x.device(), "gate is on ", gate->device(), " but x on ", x.device());
    TORCH_CHECK_TYPE(gate->is_floating_point(), "gate must be floating point, got ", gate->scalar_type());
    TORCH_CHECK_VALUE(gate->dim() == 2 && gate->size(0) == g.batch && gate->size(1) == g.top_k,
                      "gate must have shape (B, k) = (", g.batch, ", ", g.top_k, "), got ", gate->sizes());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), " but x on ", x.device());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(),
                     " does not match x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (E * w,) = (",
                      weight.size(0), ",), got ", bias->sizes());
  }
  return g;
}

OptTensor contiguous_as(const OptTensor& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(dtype).contiguous();
}

// The slots sorted by expert (device, int32) and the expert offsets (host).
struct Routing {
  Tensor sorted_slot;
  std::vector<int64_t> offsets;
};

Routing route(const Tensor& expert_idx, int64_t num_experts, cudaStream_t stream) {
  const Tensor idx = expert_idx.to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  Routing r{at::empty({n}, idx.options().dtype(at::kInt)), std::vector<int64_t>(num_experts + 1, 0)};
  Tensor info = at::empty({num_experts + 2}, idx.options().dtype(at::kInt));
  MOE_CUDA_CHECK(moe_route(idx.data_ptr<int64_t>(), n, num_experts, r.sorted_slot.data_ptr<int32_t>(),
                           info.data_ptr<int32_t>(), stream));
  const Tensor host = info.cpu();  // the one host sync: the per-expert group sizes drive the cuDNN calls
  const int32_t* h = host.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(h[0] == 0, "expert_idx values must lie in [0, num_experts) = [0, ", num_experts, ")");
  for (int64_t e = 0; e <= num_experts; ++e) r.offsets[e] = h[1 + e];
  return r;
}

Tensor sparse_moe_conv2d_fwd_cuda(const Tensor& x, const Tensor& weight, const Tensor& expert_idx, const OptTensor& gate,
                                  const OptTensor& bias, int64_t num_experts, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_args(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t w = g.expert_width;
  Tensor y = at::empty({g.batch, g.top_k * w, g.h_out, g.w_out}, x.options());
  if (g.batch == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const moe_dtype_t dtype = moe_dtype(x.scalar_type());
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const OptTensor gc = contiguous_as(gate, x.scalar_type()), bc = contiguous_as(bias, x.scalar_type());
  const Routing rt = route(expert_idx, num_experts, stream);
  const int32_t* sorted = rt.sorted_slot.data_ptr<int32_t>();
  const int64_t x_row = g.c_in * g.height * g.width_in;
  Tensor xg = at::empty({g.slots(), g.c_in, g.height, g.width_in}, xc.options());
  MOE_CUDA_CHECK(moe_gather_rows(xc.data_ptr(), x_row, sorted, g.slots(), g.top_k, nullptr, xg.data_ptr(), nullptr,
                                 dtype, stream));
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t start = rt.offsets[e], rows = rt.offsets[e + 1] - start;
    if (rows == 0) continue;
    const Tensor conv = at::convolution(xg.narrow(0, start, rows), wc.narrow(0, e * w, w), std::nullopt, stride,
                                        padding, dilation, false, {0, 0}, 1)
                            .contiguous();
    const void* bias_e = bc.has_value() ? bc->narrow(0, e * w, w).data_ptr() : nullptr;
    MOE_CUDA_CHECK(moe_scatter_epilogue(conv.data_ptr(), sorted + start, rows, w, g.plane(), ptr_or_null(gc), bias_e,
                                        y.data_ptr(), dtype, stream));
  }
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sparse_moe_conv2d_bwd_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& expert_idx, const OptTensor& gate,
    const OptTensor& bias, int64_t num_experts, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 4> needs) {
  const Geometry g = check_args(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation);
  const int64_t w = g.expert_width;
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(), " but x on ", x.device());
  const std::vector<int64_t> out_shape{g.batch, g.top_k * w, g.h_out, g.w_out};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape),
                    "grad_out must have the output's shape (", g.batch, ", ", g.top_k * w, ", ", g.h_out, ", ",
                    g.w_out, "), got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_gate = gate.has_value() && gate->defined(), has_bias = bias.has_value() && bias->defined();
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2] && has_bias, need_g = needs[3] && has_gate;
  const auto opts = x.options();
  const bool accumulate = g.top_k > 1;  // a sample occurs k times: atomically add its k input gradients
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_x = need_x ? (accumulate ? at::zeros(x.sizes(), opts.dtype(acc_type)) : at::empty(x.sizes(), opts))
                         : at::empty({0}, opts);
  Tensor grad_w = need_w ? at::zeros(weight.sizes(), opts) : at::empty({0}, opts);
  Tensor grad_b = need_b ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);
  Tensor grad_g = need_g ? at::empty({g.batch, g.top_k}, opts) : at::empty({0}, opts);
  if (g.batch > 0 && (need_x || need_w || need_b || need_g)) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const moe_dtype_t dtype = moe_dtype(x.scalar_type());
    const Tensor xc = x.contiguous(), wc = weight.contiguous(), go = grad_out.to(x.scalar_type()).contiguous();
    const OptTensor gc = contiguous_as(gate, x.scalar_type()), bc = contiguous_as(bias, x.scalar_type());
    const Routing rt = route(expert_idx, num_experts, stream);
    const int32_t* sorted = rt.sorted_slot.data_ptr<int32_t>();
    const int64_t x_row = g.c_in * g.height * g.width_in, n = g.slots();
    // Grouped output gradient: unscaled for the input and gate gradients, gate-scaled for the weight/bias ones.
    const bool need_unscaled = need_x || need_g || !has_gate;
    const bool need_scaled = (need_w || need_b) && has_gate;
    Tensor g_rows = at::empty({need_unscaled ? n : 0, w, g.h_out, g.w_out}, opts);
    Tensor g_scaled = need_scaled ? at::empty({n, w, g.h_out, g.w_out}, opts) : g_rows;
    MOE_CUDA_CHECK(moe_gather_rows(go.data_ptr(), w * g.plane(), sorted, n, 1, need_scaled ? gc->data_ptr() : nullptr,
                                   need_unscaled ? g_rows.data_ptr() : nullptr,
                                   need_scaled ? g_scaled.data_ptr() : nullptr, dtype, stream));
    // Grouped input; its values are read only by the weight gradient (the input gradient needs its shape).
    Tensor xg = at::empty({n, g.c_in, g.height, g.width_in}, opts);
    if (need_w) {
      MOE_CUDA_CHECK(moe_gather_rows(xc.data_ptr(), x_row, sorted, n, g.top_k, nullptr, xg.data_ptr(), nullptr, dtype,
                                     stream));
    }
    const std::vector<int64_t> bias_sizes{w};
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t start = rt.offsets[e], rows = rt.offsets[e + 1] - start;
      if (rows == 0) continue;
      const Tensor x_e = xg.narrow(0, start, rows), w_e = wc.narrow(0, e * w, w);
      if (need_w || need_b) {
        const auto wb = at::convolution_backward(
            g_scaled.narrow(0, start, rows), x_e, w_e,
            need_b ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride, padding, dilation, false,
            {0, 0}, 1, {false, need_w, need_b});
        if (need_w) grad_w.narrow(0, e * w, w).copy_(std::get<1>(wb));
        if (need_b) grad_b.narrow(0, e * w, w).copy_(std::get<2>(wb));
      }
      if (need_x || need_g) {
        const Tensor g_e = g_rows.narrow(0, start, rows);
        const Tensor gx = std::get<0>(at::convolution_backward(g_e, x_e, w_e, at::OptionalIntArrayRef(), stride,
                                                               padding, dilation, false, {0, 0}, 1,
                                                               {true, false, false}))
                              .contiguous();
        if (need_g) {
          const void* bias_e = bc.has_value() ? bc->narrow(0, e * w, w).data_ptr() : nullptr;
          MOE_CUDA_CHECK(moe_gate_grad(gx.data_ptr(), xc.data_ptr(), x_row, g_e.data_ptr(), bias_e, w, g.plane(),
                                       sorted + start, rows, g.top_k, grad_g.data_ptr(), dtype, stream));
        }
        if (need_x) {
          MOE_CUDA_CHECK(moe_scatter_rows(gx.data_ptr(), sorted + start, rows, x_row, g.top_k, ptr_or_null(gc),
                                          grad_x.data_ptr(), accumulate ? 1 : 0, dtype, stream));
        }
      }
    }
  }
  if (need_x && grad_x.scalar_type() != x.scalar_type()) grad_x = grad_x.to(x.scalar_type());
  if (need_g && grad_g.scalar_type() != gate->scalar_type()) grad_g = grad_g.to(gate->scalar_type());
  return {grad_x, grad_w, grad_b, grad_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels_C, CUDA, m) {
  m.impl("sparse_moe_conv2d_fwd", &sparse_moe_conv2d_fwd_cuda);
  m.impl("sparse_moe_conv2d_bwd", &sparse_moe_conv2d_bwd_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "advmoe CUDA kernels (registered as the CUDA kernels of torch.ops.moe_kernels_C.*)";
}
