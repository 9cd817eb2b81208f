// CPU kernels of the nuisance family (lfi_fast/reference/nuisance.py is the specification).
//
// sample_linear: the shared part W_s·mu_s + b is one ATen GEMM per call (B rows, not B * n); the
// per-sample part runs row by row, OpenMP across rows: the row's noise is regenerated from
// (seed, offset) into a few registers (Dn is small), the row's W_n·z_n is accumulated onto the
// shared part in L1 and the activation is applied before the row is stored. The noise never
// reaches memory. The row loop is compiled twice (AVX2+FMA and baseline x86-64) and picked at
// load time, since the extension is built without -march.
//
// Backward: the noise is regenerated (B * n x Dn values, small), the pre-activation is recomputed
// row by row and multiplied by the activation's derivative, and the gradients are ATen GEMMs and
// reductions over that. Half types compute in float32.
#include "../nuisance_math.h"
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LFI_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LFI_ROW_CLONES
#endif

namespace lfi_fast {
namespace {

using at::Tensor;
namespace nu = nuisance;
using nu::compute_type;
using nu::per_input;
using nu::Prepared;
using nu::prepare;
using nu::shared_part;

const at::Device kCPU(at::kCPU);


// Rows per parallel task: enough work per task to amortise the OpenMP fork.
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// Where the nuisance part of row r comes from: eps (the stream, or explicit noise), then
// z_n = eps (standard prior) or mu_n + sd * eps (posterior).
template <typename T>
struct RowNoise {
  uint64_t seed, offset;
  int64_t dn, dn4, d, ds, n;
  const T* noise;  // (rows, dn) contiguous in T, or nullptr: the stream
  bool posterior;
  const T* mu;  // (B, D) contiguous in T
  const T* sd;  // (B, dn) exp(logvar_n / 2), posterior only

  void eps(int64_t r, T* e) const {
    if (noise != nullptr) {
      for (int64_t j = 0; j < dn; ++j) e[j] = noise[r * dn + j];
      return;
    }
    const uint64_t base = offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(dn4 / 4);
    float z[4];
    for (int64_t k = 0; k < dn4 / 4; ++k) {
      nu::normals4(seed, base + k, z);
      for (int l = 0; l < 4 && 4 * k + l < dn; ++l) e[4 * k + l] = static_cast<T>(z[l]);
    }
  }

  void latent(int64_t r, const T* e, T* z) const {
    if (!posterior) {
      for (int64_t j = 0; j < dn; ++j) z[j] = e[j];
      return;
    }
    const int64_t b = r / n;
    for (int64_t j = 0; j < dn; ++j) z[j] = mu[b * d + ds + j] + sd[b * dn + j] * e[j];
  }
};


template <typename T>
RowNoise<T> row_noise(const Prepared& p, int64_t d, int64_t ds, int64_t n, bool posterior,
                      int64_t seed, int64_t offset) {
  const int64_t dn = d - ds;
  return RowNoise<T>{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dn,
                     nu::padded_width(dn), d, ds, n,
                     p.noise.defined() ? p.noise.data_ptr<T>() : nullptr, posterior,
                     p.mu.data_ptr<T>(), posterior ? p.sd.data_ptr<T>() : nullptr};
}

// eps (rows, dn) in the compute dtype: what the forward drew (the backward's regeneration).
Tensor regenerate_eps(const Prepared& p, int64_t d, int64_t ds, int64_t n, bool posterior,
                      int64_t seed, int64_t offset) {
  const int64_t rows = p.mu.size(0) * n, dn = d - ds;
  if (p.noise.defined()) return p.noise;
  Tensor eps = at::empty({rows, dn}, p.mu.options());
  AT_DISPATCH_FLOATING_TYPES(p.mu.scalar_type(), "nuisance_eps", [&] {
    const auto src = row_noise<scalar_t>(p, d, ds, n, posterior, seed, offset);
    scalar_t* out = eps.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(dn), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) src.eps(r, out + r * dn);
    });
  });
  return eps;
}

// ---- the per-sample row: dst = act(hs + sum_j z_j * wnT[j]) ------------------------------------

template <typename T>
inline __attribute__((always_inline)) void linear_row_impl(const T* hs, const T* wnT, const T* z,
                                                           int64_t dn, int64_t h, int act, T slope,
                                                           T* dst) {
  for (int64_t i = 0; i < h; ++i) dst[i] = hs[i];
  int64_t j = 0;
  for (; j + 1 < dn; j += 2) {  // two nuisance dims per pass: half the passes over dst
    const T z0 = z[j], z1 = z[j + 1];
    const T* w0 = wnT + j * h;
    const T* w1 = w0 + h;
    for (int64_t i = 0; i < h; ++i) dst[i] += z0 * w0[i] + z1 * w1[i];
  }
  if (j < dn) {
    const T z0 = z[j];
    const T* w0 = wnT + j * h;
    for (int64_t i = 0; i < h; ++i) dst[i] += z0 * w0[i];
  }
  switch (act) {  // outside the loops, so that each loop vectorises
    case nu::kRelu:
      for (int64_t i = 0; i < h; ++i) dst[i] = dst[i] > T(0) ? dst[i] : T(0);
      break;
    case nu::kLeakyRelu:
      // The factor (1 or slope) first, then the product, 64 at a time: as one loop (x > 0 ? x :
      // x * slope, in any spelling) gcc emits a compare-and-jump per element, 2.3x slower.
      for (int64_t i0 = 0; i0 < h; i0 += 64) {
        const int64_t m = std::min<int64_t>(64, h - i0);
        T f[64];
        for (int64_t l = 0; l < m; ++l) f[l] = dst[i0 + l] > T(0) ? T(1) : slope;
        for (int64_t l = 0; l < m; ++l) dst[i0 + l] *= f[l];
      }
      break;
    case nu::kGelu:
    case nu::kSilu:
      for (int64_t i = 0; i < h; ++i) dst[i] = nu::activate<T>(dst[i], act, slope);
      break;
    default:
      break;
  }
}

LFI_ROW_CLONES void linear_row(const float* hs, const float* wnT, const float* z, int64_t dn,
                               int64_t h, int act, float slope, float* dst) {
  linear_row_impl<float>(hs, wnT, z, dn, h, act, slope, dst);
}

LFI_ROW_CLONES void linear_row(const double* hs, const double* wnT, const double* z, int64_t dn,
                               int64_t h, int act, double slope, double* dst) {
  linear_row_impl<double>(hs, wnT, z, dn, h, act, slope, dst);
}

// ---- the backward's row: gpre = grad * act'(pre), reduced at once ----------------------------------
// pre is recomputed (never stored); gb += gpre; acc (dn x H) += z gpre^T; gz (posterior) = W_n^T gpre.
// pre and gr: scratch rows of H.
template <typename T>
inline __attribute__((always_inline)) void backward_row_impl(
    const T* __restrict__ hs, const T* __restrict__ wnT, const T* __restrict__ z,
    const T* __restrict__ grow, int64_t dn, int64_t h, int act, T slope, T* __restrict__ pre,
    T* __restrict__ gr, T* __restrict__ gb, T* __restrict__ acc, T* __restrict__ gz) {
  const T* gpre = grow;
  if (act != nu::kNone) {
    linear_row_impl<T>(hs, wnT, z, dn, h, nu::kNone, slope, pre);
    // The branch outside the loops, and the derivative first as its own row (in place of pre),
    // then the product: in one loop (grow * (pre > 0 ? 1 : 0)) gcc emits a compare-and-jump per
    // element, which mispredicts on half of them and made this loop 80 % of the backward.
    switch (act) {
      case nu::kRelu:
        for (int64_t i = 0; i < h; ++i) pre[i] = pre[i] > T(0) ? T(1) : T(0);
        for (int64_t i = 0; i < h; ++i) gr[i] = grow[i] * pre[i];
        break;
      case nu::kLeakyRelu:
        for (int64_t i = 0; i < h; ++i) pre[i] = pre[i] > T(0) ? T(1) : slope;
        for (int64_t i = 0; i < h; ++i) gr[i] = grow[i] * pre[i];
        break;
      default:
        for (int64_t i = 0; i < h; ++i) gr[i] = grow[i] * nu::activate_grad<T>(pre[i], act, slope);
    }
    gpre = gr;
  }
  for (int64_t i = 0; i < h; ++i) gb[i] += gpre[i];
  for (int64_t j = 0; j < dn; ++j) {
    const T zj = z[j];
    T* __restrict__ aj = acc + j * h;
    for (int64_t i = 0; i < h; ++i) aj[i] += zj * gpre[i];
  }
  if (gz != nullptr) {
    // Dot products of H terms: kLanes partial sums (a plain running sum is a serial chain that
    // strict floating point keeps from vectorising: 4x slower).
    constexpr int kLanes = 16;
    for (int64_t j = 0; j < dn; ++j) {
      const T* wj = wnT + j * h;
      T part[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= h; i += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += gpre[i + l] * wj[i + l];
      T s = 0;
      for (; i < h; ++i) s += gpre[i] * wj[i];
      for (int l = 0; l < kLanes; ++l) s += part[l];
      gz[j] = s;
    }
  }
}

LFI_ROW_CLONES void backward_row(const float* hs, const float* wnT, const float* z, const float* grow,
                                 int64_t dn, int64_t h, int act, float slope, float* pre, float* gr,
                                 float* gb, float* acc, float* gz) {
  backward_row_impl<float>(hs, wnT, z, grow, dn, h, act, slope, pre, gr, gb, acc, gz);
}

LFI_ROW_CLONES void backward_row(const double* hs, const double* wnT, const double* z,
                                 const double* grow, int64_t dn, int64_t h, int act, double slope,
                                 double* pre, double* gr, double* gb, double* acc, double* gz) {
  backward_row_impl<double>(hs, wnT, z, grow, dn, h, act, slope, pre, gr, gb, acc, gz);
}



}  // namespace

// ---- nuisance_sample -------------------------------------------------------------------------------

Tensor nuisance_sample_cpu(const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
                           bool posterior, int64_t seed, int64_t offset,
                           const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  LFI_CHECK_DEVICE(mu, kCPU);
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n;
  Tensor out = at::empty({rows, d}, mu.options());
  if (rows == 0) return out;
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "nuisance_sample", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto src = row_noise<T>(p, d, ds, n, posterior, seed, offset);
    const T* m = p.mu.data_ptr<T>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      std::vector<T> e(dn), z(dn);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = o + r * d;
        const T* mrow = m + (r / n) * d;
        for (int64_t j = 0; j < ds; ++j) row[j] = static_cast<scalar_t>(mrow[j]);
        src.eps(r, e.data());
        src.latent(r, e.data(), z.data());
        for (int64_t j = 0; j < dn; ++j) row[ds + j] = static_cast<scalar_t>(z[j]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> nuisance_sample_backward_cpu(const Tensor& grad, const Tensor& mu,
                                                        const Tensor& logvar, int64_t ds, int64_t n,
                                                        bool posterior, int64_t seed, int64_t offset,
                                                        const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  LFI_CHECK_DEVICE(mu, kCPU);
  const int64_t d = mu.size(1);
  return nu::sample_backward(grad, mu, logvar, ds, n, posterior, noise, [&](const Prepared& q) {
    return regenerate_eps(q, d, ds, n, posterior, seed, offset);
  });
}

// ---- nuisance_sample_linear --------------------------------------------------------------------------

Tensor nuisance_sample_linear_cpu(const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
                                  const Tensor& weight, const c10::optional<Tensor>& bias,
                                  c10::string_view activation, double negative_slope,
                                  bool posterior, int64_t seed, int64_t offset,
                                  const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  nu::check_layer(mu, weight, bias);
  LFI_CHECK_DEVICE(mu, kCPU);
  const int act = nu::parse_activation(std::string(activation));
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n, h = weight.size(0);
  Tensor out = at::empty({rows, h}, mu.options());
  if (rows == 0 || h == 0) return out;
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  const auto [hs, wnT] = shared_part(p.mu, weight, bias, ds);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "nuisance_sample_linear", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto src = row_noise<T>(p, d, ds, n, posterior, seed, offset);
    const T* hsp = hs.data_ptr<T>();
    const T* w = wnT.data_ptr<T>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const T slope = static_cast<T>(negative_slope);
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
      std::vector<T> e(dn), z(dn);
      constexpr bool kInPlace = std::is_same_v<T, scalar_t>;
      std::vector<T> buf(kInPlace ? 0 : h);
      for (int64_t r = begin; r < end; ++r) {
        src.eps(r, e.data());
        src.latent(r, e.data(), z.data());
        // float and double rows are written in place; half rows go through a float buffer
        T* dst = kInPlace ? reinterpret_cast<T*>(o + r * h) : buf.data();
        linear_row(hsp + (r / n) * h, w, z.data(), dn, h, act, slope, dst);
        if (!kInPlace)
          for (int64_t i = 0; i < h; ++i) o[r * h + i] = static_cast<scalar_t>(buf[i]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nuisance_sample_linear_backward_cpu(
    const Tensor& grad, const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
    const Tensor& weight, const c10::optional<Tensor>& bias, c10::string_view activation,
    double negative_slope, bool posterior, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  nu::check_layer(mu, weight, bias);
  LFI_CHECK_DEVICE(mu, kCPU);
  const int act = nu::parse_activation(std::string(activation));
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n, h = weight.size(0);
  nu::check_linear_grad(grad, rows, h);
  const auto acc = compute_type(mu.scalar_type());
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  const Tensor eps = regenerate_eps(p, d, ds, n, posterior, seed, offset);
  const Tensor zn = nu::latent_nuisance(eps, p, n, ds, posterior);
  const auto [hs, wnT] = shared_part(p.mu, weight, bias, ds);
  const Tensor g = grad.to(acc).contiguous();
  // One pass over the rows, input by input: gpre = grad * act'(pre) with the pre-activation
  // recomputed (gpre is never stored), reduced at once into gb (per-input sums), gz (posterior:
  // gpre W_n) and, per thread, gwn^T = z_n^T gpre (dn x H, summed over the threads after).
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  Tensor gb = at::zeros({b, h}, g.options());
  Tensor gz = posterior ? at::zeros({rows, dn}, g.options()) : Tensor();
  Tensor parts = at::zeros({nt, dn, h}, g.options());
  const Tensor zc = zn.contiguous();
  if (rows > 0 && h > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "nuisance_sample_linear_bwd", [&] {
      using T = scalar_t;
      const T* hsp = hs.data_ptr<T>();
      const T* w = wnT.data_ptr<T>();
      const T* zp = zc.data_ptr<T>();
      const T* gp = g.data_ptr<T>();
      T* gbp = gb.data_ptr<T>();
      T* gzp = posterior ? gz.data_ptr<T>() : nullptr;
      T* partp = parts.data_ptr<T>();
      const T slope = static_cast<T>(negative_slope);
      const int64_t grain = std::max<int64_t>(1, grain_rows(h) / std::max<int64_t>(n, 1));
      at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
        // Threads write disjoint rows of gb and gz; the partial gwn is the thread's own.
        T* acc_w = partp + std::min<int64_t>(at::get_thread_num(), nt - 1) * dn * h;
        std::vector<T> pre(h), gr(h);
        for (int64_t bi = begin; bi < end; ++bi) {
          T* gbr = gbp + bi * h;
          for (int64_t r = bi * n; r < (bi + 1) * n; ++r)
            backward_row(hsp + bi * h, w, zp + r * dn, gp + r * h, dn, h, act, slope, pre.data(),
                         gr.data(), gbr, acc_w, posterior ? gzp + r * dn : nullptr);
        }
      });
    });
  }
  const Tensor gwn = parts.sum(0).t();  // (H, dn)
  return nu::linear_backward_from_sums(gb, gwn, gz, eps, p, weight, n, ds, posterior,
                                       mu.scalar_type());
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("nuisance_sample", &nuisance_sample_cpu);
  m.impl("nuisance_sample_backward", &nuisance_sample_backward_cpu);
  m.impl("nuisance_sample_linear", &nuisance_sample_linear_cpu);
  m.impl("nuisance_sample_linear_backward", &nuisance_sample_linear_backward_cpu);
}

}  // namespace lfi_fast
