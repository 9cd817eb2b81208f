// Per-row scalar math of the Poincaré-ball ops, shared by the CPU and CUDA kernels.
//
// Each op is a fused pass over rows: the kernel accumulates a few dot products of the row, these
// functions turn them into the coefficients of the result (a linear combination of the row's
// vectors), and the kernel writes it. The formulas follow geoopt's (stereographic model with
// k = -c): the same clamps, the same projection, so float64 results match geoopt to rounding.
// Gradients are derived by hand from that same graph, projection and clamps included.
#pragma once

#include "common.h"

#include <cmath>

namespace lfi_fast {
namespace hyp {

constexpr double kMinNorm = 1e-15;  // geoopt's clamp of norms and denominators

template <typename T>
LFI_HD T sqrt_(T v) {
  using std::sqrt;  // float and double overloads on the host and the device
  return sqrt(v);
}

template <typename T>
LFI_HD T clamp_abs(T v, T eps) {  // geoopt.utils.clamp_abs: keeps the sign, 0 counts as +
  const T a = v < T(0) ? -v : v;
  const T m = a < eps ? eps : a;
  return v < T(0) ? -m : m;
}

// Radius of the projection ball, (1 - eps) / sqrt(max(c, 1e-15)), and its derivative in c.
template <typename T>
LFI_HD T max_norm(T c, T eps) {
  return (T(1) - eps) / sqrt_(c < T(kMinNorm) ? T(kMinNorm) : c);
}
template <typename T>
LFI_HD T max_norm_dc(T c, T maxnorm) {
  return c < T(kMinNorm) ? T(0) : T(-0.5) * maxnorm / c;
}

// ---- mobius_add ------------------------------------------------------------------------------
//   num = (1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y,  den = 1 + 2c<x,y> + c^2 |x|^2 |y|^2
//   r = num / clamp_abs(den),  out = project(r) = r * min(1, maxnorm / |r|)
// so out = alpha * x + beta * y.
template <typename T>
struct MobiusAddFwd {
  T alpha, beta;
};

template <typename T>
LFI_HD MobiusAddFwd<T> mobius_add_fwd(T x2, T y2, T xy, T c, T maxnorm, bool project) {
  const T A = T(1) + T(2) * c * xy + c * y2;
  const T B = T(1) - c * x2;
  const T den = T(1) + T(2) * c * xy + c * c * x2 * y2;
  const T inv = T(1) / clamp_abs(den, T(kMinNorm));
  T s = T(1);
  if (project) {
    T n2 = (A * A * x2 + T(2) * A * B * xy + B * B * y2) * inv * inv;
    T n = sqrt_(n2 > T(0) ? n2 : T(0));
    n = n < T(kMinNorm) ? T(kMinNorm) : n;
    if (n > maxnorm) s = maxnorm / n;
  }
  return {s * A * inv, s * B * inv};
}

// Backward: given the row's x2, y2, xy and gx = <g,x>, gy = <g,y> (g the incoming gradient),
//   grad_x = gx_g * g + gx_x * x + gx_y * y,   grad_y = gy_g * g + gy_x * x + gy_y * y,
// and gc the row's contribution to the gradient of c.
template <typename T>
struct MobiusAddBwd {
  T gx_g, gx_x, gx_y, gy_g, gy_x, gy_y, gc;
};

template <typename T>
LFI_HD MobiusAddBwd<T> mobius_add_bwd(T x2, T y2, T xy, T gx, T gy, T c, T maxnorm,
                                      bool project) {
  const T A = T(1) + T(2) * c * xy + c * y2;
  const T B = T(1) - c * x2;
  const T den = T(1) + T(2) * c * xy + c * c * x2 * y2;
  const T adn = den < T(0) ? -den : den;
  const T dcl = clamp_abs(den, T(kMinNorm));
  const T inv = T(1) / dcl;
  const T rx = (A * x2 + B * xy) * inv;  // <r, x>
  const T ry = (A * xy + B * y2) * inv;  // <r, y>
  const T gr_dot = (A * gx + B * gy) * inv;  // <g, r>
  T n2 = (A * rx + B * ry) * inv;            // |r|^2
  n2 = n2 > T(0) ? n2 : T(0);

  // Projection: out = s r with s = m / n when |r| > m; then d out = s dr - k <r, dr> r.
  T s = T(1), k = T(0), gc = T(0);
  if (project) {
    const T n_true = sqrt_(n2);
    const T n = n_true < T(kMinNorm) ? T(kMinNorm) : n_true;
    if (n > maxnorm) {
      s = maxnorm / n;
      if (n_true >= T(kMinNorm)) k = maxnorm * gr_dot / (n * n * n);
      gc = gr_dot / n * max_norm_dc(c, maxnorm);
    }
  }
  // gr = dL/dr = s g - k r ; gn = dL/dnum = gr / dcl ; dL/d den through the clamp.
  const T gA = (s * gx - k * rx) * inv;  // <gn, x>
  const T gB = (s * gy - k * ry) * inv;  // <gn, y>
  const T grr = s * gr_dot - k * n2;     // <gr, r>
  const T gden = adn >= T(kMinNorm) ? -grr * inv : T(0);

  const T g_xy = T(2) * c * (gA + gden);
  const T g_x2 = -c * gB + c * c * y2 * gden;
  const T g_y2 = c * gA + c * c * x2 * gden;
  gc += gA * (T(2) * xy + y2) - gB * x2 + gden * (T(2) * xy + T(2) * c * x2 * y2);

  // gn = (s/dcl) g - (k/dcl^2) (A x + B y)
  const T kk = k * inv * inv;
  MobiusAddBwd<T> o;
  o.gx_g = A * s * inv;
  o.gx_x = -A * A * kk + T(2) * g_x2;
  o.gx_y = -A * B * kk + g_xy;
  o.gy_g = B * s * inv;
  o.gy_x = -A * B * kk + g_xy;
  o.gy_y = -B * B * kk + T(2) * g_y2;
  o.gc = gc;
  return o;
}

}  // namespace hyp
}  // namespace lfi_fast
