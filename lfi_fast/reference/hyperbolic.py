"""Poincaré ball of curvature -c (c > 0): the reference, written as geoopt writes it.

geoopt's stereographic model uses k = -c; these functions take c (a number or a 0-dim tensor,
differentiable). Numerics are geoopt's (0.5): norms and denominators clamped at 1e-15, tanh's
argument clamped to ±15, artanh's to ±(1 - 1e-7), a first-order Taylor expansion for c <= 1e-8,
projection to (1 - eps)/sqrt(c + 1e-15) with eps 4e-3 (float32) or 1e-5 (float64). artanh is
0.5 (log1p(x) - log1p(-x)): geoopt's 0.5 (log(1 + x) - log(1 - x)) loses every digit of a tiny x
(in float32 from |x| ~ 1e-4 on). Unlike geoopt, float16 inputs are computed in float32 and
bfloat16 inputs in float64 (float32's range: their squared norms can overflow float32), both with
float32's margin, and cast back, so finite inputs never give NaN or inf.

Every function reduces over `dim`; inputs broadcast like geoopt's.
"""
from __future__ import annotations

import torch

MIN_NORM = 1e-15
ZERO_CURVATURE = 1e-8  # torch.isclose(k, 0): geoopt's Taylor branch


def ball_eps(dtype: torch.dtype) -> float:
    """Projection margin below the ball's radius, by the dtype of the *input*."""
    return 1e-5 if dtype == torch.float64 else 4e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """As the kernels' compute_t (csrc/common.h)."""
    if dtype == torch.bfloat16:
        return torch.float64
    return torch.float32 if dtype == torch.float16 else dtype


def _as_c(c: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(c), dtype=like.dtype, device=like.device)


def _upcast(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(compute_dtype(t.dtype)) for t in ts]


# ---- geoopt's building blocks ---------------------------------------------------------------------


def _tanh(x):
    return x.clamp(-15, 15).tanh()


def _artanh(x):
    # geoopt's clamp; log1p instead of geoopt's log(1 + x), which loses a tiny x's digits
    x = x.clamp(-1 + 1e-7, 1 - 1e-7)
    return 0.5 * (torch.log1p(x) - torch.log1p(-x))


def _small_c(c: torch.Tensor) -> bool:
    # geoopt tests torch.isclose(k, 0) on the tensor; c is a validated scalar here.
    return bool(c.detach() <= ZERO_CURVATURE) if not torch.compiler.is_compiling() else False


def tan_k(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """tanh(sqrt(c) x) / sqrt(c); geoopt's Taylor branch (x + c x³/3) for c <= 1e-8."""
    if _small_c(c):
        return x + c * x**3 / 3
    sc = (c + MIN_NORM).sqrt()
    return _tanh(x * sc) / sc


def artan_k(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """artanh(sqrt(c) x) / sqrt(c); geoopt's Taylor branch (x - c x³/3) for c <= 1e-8."""
    if _small_c(c):
        return x - c * x**3 / 3
    sc = (c + MIN_NORM).sqrt()
    return _artanh(x * sc) / sc


def _norm(x, dim, keepdim=True):
    return x.norm(dim=dim, keepdim=keepdim, p=2)


def _lambda_x(x, c, dim):
    return 2 / (1 - c * x.pow(2).sum(dim=dim, keepdim=True)).clamp_min(MIN_NORM)


def _project(x, c, eps, dim):
    maxnorm = (1 - eps) / (c.abs() + MIN_NORM) ** 0.5
    norm = _norm(x, dim).clamp_min(MIN_NORM)
    return torch.where(norm > maxnorm, x / norm * maxnorm, x)


def _mobius_add(x, y, c, dim):
    x2 = x.pow(2).sum(dim=dim, keepdim=True)
    y2 = y.pow(2).sum(dim=dim, keepdim=True)
    xy = (x * y).sum(dim=dim, keepdim=True)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    den = 1 + 2 * c * xy + c**2 * x2 * y2
    return num / den.clamp_min(MIN_NORM)


def _finish(out, c, eps, dim, project, dtype):
    if project:
        out = _project(out, c, eps, dim)
    return out.to(dtype)


# ---- the ops ----------------------------------------------------------------------------------------


def project(x: torch.Tensor, c: float | torch.Tensor = 1.0, *, dim: int = -1) -> torch.Tensor:
    """Project x onto the ball of radius (1 - eps)/sqrt(c)."""
    (xc,) = _upcast(x)
    return _project(xc, _as_c(c, xc), ball_eps(x.dtype), dim).to(x.dtype)


def mobius_add(x, y, c=1.0, *, dim=-1, project=True):
    """Möbius addition x ⊕_c y."""
    xc, yc = _upcast(x, y)
    cc = _as_c(c, xc)
    return _finish(_mobius_add(xc, yc, cc, dim), cc, ball_eps(x.dtype), dim, project, x.dtype)


def mobius_scalar_mul(r, x, c=1.0, *, dim=-1, project=True):
    """Möbius scalar multiplication r ⊗_c x = tan_k(r artan_k(|x|)) x / |x|."""
    rc, xc = _upcast(r, x)
    cc = _as_c(c, xc)
    xn = _norm(xc, dim).clamp_min(MIN_NORM)
    out = tan_k(rc * artan_k(xn, cc), cc) * (xc / xn)
    return _finish(out, cc, ball_eps(x.dtype), dim, project, x.dtype)


def mobius_matvec(m, x, c=1.0, *, dim=-1, project=True):
    """Möbius matrix-vector product m ⊗_c x for m (out, in) and x (..., in) along `dim`."""
    mc, xc = _upcast(m, x)
    cc = _as_c(c, xc)
    xn = _norm(xc, dim).clamp_min(MIN_NORM)
    mx = torch.tensordot(xc, mc, ([dim], [1])).movedim(-1, dim)
    mn = _norm(mx, dim).clamp_min(MIN_NORM)
    res = tan_k(mn / xn * artan_k(xn, cc), cc) * (mx / mn)
    zero = (mx == 0).all(dim=dim, keepdim=True)
    res = torch.where(zero, torch.zeros((), dtype=res.dtype, device=res.device), res)
    return _finish(res, cc, ball_eps(x.dtype), dim, project, x.dtype)


def expmap0(u, c=1.0, *, dim=-1, project=True):
    """Exponential map at the origin: tan_k(|u|) u / |u|."""
    (uc,) = _upcast(u)
    cc = _as_c(c, uc)
    un = _norm(uc, dim).clamp_min(MIN_NORM)
    return _finish(tan_k(un, cc) * (uc / un), cc, ball_eps(u.dtype), dim, project, u.dtype)


def logmap0(y, c=1.0, *, dim=-1):
    """Logarithmic map at the origin: artan_k(|y|) y / |y|."""
    (yc,) = _upcast(y)
    cc = _as_c(c, yc)
    yn = _norm(yc, dim).clamp_min(MIN_NORM)
    return ((yc / yn) * artan_k(yn, cc)).to(y.dtype)


def expmap(x, u, c=1.0, *, dim=-1, project=True):
    """Exponential map at x: x ⊕_c tan_k(λ_x |u| / 2) u / |u|."""
    xc, uc = _upcast(x, u)
    cc = _as_c(c, xc)
    un = _norm(uc, dim).clamp_min(MIN_NORM)
    second = tan_k(_lambda_x(xc, cc, dim) / 2 * un, cc) * (uc / un)
    return _finish(_mobius_add(xc, second, cc, dim), cc, ball_eps(x.dtype), dim, project, x.dtype)


def logmap(x, y, c=1.0, *, dim=-1):
    """Logarithmic map at x: 2 artan_k(|s|) s / (λ_x |s|), s = (-x) ⊕_c y."""
    xc, yc = _upcast(x, y)
    cc = _as_c(c, xc)
    sub = _mobius_add(-xc, yc, cc, dim)
    sn = _norm(sub, dim).clamp_min(MIN_NORM)
    return (2 * artan_k(sn, cc) * (sub / (_lambda_x(xc, cc, dim) * sn))).to(x.dtype)


def dist(x, y, c=1.0, *, keepdim=False, dim=-1):
    """Geodesic distance 2 artan_k(|(-x) ⊕_c y|)."""
    xc, yc = _upcast(x, y)
    cc = _as_c(c, xc)
    return (2 * artan_k(_norm(_mobius_add(-xc, yc, cc, dim), dim, keepdim), cc)).to(x.dtype)


def dist0(x, c=1.0, *, keepdim=False, dim=-1):
    """Distance to the origin 2 artan_k(|x|)."""
    (xc,) = _upcast(x)
    cc = _as_c(c, xc)
    return (2 * artan_k(_norm(xc, dim, keepdim), cc)).to(x.dtype)


def pairwise_dist(x, y, c=1.0):
    """(N, D), (M, D) -> (N, M) geodesic distances (here through an N×M×D broadcast: it is the
    specification, not the fast path)."""
    return dist(x[:, None, :], y[None, :, :], c)
