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
// Tensor cores (sm_80+): float16 and bfloat16 inputs, and float32 when TF32 is allowed
// (torch.backends.cuda.matmul.allow_tf32), take nearest_tc_kernel: the x . c products of a 64 x 64
// tile by WMMA (16 x 16 x 16 half/bf16 fragments, or 16 x 16 x 8 TF32) with float32 accumulation,
// the score epilogue in float32, and four threads per row each keeping a running top-R of its
// columns (R >= k + 3 candidates), merged by warp shuffles at the end. The approximate scores are
// off by at most b (a bound from the input precision, D and the norms); a row whose R-th candidate
// is within 2b of its k-th cannot be sure its true top-k are among the candidates and is flagged.
// Flagged rows are searched again by the float32 kernel (the near-tie re-check); then the exact
// double distances of the R candidates pick and order the k. So the tensor-core path returns what
// the float32 path returns, up to float32 rounding of the scores.
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// |x_i|^2 in T, 0 for a padding row (i >= n): the per-row term of both search kernels.
template <typename T, typename scalar_t>
LFI_D T row_sq_norm(const scalar_t* __restrict__ x, int64_t i, int64_t n, int64_t d) {
  T s2 = 0;
  if (i < n) {
    const scalar_t* xr = x + i * d;
    for (int64_t q = 0; q < d; ++q) {
      const T v = static_cast<T>(xr[q]);
      s2 += v * v;
    }
  }
  return s2;
}

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
    const T s2 = row_sq_norm<T>(x, i0 + tid, n, d);
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


// ---- the tensor-core search kernel ----------------------------------------------------------------

namespace wmma = nvcuda::wmma;

// Per input type: the element type of the shared-memory tiles and of WMMA's A/B fragments, the
// fragment depth WK, the coordinates per shared-memory step BK and the row padding (rows of
// BK + PAD elements keep every fragment pointer 32-byte aligned).
template <typename scalar_t>
struct TcTraits;
template <>
struct TcTraits<at::Half> {
  using elem = __half;
  using frag = __half;
  static constexpr int WK = 16, BK = 32, PAD = 8;
};
template <>
struct TcTraits<at::BFloat16> {
  using elem = __nv_bfloat16;
  using frag = __nv_bfloat16;
  static constexpr int WK = 16, BK = 32, PAD = 8;
};
template <>
struct TcTraits<float> {
  using elem = float;
  using frag = wmma::precision::tf32;
  static constexpr int WK = 8, BK = 16, PAD = 4;
};

// Zero of a tile element (the half types' float constructors are off: __CUDA_NO_HALF_CONVERSIONS__).
template <typename E>
LFI_D E tc_zero();
template <>
LFI_D __half tc_zero<__half>() { return __float2half(0.f); }
template <>
LFI_D __nv_bfloat16 tc_zero<__nv_bfloat16>() { return __float2bfloat16(0.f); }
template <>
LFI_D float tc_zero<float>() { return 0.f; }

constexpr int kTcBM = 64;  // rows per block
constexpr int kTcBN = 64;  // codes per tile
constexpr int kTcLanes = 4;  // threads per row in the top-R update (16 columns each)
constexpr int kTcScLd = kTcBN + 4;

// (v, i) before (w, j): smaller score, ties to the lower index.
LFI_D bool lex_less(float v, int64_t i, float w, int64_t j) { return v < w || (v == w && i < j); }

// Sorted insertion into a list of R in registers (compile-time indices only).
template <int R>
LFI_D void insert_top(float v, int64_t id, float (&tv)[R], int64_t (&ti)[R]) {
  if (!lex_less(v, id, tv[R - 1], ti[R - 1])) return;
#pragma unroll
  for (int q = R - 1; q >= 0; --q) {
    const int p = q > 0 ? q - 1 : 0;
    if (q > 0 && lex_less(v, id, tv[p], ti[p])) {
      tv[q] = tv[p];
      ti[q] = ti[p];
    } else if (lex_less(v, id, tv[q], ti[q])) {
      tv[q] = v;
      ti[q] = id;
    }
  }
}

// Scores (the same order as the float32 kernel's): l2 |x|^2 + |c|^2 - 2 x.c; Poincaré
// s_c (|x|^2 + |c|^2 - 2 x.c) with s_c = 1 / (1 - c|c|^2); cosine -x.c / (|x| |c|).
// n2, s, cinv: (K,) float32. eps: the relative error bound of a product sum; cmax = max |c|,
// smax = max s_c. out_idx: (N, R) candidates sorted by approximate score; flag: (N,) 1 where the
// candidates may miss one of the true top-k.
template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads)
    nearest_tc_kernel(const scalar_t* __restrict__ x_, const scalar_t* __restrict__ cb_,
                      const float* __restrict__ n2, const float* __restrict__ s,
                      const float* __restrict__ cinv, int metric, float eps, float cmax, float smax,
                      int64_t n, int64_t kk, int64_t d, int k, int64_t* __restrict__ out_idx,
                      uint8_t* __restrict__ flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host takes this path only on sm_80+
#else
  using Tr = TcTraits<scalar_t>;
  using E = typename Tr::elem;
  constexpr int BK = Tr::BK, WK = Tr::WK, LD = Tr::BK + Tr::PAD;
  const E* x = reinterpret_cast<const E*>(x_);
  const E* cb = reinterpret_cast<const E*>(cb_);
  __shared__ __align__(32) E xs[kTcBM][LD];
  __shared__ __align__(32) E cs[kTcBN][LD];
  __shared__ __align__(32) float sc[kTcBM][kTcScLd];
  __shared__ float xn[kTcBM];
  __shared__ float xinv[kTcBM];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcBM;
  const E zero = tc_zero<E>();

  if (tid < kTcBM) {
    const float s2 = row_sq_norm<float>(x_, i0 + tid, n, d);
    xn[tid] = s2;
    xinv[tid] = 1.f / fmaxf(sqrtf(s2), static_cast<float>(kNormEps));
  }
  const int row = tid / kTcLanes, lane = tid % kTcLanes;
  float topv[R];
  int64_t topi[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    topv[q] = std::numeric_limits<float>::infinity();
    topi[q] = std::numeric_limits<int64_t>::max();
  }
  // Warp w computes rows 16 (w / 2) .. + 16 and codes 32 (w % 2) .. + 32 of each tile.
  const int wm = (warp / 2) * 16, wn = (warp % 2) * 32;
  __syncthreads();

  for (int64_t j0 = 0; j0 < kk; j0 += kTcBN) {
    wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t d0 = 0; d0 < d; d0 += BK) {
      for (int e = tid; e < kTcBM * BK; e += kThreads) {
        const int r = e / BK, q = e % BK;
        const int64_t i = i0 + r, dq = d0 + q;
        xs[r][q] = (i < n && dq < d) ? x[i * d + dq] : zero;
      }
      for (int e = tid; e < kTcBN * BK; e += kThreads) {
        const int r = e / BK, q = e % BK;
        const int64_t j = j0 + r, dq = d0 + q;
        cs[r][q] = (j < kk && dq < d) ? cb[j * d + dq] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < BK; q += WK) {
        wmma::fragment<wmma::matrix_a, 16, 16, WK, typename Tr::frag, wmma::row_major> a;
        wmma::load_matrix_sync(a, &xs[wm][q], LD);
        if constexpr (std::is_same_v<scalar_t, float>) {
#pragma unroll
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wmma::fragment<wmma::matrix_b, 16, 16, WK, typename Tr::frag, wmma::col_major> b;
          wmma::load_matrix_sync(b, &cs[wn + 16 * h][q], LD);
          if constexpr (std::is_same_v<scalar_t, float>) {
#pragma unroll
            for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
          }
          wmma::mma_sync(acc[h], a, b, acc[h]);
        }
      }
      __syncthreads();
    }
    wmma::store_matrix_sync(&sc[wm][wn], acc[0], kTcScLd, wmma::mem_row_major);
    wmma::store_matrix_sync(&sc[wm][wn + 16], acc[1], kTcScLd, wmma::mem_row_major);
    __syncthreads();
    {
      const float xr2 = xn[row], xri = xinv[row];
      constexpr int per = kTcBN / kTcLanes;
#pragma unroll 4
      for (int cc = 0; cc < per; ++cc) {
        const int col = lane * per + cc;
        const int64_t j = j0 + col;
        if (j >= kk) break;
        const float dot = sc[row][col];
        float v;
        if (metric == kL2) {
          v = xr2 + n2[j] - 2.f * dot;
        } else if (metric == kPoincare) {
          v = s[j] * (xr2 + n2[j] - 2.f * dot);
        } else {
          v = -dot * xri * cinv[j];
        }
        insert_top<R>(v, j, topv, topi);
      }
    }
    __syncthreads();
  }

  // Merge the four lists of a row into lane 0's (the lanes of a row are adjacent in one warp).
  const unsigned full = 0xffffffffu;
  const int base = (tid % 32) & ~(kTcLanes - 1);
#pragma unroll
  for (int src = 1; src < kTcLanes; ++src) {
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const float v = __shfl_sync(full, topv[q], base + src);
      const long long id = __shfl_sync(full, static_cast<long long>(topi[q]), base + src);
      if (lane == 0) insert_top<R>(v, static_cast<int64_t>(id), topv, topi);
    }
  }
  const int64_t i = i0 + row;
  if (lane == 0 && i < n) {
    // b: the bound on a score's error; 2b separates a sure candidate list from an unsure one.
    float b;
    if (metric == kCosine) {
      b = eps + 1e-6f;
    } else {
      const float xr = sqrtf(xn[row]);
      b = smax * (2.f * eps * xr * cmax + 5e-7f * (xr + cmax) * (xr + cmax));
    }
    bool unsure = false;
    if (kk > R) {
      const float gap = topv[R - 1] - topv[k - 1];
      unsure = !(gap > 2.f * b);  // also NaN / inf - inf
    }
#pragma unroll
    for (int q = 0; q < R; ++q) out_idx[i * R + q] = topi[q] < kk ? topi[q] : 0;
    flag[i] = unsure ? 1 : 0;
  }
#endif
}

// Whether nearest takes the tensor-core kernel: sm_80+, float16/bfloat16, or float32 with TF32
// allowed, and k small enough for R = k + 3 candidates in registers.
bool use_tensor_cores(const Tensor& x, int64_t k) {
  if (k + 3 > 32) return false;
  const auto st = x.scalar_type();
  const bool type_ok = st == at::kHalf || st == at::kBFloat16 ||
                       (st == at::kFloat && at::globalContext().allowTF32CuBLAS());
  if (!type_ok) return false;
  return at::cuda::getDeviceProperties(x.device().index())->major >= 8;
}

template <typename scalar_t, int R>
void launch_tc(const Tensor& x, const Tensor& cb, const Tensor& n2, const Tensor& s,
               const Tensor& cinv, Metric m, float eps, float cmax, float smax, int k, Tensor& cand,
               Tensor& flag) {
  const int64_t n = x.size(0), d = x.size(1), kk = cb.size(0);
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kTcBM)));
  nearest_tc_kernel<scalar_t, R><<<grid, kThreads, 0, current_stream()>>>(
      x.const_data_ptr<scalar_t>(), cb.const_data_ptr<scalar_t>(), n2.const_data_ptr<float>(),
      s.const_data_ptr<float>(), cinv.const_data_ptr<float>(), static_cast<int>(m), eps, cmax,
      smax, n, kk, d, k, cand.mutable_data_ptr<int64_t>(), flag.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int R>
void tc_dispatch_type(const Tensor& x, const Tensor& cb, const Tensor& n2, const Tensor& s,
                      const Tensor& cinv, Metric m, float eps, float cmax, float smax, int k,
                      Tensor& cand, Tensor& flag) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return launch_tc<at::Half, R>(x, cb, n2, s, cinv, m, eps, cmax, smax, k, cand, flag);
    case at::kBFloat16:
      return launch_tc<at::BFloat16, R>(x, cb, n2, s, cinv, m, eps, cmax, smax, k, cand, flag);
    case at::kFloat:
      return launch_tc<float, R>(x, cb, n2, s, cinv, m, eps, cmax, smax, k, cand, flag);
    default:
      TORCH_CHECK(false, "vq_nearest_cuda: no tensor-core kernel for ", x.scalar_type());
  }
}

// The candidates (N, min(R, K)) of every row by the tensor-core kernel, with unsure rows
// re-searched by the float32 kernel. R: 4, 8, 16 or 32 (the smallest >= k + 3).
Tensor nearest_candidates_tc(const Tensor& x, const Tensor& cb, Metric m, const Tensor& c,
                             int64_t k) {
  const int64_t n = x.size(0), d = x.size(1), kk = cb.size(0);
  const int need = static_cast<int>(k) + 3;
  const int R = need <= 4 ? 4 : need <= 8 ? 8 : need <= 16 ? 16 : 32;
  Tensor cbf = cb.to(at::kFloat);
  Tensor n2 = cbf.pow(2).sum(-1).contiguous();
  Tensor cnorm = n2.sqrt();
  Tensor cinv = cnorm.clamp_min(kNormEps).reciprocal().contiguous();
  Tensor s = m == kPoincare ? (1 - c.to(n2.device(), at::kFloat) * n2).clamp_min(kMinDen).reciprocal()
                            : at::ones_like(n2);
  s = s.contiguous();
  // One host sync for the three bounds (the search needs them before it starts).
  const Tensor stats = at::stack({cnorm.max(), s.max()}).cpu();
  const float cmax = stats[0].item<float>(), smax = stats[1].item<float>();
  const double acc = static_cast<double>(std::max<int64_t>(d, 1)) * std::ldexp(1.0, -22);
  const double in = x.scalar_type() == at::kFloat ? std::ldexp(1.0, -9) : 0.0;  // TF32 rounding
  const float eps = static_cast<float>(in + acc);
  Tensor cand = at::empty({n, R}, x.options().dtype(at::kLong));
  Tensor flag = at::empty({n}, x.options().dtype(at::kByte));
  const int kk_i = static_cast<int>(k);
  if (R == 4) tc_dispatch_type<4>(x, cb, n2, s, cinv, m, eps, cmax, smax, kk_i, cand, flag);
  else if (R == 8) tc_dispatch_type<8>(x, cb, n2, s, cinv, m, eps, cmax, smax, kk_i, cand, flag);
  else if (R == 16) tc_dispatch_type<16>(x, cb, n2, s, cinv, m, eps, cmax, smax, kk_i, cand, flag);
  else tc_dispatch_type<32>(x, cb, n2, s, cinv, m, eps, cmax, smax, kk_i, cand, flag);
  const int64_t r = std::min<int64_t>(R, kk);
  cand = cand.narrow(1, 0, r);
  const Tensor rows = flag.nonzero().squeeze(1);  // host sync: the count of unsure rows
  if (rows.numel() > 0) {
    const Tensor xs = x.index_select(0, rows).contiguous();
    const CodeSide cs = code_side(cb, m, c, at::kFloat);
    Tensor sub = at::empty({xs.size(0), r}, cand.options());
    const bool nrm = m == kCosine;
    const int ri = static_cast<int>(r);
    if (x.scalar_type() == at::kHalf) dispatch_k<at::Half, float, 64>(xs, cs, nrm, kk, ri, sub);
    else if (x.scalar_type() == at::kBFloat16) dispatch_k<at::BFloat16, float, 64>(xs, cs, nrm, kk, ri, sub);
    else dispatch_k<float, float, 64>(xs, cs, nrm, kk, ri, sub);
    cand = cand.contiguous();
    cand.index_copy_(0, rows, sub);
  }
  return cand.contiguous();
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
  const bool normalize = m == kCosine;
  // cand: (N, r) candidate codes; the float32/float64 kernels give exactly the k (r = k), the
  // tensor-core kernel R >= k + 3 of them (r = min(R, K)), re-ranked by the exact distances.
  Tensor cand = idx;
  if (use_tensor_cores(xc, k)) {
    // Ascending index first, so that the stable sort below sends exact ties to the lower index.
    cand = std::get<0>(at::sort(nearest_candidates_tc(xc, cbc, m, c, k), 1)).contiguous();
  } else {
    const CodeSide cs = code_side(cbc, m, c, st);
    if (k > kMaxK) {
      nearest_chunked(xc, cs, normalize, k, cand);
    } else {
      LFI_DISPATCH(x.scalar_type(), "vq_nearest_cuda", [&] {
        if constexpr (std::is_same_v<scalar_t, double>) {
          dispatch_k<scalar_t, double, 32>(xc, cs, normalize, kk, static_cast<int>(k), cand);
        } else {
          dispatch_k<scalar_t, float, 64>(xc, cs, normalize, kk, static_cast<int>(k), cand);
        }
      });
    }
  }
  const int64_t r = cand.size(1);
  // Exact distances of the candidates, then re-sorted by them (stable).
  Tensor exact = at::empty({n, r}, x.options().dtype(at::kDouble));
  const Tensor cdev = c.to(x.device(), at::kDouble);
  LFI_DISPATCH(x.scalar_type(), "vq_exact_distance", [&] {
    const int64_t total = n * r;
    exact_distance_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0,
                                      current_stream()>>>(
        xc.const_data_ptr<scalar_t>(), cbc.const_data_ptr<scalar_t>(), cand.const_data_ptr<int64_t>(),
        cdev.const_data_ptr<double>(), static_cast<int>(m), n, kk, d, static_cast<int>(r),
        exact.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (r > 1) {
    auto [sorted, perm] = at::sort(exact, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    cand = cand.gather(1, perm);
    exact = sorted;
  }
  if (r != k) {
    cand = cand.narrow(1, 0, k).contiguous();
    exact = exact.narrow(1, 0, k);
  }
  idx = cand;
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
