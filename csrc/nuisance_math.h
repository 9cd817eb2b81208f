// Shared by the CPU and CUDA kernels of the nuisance family: argument checks, the fused
// activations and their derivatives, and the noise of one row (lfi_fast/reference/nuisance.py is
// the specification).
//
// Noise layout: eps[r, j] (row r = b * n + m of B * n, nuisance dim j < Dn) is the normal number
// r * Dn4 + j of the Philox stream (seed, offset), Dn4 = Dn rounded up to a multiple of 4: row r
// reads counters offset + r * Dn4 / 4 + k, k < Dn4 / 4, and counter k gives the normals
// 4k .. 4k + 3 by Box-Muller from lanes (x, y) and (z, w) (csrc/philox.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "common.h"
#include "philox.h"

namespace lfi_fast {
namespace nuisance {

#if defined(__CUDA_ARCH__)
using ::erf;
using ::exp;
#else
using std::erf;
using std::exp;
#endif

enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kGelu = 3, kSilu = 4 };

inline int64_t padded_width(int64_t dn) { return (dn + 3) / 4 * 4; }

// The four normals of counter k of row r.
LFI_HD void normals4(uint64_t seed, uint64_t counter, float* z) {
  const philox::U4 v = philox::block(seed, counter);
  philox::box_muller(v.x, v.y, z, z + 1);
  philox::box_muller(v.z, v.w, z + 2, z + 3);
}

template <typename T>
LFI_HD T activate(T x, int act, T slope) {
  switch (act) {
    case kRelu:
      return x > T(0) ? x : T(0);
    case kLeakyRelu:
      return x > T(0) ? x : x * slope;
    case kGelu:
      return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752440)));
    case kSilu:
      return x / (T(1) + exp(-x));
    default:
      return x;
  }
}

// d act / dx at the pre-activation x (relu: 0 at 0, as torch).
template <typename T>
LFI_HD T activate_grad(T x, int act, T slope) {
  switch (act) {
    case kRelu:
      return x > T(0) ? T(1) : T(0);
    case kLeakyRelu:
      return x > T(0) ? T(1) : slope;
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752440)));
      const T pdf = exp(T(-0.5) * x * x) * T(0.39894228040143267794);
      return cdf + x * pdf;
    }
    case kSilu: {
      const T s = T(1) / (T(1) + exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    default:
      return T(1);
  }
}

// Host-only (plain inline functions; nvcc's device pass parses them too).
inline int parse_activation(const std::string& a) {
  if (a == "relu") return kRelu;
  if (a == "leaky_relu") return kLeakyRelu;
  if (a == "gelu") return kGelu;
  if (a == "silu") return kSilu;
  if (a == "none") return kNone;
  TORCH_CHECK(false, "activation must be one of relu, leaky_relu, gelu, silu, none (got '", a, "')");
  return kNone;
}

// The checks of every nuisance op (a direct torch.ops call gets a named error, never a crash).
inline void check_latent(const at::Tensor& mu, const at::Tensor& logvar, int64_t ds, int64_t n,
                         int64_t seed, int64_t offset, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(mu.dim() == 2, "mu must be (B, D) (got shape ", mu.sizes(), ")");
  LFI_CHECK_FLOATING(mu);
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar must have mu's shape ", mu.sizes(), " (got ",
              logvar.sizes(), ")");
  LFI_CHECK_SAME_DTYPE(mu, logvar);
  LFI_CHECK_DEVICE(logvar, mu.device());
  TORCH_CHECK(ds > 0 && ds < mu.size(1), "supervised_dims must be in (0, D = ", mu.size(1),
              ") (got ", ds, ")");
  TORCH_CHECK(n >= 1, "n_samples must be >= 1 (got ", n, ")");
  TORCH_CHECK(seed >= 0, "seed must be >= 0 (got ", seed, ")");
  TORCH_CHECK(offset >= 0, "offset must be >= 0 (got ", offset, ")");
  if (noise.has_value()) {
    const at::Tensor& e = *noise;
    TORCH_CHECK(e.dim() == 2 && e.size(0) == mu.size(0) * n && e.size(1) == mu.size(1) - ds,
                "noise must be (B * n_samples, D - supervised_dims) = (", mu.size(0) * n, ", ",
                mu.size(1) - ds, ") (got ", e.sizes(), ")");
    LFI_CHECK_FLOATING(e);
    LFI_CHECK_DEVICE(e, mu.device());
  }
}

inline void check_layer(const at::Tensor& mu, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == mu.size(1), "weight must be (H, D = ",
              mu.size(1), ") (got ", weight.sizes(), ")");
  LFI_CHECK_SAME_DTYPE(mu, weight);
  LFI_CHECK_DEVICE(weight, mu.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must be (H = ", weight.size(0),
                ",) (got ", b.sizes(), ")");
    LFI_CHECK_SAME_DTYPE(mu, b);
    LFI_CHECK_DEVICE(b, mu.device());
  }
}

// ---- host side: the ATen code of the ops, the same on the CPU and on CUDA -----------------------

// float64 stays float64; the other dtypes compute in float32.
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct Prepared {
  at::Tensor mu, sd, noise;  // compute dtype, contiguous; sd = exp(logvar_n / 2), posterior only
};

inline Prepared prepare(const at::Tensor& mu, const at::Tensor& logvar, int64_t ds, bool posterior,
                        const c10::optional<at::Tensor>& noise) {
  const auto acc = compute_type(mu.scalar_type());
  Prepared p;
  p.mu = mu.to(acc).contiguous();
  if (posterior) p.sd = logvar.narrow(1, ds, mu.size(1) - ds).to(acc).mul(0.5).exp().contiguous();
  if (noise.has_value()) p.noise = noise->to(acc).contiguous();
  return p;
}

// The shared part hs = mu_s · W_s^T + b (B, H) and W_n transposed (dn, H), in the compute dtype.
inline std::pair<at::Tensor, at::Tensor> shared_part(const at::Tensor& mu_c, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, int64_t ds) {
  const auto acc = mu_c.scalar_type();
  const at::Tensor w = weight.to(acc);
  const at::Tensor mu_s = mu_c.narrow(1, 0, ds), w_s = w.narrow(1, 0, ds);
  at::Tensor hs = bias.has_value() ? at::addmm(bias->to(acc), mu_s, w_s.t()) : at::mm(mu_s, w_s.t());
  return {hs.contiguous(), w.narrow(1, ds, w.size(1) - ds).t().contiguous()};
}

// Sums over the n samples of each input: (B * n, k) -> (B, k).
inline at::Tensor per_input(const at::Tensor& t, int64_t b, int64_t n) {
  return t.view({b, n, t.size(1)}).sum(1);
}

// z_n (rows, dn) from eps: eps itself (standard prior) or mu_n + sd * eps (posterior).
inline at::Tensor latent_nuisance(const at::Tensor& eps, const Prepared& p, int64_t n, int64_t ds,
                                  bool posterior) {
  if (!posterior) return eps;
  const int64_t b = p.mu.size(0), dn = p.mu.size(1) - ds;
  return (eps.view({b, n, dn}) * p.sd.unsqueeze(1) + p.mu.narrow(1, ds, dn).unsqueeze(1))
      .reshape({b * n, dn});
}

// The backward of nuisance_sample. regenerate_eps(p) returns the noise the forward drew (rows, dn),
// in the compute dtype, on the device's own kernel; it is called only for the posterior prior.
template <typename RegenerateEps>
std::tuple<at::Tensor, at::Tensor> sample_backward(const at::Tensor& grad, const at::Tensor& mu,
                                                   const at::Tensor& logvar, int64_t ds, int64_t n,
                                                   bool posterior,
                                                   const c10::optional<at::Tensor>& noise,
                                                   const RegenerateEps& regenerate_eps) {
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == b * n && grad.size(1) == d,
              "grad must be (B * n_samples, D) (got ", grad.sizes(), ")");
  const auto acc = compute_type(mu.scalar_type());
  const at::Tensor g = grad.to(acc);
  at::Tensor g_mu = at::zeros({b, d}, mu.options().dtype(acc));
  at::Tensor g_lv = at::zeros({b, d}, mu.options().dtype(acc));
  if (b > 0) {
    g_mu.narrow(1, 0, ds).copy_(per_input(g.narrow(1, 0, ds), b, n));
    if (posterior) {
      const Prepared p = prepare(mu, logvar, ds, posterior, noise);
      const at::Tensor eps = regenerate_eps(p);
      const at::Tensor g_n = g.narrow(1, ds, dn);
      g_mu.narrow(1, ds, dn).copy_(per_input(g_n, b, n));
      g_lv.narrow(1, ds, dn).copy_(per_input(g_n * eps, b, n).mul_(p.sd).mul_(0.5));
    }
  }
  return {g_mu.to(mu.scalar_type()), g_lv.to(mu.scalar_type())};
}

inline void check_linear_grad(const at::Tensor& grad, int64_t rows, int64_t h) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == h,
              "grad must be (B * n_samples, H) = (", rows, ", ", h, ") (got ", grad.sizes(), ")");
}

// The gradients of nuisance_sample_linear from three reductions of gpre = grad * act'(pre)
// (rows, H): gb (B, H) its per-input sums, gwn (H, dn) = gpre^T z_n, and (posterior only)
// gz (rows, dn) = gpre W_n. The CPU computes them in its one fused pass over the rows (gpre is
// never stored there); linear_backward_from_gpre gets them from a stored gpre.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_from_sums(
    const at::Tensor& gb, const at::Tensor& gwn, const at::Tensor& gz, const at::Tensor& eps,
    const Prepared& p, const at::Tensor& weight, int64_t n, int64_t ds, bool posterior,
    at::ScalarType out_dtype) {
  const int64_t b = p.mu.size(0), d = p.mu.size(1), dn = d - ds, h = weight.size(0);
  const at::Tensor w = weight.to(p.mu.scalar_type());
  at::Tensor g_w = at::empty({h, d}, w.options());
  // As (mu_s^T gb)^T: the long reduction with the small side first (see below).
  g_w.narrow(1, 0, ds).copy_(at::mm(p.mu.narrow(1, 0, ds).t(), gb).t());
  g_w.narrow(1, ds, dn).copy_(gwn);
  at::Tensor g_b = gb.sum(0);
  at::Tensor g_mu = at::zeros({b, d}, w.options());
  at::Tensor g_lv = at::zeros({b, d}, w.options());
  g_mu.narrow(1, 0, ds).copy_(at::mm(gb, w.narrow(1, 0, ds)));
  if (posterior && b > 0) {
    g_mu.narrow(1, ds, dn).copy_(per_input(gz, b, n));
    g_lv.narrow(1, ds, dn).copy_(per_input(gz * eps, b, n).mul_(p.sd).mul_(0.5));
  }
  return {g_mu.to(out_dtype), g_lv.to(out_dtype), g_w.to(out_dtype), g_b.to(out_dtype)};
}

// The same from a stored gpre (rows, H): per-input sums and two GEMMs.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_from_gpre(
    const at::Tensor& gpre, const at::Tensor& eps, const at::Tensor& zn, const Prepared& p,
    const at::Tensor& weight, int64_t n, int64_t ds, bool posterior, at::ScalarType out_dtype) {
  const int64_t b = p.mu.size(0), dn = p.mu.size(1) - ds;
  const at::Tensor w = weight.to(p.mu.scalar_type());
  // gpre^T z_n as (z_n^T gpre)^T: the direct form (H x rows times rows x dn, dn ~ 8) takes a
  // slow BLAS path on the CPU (110 ms against 16 ms at 65,536 x 512 x 8).
  const at::Tensor gwn = at::mm(zn.t(), gpre).t();
  const at::Tensor gz = posterior && b > 0 ? at::mm(gpre, w.narrow(1, ds, dn)) : at::Tensor();
  return linear_backward_from_sums(per_input(gpre, b, n), gwn, gz, eps, p, weight, n, ds,
                                   posterior, out_dtype);
}

}  // namespace nuisance
}  // namespace lfi_fast
