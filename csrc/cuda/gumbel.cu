// CUDA kernels of the Gumbel family; the semantics are those of cpu/gumbel.cpp.
//
// Sampling: rows of up to 1024 categories are owned by a warp, each lane holding up to 8 Philox
// counters (32 values) of the row in registers: the noise is generated once (element (row, k) is
// number row * K4 + k of the stream, csrc/philox.h), the logits read once, max/argmax and the
// exp-sum reduced with shuffles, the sample written once. Longer rows are owned by a block that
// regenerates the noise on each of its passes instead of storing it. K = 2 has a thread per row:
// one counter, the logistic of the difference (l1 + g1) - (l0 + g0). Forced rows are written as
// one-hots without reading their logits. The backward is a warp per row: soft from the saved
// sample; hard (straight-through) recomputes the soft sample from the logits and the noise.
// Half types compute in float32, float64 in double (the noise is float32, as everywhere). The
// values are checked by the Python layer (one reduction), not here: the kernels never stop the
// stream to report.
#include "cuda_common.cuh"
#include "../common.h"
#include "../ops.h"
#include "../philox.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace lfi_fast {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

LFI_D float dexp(float x) { return expf(x); }
LFI_D double dexp(double x) { return ::exp(x); }

template <typename acc_t>
LFI_D acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The noise of element i (< k) of row r, whose counter's four numbers are `bits` (Philox) or
// read from np (explicit noise).
template <typename acc_t>
LFI_D acc_t noise_of(const acc_t* np, const philox::U4& bits, int64_t r, int64_t k, int64_t i, int e) {
  return np ? np[r * k + i] : static_cast<acc_t>(philox::gumbel(philox::lane(bits, e)));
}

template <typename acc_t>
LFI_D void argmax_merge(acc_t& m, int& a, acc_t m2, int a2) {
  if (m2 > m || (m2 == m && a2 < a)) {
    m = m2;
    a = a2;
  }
}

template <typename acc_t>
LFI_D void warp_argmax(acc_t& m, int& a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(kFull, m, off);
    const int a2 = __shfl_xor_sync(kFull, a, off);
    argmax_merge(m, a, m2, a2);
  }
}

template <typename acc_t>
LFI_D acc_t warp_sum(acc_t s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  return s;
}

template <typename scalar_t>
LFI_D void write_one_hot(scalar_t* o, int64_t k, int64_t hot, int64_t start, int64_t step) {
  for (int64_t i = start; i < k; i += step) o[i] = static_cast<scalar_t>(i == hot ? 1.0f : 0.0f);
}

struct SampleArgs {
  const bool* mask;
  const int64_t* targets;
  int64_t rows, k;
  uint64_t seed, offset;
  bool hard;
};

// ---- forward: a warp per row, the row's noise and logits in registers (K <= 128 NC) -------------

template <typename scalar_t, int NC>
__global__ void __launch_bounds__(kThreads) fwd_warp_kernel(const scalar_t* __restrict__ lp,
                                                            const typename AccT<scalar_t>::type* __restrict__ np,
                                                            scalar_t* __restrict__ op, SampleArgs a,
                                                            typename AccT<scalar_t>::type inv_tau) {
  using acc_t = typename AccT<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t k = a.k, cpr = (k + 3) / 4;  // counters per row
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < a.rows; r += step) {
    scalar_t* o = op + r * k;
    if (a.mask && a.mask[r]) {
      write_one_hot(o, k, a.targets[r], lane, 32);
      continue;
    }
    acc_t z[4 * NC];
    acc_t m = neg_inf<acc_t>();
    int am = std::numeric_limits<int>::max();
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int64_t c = lane + 32 * j;
      philox::U4 bits{0u, 0u, 0u, 0u};
      if (!np && c < cpr) bits = philox::block(a.seed, a.offset + static_cast<uint64_t>(r * cpr + c));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = 4 * c + e;
        acc_t v = neg_inf<acc_t>();
        if (i < k) v = static_cast<acc_t>(lp[r * k + i]) + noise_of(np, bits, r, k, i, e);
        z[4 * j + e] = v;
        if (i < k) argmax_merge(m, am, v, static_cast<int>(i));  // increasing i: the first max
      }
    }
    warp_argmax(m, am);
    if (a.hard) {
      write_one_hot(o, k, am, lane, 32);
      continue;
    }
    acc_t s = 0;
#pragma unroll
    for (int j = 0; j < 4 * NC; ++j) {
      const int64_t i = 4 * (lane + 32 * (j / 4)) + (j % 4);
      z[j] = i < k ? dexp((z[j] - m) * inv_tau) : acc_t(0);
      s += z[j];
    }
    const acc_t inv = acc_t(1) / warp_sum(s);
#pragma unroll
    for (int j = 0; j < 4 * NC; ++j) {
      const int64_t i = 4 * (lane + 32 * (j / 4)) + (j % 4);
      if (i < k) o[i] = static_cast<scalar_t>(z[j] * inv);
    }
  }
}

// ---- forward: a block per row for long rows, the noise regenerated on each pass -----------------

template <typename acc_t>
LFI_D void block_argmax(acc_t& m, int& a, acc_t* sm, int* sa) {
  warp_argmax(m, a);
  const int w = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();  // the shared slots may still be read by the previous reduction
  if (lane == 0) {
    sm[w] = m;
    sa[w] = a;
  }
  __syncthreads();
  m = lane < kWarps ? sm[lane] : neg_inf<acc_t>();
  a = lane < kWarps ? sa[lane] : std::numeric_limits<int>::max();
  warp_argmax(m, a);
}

template <typename acc_t>
LFI_D acc_t block_sum(acc_t s, acc_t* sm) {
  s = warp_sum(s);
  const int w = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) sm[w] = s;
  __syncthreads();
  s = lane < kWarps ? sm[lane] : acc_t(0);
  return warp_sum(s);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fwd_block_kernel(const scalar_t* __restrict__ lp,
                                                             const typename AccT<scalar_t>::type* __restrict__ np,
                                                             scalar_t* __restrict__ op, SampleArgs a,
                                                             typename AccT<scalar_t>::type inv_tau) {
  using acc_t = typename AccT<scalar_t>::type;
  __shared__ acc_t sm[kWarps];
  __shared__ int sa[kWarps];
  const int64_t k = a.k, cpr = (k + 3) / 4;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    scalar_t* o = op + r * k;
    if (a.mask && a.mask[r]) {
      write_one_hot(o, k, a.targets[r], threadIdx.x, kThreads);
      continue;
    }
    // pass over the row's counters: visit(i, z) for every element
    auto each = [&](auto&& visit) {
      for (int64_t c = threadIdx.x; c < cpr; c += kThreads) {
        philox::U4 bits{0u, 0u, 0u, 0u};
        if (!np) bits = philox::block(a.seed, a.offset + static_cast<uint64_t>(r * cpr + c));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = 4 * c + e;
          if (i < k) visit(i, static_cast<acc_t>(lp[r * k + i]) + noise_of(np, bits, r, k, i, e));
        }
      }
    };
    acc_t m = neg_inf<acc_t>();
    int am = std::numeric_limits<int>::max();
    each([&](int64_t i, acc_t v) { argmax_merge(m, am, v, static_cast<int>(i)); });
    block_argmax(m, am, sm, sa);
    if (a.hard) {
      write_one_hot(o, k, am, threadIdx.x, kThreads);
      continue;
    }
    acc_t s = 0;
    each([&](int64_t, acc_t v) { s += dexp((v - m) * inv_tau); });
    const acc_t inv = acc_t(1) / block_sum(s, sm);
    each([&](int64_t i, acc_t v) { o[i] = static_cast<scalar_t>(dexp((v - m) * inv_tau) * inv); });
  }
}

// ---- forward: K = 2, a thread per row -------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fwd_binary_kernel(const scalar_t* __restrict__ lp,
                                                              const typename AccT<scalar_t>::type* __restrict__ np,
                                                              scalar_t* __restrict__ op, SampleArgs a,
                                                              typename AccT<scalar_t>::type inv_tau) {
  using acc_t = typename AccT<scalar_t>::type;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < a.rows; r += step) {
    acc_t y0, y1;
    if (a.mask && a.mask[r]) {
      y1 = a.targets[r] == 1 ? acc_t(1) : acc_t(0);
      y0 = acc_t(1) - y1;
    } else {
      philox::U4 bits{0u, 0u, 0u, 0u};
      if (!np) bits = philox::block(a.seed, a.offset + static_cast<uint64_t>(r));
      const acc_t d = (static_cast<acc_t>(lp[2 * r + 1]) + noise_of(np, bits, r, 2, 1, 1)) -
                      (static_cast<acc_t>(lp[2 * r]) + noise_of(np, bits, r, 2, 0, 0));
      if (a.hard) {
        y1 = d > 0 ? acc_t(1) : acc_t(0);
        y0 = acc_t(1) - y1;
      } else {
        const acc_t e = dexp(-(d < 0 ? -d : d) * inv_tau);
        const acc_t big = acc_t(1) / (acc_t(1) + e), small = e * big;
        y0 = d > 0 ? small : big;
        y1 = d > 0 ? big : small;
      }
    }
    op[2 * r] = static_cast<scalar_t>(y0);
    op[2 * r + 1] = static_cast<scalar_t>(y1);
  }
}

// ---- backward: a warp per row ---------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bwd_warp_kernel(const scalar_t* __restrict__ gp,
                                                            const scalar_t* __restrict__ lp,
                                                            const scalar_t* __restrict__ yp,
                                                            const typename AccT<scalar_t>::type* __restrict__ np,
                                                            scalar_t* __restrict__ gip, SampleArgs a,
                                                            typename AccT<scalar_t>::type inv_tau) {
  using acc_t = typename AccT<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t k = a.k, cpr = (k + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < a.rows; r += step) {
    const scalar_t* g = gp + r * k;
    scalar_t* o = gip + r * k;
    if (a.mask && a.mask[r]) {
      for (int64_t i = lane; i < k; i += 32) o[i] = static_cast<scalar_t>(0.0f);
      continue;
    }
    if (!a.hard) {  // from the saved sample y: y * (g - <g, y>) / tau
      const scalar_t* y = yp + r * k;
      acc_t s = 0;
      for (int64_t i = lane; i < k; i += 32) s += static_cast<acc_t>(g[i]) * static_cast<acc_t>(y[i]);
      s = warp_sum(s);
      for (int64_t i = lane; i < k; i += 32) {
        const acc_t yi = static_cast<acc_t>(y[i]);
        o[i] = static_cast<scalar_t>(yi * (static_cast<acc_t>(g[i]) - s) * inv_tau);
      }
      continue;
    }
    // straight-through: the soft sample's gradient, the soft sample recomputed from its noise
    auto each = [&](auto&& visit) {
      for (int64_t c = lane; c < cpr; c += 32) {
        philox::U4 bits{0u, 0u, 0u, 0u};
        if (!np) bits = philox::block(a.seed, a.offset + static_cast<uint64_t>(r * cpr + c));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = 4 * c + e;
          if (i < k) visit(i, static_cast<acc_t>(lp[r * k + i]) + noise_of(np, bits, r, k, i, e));
        }
      }
    };
    acc_t m = neg_inf<acc_t>();
    each([&](int64_t, acc_t v) { m = v > m ? v : m; });
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t m2 = __shfl_xor_sync(kFull, m, off);
      m = m2 > m ? m2 : m;
    }
    acc_t se = 0, sg = 0;
    each([&](int64_t i, acc_t v) {
      const acc_t ev = dexp((v - m) * inv_tau);
      se += ev;
      sg += ev * static_cast<acc_t>(g[i]);
    });
    se = warp_sum(se);
    sg = warp_sum(sg);
    const acc_t inv = acc_t(1) / se, s = sg * inv;
    each([&](int64_t i, acc_t v) {
      const acc_t yi = dexp((v - m) * inv_tau) * inv;
      o[i] = static_cast<scalar_t>(yi * (static_cast<acc_t>(g[i]) - s) * inv_tau);
    });
  }
}

// ---- single interventions --------------------------------------------------------------------------

// Element (b, j, u) of single_interventions: variable u of change j of code b.
LFI_D int64_t changed_code(const int64_t* codes, int64_t b, int64_t j, int64_t u, int64_t v, int64_t k1) {
  const int64_t var = j / k1, r = j % k1, c = codes[b * v + u];
  return u == var ? r + (r >= c ? 1 : 0) : c;
}

__global__ void single_interventions_kernel(const int64_t* __restrict__ codes, int64_t* __restrict__ out,
                                            int64_t total, int64_t v, int64_t k1) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t u = idx % v, t = idx / v;
    out[idx] = changed_code(codes, t / (v * k1), t % (v * k1), u, v, k1);
  }
}

template <typename scalar_t>
__global__ void single_intervention_one_hot_kernel(const int64_t* __restrict__ codes, scalar_t* __restrict__ out,
                                                   int64_t total, int64_t v, int64_t k) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t k1 = k - 1;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t cat = idx % k, t = idx / k, u = t % v, t2 = t / v;
    const int64_t c = changed_code(codes, t2 / (v * k1), t2 % (v * k1), u, v, k1);
    out[idx] = static_cast<scalar_t>(c == cat ? 1.0f : 0.0f);
  }
}

// ---- launchers -------------------------------------------------------------------------------------


unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

struct Checked {
  SampleArgs args;
  Tensor mask, targets, noise;
};

Checked check_args(const Tensor& logits, const std::optional<Tensor>& mask, const std::optional<Tensor>& targets,
                   const std::optional<Tensor>& noise, double tau, int64_t seed, int64_t offset, bool hard) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (rows, K) (got shape ", logits.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be a floating tensor (got ",
              logits.scalar_type(), ")");
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor (got ", logits.device(), ")");
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be positive and finite (got ", tau, ")");
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, "seed and offset must be >= 0 (got ", seed, ", ", offset, ")");
  TORCH_CHECK(mask.has_value() == targets.has_value(), "mask and targets go together");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(), "logits: K must be < 2^31");
  const int64_t rows = logits.size(0);
  Checked c;
  c.args = SampleArgs{nullptr, nullptr, rows, logits.size(1), static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset), hard};
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be a bool tensor (got ", mask->scalar_type(), ")");
    TORCH_CHECK(targets->scalar_type() == at::kLong, "targets must be int64 (got ", targets->scalar_type(), ")");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == rows, "mask must be (rows,) = (", rows, ",) (got ",
                mask->sizes(), ")");
    TORCH_CHECK(targets->dim() == 1 && targets->size(0) == rows, "targets must be (rows,) = (", rows,
                ",) (got ", targets->sizes(), ")");
    LFI_CHECK_DEVICE(*mask, logits.device());
    LFI_CHECK_DEVICE(*targets, logits.device());
    c.mask = mask->contiguous();
    c.targets = targets->contiguous();
    c.args.mask = c.mask.const_data_ptr<bool>();
    c.args.targets = c.targets.const_data_ptr<int64_t>();
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), "noise must have the logits' shape ", logits.sizes(),
                " (got ", noise->sizes(), ")");
    TORCH_CHECK(at::isFloatingType(noise->scalar_type()), "noise must be a floating tensor");
    LFI_CHECK_DEVICE(*noise, logits.device());
    c.noise = noise->to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  return c;
}

template <typename scalar_t>
void launch_forward(const Tensor& l, const Checked& c, double tau, Tensor& out) {
  using acc_t = typename AccT<scalar_t>::type;
  const scalar_t* lp = l.const_data_ptr<scalar_t>();
  const acc_t* np = c.noise.defined() ? c.noise.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const SampleArgs& a = c.args;
  const int64_t cpr = (a.k + 3) / 4;
  if (a.k == 2) {
    fwd_binary_kernel<scalar_t><<<grid_for(a.rows, kThreads), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  } else if (cpr <= 32) {
    fwd_warp_kernel<scalar_t, 1><<<grid_for(a.rows, kWarps), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  } else if (cpr <= 64) {
    fwd_warp_kernel<scalar_t, 2><<<grid_for(a.rows, kWarps), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  } else if (cpr <= 128) {
    fwd_warp_kernel<scalar_t, 4><<<grid_for(a.rows, kWarps), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  } else if (cpr <= 256) {
    fwd_warp_kernel<scalar_t, 8><<<grid_for(a.rows, kWarps), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  } else {
    fwd_block_kernel<scalar_t><<<grid_for(a.rows, 1), kThreads, 0, current_stream()>>>(lp, np, op, a, inv_tau);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor check_codes(const Tensor& codes, int64_t k) {
  TORCH_CHECK(codes.dim() == 2, "codes must be (B, V) (got shape ", codes.sizes(), ")");
  TORCH_CHECK(codes.scalar_type() == at::kLong, "codes must be int64 (got ", codes.scalar_type(), ")");
  TORCH_CHECK(codes.is_cuda(), "codes must be a CUDA tensor (got ", codes.device(), ")");
  TORCH_CHECK_VALUE(k >= 2, "num_categories must be >= 2 (got ", k, ")");
  return codes.contiguous();
}

}  // namespace

Tensor gumbel_softmax_cuda(const Tensor& logits, const std::optional<Tensor>& mask,
                           const std::optional<Tensor>& targets, const std::optional<Tensor>& noise, double tau,
                           bool hard, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Checked c = check_args(logits, mask, targets, noise, tau, seed, offset, hard);
  const Tensor l = logits.contiguous();
  Tensor out = at::empty_like(l, at::MemoryFormat::Contiguous);
  if (l.numel() == 0) return out;
  LFI_DISPATCH(l.scalar_type(), "gumbel_softmax_cuda", [&] { launch_forward<scalar_t>(l, c, tau, out); });
  return out;
}

Tensor gumbel_softmax_backward_cuda(const Tensor& grad, const Tensor& logits, const Tensor& out,
                                    const std::optional<Tensor>& mask, const std::optional<Tensor>& noise,
                                    double tau, bool hard, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(logits.device());
  std::optional<Tensor> targets;
  if (mask.has_value()) targets = at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  const Checked c = check_args(logits, mask, targets, noise, tau, seed, offset, hard);
  TORCH_CHECK(grad.sizes() == logits.sizes() && out.sizes() == logits.sizes(),
              "grad and out must have the logits' shape ", logits.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && out.scalar_type() == logits.scalar_type(),
              "grad, out and logits must have one dtype");
  LFI_CHECK_DEVICE(grad, logits.device());
  LFI_CHECK_DEVICE(out, logits.device());
  const Tensor l = logits.contiguous(), g = grad.contiguous(), y = out.contiguous();
  Tensor gl = at::empty_like(l, at::MemoryFormat::Contiguous);
  if (l.numel() == 0) return gl;
  LFI_DISPATCH(l.scalar_type(), "gumbel_softmax_backward_cuda", [&] {
    using acc_t = typename AccT<scalar_t>::type;
    const acc_t* np = c.noise.defined() ? c.noise.const_data_ptr<acc_t>() : nullptr;
    bwd_warp_kernel<scalar_t><<<grid_for(c.args.rows, kWarps), kThreads, 0, current_stream()>>>(
        g.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), np,
        gl.mutable_data_ptr<scalar_t>(), c.args, static_cast<acc_t>(1.0 / tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gl;
}

Tensor single_interventions_cuda(const Tensor& codes, int64_t num_categories) {
  const c10::cuda::CUDAGuard guard(codes.device());
  const Tensor c = check_codes(codes, num_categories);
  const int64_t b = c.size(0), v = c.size(1), k1 = num_categories - 1;
  Tensor out = at::empty({b, v * k1, v}, c.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  single_interventions_kernel<<<grid_for(total, kThreads), kThreads, 0, current_stream()>>>(
      c.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), total, v, k1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor single_intervention_one_hot_cuda(const Tensor& codes, int64_t num_categories, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(codes.device());
  const Tensor c = check_codes(codes, num_categories);
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating dtype (got ", dtype, ")");
  const int64_t b = c.size(0), v = c.size(1), k = num_categories;
  Tensor out = at::empty({b, v * (k - 1), v, k}, c.options().dtype(dtype));
  const int64_t total = out.numel();
  if (total == 0) return out;
  LFI_DISPATCH(dtype, "single_intervention_one_hot_cuda", [&] {
    single_intervention_one_hot_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0, current_stream()>>>(
        c.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), total, v, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(lfi_fast, CUDA, m) {
  m.impl("gumbel_softmax", &gumbel_softmax_cuda);
  m.impl("gumbel_softmax_backward", &gumbel_softmax_backward_cuda);
  m.impl("single_interventions", &single_interventions_cuda);
  m.impl("single_intervention_one_hot", &single_intervention_one_hot_cuda);
}

}  // namespace lfi_fast
