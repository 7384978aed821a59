// CUDA kernels of the sparse MoE convolution: routing (stable counting sort by expert), the gather of
// samples into expert groups, the fused forward epilogue (bias, gate, scatter into the compact output),
// the input-gradient scatter and the gate-gradient reduction. The per-expert convolutions themselves
// run in cuDNN, called by the torch binding (sparse_moe_conv2d_cuda.cpp) on each expert's group.
//
// Plain CUDA with C launchers (declared in sparse_moe_conv2d_kernel.h): no torch headers, so CI
// compile-checks this file with nvcc alone, and csrc/cuda/standalone_test.cu runs it without torch.
//
// Index types: slots and rows are int32 (the binding checks B * k < 2^31); element offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sparse_moe_conv2d_kernel.h"

namespace {

constexpr int kThreads = 256;           // threads per block of every kernel
constexpr int kWarps = kThreads / 32;   // warps per block
constexpr int kMaxGridRows = 65535;     // gridDim.y limit; rows beyond it are grid-strided
constexpr int64_t kMaxBlocksPerRow = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types: load/store in the tensor's type, compute in Acc<T>::type -----------------------
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Runs `body` with scalar_t bound to the C++ type of `dtype`; unknown dtypes return cudaErrorInvalidValue.
#define MOE_DISPATCH_DTYPE(dtype, ...)        \
  switch (dtype) {                            \
    case MOE_FLOAT32: {                       \
      using scalar_t = float;                 \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case MOE_FLOAT16: {                       \
      using scalar_t = __half;                \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case MOE_BFLOAT16: {                      \
      using scalar_t = __nv_bfloat16;         \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case MOE_FLOAT64: {                       \
      using scalar_t = double;                \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    default:                                  \
      return cudaErrorInvalidValue;           \
  }

// Grid of the row kernels: y strides over rows, x over the elements of a row (>= 4 per thread).
dim3 row_grid(int64_t num_rows, int64_t row_elems) {
  int64_t per_row = (row_elems + 4 * kThreads - 1) / (4 * kThreads);
  per_row = per_row < 1 ? 1 : (per_row > kMaxBlocksPerRow ? kMaxBlocksPerRow : per_row);
  int64_t rows = num_rows > kMaxGridRows ? kMaxGridRows : num_rows;
  return dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(rows));
}

// Bitmask of the lanes of this warp holding the same `value` (all 32 lanes must call it).
__device__ __forceinline__ unsigned match_any(int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  return __match_any_sync(kFullMask, value);
#else
  unsigned peers = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (__shfl_sync(kFullMask, value, lane) == value) peers |= 1u << lane;
  }
  return peers;
#endif
}

// Sum over the block (blockDim.x == kThreads); the result is valid in thread 0. `scratch` holds kWarps values.
template <typename A>
__device__ A block_sum(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(kFullMask, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  A total = 0;
  if (warp == 0) {
    total = lane < kWarps ? scratch[lane] : A(0);
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(kFullMask, total, offset);
  }
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return total;
}

// ---- routing ------------------------------------------------------------------------------------------
// expert_idx: (N,) int64 -> sorted_slot: (N,) int32, info: (E + 2,) int32 = [status, offsets[0..E]].
// One block of kThreads. Shared memory: count[E], base[E], warp_count[kWarps][E].
// Pass 1 validates and counts; thread 0 scans the counts; pass 2 walks the slots in chunks of kThreads,
// ranking each slot among equal experts of its warp (match_any) and of the earlier warps, which keeps
// the sort stable (slots of one expert stay in increasing order).
__global__ void route_kernel(const int64_t* __restrict__ expert_idx, int num_slots, int num_experts,
                             int32_t* __restrict__ sorted_slot, int32_t* __restrict__ info) {
  extern __shared__ int smem[];
  int* count = smem;
  int* base = smem + num_experts;
  int* warp_count = smem + 2 * num_experts;
  __shared__ int bad_index;
  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) count[e] = 0;
  if (tid == 0) bad_index = 0;
  __syncthreads();
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const int64_t e = expert_idx[i];
    if (e < 0 || e >= num_experts) {
      atomicExch(&bad_index, 1);
    } else {
      atomicAdd(&count[e], 1);
    }
  }
  __syncthreads();
  if (bad_index) {  // uniform over the block: every thread leaves here
    if (tid == 0) info[0] = 1;
    return;
  }
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e < num_experts; ++e) {
      base[e] = run;
      info[1 + e] = run;
      run += count[e];
    }
    info[1 + num_experts] = run;
    info[0] = 0;
  }
  __syncthreads();
  const int lane = tid & 31, warp = tid >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int chunk = 0; chunk < num_slots; chunk += blockDim.x) {
    for (int i = tid; i < kWarps * num_experts; i += blockDim.x) warp_count[i] = 0;
    __syncthreads();
    const int i = chunk + tid;
    const bool valid = i < num_slots;
    const int e = valid ? static_cast<int>(expert_idx[i]) : -1;
    const unsigned peers = match_any(e);
    const int rank = __popc(peers & lanes_below);
    if (valid && rank == 0) warp_count[warp * num_experts + e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int pos = base[e] + rank;
      for (int w = 0; w < warp; ++w) pos += warp_count[w * num_experts + e];
      sorted_slot[pos] = i;
    }
    __syncthreads();
    for (int x = tid; x < num_experts; x += blockDim.x) {
      for (int w = 0; w < kWarps; ++w) base[x] += warp_count[w * num_experts + x];
    }
    __syncthreads();
  }
}

// ---- gather -------------------------------------------------------------------------------------------
// src: (rows_src, row_elems); dst, dst_scaled: (num_rows, row_elems); gate: (N,)
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, int64_t row_elems, const int32_t* __restrict__ sorted_slot,
                                   int num_rows, int divisor, const T* __restrict__ gate, T* __restrict__ dst,
                                   T* __restrict__ dst_scaled) {
  using A = typename Acc<T>::type;
  for (int r = blockIdx.y; r < num_rows; r += gridDim.y) {
    const int s = sorted_slot[r];
    const T* in = src + static_cast<int64_t>(s / divisor) * row_elems;
    const int64_t out_offset = static_cast<int64_t>(r) * row_elems;
    const A g = gate != nullptr ? to_acc(gate[s]) : A(1);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row_elems;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const T v = in[i];
      if (dst != nullptr) dst[out_offset + i] = v;
      if (dst_scaled != nullptr) dst_scaled[out_offset + i] = from_acc<T>(to_acc(v) * g);
    }
  }
}

// ---- forward epilogue ---------------------------------------------------------------------------------
// conv: (num_rows, width, plane); bias: (width,) or null; gate: (N,) or null; y: (N, width, plane)
template <typename T>
__global__ void scatter_epilogue_kernel(const T* __restrict__ conv, const int32_t* __restrict__ sorted_slot,
                                        int num_rows, int64_t width, int64_t plane, const T* __restrict__ gate,
                                        const T* __restrict__ bias, T* __restrict__ y) {
  using A = typename Acc<T>::type;
  const int64_t row_elems = width * plane;
  for (int r = blockIdx.y; r < num_rows; r += gridDim.y) {
    const int s = sorted_slot[r];
    const T* in = conv + static_cast<int64_t>(r) * row_elems;
    T* out = y + static_cast<int64_t>(s) * row_elems;
    const A g = gate != nullptr ? to_acc(gate[s]) : A(1);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row_elems;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      A v = to_acc(in[i]);
      if (bias != nullptr) v += to_acc(bias[i / plane]);
      out[i] = from_acc<T>(v * g);
    }
  }
}

// ---- input-gradient scatter ---------------------------------------------------------------------------
// src: (num_rows, row_elems); gate: (N,) or null; dst: (B, row_elems) of T (store) or Acc<T> (atomic add)
template <typename T, typename D, bool kAtomic>
__global__ void scatter_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ sorted_slot, int num_rows,
                                    int64_t row_elems, int divisor, const T* __restrict__ gate, D* __restrict__ dst) {
  using A = typename Acc<T>::type;
  for (int r = blockIdx.y; r < num_rows; r += gridDim.y) {
    const int s = sorted_slot[r];
    const T* in = src + static_cast<int64_t>(r) * row_elems;
    D* out = dst + static_cast<int64_t>(s / divisor) * row_elems;
    const A g = gate != nullptr ? to_acc(gate[s]) : A(1);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row_elems;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A v = to_acc(in[i]) * g;
      if constexpr (kAtomic) {
        atomicAdd(out + i, v);
      } else {
        out[i] = from_acc<D>(v);
      }
    }
  }
}

// ---- gate gradient ------------------------------------------------------------------------------------
// grad_x_unscaled: (num_rows, x_row); x: (B, x_row); grad_out: (num_rows, width, plane); bias: (width,) or null;
// grad_gate: (N,). One block per row (grid-strided), fp32/fp64 block reduction.
template <typename T>
__global__ void gate_grad_kernel(const T* __restrict__ grad_x_unscaled, const T* __restrict__ x, int64_t x_row,
                                 const T* __restrict__ grad_out, const T* __restrict__ bias, int64_t width,
                                 int64_t plane, const int32_t* __restrict__ sorted_slot, int num_rows, int divisor,
                                 T* __restrict__ grad_gate) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kWarps];
  for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int s = sorted_slot[r];
    const T* gx = grad_x_unscaled + static_cast<int64_t>(r) * x_row;
    const T* xs = x + static_cast<int64_t>(s / divisor) * x_row;
    A sum = 0;
    for (int64_t i = threadIdx.x; i < x_row; i += blockDim.x) sum += to_acc(gx[i]) * to_acc(xs[i]);
    if (bias != nullptr) {
      const T* g = grad_out + static_cast<int64_t>(r) * width * plane;
      for (int64_t i = threadIdx.x; i < width * plane; i += blockDim.x) sum += to_acc(g[i]) * to_acc(bias[i / plane]);
    }
    const A total = block_sum(sum, scratch);
    if (threadIdx.x == 0) grad_gate[s] = from_acc<T>(total);
  }
}

}  // namespace

extern "C" {

cudaError_t moe_route(const int64_t* expert_idx, int64_t num_slots, int64_t num_experts, int32_t* sorted_slot,
                      int32_t* info, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > MOE_MAX_EXPERTS || num_slots < 0 || num_slots > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const size_t shared = static_cast<size_t>(2 + kWarps) * num_experts * sizeof(int);
  route_kernel<<<1, kThreads, shared, stream>>>(expert_idx, static_cast<int>(num_slots), static_cast<int>(num_experts),
                                                sorted_slot, info);
  return cudaGetLastError();
}

cudaError_t moe_gather_rows(const void* src, int64_t row_elems, const int32_t* sorted_slot, int64_t num_rows,
                            int64_t divisor, const void* gate, void* dst, void* dst_scaled, moe_dtype_t dtype,
                            cudaStream_t stream) {
  if (num_rows < 0 || num_rows > INT32_MAX || row_elems < 0 || divisor < 1 || (dst_scaled != nullptr && gate == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0 || row_elems == 0 || (dst == nullptr && dst_scaled == nullptr)) return cudaSuccess;
  const dim3 grid = row_grid(num_rows, row_elems);
  MOE_DISPATCH_DTYPE(dtype, gather_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                                static_cast<const scalar_t*>(src), row_elems, sorted_slot, static_cast<int>(num_rows),
                                static_cast<int>(divisor), static_cast<const scalar_t*>(gate),
                                static_cast<scalar_t*>(dst), static_cast<scalar_t*>(dst_scaled)));
  return cudaGetLastError();
}

cudaError_t moe_scatter_epilogue(const void* conv, const int32_t* sorted_slot, int64_t num_rows, int64_t width,
                                 int64_t plane, const void* gate, const void* bias, void* y, moe_dtype_t dtype,
                                 cudaStream_t stream) {
  if (num_rows < 0 || num_rows > INT32_MAX || width < 0 || plane < 0) return cudaErrorInvalidValue;
  if (num_rows == 0 || width == 0 || plane == 0) return cudaSuccess;
  const dim3 grid = row_grid(num_rows, width * plane);
  MOE_DISPATCH_DTYPE(dtype, scatter_epilogue_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                                static_cast<const scalar_t*>(conv), sorted_slot, static_cast<int>(num_rows), width,
                                plane, static_cast<const scalar_t*>(gate), static_cast<const scalar_t*>(bias),
                                static_cast<scalar_t*>(y)));
  return cudaGetLastError();
}

cudaError_t moe_scatter_rows(const void* src, const int32_t* sorted_slot, int64_t num_rows, int64_t row_elems,
                             int64_t divisor, const void* gate, void* dst, int accumulate, moe_dtype_t dtype,
                             cudaStream_t stream) {
  if (num_rows < 0 || num_rows > INT32_MAX || row_elems < 0 || divisor < 1) return cudaErrorInvalidValue;
  if (num_rows == 0 || row_elems == 0) return cudaSuccess;
  const dim3 grid = row_grid(num_rows, row_elems);
  if (accumulate) {
    MOE_DISPATCH_DTYPE(dtype, {
      using acc_t = typename Acc<scalar_t>::type;
      scatter_rows_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(src), sorted_slot, static_cast<int>(num_rows), row_elems,
          static_cast<int>(divisor), static_cast<const scalar_t*>(gate), static_cast<acc_t*>(dst));
    });
  } else {
    MOE_DISPATCH_DTYPE(dtype, scatter_rows_kernel<scalar_t, scalar_t, false><<<grid, kThreads, 0, stream>>>(
                                  static_cast<const scalar_t*>(src), sorted_slot, static_cast<int>(num_rows),
                                  row_elems, static_cast<int>(divisor), static_cast<const scalar_t*>(gate),
                                  static_cast<scalar_t*>(dst)));
  }
  return cudaGetLastError();
}

cudaError_t moe_gate_grad(const void* grad_x_unscaled, const void* x, int64_t x_row, const void* grad_out,
                          const void* bias, int64_t width, int64_t plane, const int32_t* sorted_slot, int64_t num_rows,
                          int64_t divisor, void* grad_gate, moe_dtype_t dtype, cudaStream_t stream) {
  if (num_rows < 0 || num_rows > INT32_MAX || x_row < 0 || width < 0 || plane < 0 || divisor < 1) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_rows > 65535 ? 65535 : num_rows);
  MOE_DISPATCH_DTYPE(dtype, gate_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                static_cast<const scalar_t*>(grad_x_unscaled), static_cast<const scalar_t*>(x), x_row,
                                static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(bias), width,
                                plane, sorted_slot, static_cast<int>(num_rows), static_cast<int>(divisor),
                                static_cast<scalar_t*>(grad_gate)));
  return cudaGetLastError();
}

}  // extern "C"
