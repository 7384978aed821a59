// Torch-free check of the CUDA kernels in sparse_moe_conv2d_kernel.cu against plain CPU loops.
//
// Runs every launcher on odd shapes (sizes that are multiples of nothing, an expert with no slot, k = 1,
// k = E, duplicate experts within a sample, more rows than gridDim.y allows, more experts than a warp
// has lanes, batch 0) in fp32, fp16, bf16 and fp64, plus an out-of-range expert index, and exits
// non-zero on any mismatch. The per-expert convolution (cuDNN in the extension) is done here by a CPU
// loop, so the forward check covers route + gather + epilogue against a direct CPU formula of the op.
// This is the program compute-sanitizer (memcheck, racecheck) runs on the GPU machine:
//
//   nvcc -std=c++17 -O2 -lineinfo -arch=sm_90 -o standalone_test
//        csrc/cuda/standalone_test.cu csrc/cuda/sparse_moe_conv2d_kernel.cu   (one command)
//   ./standalone_test && compute-sanitizer --tool memcheck ./standalone_test
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "sparse_moe_conv2d_kernel.h"

#define CHECK_CUDA(expr)                                                                                  \
  do {                                                                                                    \
    const cudaError_t err_ = (expr);                                                                      \
    if (err_ != cudaSuccess) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                       \
    }                                                                                                     \
  } while (0)

namespace {

int g_failures = 0;

// One configuration of the op. dup: slots drawn with replacement (a sample may pick an expert twice).
struct Config {
  const char* name;
  int batch, top_k, experts, c_in, height, width_in, width, kh, kw, stride, pad, dil;
  bool bias, gate, empty_expert, dup;
  int h_out() const { return (height + 2 * pad - dil * (kh - 1) - 1) / stride + 1; }
  int w_out() const { return (width_in + 2 * pad - dil * (kw - 1) - 1) / stride + 1; }
};

// Host conversions and tolerances per element type: one row per type (the *2half / *2bfloat16 intrinsics
// are host-callable).
template <typename T>
struct Host;
#define MOE_HOST_TYPE(T, ACC, MAKE, GET, TOL, DTYPE, NAME)  \
  template <>                                              \
  struct Host<T> {                                         \
    using acc = ACC;                                       \
    static T make(double v) { return MAKE; }               \
    static double get(T v) { return GET; }                 \
    static constexpr double tol = TOL;                     \
    static constexpr moe_dtype_t dtype = DTYPE;            \
    static constexpr const char* name = NAME;              \
  };
MOE_HOST_TYPE(float, float, static_cast<float>(v), v, 1e-5, MOE_FLOAT32, "fp32")
MOE_HOST_TYPE(double, double, v, v, 1e-12, MOE_FLOAT64, "fp64")
MOE_HOST_TYPE(__half, float, __float2half(static_cast<float>(v)), __half2float(v), 2e-3, MOE_FLOAT16, "fp16")
MOE_HOST_TYPE(__nv_bfloat16, float, __float2bfloat16(static_cast<float>(v)), __bfloat162float(v), 1.6e-2,
              MOE_BFLOAT16, "bf16")
#undef MOE_HOST_TYPE

template <typename T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK_CUDA(cudaMalloc(&dev, std::max<size_t>(1, host.size()) * sizeof(T)));
  if (!host.empty()) CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

template <typename T>
std::vector<T> download(const T* dev, size_t n) {
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<T> host(n);
  if (n) CHECK_CUDA(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// Compares got (as doubles) with want; |got - want| <= tol * (scale + |want|). Reports the worst entry.
void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol, double scale,
                  const char* what, const Config& c, const char* dtype) {
  if (got.size() != want.size()) {
    std::fprintf(stderr, "FAIL %s/%s %s: size %zu != %zu\n", c.name, dtype, what, got.size(), want.size());
    ++g_failures;
    return;
  }
  double worst = 0;
  size_t at = 0;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * (scale + std::fabs(want[i])))) ++bad;
    if (!(err <= worst)) worst = err, at = i;
  }
  if (bad) {
    std::fprintf(stderr, "FAIL %s/%s %s: %d mismatches, worst at %zu: got %g want %g\n", c.name, dtype, what, bad, at,
                 got[at], want[at]);
    ++g_failures;
  }
}

template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Host<T>::get(v[i]);
  return out;
}

template <typename T>
std::vector<T> random_vec(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<T> v(n);
  for (auto& e : v) e = Host<T>::make(dist(rng));
  return v;
}

std::vector<int64_t> random_routing(const Config& c, std::mt19937& rng) {
  const int usable = c.empty_expert ? c.experts - 1 : c.experts;
  std::vector<int64_t> idx(static_cast<size_t>(c.batch) * c.top_k);
  std::vector<int64_t> perm(usable);
  for (int b = 0; b < c.batch; ++b) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < c.top_k; ++j) idx[b * c.top_k + j] = c.dup ? perm[rng() % usable] : perm[j];
  }
  return idx;
}

// Direct CPU convolution of sample x_b (C, H, W) with output channel `row` of weight, at output pixel (oh, ow).
template <typename T>
double conv_at(const Config& c, const std::vector<T>& x, int b, const std::vector<T>& weight, int row, int oh, int ow) {
  double sum = 0;
  for (int ci = 0; ci < c.c_in; ++ci)
    for (int i = 0; i < c.kh; ++i)
      for (int j = 0; j < c.kw; ++j) {
        const int h = oh * c.stride - c.pad + i * c.dil, w = ow * c.stride - c.pad + j * c.dil;
        if (h < 0 || h >= c.height || w < 0 || w >= c.width_in) continue;
        sum += Host<T>::get(x[((static_cast<size_t>(b) * c.c_in + ci) * c.height + h) * c.width_in + w]) *
               Host<T>::get(weight[((static_cast<size_t>(row) * c.c_in + ci) * c.kh + i) * c.kw + j]);
      }
  return sum;
}

template <typename T>
void run_case(const Config& c, std::mt19937& rng) {
  using H = Host<T>;
  using A = typename H::acc;
  const int n = c.batch * c.top_k, ew = c.experts * c.width, plane = c.h_out() * c.w_out();
  const size_t x_row = static_cast<size_t>(c.c_in) * c.height * c.width_in, y_row = static_cast<size_t>(c.width) * plane;
  const std::vector<int64_t> idx = random_routing(c, rng);

  // ---- route: offsets and the stable order against a CPU counting sort
  std::vector<int> counts(c.experts, 0), offsets(c.experts + 1, 0), order;
  for (int64_t e : idx) ++counts[e];
  for (int e = 0; e < c.experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  for (int e = 0; e < c.experts; ++e)
    for (int s = 0; s < n; ++s)
      if (idx[s] == e) order.push_back(s);
  int64_t* d_idx = upload(idx);
  int32_t* d_sorted = upload(std::vector<int32_t>(n, -1));
  int32_t* d_info = upload(std::vector<int32_t>(c.experts + 2, -1));
  CHECK_CUDA(moe_route(d_idx, n, c.experts, d_sorted, d_info, 0));
  const std::vector<int32_t> info = download(d_info, c.experts + 2), sorted = download(d_sorted, n);
  bool route_ok = info[0] == 0;
  for (int e = 0; e <= c.experts; ++e) route_ok = route_ok && info[1 + e] == offsets[e];
  for (int r = 0; r < n; ++r) route_ok = route_ok && sorted[r] == order[r];
  if (!route_ok) {
    std::fprintf(stderr, "FAIL %s/%s route: status %d or offsets/order differ from the CPU sort\n", c.name, H::name,
                 info[0]);
    ++g_failures;
    return;
  }

  // ---- forward: gather x, "conv" per expert on the CPU (stands in for cuDNN), fused epilogue
  const std::vector<T> x = random_vec<T>(c.batch * x_row, rng);
  const std::vector<T> weight = random_vec<T>(static_cast<size_t>(ew) * c.c_in * c.kh * c.kw, rng);
  const std::vector<T> gate = random_vec<T>(c.gate ? n : 0, rng), bias = random_vec<T>(c.bias ? ew : 0, rng);
  T* d_x = upload(x);
  T* d_xg = upload(std::vector<T>(n * x_row));
  T* d_gate = c.gate ? upload(gate) : nullptr;
  T* d_bias = c.bias ? upload(bias) : nullptr;
  CHECK_CUDA(moe_gather_rows(d_x, x_row, d_sorted, n, c.top_k, nullptr, d_xg, nullptr, H::dtype, 0));
  const std::vector<T> xg = download(d_xg, n * x_row);
  std::vector<double> want_xg(n * x_row);
  for (int r = 0; r < n; ++r)
    for (size_t i = 0; i < x_row; ++i) want_xg[r * x_row + i] = H::get(x[(order[r] / c.top_k) * x_row + i]);
  expect_close(as_double(xg), want_xg, 0, 0, "gather x", c, H::name);

  std::vector<T> conv(n * y_row);
  std::vector<double> want_y(n * y_row);
  for (int e = 0; e < c.experts; ++e)
    for (int r = offsets[e]; r < offsets[e + 1]; ++r) {
      const int s = order[r], b = s / c.top_k;
      for (int ch = 0; ch < c.width; ++ch)
        for (int p = 0; p < plane; ++p) {
          const double v = conv_at(c, x, b, weight, e * c.width + ch, p / c.w_out(), p % c.w_out());
          conv[r * y_row + ch * plane + p] = H::make(v);
          const double with_bias = v + (c.bias ? H::get(bias[e * c.width + ch]) : 0.0);
          want_y[s * y_row + ch * plane + p] = (c.gate ? H::get(gate[s]) : 1.0) * with_bias;
        }
    }
  T* d_conv = upload(conv);
  T* d_y = upload(std::vector<T>(n * y_row, H::make(1e9)));
  for (int e = 0; e < c.experts; ++e) {
    CHECK_CUDA(moe_scatter_epilogue(d_conv + static_cast<size_t>(offsets[e]) * y_row, d_sorted + offsets[e],
                                    offsets[e + 1] - offsets[e], c.width, plane, d_gate,
                                    c.bias ? d_bias + e * c.width : nullptr, d_y, H::dtype, 0));
  }
  expect_close(as_double(download(d_y, n * y_row)), want_y, 4 * H::tol, 1.0, "forward y", c, H::name);

  // ---- backward: gather grad_out (plain and gate-scaled), scatter(-add) input grads, gate grads
  const std::vector<T> grad_out = random_vec<T>(n * y_row, rng), gx = random_vec<T>(n * x_row, rng);
  T* d_go = upload(grad_out);
  T* d_g = upload(std::vector<T>(n * y_row));
  T* d_gs = upload(std::vector<T>(n * y_row));
  CHECK_CUDA(moe_gather_rows(d_go, y_row, d_sorted, n, 1, d_gate, d_g, c.gate ? d_gs : nullptr, H::dtype, 0));
  std::vector<double> want_g(n * y_row), want_gs(n * y_row);
  for (int r = 0; r < n; ++r)
    for (size_t i = 0; i < y_row; ++i) {
      want_g[r * y_row + i] = H::get(grad_out[order[r] * y_row + i]);
      want_gs[r * y_row + i] = (c.gate ? H::get(gate[order[r]]) : 1.0) * want_g[r * y_row + i];
    }
  expect_close(as_double(download(d_g, n * y_row)), want_g, 0, 0, "gather grad_out", c, H::name);
  // Absolute floor 1e-2 * tol: one rounding of a tiny (subnormal in fp16) product is not relatively small.
  if (c.gate) expect_close(as_double(download(d_gs, n * y_row)), want_gs, H::tol, 1e-2, "gather scaled", c, H::name);

  T* d_gx = upload(gx);
  std::vector<double> want_dx(c.batch * x_row, 0.0);
  for (int r = 0; r < n; ++r)
    for (size_t i = 0; i < x_row; ++i)
      want_dx[(order[r] / c.top_k) * x_row + i] += (c.gate ? H::get(gate[order[r]]) : 1.0) * H::get(gx[r * x_row + i]);
  A* d_acc = upload(std::vector<A>(c.batch * x_row, A(0)));
  for (int e = 0; e < c.experts; ++e) {
    CHECK_CUDA(moe_scatter_rows(d_gx + static_cast<size_t>(offsets[e]) * x_row, d_sorted + offsets[e],
                                offsets[e + 1] - offsets[e], x_row, c.top_k, d_gate, d_acc, 1, H::dtype, 0));
  }
  std::vector<double> got_acc;
  for (A v : download(d_acc, c.batch * x_row)) got_acc.push_back(v);
  expect_close(got_acc, want_dx, 4 * H::tol, 1.0, "scatter-add grad_x", c, H::name);
  if (c.top_k == 1) {
    T* d_dx = upload(std::vector<T>(c.batch * x_row, H::make(1e9)));
    for (int e = 0; e < c.experts; ++e) {
      CHECK_CUDA(moe_scatter_rows(d_gx + static_cast<size_t>(offsets[e]) * x_row, d_sorted + offsets[e],
                                  offsets[e + 1] - offsets[e], x_row, 1, d_gate, d_dx, 0, H::dtype, 0));
    }
    expect_close(as_double(download(d_dx, c.batch * x_row)), want_dx, 2 * H::tol, 1.0, "scatter grad_x", c, H::name);
    CHECK_CUDA(cudaFree(d_dx));
  }

  T* d_gg = upload(std::vector<T>(n, H::make(1e9)));
  std::vector<double> want_gg(n);
  double gg_scale = 1.0;
  for (int e = 0; e < c.experts; ++e)
    for (int r = offsets[e]; r < offsets[e + 1]; ++r) {
      const int s = order[r];
      double sum = 0;
      for (size_t i = 0; i < x_row; ++i) sum += H::get(gx[r * x_row + i]) * H::get(x[(s / c.top_k) * x_row + i]);
      if (c.bias)
        for (size_t i = 0; i < y_row; ++i) sum += H::get(grad_out[s * y_row + i]) * H::get(bias[e * c.width + i / plane]);
      want_gg[s] = sum;
      gg_scale = std::max(gg_scale, std::sqrt(static_cast<double>(x_row + y_row)));
    }
  for (int e = 0; e < c.experts; ++e) {
    CHECK_CUDA(moe_gate_grad(d_gx + static_cast<size_t>(offsets[e]) * x_row, d_x, x_row,
                             d_g + static_cast<size_t>(offsets[e]) * y_row, c.bias ? d_bias + e * c.width : nullptr,
                             c.width, plane, d_sorted + offsets[e], offsets[e + 1] - offsets[e], c.top_k, d_gg,
                             H::dtype, 0));
  }
  expect_close(as_double(download(d_gg, n)), want_gg, 4 * H::tol, gg_scale, "gate grad", c, H::name);

  for (void* p : {static_cast<void*>(d_idx), static_cast<void*>(d_sorted), static_cast<void*>(d_info),
                  static_cast<void*>(d_x), static_cast<void*>(d_xg), static_cast<void*>(d_gate),
                  static_cast<void*>(d_bias), static_cast<void*>(d_conv), static_cast<void*>(d_y),
                  static_cast<void*>(d_go), static_cast<void*>(d_g), static_cast<void*>(d_gs),
                  static_cast<void*>(d_gx), static_cast<void*>(d_acc), static_cast<void*>(d_gg)}) {
    if (p) CHECK_CUDA(cudaFree(p));
  }
}

// An index outside [0, E) (and a negative one) must be reported through info[0], with nothing else written.
void check_bad_index() {
  for (int64_t bad : {int64_t(3), int64_t(-1), int64_t(1) << 40}) {
    const std::vector<int64_t> idx = {0, 1, 2, bad, 1};
    int64_t* d_idx = upload(idx);
    int32_t* d_sorted = upload(std::vector<int32_t>(idx.size(), -7));
    int32_t* d_info = upload(std::vector<int32_t>(5, -7));
    CHECK_CUDA(moe_route(d_idx, idx.size(), 3, d_sorted, d_info, 0));
    const std::vector<int32_t> info = download(d_info, 5), sorted = download(d_sorted, idx.size());
    const bool untouched = std::all_of(sorted.begin(), sorted.end(), [](int32_t v) { return v == -7; });
    if (info[0] != 1 || !untouched) {
      std::fprintf(stderr, "FAIL bad index %lld: status %d, sorted_slot %s\n", static_cast<long long>(bad), info[0],
                   untouched ? "untouched" : "written");
      ++g_failures;
    }
    CHECK_CUDA(cudaFree(d_idx));
    CHECK_CUDA(cudaFree(d_sorted));
    CHECK_CUDA(cudaFree(d_info));
  }
  if (moe_route(nullptr, 1, 0, nullptr, nullptr, 0) != cudaErrorInvalidValue) {
    std::fprintf(stderr, "FAIL moe_route accepted num_experts = 0\n");
    ++g_failures;
  }
  (void)cudaGetLastError();
}

}  // namespace

int main(int argc, char** argv) {
  // name, B, k, E, C_in, H, W, w, kh, kw, stride, pad, dil, bias, gate, empty_expert, dup
  const std::vector<Config> configs = {
      {"basic", 5, 1, 3, 3, 7, 6, 4, 3, 3, 1, 1, 1, true, true, false, false},
      {"k2_empty_stride2", 6, 2, 4, 5, 9, 8, 3, 3, 3, 2, 0, 1, true, true, true, false},
      {"k_eq_e_dilated", 3, 3, 3, 2, 8, 9, 5, 3, 1, 1, 2, 2, false, false, false, false},
      {"dup_slots", 7, 3, 2, 3, 5, 5, 2, 1, 3, 1, 1, 1, true, true, false, true},
      {"batch1", 1, 1, 2, 1, 5, 5, 2, 1, 1, 1, 0, 1, true, false, false, false},
      {"batch0", 0, 2, 3, 2, 4, 4, 2, 3, 3, 1, 1, 1, true, true, false, false},
      {"many_experts", 300, 2, 37, 2, 3, 2, 3, 1, 1, 1, 0, 1, true, true, true, false},
      {"rows_over_grid_y", 70001, 1, 5, 1, 2, 1, 1, 1, 1, 1, 0, 1, true, true, false, false},
  };
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // memcheck/racecheck: skip the huge case
  std::mt19937 rng(1234);
  for (const Config& c : configs) {
    if (quick && c.batch > 10000) continue;
    run_case<float>(c, rng);
    run_case<__half>(c, rng);
    run_case<__nv_bfloat16>(c, rng);
    run_case<double>(c, rng);
  }
  check_bad_index();
  CHECK_CUDA(cudaDeviceSynchronize());
  if (g_failures) {
    std::fprintf(stderr, "standalone_test: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("standalone_test: all kernel checks passed (%zu configs x 4 dtypes)\n", configs.size());
  return 0;
}
