// CPU kernels of the Gumbel family: Gumbel-softmax sampling (soft and hard) with forced rows, its
// backward, and the single-variable interventions of discrete codes.
//
// Sampling is one pass per row, OpenMP across rows: the row's Gumbel noise is regenerated from
// its Philox counters (csrc/philox.h's stream: element (row, k) is number row * K4 + k) into an
// L1-sized buffer, added to the logits with the max (and the input checks) in the same loop, then
// exponentiated, summed and written (soft) or reduced to its argmax and written as a one-hot
// (hard: no exp at all). Consecutive rows use consecutive counters, so small rows are generated
// several at a time. The loops over counters and categories are written so that GCC vectorises
// them: Philox's 32x32->64 products become vector multiplies, log and exp are polynomial (Cephes'
// logf and expf; within 1-2 ulp of libm). They are compiled for AVX-512, AVX2 and the baseline
// (target_clones) and picked at load time. K = 2 has its own loop across rows: the sample is the
// logistic of the difference (l1 + g1) - (l0 + g0). float64 computes in double with std::exp/log
// (the noise itself is float32, as everywhere); half types compute in float32.
#include "../common.h"
#include "../ops.h"
#include "../philox.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <optional>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LFI_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LFI_VEC_CLONES
#endif

namespace lfi_fast {
namespace {

using at::Tensor;

const at::Device kCPU(at::kCPU);
constexpr int kBlock = 16;  // Philox counters generated together (64 numbers)

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// log(x) for normal x > 0, branch-free and without a division, so that it vectorises: x = 2^k m
// with m in [sqrt(1/2), sqrt(2)) (musl's reduction), log(m) = log1p(f) by Cephes' logf polynomial
// (~1 ulp; a division-based series costs twice as much in AVX-512 divides).
inline float log_poly(float x) {
  const uint32_t ix = as_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  const float f = as_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  return f + y + 0.693359375f * k;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp); exactly 0 below -87.3 (and for -inf).
inline float exp_poly(float x) {
  const float xc = std::max(x, -87.3f);
  const float kf = (xc * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = as_float(static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23);
  return x < -87.3f ? 0.0f : y * scale;
}

inline double exp_poly(double x) { return std::exp(x); }

// ---- noise ---------------------------------------------------------------------------------------

// The Gumbel noise of counters n0 .. n0 + nctr - 1 (4 numbers each) into out[0 .. 4 nctr); only
// the first `lanes` numbers of each counter are computed (K < 4 uses fewer), the others are 0.
LFI_VEC_CLONES
void gumbel_noise(uint64_t seed, uint64_t n0, int64_t nctr, float* out, int lanes = 4) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) uint32_t c0[kBlock], c1[kBlock], c2[kBlock], c3[kBlock];
  alignas(64) float tmp[4 * kBlock];
  for (int64_t b = 0; b < nctr; b += kBlock) {
    for (int j = 0; j < kBlock; ++j) {
      const uint64_t n = n0 + static_cast<uint64_t>(b + j);
      c0[j] = static_cast<uint32_t>(n);
      c1[j] = static_cast<uint32_t>(n >> 32);
      c2[j] = 0u;
      c3[j] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) {
        const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2[j];
        const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0[j];
        const uint32_t y0 = static_cast<uint32_t>(pb >> 32) ^ c1[j] ^ k0;
        const uint32_t y2 = static_cast<uint32_t>(pa >> 32) ^ c3[j] ^ k1;
        c1[j] = static_cast<uint32_t>(pb);
        c3[j] = static_cast<uint32_t>(pa);
        c0[j] = y0;
        c2[j] = y2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // lanes (x, y, z, w) of counter j are numbers 4j .. 4j + 3: compute per lane, store interleaved
    const uint32_t* lane_bits[4] = {c0, c1, c2, c3};
    for (int l = 0; l < 4; ++l) {
      if (l >= lanes) {
        std::fill(tmp + l * kBlock, tmp + (l + 1) * kBlock, 0.0f);
        continue;
      }
      const uint32_t* c = lane_bits[l];
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) {
        const float u = (static_cast<float>(static_cast<int32_t>(c[j] >> 9)) + 0.5f) * 1.1920928955078125e-07f;
        tmp[l * kBlock + j] = -log_poly(-log_poly(u));
      }
    }
    const int64_t m = std::min<int64_t>(kBlock, nctr - b);
    float* o = out + 4 * b;
    for (int64_t j = 0; j < m; ++j)
      for (int l = 0; l < 4; ++l) o[4 * j + l] = tmp[l * kBlock + j];
  }
}

// ---- row pieces (compiled per ISA for float; plain loops for double) ------------------------------

// z = l + g and its max; `bad` is set when l holds NaN or +inf.
template <typename T>
inline T add_noise_max_impl(const T* l, const T* g, T* z, int64_t k, bool* bad) {
  T m = -std::numeric_limits<T>::infinity();
  bool b = false;
#pragma omp simd reduction(max : m) reduction(| : b)
  for (int64_t i = 0; i < k; ++i) {
    const T v = l[i];
    b |= !(v < std::numeric_limits<T>::infinity());  // NaN or +inf
    const T zi = v + g[i];
    z[i] = zi;
    m = std::max(m, zi);
  }
  *bad = b;
  return m;
}

// e = exp((z - m) / tau) in place; returns the sum.
template <typename T>
inline T exp_sum_impl(T* z, int64_t k, T m, T inv_tau) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < k; ++i) {
    const T e = exp_poly((z[i] - m) * inv_tau);
    z[i] = e;
    s += e;
  }
  return s;
}

// gi = y * (go - <go, y>) / tau
template <typename T>
inline void softmax_grad_impl(const T* y, const T* go, T* gi, int64_t k, T inv_tau) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < k; ++i) s += go[i] * y[i];
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) gi[i] = y[i] * (go[i] - s) * inv_tau;
}

LFI_VEC_CLONES float add_noise_max(const float* l, const float* g, float* z, int64_t k, bool* bad) {
  return add_noise_max_impl(l, g, z, k, bad);
}
double add_noise_max(const double* l, const double* g, double* z, int64_t k, bool* bad) {
  return add_noise_max_impl(l, g, z, k, bad);
}
LFI_VEC_CLONES float exp_sum(float* z, int64_t k, float m, float inv_tau) {
  return exp_sum_impl(z, k, m, inv_tau);
}
double exp_sum(double* z, int64_t k, double m, double inv_tau) { return exp_sum_impl(z, k, m, inv_tau); }
LFI_VEC_CLONES void softmax_grad(const float* y, const float* go, float* gi, int64_t k, float inv_tau) {
  softmax_grad_impl(y, go, gi, k, inv_tau);
}
void softmax_grad(const double* y, const double* go, double* gi, int64_t k, double inv_tau) {
  softmax_grad_impl(y, go, gi, k, inv_tau);
}

// K = 2, n rows: d = (l1 + g1) - (l0 + g0); soft: (sigmoid(-d/tau), sigmoid(d/tau)); hard: one-hot
// of d > 0 (a tie picks category 0, as argmax does). l and out are (n, 2); g is (n, 4) (a row's
// counter). Returns whether a row holds NaN or +inf, or only -inf (the caller finds which).
template <typename T>
inline bool binary_rows_impl(const T* l, const T* g, T* out, int64_t n, T inv_tau, bool hard) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  bool bad = false;
  if (hard) {
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < n; ++i) {
      const T l0 = l[2 * i], l1 = l[2 * i + 1];
      bad |= !(l0 < inf) || !(l1 < inf) || !(std::max(l0, l1) > -inf);
      const T d = (l1 + g[4 * i + 1]) - (l0 + g[4 * i]);
      out[2 * i] = d > 0 ? T(0) : T(1);
      out[2 * i + 1] = d > 0 ? T(1) : T(0);
    }
    return bad;
  }
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const T l0 = l[2 * i], l1 = l[2 * i + 1];
    bad |= !(l0 < inf) || !(l1 < inf) || !(std::max(l0, l1) > -inf);
    const T d = (l1 + g[4 * i + 1]) - (l0 + g[4 * i]);
    const T e = exp_poly(-std::abs(d) * inv_tau);  // in [0, 1]; 0 when a logit is -inf
    const T big = T(1) / (T(1) + e), small = e * big;
    out[2 * i] = d > 0 ? small : big;
    out[2 * i + 1] = d > 0 ? big : small;
  }
  return bad;
}
LFI_VEC_CLONES bool binary_rows(const float* l, const float* g, float* out, int64_t n, float inv_tau, bool hard) {
  return binary_rows_impl(l, g, out, n, inv_tau, hard);
}
bool binary_rows(const double* l, const double* g, double* out, int64_t n, double inv_tau, bool hard) {
  return binary_rows_impl(l, g, out, n, inv_tau, hard);
}

// ---- checks --------------------------------------------------------------------------------------

struct Forced {
  const bool* mask = nullptr;
  const int64_t* targets = nullptr;
  Tensor mask_t, targets_t;  // contiguous copies kept alive
};

Forced check_args(const Tensor& logits, const std::optional<Tensor>& mask,
                  const std::optional<Tensor>& targets, const std::optional<Tensor>& noise, double tau,
                  int64_t seed, int64_t offset) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (rows, K) (got shape ", logits.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be a floating tensor (got ",
              logits.scalar_type(), ")");
  LFI_CHECK_DEVICE(logits, kCPU);
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be positive and finite (got ", tau, ")");
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, "seed and offset must be >= 0 (got ", seed, ", ", offset, ")");
  TORCH_CHECK(mask.has_value() == targets.has_value(), "mask and targets go together");
  const int64_t rows = logits.size(0);
  Forced f;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be a bool tensor (got ", mask->scalar_type(), ")");
    TORCH_CHECK(targets->scalar_type() == at::kLong, "targets must be int64 (got ", targets->scalar_type(), ")");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == rows, "mask must be (rows,) = (", rows,
                ",) (got ", mask->sizes(), ")");
    TORCH_CHECK(targets->dim() == 1 && targets->size(0) == rows, "targets must be (rows,) = (", rows,
                ",) (got ", targets->sizes(), ")");
    LFI_CHECK_DEVICE(*mask, kCPU);
    LFI_CHECK_DEVICE(*targets, kCPU);
    f.mask_t = mask->contiguous();
    f.targets_t = targets->contiguous();
    f.mask = f.mask_t.const_data_ptr<bool>();
    f.targets = f.targets_t.const_data_ptr<int64_t>();
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), "noise must have the logits' shape ", logits.sizes(),
                " (got ", noise->sizes(), ")");
    TORCH_CHECK(at::isFloatingType(noise->scalar_type()), "noise must be a floating tensor");
    LFI_CHECK_DEVICE(*noise, kCPU);
  }
  return f;
}

// The first row (lowest index) that failed each check, across threads.
struct BadRows {
  std::atomic<int64_t> nonfinite{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> all_neg_inf{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> target{std::numeric_limits<int64_t>::max()};
  static void note(std::atomic<int64_t>& a, int64_t row) {
    int64_t cur = a.load(std::memory_order_relaxed);
    while (row < cur && !a.compare_exchange_weak(cur, row, std::memory_order_relaxed)) {
    }
  }
  void raise(const Forced& f) const {
    constexpr int64_t none = std::numeric_limits<int64_t>::max();
    const int64_t a = nonfinite.load(), b = all_neg_inf.load(), c = target.load();
    TORCH_CHECK_VALUE(a == none, "logits must not contain NaN or +inf (row ", a, ")");
    TORCH_CHECK_VALUE(b == none, "logits: every logit of row ", b, " is -inf (no category can be sampled)");
    TORCH_CHECK_VALUE(c == none, "targets must be in [0, K) where mask is set (got ",
                      c == none ? 0 : f.targets[c], " at row ", c, ")");
  }
};

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

// Rows whose noise is generated together: at least kBlock counters' worth.
int64_t group_rows(int64_t k4) { return std::max<int64_t>(1, (4 * kBlock * 4) / k4); }

// ---- forward -------------------------------------------------------------------------------------

// The row loop shared by the forward and the backward's recomputation: for each row of [begin,
// end), fills z (the row's acc_t logits + noise) and calls visit(row, z, max, bad).
template <typename scalar_t, typename acc_t, typename Visit>
void for_rows_with_noise(const scalar_t* lp, const acc_t* np, int64_t k, uint64_t seed, uint64_t offset,
                         int64_t begin, int64_t end, const Visit& visit) {
  const int64_t k4 = (k + 3) / 4 * 4, g = group_rows(k4);
  std::vector<float> noise32(np ? 0 : g * k4);
  std::vector<acc_t> noise_acc(np || std::is_same_v<acc_t, float> ? 0 : g * k4);
  std::vector<acc_t> lrow(std::is_same_v<scalar_t, acc_t> ? 0 : k), z(k);
  for (int64_t r0 = begin; r0 < end; r0 += g) {
    const int64_t r1 = std::min(end, r0 + g);
    const acc_t* gbase = nullptr;
    int64_t gstride = k;
    if (np) {
      gbase = np + r0 * k;
    } else {
      gumbel_noise(seed, offset + static_cast<uint64_t>(r0 * (k4 / 4)), (r1 - r0) * (k4 / 4), noise32.data(),
                   static_cast<int>(std::min<int64_t>(k, 4)));
      if constexpr (std::is_same_v<acc_t, float>) {
        gbase = noise32.data();
      } else {
        for (int64_t i = 0; i < (r1 - r0) * k4; ++i) noise_acc[i] = noise32[i];
        gbase = noise_acc.data();
      }
      gstride = k4;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* l;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        l = lp + r * k;
      } else {
        for (int64_t i = 0; i < k; ++i) lrow[i] = static_cast<acc_t>(lp[r * k + i]);
        l = lrow.data();
      }
      bool bad = false;
      const acc_t m = add_noise_max(l, gbase + (r - r0) * gstride, z.data(), k, &bad);
      visit(r, z.data(), m, bad);
    }
  }
}

template <typename acc_t>
int64_t first_max(const acc_t* z, int64_t k, acc_t m) {
  for (int64_t i = 0; i < k; ++i)
    if (z[i] == m) return i;
  return 0;
}

template <typename scalar_t>
void forward_kernel(const Tensor& logits, const Tensor* noise, const Forced& f, double tau, bool hard,
                    uint64_t seed, uint64_t offset, Tensor& out, BadRows& bad_rows) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t rows = logits.size(0), k = logits.size(1);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const acc_t* np = noise ? noise->const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);

  auto forced = [&](int64_t r) {
    if (!f.mask || !f.mask[r]) return false;
    const int64_t t = f.targets[r];
    if (t < 0 || t >= k) {
      BadRows::note(bad_rows.target, r);
      return true;
    }
    std::fill(op + r * k, op + (r + 1) * k, scalar_t(0));
    op[r * k + t] = scalar_t(1);
    return true;
  };

  if (k == 2 && !np) {  // binary fast path: rows in groups, one counter per row
    at::parallel_for(0, rows, grain_rows(64), [&](int64_t begin, int64_t end) {
      constexpr int64_t G = 4 * kBlock;
      constexpr bool same = std::is_same_v<scalar_t, acc_t>;
      alignas(64) float noise32[4 * G];
      alignas(64) acc_t gbuf[same && std::is_same_v<acc_t, float> ? 1 : 4 * G];
      alignas(64) acc_t lbuf[same ? 1 : 2 * G], obuf[same ? 1 : 2 * G];
      for (int64_t r0 = begin; r0 < end; r0 += G) {
        const int64_t n = std::min(G, end - r0);
        gumbel_noise(seed, offset + static_cast<uint64_t>(r0), n, noise32, 2);
        const acc_t* g;
        if constexpr (std::is_same_v<acc_t, float>) {
          g = noise32;
        } else {
          for (int64_t i = 0; i < 4 * n; ++i) gbuf[i] = noise32[i];
          g = gbuf;
        }
        const acc_t* l;
        acc_t* o;
        if constexpr (same) {
          l = lp + 2 * r0;
          o = op + 2 * r0;
        } else {
          for (int64_t i = 0; i < 2 * n; ++i) lbuf[i] = static_cast<acc_t>(lp[2 * r0 + i]);
          l = lbuf;
          o = obuf;
        }
        const bool bad = binary_rows(l, g, o, n, inv_tau, hard);
        if constexpr (!same)
          for (int64_t i = 0; i < 2 * n; ++i) op[2 * r0 + i] = static_cast<scalar_t>(obuf[i]);
        if (bad) {
          constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
          for (int64_t i = 0; i < n; ++i) {
            const acc_t l0 = l[2 * i], l1 = l[2 * i + 1];
            if (!(l0 < inf) || !(l1 < inf)) BadRows::note(bad_rows.nonfinite, r0 + i);
            else if (!(std::max(l0, l1) > -inf)) BadRows::note(bad_rows.all_neg_inf, r0 + i);
          }
        }
        if (f.mask)
          for (int64_t i = 0; i < n; ++i) forced(r0 + i);
      }
    });
    return;
  }

  at::parallel_for(0, rows, grain_rows(k), [&](int64_t begin, int64_t end) {
    for_rows_with_noise<scalar_t, acc_t>(lp, np, k, seed, offset, begin, end,
                                         [&](int64_t r, acc_t* z, acc_t m, bool bad) {
      if (bad) {
        BadRows::note(bad_rows.nonfinite, r);
        return;
      }
      if (!(m > -std::numeric_limits<acc_t>::infinity())) {
        BadRows::note(bad_rows.all_neg_inf, r);
        return;
      }
      if (forced(r)) return;
      scalar_t* o = op + r * k;
      if (hard) {
        const int64_t i = first_max(z, k, m);
        std::fill(o, o + k, scalar_t(0));
        o[i] = scalar_t(1);
        return;
      }
      const acc_t s = exp_sum(z, k, m, inv_tau);
      const acc_t inv = acc_t(1) / s;
      for (int64_t i = 0; i < k; ++i) o[i] = static_cast<scalar_t>(z[i] * inv);
    });
  });
}

Tensor noise_for(const Tensor& logits, const std::optional<Tensor>& noise) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return noise->to(acc).contiguous();
}

// ---- backward ------------------------------------------------------------------------------------

template <typename scalar_t>
void backward_kernel(const Tensor& grad, const Tensor& logits, const Tensor& out, const Tensor* noise,
                     const bool* mask, double tau, bool hard, uint64_t seed, uint64_t offset, Tensor& gl) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t rows = logits.size(0), k = logits.size(1);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* yp = out.const_data_ptr<scalar_t>();
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const acc_t* np = noise ? noise->const_data_ptr<acc_t>() : nullptr;
  scalar_t* gip = gl.mutable_data_ptr<scalar_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);

  auto row_grad = [&](int64_t r, const acc_t* y, std::vector<acc_t>& go, std::vector<acc_t>& gi) {
    scalar_t* o = gip + r * k;
    if (mask && mask[r]) {
      std::fill(o, o + k, scalar_t(0));
      return;
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {  // straight from and to the tensors
      softmax_grad(y, gp + r * k, o, k, inv_tau);
    } else {
      for (int64_t i = 0; i < k; ++i) go[i] = static_cast<acc_t>(gp[r * k + i]);
      softmax_grad(y, go.data(), gi.data(), k, inv_tau);
      for (int64_t i = 0; i < k; ++i) o[i] = static_cast<scalar_t>(gi[i]);
    }
  };

  at::parallel_for(0, rows, grain_rows(k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(k), gi(k), y(k);
    if (!hard) {  // the softmax backward from the saved sample
      for (int64_t r = begin; r < end; ++r) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          row_grad(r, yp + r * k, go, gi);
        } else {
          for (int64_t i = 0; i < k; ++i) y[i] = static_cast<acc_t>(yp[r * k + i]);
          row_grad(r, y.data(), go, gi);
        }
      }
      return;
    }
    // straight-through: the soft sample's gradient, the soft sample recomputed from its noise
    for_rows_with_noise<scalar_t, acc_t>(lp, np, k, seed, offset, begin, end,
                                         [&](int64_t r, acc_t* z, acc_t m, bool) {
      if (mask && mask[r]) {
        std::fill(gip + r * k, gip + (r + 1) * k, scalar_t(0));
        return;
      }
      const acc_t s = exp_sum(z, k, m, inv_tau);
      const acc_t inv = acc_t(1) / s;
      for (int64_t i = 0; i < k; ++i) z[i] *= inv;
      row_grad(r, z, go, gi);
    });
  });
}

}  // namespace

Tensor gumbel_softmax_cpu(const Tensor& logits, const std::optional<Tensor>& mask,
                          const std::optional<Tensor>& targets, const std::optional<Tensor>& noise,
                          double tau, bool hard, int64_t seed, int64_t offset) {
  Forced f = check_args(logits, mask, targets, noise, tau, seed, offset);
  const Tensor l = logits.contiguous();
  Tensor nz = noise.has_value() ? noise_for(l, noise) : Tensor();
  Tensor out = at::empty_like(l, at::MemoryFormat::Contiguous);
  if (l.numel() == 0) return out;
  BadRows bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "gumbel_softmax_cpu", [&] {
    forward_kernel<scalar_t>(l, nz.defined() ? &nz : nullptr, f, tau, hard, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset), out, bad);
  });
  bad.raise(f);
  return out;
}

Tensor gumbel_softmax_backward_cpu(const Tensor& grad, const Tensor& logits, const Tensor& out,
                                   const std::optional<Tensor>& mask, const std::optional<Tensor>& noise,
                                   double tau, bool hard, int64_t seed, int64_t offset) {
  std::optional<Tensor> targets;
  if (mask.has_value()) targets = at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  Forced f = check_args(logits, mask, targets, noise, tau, seed, offset);
  TORCH_CHECK(grad.sizes() == logits.sizes() && out.sizes() == logits.sizes(),
              "grad and out must have the logits' shape ", logits.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && out.scalar_type() == logits.scalar_type(),
              "grad, out and logits must have one dtype");
  LFI_CHECK_DEVICE(grad, kCPU);
  LFI_CHECK_DEVICE(out, kCPU);
  const Tensor l = logits.contiguous(), g = grad.contiguous(), y = out.contiguous();
  Tensor nz = noise.has_value() ? noise_for(l, noise) : Tensor();
  Tensor gl = at::empty_like(l, at::MemoryFormat::Contiguous);
  if (l.numel() == 0) return gl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "gumbel_softmax_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, l, y, nz.defined() ? &nz : nullptr, f.mask, tau, hard,
                              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), gl);
  });
  return gl;
}

namespace {

// Each code's variables, checked: codes (B, V) int64, every value in [0, K).
Tensor check_codes(const Tensor& codes, int64_t k) {
  TORCH_CHECK(codes.dim() == 2, "codes must be (B, V) (got shape ", codes.sizes(), ")");
  TORCH_CHECK(codes.scalar_type() == at::kLong, "codes must be int64 (got ", codes.scalar_type(), ")");
  TORCH_CHECK_VALUE(k >= 2, "num_categories must be >= 2 (got ", k, ")");
  LFI_CHECK_DEVICE(codes, kCPU);
  Tensor c = codes.contiguous();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t n = c.numel();
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (cp[i] < 0 || cp[i] >= k) {
        BadRows::note(bad, i);
        break;
      }
  });
  const int64_t i = bad.load();
  TORCH_CHECK_VALUE(i == std::numeric_limits<int64_t>::max(), "codes must be in [0, ", k, ") (got ",
                    i == std::numeric_limits<int64_t>::max() ? 0 : cp[i], " at ",
                    i / std::max<int64_t>(c.size(1), 1), ", ", i % std::max<int64_t>(c.size(1), 1), ")");
  return c;
}

}  // namespace

Tensor single_interventions_cpu(const Tensor& codes, int64_t num_categories) {
  const Tensor c = check_codes(codes, num_categories);
  const int64_t b = c.size(0), v = c.size(1), k1 = num_categories - 1, j = v * k1;
  Tensor out = at::empty({b, j, v}, c.options());
  const int64_t* cp = c.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, b * j, std::max<int64_t>(1, 4096 / std::max<int64_t>(v, 1)), [&](int64_t s, int64_t e) {
    for (int64_t idx = s; idx < e; ++idx) {
      const int64_t bi = idx / std::max<int64_t>(j, 1), ji = idx % std::max<int64_t>(j, 1);
      const int64_t var = ji / k1, r = ji % k1;
      const int64_t* code = cp + bi * v;
      int64_t* o = op + idx * v;
      std::copy(code, code + v, o);
      o[var] = r + (r >= code[var] ? 1 : 0);
    }
  });
  return out;
}

Tensor single_intervention_one_hot_cpu(const Tensor& codes, int64_t num_categories, at::ScalarType dtype) {
  const Tensor c = check_codes(codes, num_categories);
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating dtype (got ", dtype, ")");
  const int64_t b = c.size(0), v = c.size(1), k = num_categories, k1 = k - 1, j = v * k1;
  Tensor out = at::empty({b, j, v, k}, c.options().dtype(dtype));
  const int64_t* cp = c.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "single_intervention_one_hot_cpu", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, b * j, std::max<int64_t>(1, 4096 / std::max<int64_t>(v * k, 1)), [&](int64_t s, int64_t e) {
      for (int64_t idx = s; idx < e; ++idx) {
        const int64_t bi = idx / j, ji = idx % j;
        const int64_t var = ji / k1, r = ji % k1;
        const int64_t* code = cp + bi * v;
        scalar_t* o = op + idx * v * k;
        std::fill(o, o + v * k, scalar_t(0));
        for (int64_t u = 0; u < v; ++u) o[u * k + code[u]] = scalar_t(1);
        o[var * k + code[var]] = scalar_t(0);
        o[var * k + r + (r >= code[var] ? 1 : 0)] = scalar_t(1);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("gumbel_softmax", &gumbel_softmax_cpu);
  m.impl("gumbel_softmax_backward", &gumbel_softmax_backward_cpu);
  m.impl("single_interventions", &single_interventions_cpu);
  m.impl("single_intervention_one_hot", &single_intervention_one_hot_cpu);
}

}  // namespace lfi_fast
