"""Poincaré ball of curvature -c (c > 0): the reference, written as geoopt writes it.

geoopt's stereographic model uses k = -c; these functions take c. Numerics are geoopt's: norms and
denominators clamped at 1e-15, projection to (1 - eps)/sqrt(c) with eps 4e-3 (float32) or 1e-5
(float64). Unlike geoopt, float16/bfloat16 inputs are computed in float32 (with float32's margin)
and cast back, so finite inputs never give NaN or inf.
"""
from __future__ import annotations

import torch

MIN_NORM = 1e-15


def ball_eps(dtype: torch.dtype) -> float:
    """Projection margin below the ball's radius, by the dtype of the *input*."""
    return 1e-5 if dtype == torch.float64 else 4e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as_c(c: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(c), dtype=like.dtype, device=like.device)


def _sign(x: torch.Tensor) -> torch.Tensor:  # geoopt.utils.sign: 0 counts as positive
    return torch.sign(x.sign() + 0.5)


def _clamp_abs(x: torch.Tensor, eps: float) -> torch.Tensor:
    return _sign(x) * x.abs().clamp_min(eps)


def _project(x: torch.Tensor, c: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    maxnorm = (1 - eps) / c.abs().clamp_min(MIN_NORM) ** 0.5
    norm = x.norm(dim=dim, keepdim=True, p=2).clamp_min(MIN_NORM)
    return torch.where(norm > maxnorm, x / norm * maxnorm, x)


def project(x: torch.Tensor, c: float | torch.Tensor = 1.0, *, dim: int = -1) -> torch.Tensor:
    """Project x onto the ball of radius (1 - eps)/sqrt(c)."""
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    return _project(xc, _as_c(c, xc), ball_eps(x.dtype), dim).to(x.dtype)


def mobius_add(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float | torch.Tensor = 1.0,
    *,
    dim: int = -1,
    project: bool = True,
) -> torch.Tensor:
    """Möbius addition x ⊕_c y, projected onto the ball unless project=False."""
    dt = compute_dtype(x.dtype)
    xc, yc = x.to(dt), y.to(dt)
    cc = _as_c(c, xc)
    x2 = xc.pow(2).sum(dim=dim, keepdim=True)
    y2 = yc.pow(2).sum(dim=dim, keepdim=True)
    xy = (xc * yc).sum(dim=dim, keepdim=True)
    num = (1 + 2 * cc * xy + cc * y2) * xc + (1 - cc * x2) * yc
    den = 1 + 2 * cc * xy + cc**2 * x2 * y2
    out = num / _clamp_abs(den, MIN_NORM)
    if project:
        out = _project(out, cc, ball_eps(x.dtype), dim)
    return out.to(x.dtype)
