// CPU kernels of moe_kernels_C::sparse_moe_conv2d_{fwd,bwd} (schema in ../sparse_moe_conv2d.cpp).
//
// Design (measured on a 2-core CPU against a dense conv of the active width, see benchmarks/bench_op.py):
//   1. The B*k routing slots are counting-sorted by expert (stable: samples stay in order).
//   2. Each expert's run of slots is cut into chunks of a few samples (about kChunkBytes of activations),
//      so that every intermediate of a chunk stays in cache. oneDNN (at::convolution) is also faster on
//      such small batches than on one large batch.
//   3. A chunk's samples are gathered with one memcpy each (none when they are already consecutive),
//      convolved with the expert's weight slice (bias fused by oneDNN), and the result is written straight
//      into the compact output with the gate applied.
//   4. With at least as many chunks as threads, the chunks run concurrently (one thread per chunk, every op
//      inside single-threaded on cache-resident data): one parallel region per call instead of three per
//      chunk. With fewer chunks (small batches) they run in turn and each op uses all threads.
//   Backward follows the same schedule: grad_out slots are gathered, dgrad gives the unscaled input
//   gradient of every slot, one fused pass computes the gate gradient <dx_slot, x_b> (+ <sum_hw g, bias>)
//   and accumulates gate * dx_slot into grad_x; wgrad/bgrad run on the gate-scaled chunk. Chunks run
//   concurrently only for k = 1, where no two chunks share a sample.
//
// Every argument is checked here (TORCH_CHECK naming the argument) before any memory is touched, so no
// out-of-bounds access is reachable from Python even when torch.ops.moe_kernels_C.* is called directly.
//
// x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k) int64/int32 in [0, E);
// gate: (B, k) or None; bias: (E*w,) or None  ->  y: (B, k*w, H_out, W_out)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

// Activation bytes per chunk (input or output of a chunk, whichever is larger).
constexpr int64_t kChunkBytes = 2 << 20;
// Elements per block of the fused backward pass (fixed, so the gate-gradient sums are deterministic).
constexpr int64_t kBlock = 16384;

struct Geometry {
  int64_t batch, top_k, c_in, height, width_in, rows, num_experts, width, kh, kw, h_out, w_out;
  std::vector<int64_t> stride, padding, dilation;
};

std::vector<int64_t> check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "sparse_moe_conv2d: ", name, " must have 2 entries, got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "sparse_moe_conv2d: ", name, " must be >= ", min_value,
              ", got (", v[0], ", ", v[1], ")");
  return {v[0], v[1]};
}

// Checks every argument of the op; returns the geometry. Also checks the expert_idx values.
Geometry check_args(const Tensor& x, const Tensor& weight, const Tensor& expert_idx, const c10::optional<Tensor>& gate,
                    const c10::optional<Tensor>& bias, int64_t num_experts, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.defined() && x.dim() == 4, "sparse_moe_conv2d: x must have shape (B, C_in, H, W), got ",
              x.defined() ? x.dim() : 0, " dims");
  TORCH_CHECK(weight.defined() && weight.dim() == 4, "sparse_moe_conv2d: weight must have shape (E*w, C_in, kh, kw)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sparse_moe_conv2d: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "sparse_moe_conv2d: weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && expert_idx.device().is_cpu(),
              "sparse_moe_conv2d (cpu backend): x, weight and expert_idx must be CPU tensors");
  TORCH_CHECK(num_experts >= 1, "sparse_moe_conv2d: num_experts must be >= 1, got ", num_experts);
  Geometry g;
  g.batch = x.size(0);
  g.c_in = x.size(1);
  g.height = x.size(2);
  g.width_in = x.size(3);
  g.rows = weight.size(0);
  g.num_experts = num_experts;
  TORCH_CHECK(g.rows > 0 && g.rows % num_experts == 0, "sparse_moe_conv2d: weight has ", g.rows,
              " output rows, which does not divide into num_experts=", num_experts, " experts");
  g.width = g.rows / num_experts;
  TORCH_CHECK(weight.size(1) == g.c_in, "sparse_moe_conv2d: weight expects C_in=", weight.size(1),
              " input channels but x has ", g.c_in);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  TORCH_CHECK(expert_idx.dim() == 2, "sparse_moe_conv2d: expert_idx must have shape (B, k), got ", expert_idx.dim(),
              " dims");
  TORCH_CHECK(expert_idx.scalar_type() == at::kLong || expert_idx.scalar_type() == at::kInt,
              "sparse_moe_conv2d: expert_idx must be an int64 (or int32) tensor, got ", expert_idx.scalar_type());
  TORCH_CHECK(expert_idx.size(0) == g.batch, "sparse_moe_conv2d: expert_idx has batch ", expert_idx.size(0),
              " but x has batch ", g.batch);
  g.top_k = expert_idx.size(1);
  TORCH_CHECK(g.top_k >= 1, "sparse_moe_conv2d: expert_idx must select at least one expert per sample (k >= 1)");
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->dim() == 2 && gate->size(0) == g.batch && gate->size(1) == g.top_k,
                "sparse_moe_conv2d: gate must have shape (B, k) = (", g.batch, ", ", g.top_k, "), got ", gate->sizes());
    TORCH_CHECK(at::isFloatingType(gate->scalar_type()), "sparse_moe_conv2d: gate must be floating point");
    TORCH_CHECK(gate->device().is_cpu(), "sparse_moe_conv2d (cpu backend): gate must be a CPU tensor");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.rows, "sparse_moe_conv2d: bias must have shape (E*w,) = (",
                g.rows, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "sparse_moe_conv2d: bias dtype ", bias->scalar_type(),
                " does not match x dtype ", x.scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), "sparse_moe_conv2d (cpu backend): bias must be a CPU tensor");
  }
  g.stride = check_pair(stride, "stride", 1);
  g.padding = check_pair(padding, "padding", 0);
  g.dilation = check_pair(dilation, "dilation", 1);
  g.h_out = (g.height + 2 * g.padding[0] - g.dilation[0] * (g.kh - 1) - 1) / g.stride[0] + 1;
  g.w_out = (g.width_in + 2 * g.padding[1] - g.dilation[1] * (g.kw - 1) - 1) / g.stride[1] + 1;
  TORCH_CHECK(g.height + 2 * g.padding[0] - g.dilation[0] * (g.kh - 1) - 1 >= 0 &&
                  g.width_in + 2 * g.padding[1] - g.dilation[1] * (g.kw - 1) - 1 >= 0 && g.h_out >= 1 && g.w_out >= 1,
              "sparse_moe_conv2d: output size would be below 1 pixel for input ", x.sizes().slice(2), " and kernel ",
              weight.sizes().slice(2));
  if (expert_idx.numel() > 0) {
    auto [lo, hi] = at::aminmax(expert_idx);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < num_experts, "sparse_moe_conv2d: expert_idx values must be in [0, ", num_experts,
                "), got values in [", lo_v, ", ", hi_v, "]");
  }
  return g;
}

// The B*k slots sorted by expert (stable). Slot s = b*k + j; sorted[offsets[e] .. offsets[e+1]) are expert e's.
struct SlotOrder {
  std::vector<int64_t> sorted, offsets;
};

SlotOrder sort_slots(const Tensor& expert_idx, int64_t num_experts) {
  const Tensor idx = expert_idx.to(at::kLong).contiguous();
  const int64_t* e_ptr = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  SlotOrder order;
  order.offsets.assign(num_experts + 1, 0);
  for (int64_t s = 0; s < n; ++s) order.offsets[e_ptr[s] + 1]++;
  for (int64_t e = 0; e < num_experts; ++e) order.offsets[e + 1] += order.offsets[e];
  std::vector<int64_t> cursor(order.offsets.begin(), order.offsets.end() - 1);
  order.sorted.resize(n);
  for (int64_t s = 0; s < n; ++s) order.sorted[cursor[e_ptr[s]]++] = s;
  return order;
}

// Memory format shared by x and the chunk buffers: channels_last if x is, else contiguous.
at::MemoryFormat format_of(const Tensor& x) {
  if (x.size(1) > 1 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// x: (B, C, H, W) dense in `fmt` -> (n, C, H, W) with rows samples[0..n); a view when they are consecutive.
Tensor gather_samples(const Tensor& x, const int64_t* samples, int64_t n, at::MemoryFormat fmt) {
  bool consecutive = true;
  for (int64_t i = 1; i < n && consecutive; ++i) consecutive = samples[i] == samples[0] + i;
  if (consecutive) return x.narrow(0, samples[0], n);
  Tensor out = at::empty({n, x.size(1), x.size(2), x.size(3)}, x.options().memory_format(fmt));
  // Each sample is one dense block of C*H*W elements in both layouts.
  const int64_t bytes = x.size(1) * x.size(2) * x.size(3) * x.element_size();
  const int64_t src_step = x.stride(0) * x.element_size(), dst_step = out.stride(0) * out.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * dst_step, src + samples[i] * src_step, bytes);
  });
  return out;
}

// Copies (with a per-slot scale) between a chunk tensor (n, w, H, W) and the slot slices of a compact
// tensor (B, k*w, H, W): slot i of the chunk <-> compact[b_i, j_i*w:(j_i+1)*w]. Any strides on either side.
// to_compact: chunk -> compact (forward epilogue); else compact -> chunk (gathering grad_out).
template <typename scalar_t>
void copy_slots(const Tensor& chunk, const Tensor& compact, const int64_t* slots, int64_t n, int64_t top_k,
                const double* scales, bool to_compact) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t w = chunk.size(1), h = chunk.size(2), wd = chunk.size(3);
  scalar_t* c_ptr = chunk.data_ptr<scalar_t>();
  scalar_t* o_ptr = compact.data_ptr<scalar_t>();
  const auto cs = chunk.strides(), os = compact.strides();
  const bool channel_inner = cs[1] == 1 && os[1] == 1;  // channels_last on both sides
  const int64_t outer = channel_inner ? h * wd : w;
  at::parallel_for(0, n * outer, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t i = t / outer, r = t % outer;
      const int64_t b = slots[i] / top_k, j = slots[i] % top_k;
      const opmath_t scale = scales ? static_cast<opmath_t>(scales[slots[i]]) : opmath_t(1);
      scalar_t* cbase = c_ptr + i * cs[0];
      scalar_t* obase = o_ptr + b * os[0] + j * w * os[1];
      if (channel_inner) {
        const int64_t y = r / wd, xx = r % wd;
        scalar_t* cp = cbase + y * cs[2] + xx * cs[3];
        scalar_t* op = obase + y * os[2] + xx * os[3];
        scalar_t* dst = to_compact ? op : cp;
        const scalar_t* src = to_compact ? cp : op;
        for (int64_t c = 0; c < w; ++c) dst[c] = static_cast<scalar_t>(scale * static_cast<opmath_t>(src[c]));
      } else {
        for (int64_t y = 0; y < h; ++y) {
          scalar_t* cp = cbase + r * cs[1] + y * cs[2];
          scalar_t* op = obase + r * os[1] + y * os[2];
          scalar_t* dst = to_compact ? op : cp;
          const scalar_t* src = to_compact ? cp : op;
          const int64_t ds = to_compact ? os[3] : cs[3], ss = to_compact ? cs[3] : os[3];
          if (ds == 1 && ss == 1) {
            for (int64_t xx = 0; xx < wd; ++xx) dst[xx] = static_cast<scalar_t>(scale * static_cast<opmath_t>(src[xx]));
          } else {
            for (int64_t xx = 0; xx < wd; ++xx) {
              dst[xx * ds] = static_cast<scalar_t>(scale * static_cast<opmath_t>(src[xx * ss]));
            }
          }
        }
      }
    }
  });
}

// One chunk: sorted slots [start, start + n) of expert e.
struct Chunk {
  int64_t expert, start, n;
};

// Cuts every expert's run of slots into chunks of at most ~kChunkBytes of activations, and at most
// ceil(B*k / threads) slots, so that there are enough chunks to keep every thread busy.
std::vector<Chunk> make_chunks(const SlotOrder& order, const Geometry& g, int64_t element_size) {
  const int64_t per_slot = std::max(g.c_in * g.height * g.width_in, g.width * g.h_out * g.w_out) * element_size;
  const int64_t total = g.batch * g.top_k, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_bytes = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(per_slot, 1));
  const int64_t chunk = std::max<int64_t>(1, std::min(by_bytes, (total + threads - 1) / threads));
  std::vector<Chunk> chunks;
  for (int64_t e = 0; e < g.num_experts; ++e) {
    for (int64_t s = order.offsets[e]; s < order.offsets[e + 1]; s += chunk) {
      chunks.push_back({e, s, std::min(chunk, order.offsets[e + 1] - s)});
    }
  }
  return chunks;
}

// Runs fn(chunk index) for every chunk. With at least as many chunks as threads (and `outer_ok`), the
// chunks run concurrently, one thread each, and every op inside runs single-threaded on cache-resident
// data; otherwise they run one after the other and each op uses all threads.
template <typename F>
void for_each_chunk(int64_t num_chunks, bool outer_ok, const F& fn) {
  const int64_t threads = at::get_num_threads();
  if (outer_ok && threads > 1 && num_chunks >= threads && !at::in_parallel_region()) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
#ifdef _OPENMP
      // Nested oneDNN primitives must see one thread: they size their internal barriers by
      // omp_get_max_threads() and would otherwise wait forever for a thread the nested region never gets.
      // (Only this region's implicit task is affected.)
      omp_set_num_threads(1);
#endif
      for (int64_t c = lo; c < hi; ++c) fn(c);
    });
  } else {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
  }
}

// Gate as float64 (B*k,) or an empty vector when there is none.
std::vector<double> gate_values(const c10::optional<Tensor>& gate) {
  if (!gate.has_value() || !gate->defined()) return {};
  const Tensor g = gate->to(at::kDouble).contiguous();
  return std::vector<double>(g.data_ptr<double>(), g.data_ptr<double>() + g.numel());
}

Tensor sparse_moe_conv2d_fwd_cpu(const Tensor& x_in, const Tensor& weight_in, const Tensor& expert_idx,
                                 const c10::optional<Tensor>& gate, const c10::optional<Tensor>& bias,
                                 int64_t num_experts, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  const Geometry g = check_args(x_in, weight_in, expert_idx, gate, bias, num_experts, stride, padding, dilation);
  at::NoGradGuard no_grad;
  const at::MemoryFormat fmt = format_of(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Tensor weight = weight_in.contiguous();
  Tensor out = at::empty({g.batch, g.top_k * g.width, g.h_out, g.w_out}, x.options().memory_format(fmt));
  if (g.batch == 0) return out;
  const SlotOrder order = sort_slots(expert_idx, num_experts);
  const std::vector<double> gates = gate_values(gate);
  const std::vector<Chunk> chunks = make_chunks(order, g, x.element_size());
  // Chunks write disjoint output slots, so they may run concurrently for any k.
  for_each_chunk(static_cast<int64_t>(chunks.size()), true, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const int64_t* slots = order.sorted.data() + ch.start;
    std::vector<int64_t> samples(ch.n);
    for (int64_t i = 0; i < ch.n; ++i) samples[i] = slots[i] / g.top_k;
    const Tensor w_e = weight.narrow(0, ch.expert * g.width, g.width);
    c10::optional<Tensor> b_e;
    if (bias.has_value() && bias->defined()) b_e = bias->narrow(0, ch.expert * g.width, g.width);
    const Tensor x_c = gather_samples(x, samples.data(), ch.n, fmt);
    const Tensor y_c = at::convolution(x_c, w_e, b_e, g.stride, g.padding, g.dilation, false, {0, 0}, 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_moe_conv2d_fwd", [&] {
      copy_slots<scalar_t>(y_c, out, slots, ch.n, g.top_k, gates.empty() ? nullptr : gates.data(), true);
    });
  });
  return out;
}

// For every slot i of a chunk (sample b_i, gate s_i): dot[i] = <dx_i, x[b_i]> and
// grad_x[b_i] (=|+=) s_i * dx_i. dx, x and grad_x share one dense layout, so this is elementwise per sample.
// first[i] says whether slot i is the first to write its sample. Parallel over element blocks (no races
// even when one sample occurs twice in a chunk); the dot is summed per block in a fixed order.
template <typename scalar_t>
void fuse_input_grad(const Tensor& dx, const Tensor& x, Tensor* grad_x, const int64_t* samples, const double* scales,
                     const char* first, int64_t n, double* dots) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t per = x.size(1) * x.size(2) * x.size(3);  // dense elements of one sample
  const int64_t x_step = x.stride(0), dx_step = dx.stride(0), gx_step = grad_x ? grad_x->stride(0) : 0;
  const int64_t blocks = (per + kBlock - 1) / kBlock;
  std::vector<double> partial(dots ? blocks * n : 0, 0.0);
  const scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* gx_ptr = grad_x ? grad_x->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t a = blk * kBlock, z = std::min(per, a + kBlock);
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* d = dx_ptr + i * dx_step;
        if (dots) {
          const scalar_t* xs = x_ptr + samples[i] * x_step;
          opmath_t acc = 0;
          for (int64_t t = a; t < z; ++t) acc += static_cast<opmath_t>(d[t]) * static_cast<opmath_t>(xs[t]);
          partial[blk * n + i] = static_cast<double>(acc);
        }
        if (gx_ptr) {
          scalar_t* out = gx_ptr + samples[i] * gx_step;
          const opmath_t s = scales ? static_cast<opmath_t>(scales[i]) : opmath_t(1);
          if (first[i]) {
            for (int64_t t = a; t < z; ++t) out[t] = static_cast<scalar_t>(s * static_cast<opmath_t>(d[t]));
          } else {
            for (int64_t t = a; t < z; ++t) {
              out[t] = static_cast<scalar_t>(static_cast<opmath_t>(out[t]) + s * static_cast<opmath_t>(d[t]));
            }
          }
        }
      }
    }
  });
  if (dots) {
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) sum += partial[blk * n + i];
      dots[i] = sum;
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sparse_moe_conv2d_bwd_cpu(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in, const Tensor& expert_idx,
    const c10::optional<Tensor>& gate, const c10::optional<Tensor>& bias, int64_t num_experts, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 4> needs) {
  const Geometry g = check_args(x_in, weight_in, expert_idx, gate, bias, num_experts, stride, padding, dilation);
  TORCH_CHECK(grad_out_in.defined() && grad_out_in.dim() == 4 && grad_out_in.size(0) == g.batch &&
                  grad_out_in.size(1) == g.top_k * g.width && grad_out_in.size(2) == g.h_out &&
                  grad_out_in.size(3) == g.w_out,
              "sparse_moe_conv2d_bwd: grad_out must have shape (B, k*w, H_out, W_out) = (", g.batch, ", ",
              g.top_k * g.width, ", ", g.h_out, ", ", g.w_out, ")");
  TORCH_CHECK(grad_out_in.device().is_cpu() && at::isFloatingType(grad_out_in.scalar_type()),
              "sparse_moe_conv2d_bwd: grad_out must be a floating point CPU tensor");
  at::NoGradGuard no_grad;
  const bool has_gate = gate.has_value() && gate->defined(), has_bias = bias.has_value() && bias->defined();
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2] && has_bias, need_g = needs[3] && has_gate;
  const at::MemoryFormat fmt = format_of(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Tensor weight = weight_in.contiguous();
  const Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous(fmt);
  const auto opt = x.options();
  Tensor grad_x = need_x ? at::empty_like(x, opt.memory_format(fmt)) : at::empty({0}, opt);
  Tensor grad_w = need_w ? at::zeros_like(weight) : at::empty({0}, opt);
  Tensor grad_b = need_b ? at::zeros({g.rows}, opt) : at::empty({0}, opt);
  Tensor grad_g = need_g ? at::zeros({g.batch, g.top_k}, gate->options()) : at::empty({0}, opt);
  if (g.batch == 0 || !(need_x || need_w || need_b || need_g)) return {grad_x, grad_w, grad_b, grad_g};

  const SlotOrder order = sort_slots(expert_idx, num_experts);
  const std::vector<double> gates = gate_values(gate);
  const std::vector<Chunk> chunks = make_chunks(order, g, x.element_size());
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // first[p]: the slot at sorted position p is the first (in chunk order) to write its sample's grad_x.
  std::vector<char> first(order.sorted.size());
  {
    std::vector<char> touched(g.batch, 0);
    for (size_t p = 0; p < order.sorted.size(); ++p) {
      const int64_t b = order.sorted[p] / g.top_k;
      first[p] = !touched[b];
      touched[b] = 1;
    }
  }
  std::vector<double> grad_g_acc(need_g ? g.batch * g.top_k : 0, 0.0);
  std::vector<Tensor> gw_parts(num_chunks), gb_parts(num_chunks);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> bias_sizes = {g.width};
  const bool want_dx = need_x || need_g;
  const bool scaled_wgrad = has_gate && (need_w || need_b);
  // One convolution_backward call for everything when the gate does not scale the weight gradient,
  // else dgrad on the unscaled slots first (the gate gradient needs them) and wgrad on the scaled ones.
  const std::array<bool, 3> mask1 = {want_dx, need_w && !scaled_wgrad, need_b && !scaled_wgrad};
  // With k = 1 every sample lies in exactly one chunk: chunks touch disjoint grad_x rows and gate slots and
  // may run concurrently. Weight-gradient parts are summed afterwards in chunk order (deterministic).
  for_each_chunk(num_chunks, g.top_k == 1, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const int64_t n = ch.n, e = ch.expert;
    const int64_t* slots = order.sorted.data() + ch.start;
    std::vector<int64_t> samples(n);
    std::vector<double> scales(n), dots(n);
    bool consecutive = true;
    for (int64_t i = 0; i < n; ++i) {
      samples[i] = slots[i] / g.top_k;
      scales[i] = has_gate ? gates[slots[i]] : 1.0;
      consecutive = consecutive && samples[i] == samples[0] + i;
    }
    const Tensor w_e = weight.narrow(0, e * g.width, g.width);
    const Tensor x_c = gather_samples(x, samples.data(), n, fmt);
    // grad_out slots of this chunk, unscaled: (n, w, H_out, W_out)
    Tensor g_c;
    if (g.top_k == 1 && consecutive) {
      g_c = grad_out.narrow(0, samples[0], n);
    } else {
      g_c = at::empty({n, g.width, g.h_out, g.w_out}, grad_out.options().memory_format(fmt));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_moe_conv2d_gather", [&] {
        copy_slots<scalar_t>(g_c, grad_out, slots, n, g.top_k, nullptr, false);
      });
    }
    Tensor dx_c, gw_c, gb_c;
    if (mask1[0] || mask1[1] || mask1[2]) {
      std::tie(dx_c, gw_c, gb_c) = at::convolution_backward(
          g_c, x_c, w_e, mask1[2] ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), g.stride,
          g.padding, g.dilation, false, {0, 0}, 1, mask1);
    }
    if (want_dx) {
      const Tensor dx = dx_c.contiguous(fmt);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_moe_conv2d_dx", [&] {
        fuse_input_grad<scalar_t>(dx, x, need_x ? &grad_x : nullptr, samples.data(), has_gate ? scales.data() : nullptr,
                                  first.data() + ch.start, n, need_g ? dots.data() : nullptr);
      });
      if (need_g) {
        if (has_bias) {  // + <sum_hw g_slot, bias_e>
          const Tensor gsum = g_c.sum({2, 3}, false, acc_type);
          const Tensor bdot = at::mv(gsum, bias->narrow(0, e * g.width, g.width).to(acc_type)).to(at::kDouble);
          const double* bd = bdot.data_ptr<double>();
          for (int64_t i = 0; i < n; ++i) dots[i] += bd[i];
        }
        for (int64_t i = 0; i < n; ++i) grad_g_acc[slots[i]] = dots[i];
      }
    }
    if (scaled_wgrad) {
      Tensor gs = at::empty_like(g_c, g_c.options().memory_format(fmt));
      const Tensor scale_t = at::from_blob(scales.data(), {n, 1, 1, 1}, at::kDouble).to(x.scalar_type());
      at::mul_out(gs, g_c, scale_t);
      std::tie(std::ignore, gw_c, gb_c) = at::convolution_backward(
          gs, x_c, w_e, need_b ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), g.stride,
          g.padding, g.dilation, false, {0, 0}, 1, {false, need_w, need_b});
    }
    if (need_w) gw_parts[c] = gw_c;
    if (need_b) gb_parts[c] = gb_c;
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t e = chunks[c].expert;
    if (need_w) grad_w.narrow(0, e * g.width, g.width).add_(gw_parts[c]);
    if (need_b) grad_b.narrow(0, e * g.width, g.width).add_(gb_parts[c]);
  }
  if (need_g) grad_g.copy_(at::from_blob(grad_g_acc.data(), {g.batch, g.top_k}, at::kDouble));
  return {grad_x, grad_w, grad_b, grad_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("sparse_moe_conv2d_fwd", &sparse_moe_conv2d_fwd_cpu);
  m.impl("sparse_moe_conv2d_bwd", &sparse_moe_conv2d_bwd_cpu);
}
