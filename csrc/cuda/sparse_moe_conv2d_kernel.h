// C launchers of the CUDA kernels behind moe_kernels::sparse_moe_conv2d (csrc/cuda/sparse_moe_conv2d_kernel.cu).
//
// Plain CUDA, no torch headers: every launcher takes raw device pointers, sizes and a stream, launches
// asynchronously on that stream and returns the launch's cudaError_t. Tensors are dense row-major
// (contiguous NCHW); a "row" is one sample's (or one routing slot's) block of elements.
//
// Names used below:
//   B batch, k slots per sample (top-k), E experts, w expert width (output channels per expert),
//   N = B * k routing slots, slot s = b * k + j (sample b, its j-th choice), P = H_out * W_out.
//   sorted_slot: (N,) int32, the slots sorted (stably) by expert; expert e owns
//   sorted_slot[offsets[e] .. offsets[e+1]). Position r in that order is a "row" of the grouped buffers.
//
// The launchers trust their sizes (the torch binding checks every tensor before calling them), except
// moe_route, which checks the expert indices themselves and reports a bad one through `info[0]`.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the floating point tensors; math is done in fp32 (fp64 for MOE_FLOAT64).
typedef enum {
  MOE_FLOAT32 = 0,
  MOE_FLOAT16 = 1,
  MOE_BFLOAT16 = 2,
  MOE_FLOAT64 = 3,
} moe_dtype_t;

// Largest E the routing kernel handles (its shared memory holds 10 * E ints).
#define MOE_MAX_EXPERTS 1024

// Groups the N slots by expert with a stable counting sort in one thread block.
// expert_idx: (N,) int64 (the flattened (B, k) indices); sorted_slot: (N,) int32 output;
// info: (E + 2,) int32 output = [status, offsets[0], ..., offsets[E]], status 0 = ok,
// 1 = an index outside [0, E) (sorted_slot and offsets are then not written).
// Requires 1 <= num_experts <= MOE_MAX_EXPERTS and 0 <= num_slots < 2^31.
cudaError_t moe_route(const int64_t* expert_idx, int64_t num_slots, int64_t num_experts, int32_t* sorted_slot,
                      int32_t* info, cudaStream_t stream);

// Gathers rows into the grouped order: for r in [0, num_rows), s = sorted_slot[r],
//   dst[r] = src[s / divisor]                 (if dst != NULL)
//   dst_scaled[r] = gate[s] * src[s / divisor] (if dst_scaled != NULL; gate must then be non-NULL)
// src: (rows_src, row_elems); dst, dst_scaled: (num_rows, row_elems); gate: (N,).
// divisor = k gathers samples (x); divisor = 1 gathers slots (grad_out viewed as (N, w * P)).
cudaError_t moe_gather_rows(const void* src, int64_t row_elems, const int32_t* sorted_slot, int64_t num_rows,
                            int64_t divisor, const void* gate, void* dst, void* dst_scaled, moe_dtype_t dtype,
                            cudaStream_t stream);

// Forward epilogue of one expert: writes its conv output into the compact output, fused with bias and gate.
// conv: (num_rows, width, plane) = conv(x[samples of expert e], W_e); sorted_slot points at the expert's run;
// bias: (width,) the expert's bias slice or NULL; gate: (N,) or NULL; y: (N, width, plane) = (B, k*w, P).
//   y[s, c, p] = gate[s] * (conv[r, c, p] + bias[c]),  s = sorted_slot[r]
cudaError_t moe_scatter_epilogue(const void* conv, const int32_t* sorted_slot, int64_t num_rows, int64_t width,
                                 int64_t plane, const void* gate, const void* bias, void* y, moe_dtype_t dtype,
                                 cudaStream_t stream);

// Input gradient scatter of one expert: dst[s / divisor] (+)= gate[s] * src[r], s = sorted_slot[r].
// src: (num_rows, row_elems) unscaled input gradients of the expert's slots; gate: (N,) or NULL.
// accumulate = 0: plain stores into dst of `dtype` (only valid when every sample occurs once, i.e. k = 1);
// accumulate = 1: atomicAdd into dst of the accumulation type (float, or double for MOE_FLOAT64).
cudaError_t moe_scatter_rows(const void* src, const int32_t* sorted_slot, int64_t num_rows, int64_t row_elems,
                             int64_t divisor, const void* gate, void* dst, int accumulate, moe_dtype_t dtype,
                             cudaStream_t stream);

// Gate gradient of one expert's slots, by the adjoint identity <g, conv(x, W) + b> = <conv_T(g, W), x> + <sum_p g, b>:
//   grad_gate[s] = sum_i grad_x_unscaled[r, i] * x[s / divisor, i] + sum_{c,p} grad_out[r, c, p] * bias[c]
// grad_x_unscaled: (num_rows, x_row) = conv_T(grad_out rows, W_e); x: (B, x_row);
// grad_out: (num_rows, width, plane) unscaled grouped output gradient; bias: (width,) or NULL; grad_gate: (N,).
cudaError_t moe_gate_grad(const void* grad_x_unscaled, const void* x, int64_t x_row, const void* grad_out,
                          const void* bias, int64_t width, int64_t plane, const int32_t* sorted_slot, int64_t num_rows,
                          int64_t divisor, void* grad_gate, moe_dtype_t dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
