// CPU kernels of the vq family: nearest-codebook search, straight-through quantiser, EMA update.
//
// The search never holds the N x K distance matrix. Codes are ranked for a row x by a score that is
// monotone in the distance (reference/vq.py):  score_k = bias_k + <x, w_k> (+ |x|^2 scale_k), with
//   l2        w = -2 c,              bias = |c|^2
//   cosine    w = -c^ (x normalised), bias = 0
//   poincare  w = -2 s c, bias = s |c|^2, scale = s,  s = 1 / (1 - c_curv |c|^2)
// Rows are cut into tiles of kTileRows (OpenMP over tiles); for each tile, the codebook is walked in
// tiles of kTileCodes: one GEMM through ATen (single-threaded inside the parallel region) writes the
// tile's <x, w> into a per-thread buffer that stays in L2, and the running minimum (or top-k) of each
// row is updated from it while it is in cache. The distances of the chosen codes are then computed
// directly (no cancellation), in double, and the k codes re-sorted by them.
//
// The codebook gradient and the EMA update reduce rows per code after a counting sort of the
// indices: deterministic (no atomics, the same order whatever the thread count), O(N + K D) memory.
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>
#include <vector>

namespace lfi_fast {
namespace {

using at::Tensor;

constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCodes = 1024;
constexpr double kNormEps = 1e-12;  // F.normalize's clamp
constexpr double kMinDen = 1e-15;   // geoopt's denominator clamp

enum class Metric { L2, Cosine, Poincare };

Metric parse_metric(std::string_view m) {
  if (m == "l2") return Metric::L2;
  if (m == "cosine") return Metric::Cosine;
  if (m == "poincare") return Metric::Poincare;
  TORCH_CHECK(false, "metric must be one of l2, cosine, poincare (got '", std::string(m), "')");
}

void check_search(const Tensor& x, const Tensor& cb) {
  TORCH_CHECK(x.dim() == 2, "x must be (N, D) (got shape ", x.sizes(), ")");
  TORCH_CHECK(cb.dim() == 2, "codebook must be (K, D) (got shape ", cb.sizes(), ")");
  TORCH_CHECK(x.size(1) == cb.size(1), "x must be (N, D) with D == codebook.shape[1] (got x: ",
              x.sizes(), ", codebook: ", cb.sizes(), ")");
  LFI_CHECK_FLOATING(x);
  LFI_CHECK_SAME_DTYPE(x, cb);
  TORCH_CHECK(x.device() == cb.device(), "x and codebook must be on the same device");
}

void check_indices(const Tensor& idx, int64_t n, int64_t kk) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "indices must be int64 (got ", idx.scalar_type(), ")");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n, "indices must be (N,) with N = ", n, " (got ",
              idx.sizes(), ")");
  TORCH_CHECK(idx.device() == at::kCPU, "indices must be on the CPU");
  if (n == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < kk, "indices must be in [0, ", kk,
              ") (got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "])");
}

// ---- the fused scan: running minimum / top-k of a row over one code tile ------------------------
//
// GCC vector extensions, compiled for AVX-512, AVX2 and the baseline and chosen at run time: the
// scan is the only part the GEMM does not cover, and it must keep up with it.

template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int n = VB / static_cast<int>(sizeof(T));
};

// The minimum of s_j = buf_j + bias_j (+ xn scale_j) over j in [0, n), and its first position.
template <typename T, int VB>
__attribute__((always_inline)) inline void scan_min_impl(const T* __restrict__ buf,
                                                         const T* __restrict__ bias,
                                                         const T* __restrict__ scale, T xn,
                                                         int64_t n, T& best, int64_t& pos) {
  using V = typename VecOf<T, VB>::type;
  constexpr int W = VecOf<T, VB>::n;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(VB)));
  T b = std::numeric_limits<T>::infinity();
  int64_t p = 0;
  int64_t j = 0;
  if (n >= W) {
    V vmin, vxn;
    VI vpos, cur;
    for (int l = 0; l < W; ++l) {
      vmin[l] = std::numeric_limits<T>::infinity();
      vpos[l] = 0;
      cur[l] = l;
      vxn[l] = xn;
    }
    for (; j + W <= n; j += W) {
      V v, bb;
      std::memcpy(&v, buf + j, sizeof(V));
      std::memcpy(&bb, bias + j, sizeof(V));
      v += bb;
      if (scale) {
        V sc;
        std::memcpy(&sc, scale + j, sizeof(V));
        v += vxn * sc;
      }
      const VI lt = v < vmin;
      vmin = lt ? v : vmin;
      vpos = lt ? cur : vpos;
      cur += W;
    }
    for (int l = 0; l < W; ++l) {
      if (vmin[l] < b || (vmin[l] == b && vpos[l] < p)) {
        b = vmin[l];
        p = vpos[l];
      }
    }
  }
  for (; j < n; ++j) {
    const T v = buf[j] + bias[j] + (scale ? xn * scale[j] : T(0));
    if (v < b) {
      b = v;
      p = j;
    }
  }
  best = b;
  pos = p;
}

// Top-k: the k best (score, index) of a row so far, sorted ascending (ties: lower index first).
template <typename T>
struct TopK {
  T* val;
  int64_t* idx;
  int64_t k;
  int64_t filled;

  void insert(T v, int64_t j) {
    int64_t p;
    if (filled < k) {
      p = filled++;
    } else {
      if (!(v < val[k - 1])) return;
      p = k - 1;
    }
    while (p > 0 && v < val[p - 1]) {  // strict: an equal score stays ahead (lower index)
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = j;
  }
};

template <typename T, int VB>
__attribute__((always_inline)) inline void scan_topk_impl(const T* __restrict__ buf,
                                                          const T* __restrict__ bias,
                                                          const T* __restrict__ scale, T xn,
                                                          int64_t n, int64_t j0, TopK<T>& top) {
  using V = typename VecOf<T, VB>::type;
  constexpr int W = VecOf<T, VB>::n;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(VB)));
  auto score = [&](int64_t j) { return buf[j] + bias[j] + (scale ? xn * scale[j] : T(0)); };
  int64_t j = 0;
  for (; j < n && top.filled < top.k; ++j) top.insert(score(j), j0 + j);
  V vxn;
  for (int l = 0; l < W; ++l) vxn[l] = xn;
  for (; j + W <= n; j += W) {
    V v, bb;
    std::memcpy(&v, buf + j, sizeof(V));
    std::memcpy(&bb, bias + j, sizeof(V));
    v += bb;
    if (scale) {
      V sc;
      std::memcpy(&sc, scale + j, sizeof(V));
      v += vxn * sc;
    }
    V thr;
    const T t = top.val[top.k - 1];
    for (int l = 0; l < W; ++l) thr[l] = t;
    const VI lt = v < thr;
    bool any = false;
    for (int l = 0; l < W; ++l) any |= lt[l] != 0;
    if (!any) continue;
    for (int l = 0; l < W; ++l) {
      if (v[l] < top.val[top.k - 1]) top.insert(v[l], j0 + j + l);
    }
  }
  for (; j < n; ++j) {
    const T v = score(j);
    if (v < top.val[top.k - 1]) top.insert(v, j0 + j);
  }
}

#define LFI_VQ_SCAN_VARIANT(NAME, TARGET, VB)                                                     \
  template <typename T>                                                                          \
  TARGET void scan_min_##NAME(const T* buf, const T* bias, const T* scale, T xn, int64_t n,       \
                              T& best, int64_t& pos) {                                           \
    scan_min_impl<T, VB>(buf, bias, scale, xn, n, best, pos);                                    \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET void scan_topk_##NAME(const T* buf, const T* bias, const T* scale, T xn, int64_t n,      \
                               int64_t j0, TopK<T>& top) {                                       \
    scan_topk_impl<T, VB>(buf, bias, scale, xn, n, j0, top);                                     \
  }

#if defined(__x86_64__) && defined(__GNUC__)
LFI_VQ_SCAN_VARIANT(avx512, __attribute__((target("avx512f"))), 64)
LFI_VQ_SCAN_VARIANT(avx2, __attribute__((target("avx2,fma"))), 32)
#endif
LFI_VQ_SCAN_VARIANT(base, , 16)

enum class Isa { Avx512, Avx2, Base };

Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = __builtin_cpu_supports("avx512f")  ? Isa::Avx512
                         : __builtin_cpu_supports("avx2") ? Isa::Avx2
                                                          : Isa::Base;
  return isa;
#else
  return Isa::Base;
#endif
}

template <typename T>
void scan_min(Isa isa, const T* buf, const T* bias, const T* scale, T xn, int64_t n, T& best,
              int64_t& pos) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == Isa::Avx512) return scan_min_avx512(buf, bias, scale, xn, n, best, pos);
  if (isa == Isa::Avx2) return scan_min_avx2(buf, bias, scale, xn, n, best, pos);
#endif
  scan_min_base(buf, bias, scale, xn, n, best, pos);
}

template <typename T>
void scan_topk(Isa isa, const T* buf, const T* bias, const T* scale, T xn, int64_t n, int64_t j0,
               TopK<T>& top) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == Isa::Avx512) return scan_topk_avx512(buf, bias, scale, xn, n, j0, top);
  if (isa == Isa::Avx2) return scan_topk_avx2(buf, bias, scale, xn, n, j0, top);
#endif
  scan_topk_base(buf, bias, scale, xn, n, j0, top);
}

// ---- exact distances of chosen codes, in double -------------------------------------------------

template <typename scalar_t>
double exact_distance(Metric metric, const scalar_t* x, const scalar_t* y, int64_t d, double c) {
  if (metric == Metric::L2) {
    double s = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double t = static_cast<double>(x[i]) - static_cast<double>(y[i]);
      s += t * t;
    }
    return s;
  }
  double x2 = 0, y2 = 0, xy = 0;
  for (int64_t i = 0; i < d; ++i) {
    const double a = x[i], b = y[i];
    x2 += a * a;
    y2 += b * b;
    xy += a * b;
  }
  if (metric == Metric::Cosine) {
    return 1.0 - xy / (std::max(std::sqrt(x2), kNormEps) * std::max(std::sqrt(y2), kNormEps));
  }
  // (-x) (+) y = sa x + sb y (geoopt's mobius_add), its norm taken from the vectors themselves.
  double sa, sb;
  hyp::dist_sub(x2, y2, xy, c, sa, sb);
  double s2 = 0;
  for (int64_t i = 0; i < d; ++i) {
    const double t = sa * static_cast<double>(x[i]) + sb * static_cast<double>(y[i]);
    s2 += t * t;
  }
  return hyp::dist_from_sq(s2, c);
}

// ---- nearest --------------------------------------------------------------------------------------

// Codebook side of the score, in the compute type T: w (K, D), bias (K), scale (K) or empty.
template <typename T>
struct CodeSide {
  Tensor w, bias, scale;
};

template <typename T>
CodeSide<T> code_side(const Tensor& cb, Metric metric, double c) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  Tensor cbt = cb.to(st).contiguous();
  Tensor n2 = cbt.pow(2).sum(-1);
  CodeSide<T> out;
  if (metric == Metric::L2) {
    out.w = cbt * -2;
    out.bias = n2;
  } else if (metric == Metric::Cosine) {
    out.w = -(cbt / n2.sqrt().clamp_min(kNormEps).unsqueeze(1));
    out.bias = at::zeros_like(n2);
  } else {
    Tensor s = (1 - c * n2).clamp_min(kMinDen).reciprocal();
    out.w = cbt * (s * -2).unsqueeze(1);
    out.bias = n2 * s;
    out.scale = s.contiguous();
  }
  out.w = out.w.contiguous();
  out.bias = out.bias.contiguous();
  return out;
}

template <typename scalar_t>
void nearest_kernel(const Tensor& x, const Tensor& cb, Metric metric, double c, int64_t k,
                    Tensor& idx_out, Tensor& dist_out) {
  using T = at::opmath_type<scalar_t>;  // float for half types, else the type itself
  const auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t n = x.size(0), kk = cb.size(0), d = x.size(1);
  const CodeSide<T> cs = code_side<T>(cb, metric, c);
  const T* biasp = cs.bias.template const_data_ptr<T>();
  const T* scalep = cs.scale.defined() ? cs.scale.template const_data_ptr<T>() : nullptr;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* cbp = cb.const_data_ptr<scalar_t>();
  int64_t* ip = idx_out.mutable_data_ptr<int64_t>();
  scalar_t* dp = dist_out.mutable_data_ptr<scalar_t>();
  const Isa isa = cpu_isa();
  const int64_t tk = std::min(kk, kTileCodes);
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;

  at::parallel_for(0, row_tiles, 1, [&](int64_t tb, int64_t te) {
    // Per-thread buffers, allocated once per task: O(kTileRows (kTileCodes + D + k)).
    Tensor xt = at::empty({kTileRows, d}, at::TensorOptions().dtype(st));
    Tensor buf = at::empty({kTileRows * tk}, at::TensorOptions().dtype(st));
    std::vector<T> xn(kTileRows), best(kTileRows), topv(kTileRows * k);
    std::vector<int64_t> besti(kTileRows), topi(kTileRows * k);
    std::vector<double> exact(k);
    std::vector<int64_t> order(k);
    T* xtp = xt.mutable_data_ptr<T>();
    for (int64_t t = tb; t < te; ++t) {
      const int64_t i0 = t * kTileRows, tm = std::min(kTileRows, n - i0);
      // The rows in the compute type (normalised for cosine) and |x|^2 for Poincaré.
      for (int64_t r = 0; r < tm; ++r) {
        const scalar_t* src = xp + (i0 + r) * d;
        T* dst = xtp + r * d;
        T s2 = 0;
        for (int64_t q = 0; q < d; ++q) {
          dst[q] = static_cast<T>(src[q]);
          s2 += dst[q] * dst[q];
        }
        xn[r] = s2;
        if (metric == Metric::Cosine) {
          const T inv = T(1) / std::max(std::sqrt(s2), static_cast<T>(kNormEps));
          for (int64_t q = 0; q < d; ++q) dst[q] *= inv;
        }
        best[r] = std::numeric_limits<T>::infinity();
        besti[r] = 0;
        for (int64_t j = 0; j < k; ++j) {
          topv[r * k + j] = std::numeric_limits<T>::infinity();
          topi[r * k + j] = -1;
        }
      }
      Tensor xs = xt.narrow(0, 0, tm);
      std::vector<int64_t> filled(tm, 0);
      for (int64_t j0 = 0; j0 < kk; j0 += tk) {
        const int64_t tn = std::min(tk, kk - j0);
        Tensor out = buf.narrow(0, 0, tm * tn).view({tm, tn});
        at::mm_out(out, xs, cs.w.narrow(0, j0, tn).t());
        const T* bp = buf.const_data_ptr<T>();
        for (int64_t r = 0; r < tm; ++r) {
          const T* row = bp + r * tn;
          if (k == 1) {
            T b;
            int64_t p;
            scan_min(isa, row, biasp + j0, scalep ? scalep + j0 : nullptr, xn[r], tn, b, p);
            if (b < best[r]) {
              best[r] = b;
              besti[r] = j0 + p;
            }
          } else {
            TopK<T> top{topv.data() + r * k, topi.data() + r * k, k, filled[r]};
            scan_topk(isa, row, biasp + j0, scalep ? scalep + j0 : nullptr, xn[r], tn, j0, top);
            filled[r] = top.filled;
          }
        }
      }
      // Exact distances of the chosen codes; the k re-sorted by them (stable).
      for (int64_t r = 0; r < tm; ++r) {
        const int64_t i = i0 + r;
        const scalar_t* xr = xp + i * d;
        if (k == 1) {
          ip[i] = besti[r];
          dp[i] = static_cast<scalar_t>(exact_distance(metric, xr, cbp + besti[r] * d, d, c));
          continue;
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t code = std::max<int64_t>(topi[r * k + j], 0);
          topi[r * k + j] = code;
          exact[j] = exact_distance(metric, xr, cbp + code * d, d, c);
          order[j] = j;
        }
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return exact[a] < exact[b]; });
        for (int64_t j = 0; j < k; ++j) {
          ip[i * k + j] = topi[r * k + order[j]];
          dp[i * k + j] = static_cast<scalar_t>(exact[order[j]]);
        }
      }
    }
  });
}

double read_curvature(const Tensor& c) {
  LFI_CHECK_SCALAR(c);
  TORCH_CHECK(c.device() == at::kCPU, "c must be on the CPU for CPU inputs (got ", c.device(), ")");
  const double v = c.item<double>();
  TORCH_CHECK(std::isfinite(v) && v > 0, "c must be positive and finite (got ", v, ")");
  return v;
}

// ---- counting sort of the indices: rows grouped by code, in row order ---------------------------

struct Groups {
  std::vector<int64_t> start;  // K + 1 offsets into rows
  std::vector<int64_t> rows;   // N row numbers, grouped by code
};

Groups group_by_code(const int64_t* idx, int64_t n, int64_t kk) {
  Groups g;
  g.start.assign(kk + 1, 0);
  g.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) ++g.start[idx[i] + 1];
  for (int64_t q = 0; q < kk; ++q) g.start[q + 1] += g.start[q];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) g.rows[fill[idx[i]]++] = i;
  return g;
}

int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

}  // namespace

std::tuple<Tensor, Tensor> vq_nearest_cpu(const Tensor& x, const Tensor& codebook,
                                          c10::string_view metric, const Tensor& c, int64_t k) {
  check_search(x, codebook);
  LFI_CHECK_DEVICE(x, at::Device(at::kCPU));
  const Metric m = parse_metric(std::string_view(metric.data(), metric.size()));
  const double cv = read_curvature(c);
  const int64_t kk = codebook.size(0);
  TORCH_CHECK(kk >= 1, "codebook must hold at least one code (got K = 0)");
  TORCH_CHECK(k >= 1 && k <= kk, "k must be in [1, K] with K = ", kk, " (got k = ", k, ")");
  const int64_t n = x.size(0);
  Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  Tensor dist = at::empty({n, k}, x.options());
  if (n == 0) return {idx, dist};
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vq_nearest", [&] {
    nearest_kernel<scalar_t>(xc, cbc, m, cv, k, idx, dist);
  });
  return {idx, dist};
}

std::tuple<Tensor, Tensor> vq_quantize_cpu(const Tensor& x, const Tensor& codebook,
                                           const Tensor& indices, double beta) {
  check_search(x, codebook);
  LFI_CHECK_DEVICE(x, at::Device(at::kCPU));
  const int64_t n = x.size(0), d = x.size(1), kk = codebook.size(0);
  check_indices(indices, n, kk);
  Tensor q = at::empty({n, d}, x.options());
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous(), ic = indices.contiguous();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vq_quantize", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* cp = cbc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    scalar_t* qp = q.mutable_data_ptr<scalar_t>();
    total = at::parallel_reduce(
        0, n, grain(d), 0.0,
        [&](int64_t b, int64_t e, double acc) {
          for (int64_t i = b; i < e; ++i) {
            const scalar_t* code = cp + ip[i] * d;
            for (int64_t j = 0; j < d; ++j) {
              qp[i * d + j] = code[j];
              const double t = static_cast<double>(xp[i * d + j]) - static_cast<double>(code[j]);
              acc += t * t;
            }
          }
          return acc;
        },
        std::plus<double>());
  });
  const double m = static_cast<double>(n * d);
  const double loss = m > 0 ? (1.0 + beta) * total / m : std::nan("");
  return {q, at::full({}, loss, x.options())};
}

std::tuple<Tensor, Tensor> vq_quantize_backward_cpu(const Tensor& grad_q, const Tensor& grad_loss,
                                                    const Tensor& x, const Tensor& codebook,
                                                    const Tensor& indices, double beta) {
  check_search(x, codebook);
  LFI_CHECK_DEVICE(x, at::Device(at::kCPU));
  const int64_t n = x.size(0), d = x.size(1), kk = codebook.size(0);
  check_indices(indices, n, kk);
  TORCH_CHECK(grad_q.sizes() == x.sizes(), "grad_q must have x's shape ", x.sizes(), " (got ",
              grad_q.sizes(), ")");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value");
  const double gl = grad_loss.item<double>();
  const double m = static_cast<double>(std::max<int64_t>(n * d, 1));
  const double fx = gl * 2.0 * beta / m, fc = gl * 2.0 / m;
  Tensor gx = at::empty({n, d}, x.options());
  Tensor gc = at::zeros({kk, d}, x.options());
  if (n == 0) return {gx, gc};
  const Tensor xc = x.contiguous(), cbc = codebook.contiguous(), ic = indices.contiguous();
  const Tensor gqc = grad_q.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vq_quantize_bwd", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* cp = cbc.const_data_ptr<scalar_t>();
    const scalar_t* gqp = gqc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gcp = gc.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* code = cp + ip[i] * d;
        for (int64_t j = 0; j < d; ++j) {
          const double diff = static_cast<double>(xp[i * d + j]) - static_cast<double>(code[j]);
          gxp[i * d + j] = static_cast<scalar_t>(static_cast<double>(gqp[i * d + j]) + fx * diff);
        }
      }
    });
    if (fc == 0) return;
    // grad_codebook[k] = fc sum_{i in k} (c_k - x_i): rows grouped per code, summed in row order.
    const Groups g = group_by_code(ip, n, kk);
    at::parallel_for(0, kk, 1, [&](int64_t b, int64_t e) {
      std::vector<double> acc(d);
      for (int64_t q = b; q < e; ++q) {
        const int64_t s = g.start[q], t = g.start[q + 1];
        if (s == t) continue;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t r = s; r < t; ++r) {
          const scalar_t* xr = xp + g.rows[r] * d;
          for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(xr[j]);
        }
        const double cnt = static_cast<double>(t - s);
        for (int64_t j = 0; j < d; ++j) {
          gcp[q * d + j] = static_cast<scalar_t>(fc * (cnt * static_cast<double>(cp[q * d + j]) - acc[j]));
        }
      }
    });
  });
  return {gx, gc};
}

std::tuple<Tensor, Tensor, Tensor> vq_ema_update_cpu(const Tensor& x, const Tensor& indices,
                                                     const Tensor& counts, const Tensor& sums,
                                                     double decay, double eps) {
  TORCH_CHECK(x.dim() == 2, "x must be (N, D) (got shape ", x.sizes(), ")");
  LFI_CHECK_FLOATING(x);
  LFI_CHECK_DEVICE(x, at::Device(at::kCPU));
  TORCH_CHECK(counts.dim() == 1 && sums.dim() == 2 && sums.size(0) == counts.size(0) &&
                  sums.size(1) == x.size(1),
              "counts must be (K,) and sums (K, D) with D = ", x.size(1), " (got ", counts.sizes(),
              ", ", sums.sizes(), ")");
  TORCH_CHECK(counts.scalar_type() == sums.scalar_type() &&
                  (sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble),
              "counts and sums must both be float32 or both float64");
  TORCH_CHECK(counts.device() == x.device() && sums.device() == x.device(),
              "counts and sums must be on x's device");
  TORCH_CHECK(decay >= 0 && decay < 1, "decay must be in [0, 1) (got ", decay, ")");
  TORCH_CHECK(eps > 0, "eps must be positive (got ", eps, ")");
  const int64_t n = x.size(0), d = x.size(1), kk = counts.size(0);
  check_indices(indices, n, kk);
  Tensor new_counts = at::empty_like(counts, at::MemoryFormat::Contiguous);
  Tensor new_sums = at::empty_like(sums, at::MemoryFormat::Contiguous);
  Tensor codebook = at::empty_like(sums, at::MemoryFormat::Contiguous);
  const Tensor xc = x.contiguous(), ic = indices.contiguous();
  const Tensor cc = counts.contiguous(), sc = sums.contiguous();
  const Groups g = group_by_code(ic.const_data_ptr<int64_t>(), n, kk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vq_ema_update", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "vq_ema_update_acc", [&] {
      using A = scalar_t;
      const A* cp = cc.const_data_ptr<A>();
      const A* sp = sc.const_data_ptr<A>();
      A* ncp = new_counts.mutable_data_ptr<A>();
      A* nsp = new_sums.mutable_data_ptr<A>();
      A* cbp = codebook.mutable_data_ptr<A>();
      at::parallel_for(0, kk, 1, [&](int64_t b, int64_t e) {
        std::vector<double> acc(d);
        for (int64_t q = b; q < e; ++q) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t r = g.start[q]; r < g.start[q + 1]; ++r) {
            const auto* xr = xp + g.rows[r] * d;
            for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(xr[j]);
          }
          const double nk = static_cast<double>(g.start[q + 1] - g.start[q]);
          ncp[q] = static_cast<A>(decay * static_cast<double>(cp[q]) + (1 - decay) * nk);
          for (int64_t j = 0; j < d; ++j) {
            nsp[q * d + j] =
                static_cast<A>(decay * static_cast<double>(sp[q * d + j]) + (1 - decay) * acc[j]);
          }
        }
      });
      double total = 0;  // in code order: deterministic
      for (int64_t q = 0; q < kk; ++q) total += static_cast<double>(ncp[q]);
      at::parallel_for(0, kk, grain(d), [&](int64_t b, int64_t e) {
        for (int64_t q = b; q < e; ++q) {
          const double sm = (static_cast<double>(ncp[q]) + eps) / (total + kk * eps) * total;
          const double inv = 1.0 / std::max(sm, kMinDen);
          for (int64_t j = 0; j < d; ++j) cbp[q * d + j] = static_cast<A>(nsp[q * d + j] * inv);
        }
      });
    });
  });
  return {new_counts, new_sums, codebook};
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("vq_nearest", &vq_nearest_cpu);
  m.impl("vq_quantize", &vq_quantize_cpu);
  m.impl("vq_quantize_backward", &vq_quantize_backward_cpu);
  m.impl("vq_ema_update", &vq_ema_update_cpu);
}

}  // namespace lfi_fast
