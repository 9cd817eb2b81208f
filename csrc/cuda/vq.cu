// CUDA kernels of the vq family; the semantics are those of cpu/vq.cpp.
//
// nearest: a block owns kBM rows for the whole codebook. For each tile of BN codes it computes the
// kBM x BN scores as a shared-memory tiled product over D (x and w tiles of kBD coordinates in
// shared memory, a 16 x 16 thread grid with (kBM/16) x (BN/16) outputs per thread, in the compute
// type: float, or double for double inputs), adds the per-code bias (and |x|^2 scale for
// Poincaré), writes the score tile to shared memory, and one thread per row updates that row's
// running top-k (k <= 32, codes scanned in ascending order with a strict <, so ties go to the lower
// index) from it. Nothing of size N x K exists. A second kernel computes the distances of the
// chosen codes directly, in double, and the k codes are re-sorted by them. k > 32 takes a chunked
// ATen path (scores for a bounded number of rows at a time, then topk).
//
// The codebook gradient of quantize: atomics, or, when torch.are_deterministic_algorithms_enabled(),
// a stable sort of the indices and one block per code summing its rows in order. The EMA update
// always takes the sort path: deterministic.
#include "cuda_common.cuh"
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>

namespace lfi_fast {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // 16 x 16
constexpr int kBM = 64;        // rows per block
constexpr int kBD = 16;        // coordinates per shared-memory step
constexpr int kMaxK = 32;      // the largest k of the fused kernel
constexpr double kNormEps = 1e-12;
constexpr double kMinDen = 1e-15;

enum Metric : int { kL2 = 0, kCosine = 1, kPoincare = 2 };

Metric parse_metric(std::string_view m) {
  if (m == "l2") return kL2;
  if (m == "cosine") return kCosine;
  if (m == "poincare") return kPoincare;
  TORCH_CHECK(false, "metric must be one of l2, cosine, poincare (got '", std::string(m), "')");
}


int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_search(const Tensor& x, const Tensor& cb) {
  TORCH_CHECK(x.dim() == 2, "x must be (N, D) (got shape ", x.sizes(), ")");
  TORCH_CHECK(cb.dim() == 2, "codebook must be (K, D) (got shape ", cb.sizes(), ")");
  TORCH_CHECK(x.size(1) == cb.size(1), "x must be (N, D) with D == codebook.shape[1] (got x: ",
              x.sizes(), ", codebook: ", cb.sizes(), ")");
  LFI_CHECK_FLOATING(x);
  LFI_CHECK_SAME_DTYPE(x, cb);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor (got ", x.device(), ")");
  LFI_CHECK_DEVICE(cb, x.device());
}

void check_indices(const Tensor& idx, int64_t n, const Tensor& x) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "indices must be int64 (got ", idx.scalar_type(), ")");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n, "indices must be (N,) with N = ", n, " (got ",
              idx.sizes(), ")");
  LFI_CHECK_DEVICE(idx, x.device());
  // Values are not read back (no host sync): the public API checks them; kernels clamp them.
}

// An index read on the device is clamped into [0, K): the public API checks the values; a direct
// call with bad indices gets wrong codes, never an out-of-bounds read.
LFI_D int64_t clamp_code(int64_t i, int64_t kk) { return i < 0 ? 0 : (i >= kk ? kk - 1 : i); }

// ---- the search kernel -----------------------------------------------------------------------------

// Scores of the kBM rows of this block against codes [j0, j0 + BN), into sc (kBM x (BN + 1)).
template <typename scalar_t, typename T, int BN, int MAXK>
__global__ void __launch_bounds__(kThreads)
    nearest_kernel(const scalar_t* __restrict__ x, const T* __restrict__ w,
                   const T* __restrict__ bias, const T* __restrict__ scale, bool normalize,
                   int64_t n, int64_t kk, int64_t d, int k, int64_t* __restrict__ out_idx) {
  constexpr int TM = kBM / 16, TN = BN / 16;
  __shared__ T xs[kBD][kBM + 1];
  __shared__ T ws[kBD][BN + 1];
  __shared__ T sc[kBM][BN + 1];
  __shared__ T xn[kBM];    // |x|^2 (Poincaré's scale term)
  __shared__ T xinv[kBM];  // 1 / max(|x|, eps) (cosine), else 1
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;

  if (tid < kBM) {
    T s2 = 0;
    if (i0 + tid < n) {
      const scalar_t* xr = x + (i0 + tid) * d;
      for (int64_t q = 0; q < d; ++q) {
        const T v = static_cast<T>(xr[q]);
        s2 += v * v;
      }
    }
    xn[tid] = s2;
    xinv[tid] = normalize ? T(1) / max(sqrt(s2), static_cast<T>(kNormEps)) : T(1);
  }
  // The running top-k of row tid (threads tid < kBM), sorted ascending.
  T topv[MAXK];
  int64_t topi[MAXK];
#pragma unroll
  for (int j = 0; j < MAXK; ++j) {
    topv[j] = std::numeric_limits<T>::infinity();
    topi[j] = 0;
  }
  __syncthreads();

  for (int64_t j0 = 0; j0 < kk; j0 += BN) {
    T acc[TM][TN];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) acc[a][b] = 0;
    for (int64_t d0 = 0; d0 < d; d0 += kBD) {
      for (int e = tid; e < kBM * kBD; e += kThreads) {
        const int r = e / kBD, q = e % kBD;
        const int64_t i = i0 + r, dq = d0 + q;
        xs[q][r] = (i < n && dq < d) ? static_cast<T>(x[i * d + dq]) * xinv[r] : T(0);
      }
      for (int e = tid; e < BN * kBD; e += kThreads) {
        const int r = e / kBD, q = e % kBD;
        const int64_t j = j0 + r, dq = d0 + q;
        ws[q][r] = (j < kk && dq < d) ? w[j * d + dq] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kBD; ++q) {
        T av[TM], bv[TN];
#pragma unroll
        for (int a = 0; a < TM; ++a) av[a] = xs[q][ty * TM + a];
#pragma unroll
        for (int b = 0; b < TN; ++b) bv[b] = ws[q][tx * TN + b];
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
          for (int b = 0; b < TN; ++b) acc[a][b] += av[a] * bv[b];
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int r = ty * TM + a;
#pragma unroll
      for (int b = 0; b < TN; ++b) {
        const int col = tx * TN + b;
        const int64_t j = j0 + col;
        T s = std::numeric_limits<T>::infinity();
        if (j < kk) {
          s = acc[a][b] + bias[j];
          if (scale != nullptr) s += xn[r] * scale[j];
        }
        sc[r][col] = s;
      }
    }
    __syncthreads();
    if (tid < kBM) {
      const int64_t left = kk - j0;
      const int tn = left < BN ? static_cast<int>(left) : BN;
      for (int col = 0; col < tn; ++col) {
        const T v = sc[tid][col];
        if (!(v < topv[MAXK - 1])) continue;
        // Sorted insertion with compile-time indices (the arrays stay in registers). The list
        // holds the best MAXK >= k; an equal score stays ahead (ties go to the lower index).
#pragma unroll
        for (int q = MAXK - 1; q >= 0; --q) {
          const bool shift = q > 0 && v < topv[q > 0 ? q - 1 : 0];
          if (shift) {
            topv[q] = topv[q - 1];
            topi[q] = topi[q - 1];
          } else if (v < topv[q]) {
            topv[q] = v;
            topi[q] = j0 + col;
          }
        }
      }
    }
    __syncthreads();
  }
  if (tid < kBM && i0 + tid < n) {
#pragma unroll
    for (int j = 0; j < MAXK; ++j) {
      if (j < k) out_idx[(i0 + tid) * k + j] = topi[j];
    }
  }
}

// ---- exact distances of the chosen codes (double) -------------------------------------------------

template <typename scalar_t>
__global__ void exact_distance_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cb,
                                      const int64_t* __restrict__ idx, const double* __restrict__ c,
                                      int metric, int64_t n, int64_t kk, int64_t d, int k,
                                      double* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n * k) return;
  const int64_t i = t / k;
  const int64_t code = clamp_code(idx[t], kk);
  const scalar_t* xr = x + i * d;
  const scalar_t* yr = cb + code * d;
  double r = 0;
  if (metric == kL2) {
    for (int64_t q = 0; q < d; ++q) {
      const double v = static_cast<double>(xr[q]) - static_cast<double>(yr[q]);
      r += v * v;
    }
  } else {
    double x2 = 0, y2 = 0, xy = 0;
    for (int64_t q = 0; q < d; ++q) {
      const double a = static_cast<double>(xr[q]), b = static_cast<double>(yr[q]);
      x2 += a * a;
      y2 += b * b;
      xy += a * b;
    }
    if (metric == kCosine) {
      r = 1.0 - xy / (fmax(sqrt(x2), kNormEps) * fmax(sqrt(y2), kNormEps));
    } else {
      const double cv = *c;
      double sa, sb;
      hyp::dist_sub(x2, y2, xy, cv, sa, sb);
      double s2 = 0;
      for (int64_t q = 0; q < d; ++q) {
        const double v = sa * static_cast<double>(xr[q]) + sb * static_cast<double>(yr[q]);
        s2 += v * v;
      }
      r = hyp::dist_from_sq(s2, cv);
    }
  }
  out[t] = r;
}

// The codebook side of the score (see cpu/vq.cpp), by ATen in the compute type.
struct CodeSide {
  Tensor w, bias, scale;
};

CodeSide code_side(const Tensor& cb, Metric metric, const Tensor& c, at::ScalarType st) {
  Tensor cbt = cb.to(st).contiguous();
  Tensor n2 = cbt.pow(2).sum(-1);
  CodeSide out;
  if (metric == kL2) {
    out.w = cbt * -2;
    out.bias = n2;
  } else if (metric == kCosine) {
    out.w = -(cbt / n2.sqrt().clamp_min(kNormEps).unsqueeze(1));
    out.bias = at::zeros_like(n2);
  } else {
    Tensor s = (1 - c.to(n2.device(), st) * n2).clamp_min(kMinDen).reciprocal();
    out.w = cbt * (s * -2).unsqueeze(1);
    out.bias = n2 * s;
    out.scale = s.contiguous();
  }
  out.w = out.w.contiguous();
  out.bias = out.bias.contiguous();
  return out;
}

template <typename scalar_t, typename T, int BN, int MAXK>
void launch_nearest(const Tensor& x, const CodeSide& cs, bool normalize, int64_t kk, int k,
                    Tensor& idx) {
  const int64_t n = x.size(0), d = x.size(1);
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kBM)));
  nearest_kernel<scalar_t, T, BN, MAXK><<<grid, kThreads, 0, current_stream()>>>(
      x.const_data_ptr<scalar_t>(), cs.w.const_data_ptr<T>(), cs.bias.const_data_ptr<T>(),
      cs.scale.defined() ? cs.scale.const_data_ptr<T>() : nullptr, normalize, n, kk, d, k,
      idx.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename T, int BN>
void dispatch_k(const Tensor& x, const CodeSide& cs, bool normalize, int64_t kk, int k, Tensor& idx) {
  if (k == 1) return launch_nearest<scalar_t, T, BN, 1>(x, cs, normalize, kk, k, idx);
  if (k <= 4) return launch_nearest<scalar_t, T, BN, 4>(x, cs, normalize, kk, k, idx);
  if (k <= 16) return launch_nearest<scalar_t, T, BN, 16>(x, cs, normalize, kk, k, idx);
  launch_nearest<scalar_t, T, BN, kMaxK>(x, cs, normalize, kk, k, idx);
}

// k > kMaxK: scores for a bounded number of rows at a time, then ATen's topk.
void nearest_chunked(const Tensor& x, const CodeSide& cs, bool normalize, int64_t k, Tensor& idx) {
  const int64_t n = x.size(0), kk = cs.w.size(0);
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 24) / kk);
  for (int64_t s = 0; s < n; s += rows) {
    Tensor xs = x.narrow(0, s, std::min(rows, n - s)).to(cs.w.scalar_type());
    Tensor xn = xs.pow(2).sum(-1, true);
    if (normalize) xs = xs / xn.sqrt().clamp_min(kNormEps);
    Tensor sc = at::addmm(cs.bias.unsqueeze(0), xs, cs.w.t());
    if (cs.scale.defined()) sc += xn * cs.scale.unsqueeze(0);
    idx.narrow(0, s, xs.size(0)).copy_(std::get<1>(at::topk(sc, k, 1, false, true)));
  }
}

// ---- quantize ---------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void quantize_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cb,
                                const int64_t* __restrict__ idx, int64_t n, int64_t kk, int64_t d,
                                scalar_t* __restrict__ q, double* __restrict__ partial) {
  __shared__ double red[kThreads];
  double acc = 0;
  const int64_t total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    const int64_t code = clamp_code(idx[i], kk);
    const scalar_t v = cb[code * d + j];
    q[e] = v;
    const double t = static_cast<double>(x[e]) - static_cast<double>(v);
    acc += t * t;
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

template <typename scalar_t>
__global__ void quantize_grad_x_kernel(const scalar_t* __restrict__ gq, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ cb, const int64_t* __restrict__ idx,
                                       const double* __restrict__ gl, double beta, double inv_m,
                                       int64_t n, int64_t kk, int64_t d, scalar_t* __restrict__ gx) {
  const double fx = *gl * 2.0 * beta * inv_m;
  const int64_t total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    const int64_t code = clamp_code(idx[i], kk);
    const double diff = static_cast<double>(x[e]) - static_cast<double>(cb[code * d + j]);
    gx[e] = static_cast<scalar_t>(static_cast<double>(gq[e]) + fx * diff);
  }
}

// Nondeterministic codebook gradient: acc[code] += x_i and cnt[code] += 1 by atomics (double).
template <typename scalar_t>
__global__ void scatter_rows_atomic_kernel(const scalar_t* __restrict__ x,
                                           const int64_t* __restrict__ idx, int64_t n, int64_t kk,
                                           int64_t d, double* __restrict__ acc,
                                           double* __restrict__ cnt) {
  const int64_t total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    const int64_t code = clamp_code(idx[i], kk);
    atomicAdd(acc + code * d + j, static_cast<double>(x[e]));
    if (j == 0) atomicAdd(cnt + code, 1.0);
  }
}

// Deterministic: rows sorted by code (perm), code q owns perm[start[q] .. start[q + 1]); block q
// sums them in that order, one thread per coordinate.
template <typename scalar_t>
__global__ void sum_rows_sorted_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ perm,
                                       const int64_t* __restrict__ start, int64_t kk, int64_t d,
                                       double* __restrict__ acc, double* __restrict__ cnt) {
  for (int64_t q = blockIdx.x; q < kk; q += gridDim.x) {
    const int64_t s = start[q], t = start[q + 1];
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      double a = 0;
      for (int64_t r = s; r < t; ++r) a += static_cast<double>(x[perm[r] * d + j]);
      acc[q * d + j] = a;
    }
    if (threadIdx.x == 0) cnt[q] = static_cast<double>(t - s);
  }
}

// Per-code sums and counts of the rows of x assigned by idx, in double: (acc (K, D), cnt (K)).
std::tuple<Tensor, Tensor> sum_rows_per_code(const Tensor& x, const Tensor& idx, int64_t kk,
                                             bool deterministic) {
  const int64_t n = x.size(0), d = x.size(1);
  auto opts = x.options().dtype(at::kDouble);
  Tensor acc = at::zeros({kk, d}, opts), cnt = at::zeros({kk}, opts);
  if (n == 0 || d == 0) {
    if (n > 0) cnt.index_add_(0, idx.clamp(0, kk - 1), at::ones({n}, opts));
    return {acc, cnt};
  }
  if (!deterministic) {
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n * d, kThreads), 65535));
    LFI_DISPATCH(x.scalar_type(), "vq_scatter_atomic", [&] {
      scatter_rows_atomic_kernel<scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
          x.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), n, kk, d,
          acc.mutable_data_ptr<double>(), cnt.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {acc, cnt};
  }
  Tensor clamped = idx.clamp(0, kk - 1);
  Tensor perm = std::get<1>(at::sort(clamped, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Tensor counts = at::bincount(clamped, {}, kk);  // integer counts: exact
  Tensor start = at::zeros({kk + 1}, idx.options());
  start.narrow(0, 1, kk).copy_(counts.cumsum(0));
  const int threads = static_cast<int>(std::min<int64_t>(std::max<int64_t>(d, 32), kThreads));
  const int blocks = static_cast<int>(std::min<int64_t>(kk, 65535));
  LFI_DISPATCH(x.scalar_type(), "vq_sum_rows_sorted", [&] {
    sum_rows_sorted_kernel<scalar_t><<<blocks, threads, 0, current_stream()>>>(
        x.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
        start.const_data_ptr<int64_t>(), kk, d, acc.mutable_data_ptr<double>(),
        cnt.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {acc, cnt};
}

}  // namespace

std::tuple<Tensor, Tensor> vq_nearest_cuda(const Tensor& x, const Tensor& codebook,
                                           c10::string_view metric, const Tensor& c, int64_t k) {
  check_search(x, codebook);
  const c10::cuda::CUDAGuard guard(x.device());
  const Metric m = parse_metric(std::string_view(metric.data(), metric.size()));
  LFI_CHECK_SCALAR(c);
  TORCH_CHECK(c.device().is_cpu() || c.device() == x.device(),
              "c must be on the CPU or on x's device (got ", c.device(), ")");
  const int64_t kk = codebook.size(0), n = x.size(0), d = x.size(1);
  TORCH_CHECK(kk >= 1, "codebook must hold at least one code (got K = 0)");
  TORCH_CHECK(k >= 1 && k <= kk, "k must be in [1, K] with K = ", kk, " (got k = ", k, ")");
  Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  Tensor dist = at::empty({n, k}, x.options());
  if (n == 0) return {idx, dist};
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous();
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const CodeSide cs = code_side(cbc, m, c, st);
  const bool normalize = m == kCosine;
  if (k > kMaxK) {
    nearest_chunked(xc, cs, normalize, k, idx);
  } else {
    LFI_DISPATCH(x.scalar_type(), "vq_nearest_cuda", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        dispatch_k<scalar_t, double, 32>(xc, cs, normalize, kk, static_cast<int>(k), idx);
      } else {
        dispatch_k<scalar_t, float, 64>(xc, cs, normalize, kk, static_cast<int>(k), idx);
      }
    });
  }
  // Exact distances of the chosen codes, then the k re-sorted by them (stable).
  Tensor exact = at::empty({n, k}, x.options().dtype(at::kDouble));
  const Tensor cdev = c.to(x.device(), at::kDouble);
  LFI_DISPATCH(x.scalar_type(), "vq_exact_distance", [&] {
    const int64_t total = n * k;
    exact_distance_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0,
                                      current_stream()>>>(
        xc.const_data_ptr<scalar_t>(), cbc.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        cdev.const_data_ptr<double>(), static_cast<int>(m), n, kk, d, static_cast<int>(k),
        exact.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (k > 1) {
    auto [sorted, perm] = at::sort(exact, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    idx = idx.gather(1, perm);
    exact = sorted;
  }
  dist.copy_(exact);
  return {idx, dist};
}

std::tuple<Tensor, Tensor> vq_quantize_cuda(const Tensor& x, const Tensor& codebook,
                                            const Tensor& indices, double beta) {
  check_search(x, codebook);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1), kk = codebook.size(0);
  TORCH_CHECK(kk >= 1, "codebook must hold at least one code (got K = 0)");
  check_indices(indices, n, x);
  Tensor q = at::empty({n, d}, x.options());
  const int64_t total = n * d;
  if (total == 0) return {q, at::full({}, std::nan(""), x.options())};
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous(), ic = indices.contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1024));
  Tensor partial = at::empty({blocks}, x.options().dtype(at::kDouble));
  LFI_DISPATCH(x.scalar_type(), "vq_quantize_cuda", [&] {
    quantize_kernel<scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
        xc.const_data_ptr<scalar_t>(), cbc.const_data_ptr<scalar_t>(), ic.const_data_ptr<int64_t>(),
        n, kk, d, q.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  Tensor loss = (partial.sum() * ((1.0 + beta) / static_cast<double>(total))).to(x.scalar_type());
  return {q, loss};
}

std::tuple<Tensor, Tensor> vq_quantize_backward_cuda(const Tensor& grad_q, const Tensor& grad_loss,
                                                     const Tensor& x, const Tensor& codebook,
                                                     const Tensor& indices, double beta) {
  check_search(x, codebook);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1), kk = codebook.size(0);
  TORCH_CHECK(kk >= 1, "codebook must hold at least one code (got K = 0)");
  check_indices(indices, n, x);
  TORCH_CHECK(grad_q.sizes() == x.sizes(), "grad_q must have x's shape ", x.sizes(), " (got ",
              grad_q.sizes(), ")");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value");
  Tensor gx = at::empty({n, d}, x.options());
  if (n * d == 0) return {gx, at::zeros_like(codebook, at::MemoryFormat::Contiguous)};
  const double inv_m = 1.0 / static_cast<double>(n * d);
  const Tensor gl = grad_loss.reshape({}).to(x.device(), at::kDouble);
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous(), ic = indices.contiguous();
  const Tensor gqc = grad_q.to(x.scalar_type()).contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n * d, kThreads), 65535));
  LFI_DISPATCH(x.scalar_type(), "vq_quantize_backward_cuda", [&] {
    quantize_grad_x_kernel<scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
        gqc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), cbc.const_data_ptr<scalar_t>(),
        ic.const_data_ptr<int64_t>(), gl.const_data_ptr<double>(), beta, inv_m, n, kk, d,
        gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // grad_codebook[q] = 2 grad_loss / M (n_q c_q - sum_{i in q} x_i)
  auto [acc, cnt] = sum_rows_per_code(xc, ic, kk, at::globalContext().deterministicAlgorithms());
  Tensor gc = (cnt.unsqueeze(1) * cbc.to(at::kDouble) - acc) * (gl * (2.0 * inv_m));
  return {gx, gc.to(x.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> vq_ema_update_cuda(const Tensor& x, const Tensor& indices,
                                                      const Tensor& counts, const Tensor& sums,
                                                      double decay, double eps) {
  TORCH_CHECK(x.dim() == 2, "x must be (N, D) (got shape ", x.sizes(), ")");
  LFI_CHECK_FLOATING(x);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor (got ", x.device(), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(counts.dim() == 1 && sums.dim() == 2 && sums.size(0) == counts.size(0) &&
                  sums.size(1) == x.size(1),
              "counts must be (K,) and sums (K, D) with D = ", x.size(1), " (got ", counts.sizes(),
              ", ", sums.sizes(), ")");
  TORCH_CHECK(counts.scalar_type() == sums.scalar_type() &&
                  (sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble),
              "counts and sums must both be float32 or both float64");
  LFI_CHECK_DEVICE(counts, x.device());
  LFI_CHECK_DEVICE(sums, x.device());
  TORCH_CHECK(decay >= 0 && decay < 1, "decay must be in [0, 1) (got ", decay, ")");
  TORCH_CHECK(eps > 0, "eps must be positive (got ", eps, ")");
  const int64_t n = x.size(0), kk = counts.size(0);
  check_indices(indices, n, x);
  auto [acc, cnt] = sum_rows_per_code(x.contiguous(), indices.contiguous(), kk, /*deterministic=*/true);
  Tensor nc = counts.to(at::kDouble) * decay + cnt * (1 - decay);
  Tensor ns = sums.to(at::kDouble) * decay + acc * (1 - decay);
  Tensor total = nc.sum();
  Tensor smoothed = (nc + eps) / (total + static_cast<double>(kk) * eps) * total;
  Tensor cb = ns / smoothed.clamp_min(kMinDen).unsqueeze(1);
  const auto st = sums.scalar_type();
  return {nc.to(st), ns.to(st), cb.to(st)};
}

TORCH_LIBRARY_IMPL(lfi_fast, CUDA, m) {
  m.impl("vq_nearest", &vq_nearest_cuda);
  m.impl("vq_quantize", &vq_quantize_cuda);
  m.impl("vq_quantize_backward", &vq_quantize_backward_cuda);
  m.impl("vq_ema_update", &vq_ema_update_cuda);
}

}  // namespace lfi_fast
