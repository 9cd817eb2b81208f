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

const at::Device kCPU(at::kCPU);

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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

struct Prepared {
  Tensor mu, sd, noise;  // compute dtype, contiguous
};

Prepared prepare(const Tensor& mu, const Tensor& logvar, int64_t ds, bool posterior,
                 const c10::optional<Tensor>& noise) {
  const auto acc = compute_type(mu.scalar_type());
  Prepared p;
  p.mu = mu.to(acc).contiguous();
  if (posterior) p.sd = logvar.narrow(1, ds, mu.size(1) - ds).to(acc).mul(0.5).exp().contiguous();
  if (noise.has_value()) p.noise = noise->to(acc).contiguous();
  return p;
}

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
      for (int64_t i = 0; i < h; ++i) dst[i] = dst[i] > T(0) ? dst[i] : dst[i] * slope;
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

// The shared part hs = mu_s · W_s^T + b (B, H) and W_n transposed (dn, H), in the compute dtype.
std::pair<Tensor, Tensor> shared_part(const Tensor& mu_c, const Tensor& weight,
                                      const c10::optional<Tensor>& bias, int64_t ds) {
  const auto acc = mu_c.scalar_type();
  const Tensor w = weight.to(acc);
  const Tensor mu_s = mu_c.narrow(1, 0, ds), w_s = w.narrow(1, 0, ds);
  Tensor hs = bias.has_value() ? at::addmm(bias->to(acc), mu_s, w_s.t()) : at::mm(mu_s, w_s.t());
  Tensor wnT = w.narrow(1, ds, w.size(1) - ds).t().contiguous();
  return {hs.contiguous(), wnT};
}

// Sums over the n samples of each input: (B * n, k) -> (B, k).
Tensor per_input(const Tensor& t, int64_t b, int64_t n) { return t.view({b, n, t.size(1)}).sum(1); }

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
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == b * n && grad.size(1) == d,
              "grad must be (B * n_samples, D) (got ", grad.sizes(), ")");
  const auto acc = compute_type(mu.scalar_type());
  const Tensor g = grad.to(acc);
  Tensor g_mu = at::zeros({b, d}, mu.options().dtype(acc));
  Tensor g_lv = at::zeros({b, d}, mu.options().dtype(acc));
  if (b > 0) {
    g_mu.narrow(1, 0, ds).copy_(per_input(g.narrow(1, 0, ds), b, n));
    if (posterior) {
      const Prepared p = prepare(mu, logvar, ds, posterior, noise);
      const Tensor eps = regenerate_eps(p, d, ds, n, posterior, seed, offset);
      const Tensor g_n = g.narrow(1, ds, dn);
      g_mu.narrow(1, ds, dn).copy_(per_input(g_n, b, n));
      g_lv.narrow(1, ds, dn).copy_(per_input(g_n * eps, b, n).mul_(p.sd).mul_(0.5));
    }
  }
  return {g_mu.to(mu.scalar_type()), g_lv.to(mu.scalar_type())};
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
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == h,
              "grad must be (B * n_samples, H) = (", rows, ", ", h, ") (got ", grad.sizes(), ")");
  const auto acc = compute_type(mu.scalar_type());
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  const Tensor eps = regenerate_eps(p, d, ds, n, posterior, seed, offset);
  const Tensor zn = posterior
                        ? (eps.view({b, n, dn}) * p.sd.unsqueeze(1) + p.mu.narrow(1, ds, dn).unsqueeze(1))
                              .view({rows, dn})
                        : eps;
  const auto [hs, wnT] = shared_part(p.mu, weight, bias, ds);
  const Tensor g = grad.to(acc).contiguous();
  // gpre = grad * act'(pre), the pre-activation recomputed row by row (never stored).
  Tensor gpre = act == nu::kNone ? g : at::empty({rows, h}, g.options());
  if (act != nu::kNone && rows > 0 && h > 0) {
    const Tensor zc = zn.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "nuisance_sample_linear_bwd", [&] {
      using T = scalar_t;
      const T* hsp = hs.data_ptr<T>();
      const T* w = wnT.data_ptr<T>();
      const T* zp = zc.data_ptr<T>();
      const T* gp = g.data_ptr<T>();
      T* out = gpre.data_ptr<T>();
      const T slope = static_cast<T>(negative_slope);
      at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
        std::vector<T> pre(h);
        for (int64_t r = begin; r < end; ++r) {
          linear_row(hsp + (r / n) * h, w, zp + r * dn, dn, h, nu::kNone, slope, pre.data());
          for (int64_t i = 0; i < h; ++i)
            out[r * h + i] = gp[r * h + i] * nu::activate_grad<T>(pre[i], act, slope);
        }
      });
    });
  }
  const Tensor w = weight.to(acc);
  const Tensor gb = per_input(gpre, b, n);  // (B, H)
  Tensor g_w = at::empty({h, d}, w.options());
  g_w.narrow(1, 0, ds).copy_(at::mm(gb.t(), p.mu.narrow(1, 0, ds)));
  g_w.narrow(1, ds, dn).copy_(at::mm(gpre.t(), zn));
  Tensor g_b = gb.sum(0);
  Tensor g_mu = at::zeros({b, d}, w.options());
  Tensor g_lv = at::zeros({b, d}, w.options());
  g_mu.narrow(1, 0, ds).copy_(at::mm(gb, w.narrow(1, 0, ds)));
  if (posterior && b > 0) {
    const Tensor gz = at::mm(gpre, w.narrow(1, ds, dn));  // (rows, dn)
    g_mu.narrow(1, ds, dn).copy_(per_input(gz, b, n));
    g_lv.narrow(1, ds, dn).copy_(per_input(gz * eps, b, n).mul_(p.sd).mul_(0.5));
  }
  const auto dt = mu.scalar_type();
  return {g_mu.to(dt), g_lv.to(dt), g_w.to(dt), g_b.to(dt)};
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("nuisance_sample", &nuisance_sample_cpu);
  m.impl("nuisance_sample_backward", &nuisance_sample_backward_cpu);
  m.impl("nuisance_sample_linear", &nuisance_sample_linear_cpu);
  m.impl("nuisance_sample_linear_backward", &nuisance_sample_linear_backward_cpu);
}

}  // namespace lfi_fast
