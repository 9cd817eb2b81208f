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

}  // namespace nuisance
}  // namespace lfi_fast
