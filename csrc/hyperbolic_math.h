// Per-row scalar math of the Poincaré-ball ops, shared by the CPU and CUDA kernels.
//
// Every op is a fused pass over rows. The kernel accumulates a few dot products of the row (the
// Gram entries of its vectors); the functions here turn them into the result's coefficients (the
// result is a linear combination of the row's vectors, or a scalar), and the kernel writes it.
//
// The formulas are geoopt's (stereographic model with k = -c), with its clamps and projection, so
// float64 results match geoopt to rounding. Gradients are not derived by hand: each coefficient
// function is written once, generic over its scalar type, and the backward evaluates it on dual
// numbers seeded with the Gram entries and c (forward-mode AD over a handful of scalars). Clamps
// and branches then differentiate as torch's autograd does through geoopt's graph.
#pragma once

#include "common.h"

#include <cmath>

namespace lfi_fast {
namespace hyp {

constexpr double kMinNorm = 1e-15;     // geoopt's clamp of norms and denominators
constexpr double kTanhClamp = 15.0;    // geoopt's tanh argument clamp
constexpr double kArtanhClamp = 1e-7;  // geoopt's artanh argument clamp: |x| <= 1 - 1e-7
constexpr double kZeroCurvature = 1e-8;  // torch.isclose(k, 0): geoopt's Taylor branch

// ---- dual numbers ------------------------------------------------------------------------------

template <typename T, int N>
struct Dual {
  T v;
  T d[N];
  LFI_HD Dual() : Dual(T(0)) {}
  LFI_HD Dual(T value) : v(value) {  // NOLINT: a constant converts implicitly
#pragma unroll
    for (int i = 0; i < N; ++i) d[i] = T(0);
  }
  LFI_HD static Dual var(T value, int i) {
    Dual r(value);
    r.d[i] = T(1);
    return r;
  }
};

// The chain rule for a unary function with value f and derivative df at a.v.
template <typename T, int N>
LFI_HD Dual<T, N> chain(const Dual<T, N>& a, T f, T df) {
  Dual<T, N> r(f);
#pragma unroll
  for (int i = 0; i < N; ++i) r.d[i] = df * a.d[i];
  return r;
}

template <typename T, int N>
LFI_HD Dual<T, N> operator+(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v + b.v);
#pragma unroll
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] + b.d[i];
  return r;
}
template <typename T, int N>
LFI_HD Dual<T, N> operator-(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v - b.v);
#pragma unroll
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] - b.d[i];
  return r;
}
template <typename T, int N>
LFI_HD Dual<T, N> operator-(const Dual<T, N>& a) {
  return chain(a, -a.v, T(-1));
}
template <typename T, int N>
LFI_HD Dual<T, N> operator*(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v * b.v);
#pragma unroll
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] * b.v + a.v * b.d[i];
  return r;
}
template <typename T, int N>
LFI_HD Dual<T, N> operator/(const Dual<T, N>& a, const Dual<T, N>& b) {
  const T q = a.v / b.v;
  Dual<T, N> r(q);
#pragma unroll
  for (int i = 0; i < N; ++i) r.d[i] = (a.d[i] - q * b.d[i]) / b.v;
  return r;
}
// Mixed with plain constants (the constant converts to a Dual with zero derivatives).
#define LFI_DUAL_MIXED(op)                                                  \
  template <typename T, int N>                                            \
  LFI_HD Dual<T, N> operator op(const Dual<T, N>& a, T b) {               \
    return a op Dual<T, N>(b);                                            \
  }                                                                       \
  template <typename T, int N>                                            \
  LFI_HD Dual<T, N> operator op(T a, const Dual<T, N>& b) {               \
    return Dual<T, N>(a) op b;                                            \
  }
LFI_DUAL_MIXED(+)
LFI_DUAL_MIXED(-)
LFI_DUAL_MIXED(*)
LFI_DUAL_MIXED(/)
#undef LFI_DUAL_MIXED

// ---- scalar functions, for plain values and dual numbers alike ----------------------------------

template <typename T>
LFI_HD T value(T a) {
  return a;
}
template <typename T, int N>
LFI_HD T value(const Dual<T, N>& a) {
  return a.v;
}

template <typename T>
LFI_HD T sqrt_(T v) {
  using std::sqrt;  // float and double overloads on the host and the device
  return sqrt(v);
}
template <typename T>
LFI_HD T tanh_(T v) {
  using std::tanh;
  return tanh(v);
}
template <typename T>
LFI_HD T log_(T v) {
  using std::log;
  return log(v);
}
template <typename T>
LFI_HD T log1p_(T v) {
  using std::log1p;
  return log1p(v);
}
template <typename T, int N>
LFI_HD Dual<T, N> sqrt_(const Dual<T, N>& a) {
  const T s = sqrt_(a.v);
  return chain(a, s, T(0.5) / s);
}
template <typename T, int N>
LFI_HD Dual<T, N> tanh_(const Dual<T, N>& a) {
  const T t = tanh_(a.v);
  return chain(a, t, T(1) - t * t);
}
template <typename T, int N>
LFI_HD Dual<T, N> log_(const Dual<T, N>& a) {
  return chain(a, log_(a.v), T(1) / a.v);
}
template <typename T, int N>
LFI_HD Dual<T, N> log1p_(const Dual<T, N>& a) {
  return chain(a, log1p_(a.v), T(1) / (T(1) + a.v));
}

// torch's clamp: the gradient passes where lo <= a <= hi.
template <typename S, typename T>
LFI_HD S clamp_min(const S& a, T lo) {
  return value(a) >= lo ? a : S(lo);
}
template <typename S, typename T>
LFI_HD S clamp(const S& a, T lo, T hi) {
  const T v = value(a);
  return v < lo ? S(lo) : (v > hi ? S(hi) : a);
}

// The Euclidean norm from its square, as torch's norm(): sqrt, with a zero gradient at 0.
// Gram entries computed from coefficients may round slightly below 0: they count as 0.
template <typename T>
LFI_HD T norm_from_sq(T sq) {
  return sq > T(0) ? sqrt_(sq) : T(0);
}
template <typename T, int N>
LFI_HD Dual<T, N> norm_from_sq(const Dual<T, N>& sq) {
  return sq.v > T(0) ? sqrt_(sq) : Dual<T, N>(T(0));
}

// ---- geoopt's building blocks (k = -c < 0) -------------------------------------------------------

template <typename S>
LFI_HD S tanh_clamped(const S& x) {  // geoopt.math.tanh
  using T = decltype(value(x));
  return tanh_(clamp(x, T(-kTanhClamp), T(kTanhClamp)));
}

// geoopt.math.artanh's clamp, with 0.5 (log1p(x) - log1p(-x)) instead of its
// 0.5 (log(1 + x) - log(1 - x)): the same function, but 1 + x rounds away every digit of a tiny
// x (in float32 from |x| ~ 1e-4 on, relative error eps/|x|), which log1p keeps. In float64 the
// two agree to ~1e-16 absolute, i.e. to 1e-10 relative down to |x| ~ 1e-6; below that geoopt's
// own result drifts from the exact value and ours does not (tests/test_hyperbolic_ops.py
// measures the difference against geoopt's own error).
template <typename S>
LFI_HD S artanh_clamped(const S& x) {
  using T = decltype(value(x));
  const S z = clamp(x, T(-1 + kArtanhClamp), T(1 - kArtanhClamp));
  return T(0.5) * (log1p_(z) - log1p_(-z));
}

// tan_k / artan_k: tanh(sqrt(c) x) / sqrt(c) and its inverse. For |k| <= 1e-8 geoopt takes a
// first-order Taylor expansion in |k| (x + |k| x^3 / 3, resp. x - |k| x^3 / 3): reproduced as is.
template <typename S>
LFI_HD S tan_k(const S& x, const S& c) {
  using T = decltype(value(x));
  if (value(c) <= T(kZeroCurvature)) return x + c * x * x * x / T(3);
  const S sc = sqrt_(c + T(kMinNorm));
  return tanh_clamped(x * sc) / sc;
}
template <typename S>
LFI_HD S artan_k(const S& x, const S& c) {
  using T = decltype(value(x));
  if (value(c) <= T(kZeroCurvature)) return x - c * x * x * x / T(3);
  const S sc = sqrt_(c + T(kMinNorm));
  return artanh_clamped(x * sc) / sc;
}

// Conformal factor 2 / (1 - c |x|^2), clamped as geoopt.
template <typename S>
LFI_HD S lambda_x(const S& x2, const S& c) {
  using T = decltype(value(x2));
  return T(2) / clamp_min(T(1) - c * x2, T(kMinNorm));
}

// geoopt's project(): the factor that maps a point of squared norm n2 into the ball of radius
// (1 - eps) / sqrt(c + 1e-15): 1 inside, maxnorm / max(|p|, 1e-15) outside.
template <typename S, typename T>
LFI_HD S project_scale(const S& n2, const S& c, T eps) {
  const S maxnorm = (T(1) - eps) / sqrt_(c + T(kMinNorm));
  const S n = clamp_min(norm_from_sq(n2), T(kMinNorm));
  return value(n) > value(maxnorm) ? maxnorm / n : S(T(1));
}

// ---- the ops' coefficients -----------------------------------------------------------------------
// Unary ops: out = f * x from (x2 = |x|^2, c[, r]). Binary ops: out = a * x + b * y from the Gram
// entries (x2, y2, xy). Scalar ops: out = f.

// mobius_add(x, y): ((1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y) / max(den, 1e-15)
template <typename S>
LFI_HD void mobius_add_raw(const S& x2, const S& y2, const S& xy, const S& c, S& a, S& b) {
  using T = decltype(value(x2));
  const S den = T(1) + T(2) * c * xy + c * c * x2 * y2;
  const S inv = T(1) / clamp_min(den, T(kMinNorm));
  a = (T(1) + T(2) * c * xy + c * y2) * inv;
  b = (T(1) - c * x2) * inv;
}

// |a x + b y|^2 from the Gram entries.
template <typename S>
LFI_HD S combo_sq(const S& a, const S& b, const S& x2, const S& y2, const S& xy) {
  using T = decltype(value(x2));
  return a * a * x2 + T(2) * a * b * xy + b * b * y2;
}

struct MobiusAdd {
  template <typename S, typename T>
  LFI_HD static void coef(const S& x2, const S& y2, const S& xy, const S& c, T eps, bool project,
                          S& a, S& b) {
    mobius_add_raw(x2, y2, xy, c, a, b);
    if (project) {
      const S s = project_scale(combo_sq(a, b, x2, y2, xy), c, eps);
      a = a * s;
      b = b * s;
    }
  }
};

// expmap(x, u) = x ⊕ tan_k(lambda_x |u| / 2) u / |u|, projected.
struct Expmap {
  template <typename S, typename T>
  LFI_HD static void coef(const S& x2, const S& u2, const S& xu, const S& c, T eps, bool project,
                          S& a, S& b) {
    const S un = clamp_min(norm_from_sq(u2), T(kMinNorm));
    const S t = tan_k(lambda_x(x2, c) / T(2) * un, c) / un;  // second term: t u
    S a0, b0;
    mobius_add_raw(x2, t * t * u2, t * xu, c, a0, b0);
    a = a0;
    b = b0 * t;
    if (project) {
      const S s = project_scale(combo_sq(a, b, x2, u2, xu), c, eps);
      a = a * s;
      b = b * s;
    }
  }
};

// logmap(x, y) = 2 artan_k(|s|) s / (lambda_x |s|), s = (-x) ⊕ y.
struct Logmap {
  template <typename S, typename T>
  LFI_HD static void coef(const S& x2, const S& y2, const S& xy, const S& c, T /*eps*/,
                          bool /*project*/, S& a, S& b) {
    S a0, b0;
    mobius_add_raw(x2, y2, -xy, c, a0, b0);  // (-x) ⊕ y = -a0 x + b0 y
    const S sn = clamp_min(norm_from_sq(combo_sq(a0, b0, x2, y2, -xy)), T(kMinNorm));
    const S f = T(2) * artan_k(sn, c) / (lambda_x(x2, c) * sn);
    a = -a0 * f;
    b = b0 * f;
  }
};

// project(x)
struct Project {
  template <typename S, typename T>
  LFI_HD static S coef(const S& x2, const S& c, const S& /*r*/, T eps, bool /*project*/) {
    return project_scale(x2, c, eps);
  }
};

// expmap0(u) = tan_k(|u|) u / |u|, projected.
struct Expmap0 {
  template <typename S, typename T>
  LFI_HD static S coef(const S& u2, const S& c, const S& /*r*/, T eps, bool project) {
    const S un = clamp_min(norm_from_sq(u2), T(kMinNorm));
    S f = tan_k(un, c) / un;
    if (project) f = f * project_scale(f * f * u2, c, eps);
    return f;
  }
};

// logmap0(y) = artan_k(|y|) y / |y|.
struct Logmap0 {
  template <typename S, typename T>
  LFI_HD static S coef(const S& y2, const S& c, const S& /*r*/, T /*eps*/, bool /*project*/) {
    const S yn = clamp_min(norm_from_sq(y2), T(kMinNorm));
    return artan_k(yn, c) / yn;
  }
};

// mobius_scalar_mul(r, x) = tan_k(r artan_k(|x|)) x / |x|, projected; r is per row.
struct ScalarMul {
  template <typename S, typename T>
  LFI_HD static S coef(const S& x2, const S& c, const S& r, T eps, bool project) {
    const S xn = clamp_min(norm_from_sq(x2), T(kMinNorm));
    S f = tan_k(r * artan_k(xn, c), c) / xn;
    if (project) f = f * project_scale(f * f * x2, c, eps);
    return f;
  }
};

// mobius_matvec(m, x) = tan_k(|mx| / |x| artan_k(|x|)) mx / |mx| (0 where mx is all zeros),
// projected: the factor of mx from (x2, mx2).
struct Matvec {
  template <typename S, typename T>
  LFI_HD static S coef(const S& x2, const S& mx2, const S& c, T eps, bool project) {
    const S xn = clamp_min(norm_from_sq(x2), T(kMinNorm));
    const S mn = clamp_min(norm_from_sq(mx2), T(kMinNorm));
    S f = tan_k(mn / xn * artan_k(xn, c), c) / mn;
    if (project) f = f * project_scale(f * f * mx2, c, eps);
    return f;
  }
};

// dist(x, y) = 2 artan_k(|(-x) ⊕ y|). The kernels form s = (-x) ⊕ y = sa x + sb y element by
// element (its norm from the Gram entries would lose half the digits for nearby points), then
// take the distance from |s|^2.
template <typename S>
LFI_HD void dist_sub(const S& x2, const S& y2, const S& xy, const S& c, S& sa, S& sb) {
  mobius_add_raw(x2, y2, -xy, c, sa, sb);
  sa = -sa;
}
template <typename S>
LFI_HD S dist_from_sq(const S& s2, const S& c) {
  using T = decltype(value(s2));
  return T(2) * artan_k(norm_from_sq(s2), c);
}

// dist0(x) = 2 artan_k(|x|).
template <typename S>
LFI_HD S dist0(const S& x2, const S& c) {
  return dist_from_sq(x2, c);
}

// ---- generic forward and backward of the coefficient functions ---------------------------------

template <typename T>
struct BinaryBwd {  // grad_x = gx_g g + gx_x x + gx_y y ; grad_y likewise ; gc: this row's d/dc
  T gx_g, gx_x, gx_y, gy_g, gy_x, gy_y, gc;
};

template <typename Op, typename T>
LFI_HD void binary_fwd(T x2, T y2, T xy, T c, T eps, bool project, T& a, T& b) {
  Op::coef(x2, y2, xy, c, eps, project, a, b);
}

// gx = <g, x>, gy = <g, y> with g the incoming gradient of the output row.
template <typename Op, typename T>
LFI_HD BinaryBwd<T> binary_bwd(T x2, T y2, T xy, T gx, T gy, T c, T eps, bool project) {
  using D = Dual<T, 4>;
  D a, b;
  Op::coef(D::var(x2, 0), D::var(y2, 1), D::var(xy, 2), D::var(c, 3), eps, project, a, b);
  T L[4];  // dL/d(x2, y2, xy, c) = <g,x> da/d. + <g,y> db/d.
#pragma unroll
  for (int i = 0; i < 4; ++i) L[i] = gx * a.d[i] + gy * b.d[i];
  return {a.v, T(2) * L[0], L[2], b.v, L[2], T(2) * L[1], L[3]};
}

template <typename T>
struct UnaryBwd {  // grad_x = gx_g g + gx_x x ; gc, gr: this row's d/dc and d/dr
  T gx_g, gx_x, gc, gr;
};

template <typename Op, typename T>
LFI_HD T unary_fwd(T x2, T c, T r, T eps, bool project) {
  return Op::coef(x2, c, r, eps, project);
}

template <typename Op, typename T>
LFI_HD UnaryBwd<T> unary_bwd(T x2, T gx, T c, T r, T eps, bool project) {
  using D = Dual<T, 3>;
  const D f = Op::coef(D::var(x2, 0), D::var(c, 1), D::var(r, 2), eps, project);
  return {f.v, T(2) * gx * f.d[0], gx * f.d[1], gx * f.d[2]};
}

}  // namespace hyp
}  // namespace lfi_fast
