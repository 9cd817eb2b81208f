"""Poincaré ball of curvature -c (c > 0): fused Möbius, exp/log and distance ops.

Every function follows geoopt's numerics (see lfi_fast.reference.hyperbolic) and broadcasts like
geoopt. `c` is a positive number or a scalar tensor; gradients flow to a tensor c. Functions with
`project=True` project their result onto the ball of radius (1 - eps)/sqrt(c), as geoopt's
PoincareBall does. float16 inputs are computed in float32, bfloat16 in float64 (its squares
overflow float32); neither gives NaN or inf for finite inputs. `dim` is the coordinate dimension.

    from lfi_fast import hyperbolic as hyp
    z = hyp.expmap0(u, c=1.0)
    d = hyp.dist(z, hyp.mobius_add(z, w))
"""
from __future__ import annotations

import numbers

import torch

from . import _validate as V
from .ops import hyperbolic as _ops

__all__ = [
    "dist",
    "dist0",
    "expmap",
    "expmap0",
    "logmap",
    "logmap0",
    "mobius_add",
    "mobius_matvec",
    "mobius_scalar_mul",
    "pairwise_dist",
    "project",
]

Curvature = float | torch.Tensor


def _unary(name: str, x: torch.Tensor, c: Curvature, dim: int, *flags, arg: str = "x"):
    V.check_tensor(arg, x)
    d = V.check_dim(dim, x.dim())
    xs = x if d == x.dim() - 1 else x.movedim(d, -1)
    out = _ops.call(name, xs, V.curvature(c, x), *flags)
    return out, d


def _vector_out(out: torch.Tensor, d: int) -> torch.Tensor:
    return out if d == out.dim() - 1 else out.movedim(-1, d)


def _scalar_out(out: torch.Tensor, d: int, keepdim: bool) -> torch.Tensor:
    return out.unsqueeze(d) if keepdim else out


def _binary(name: str, x, y, c, dim, *flags, names=("x", "y")):
    V.check_tensor(names[0], x)
    V.check_tensor(names[1], y)
    V.check_same(**{names[0]: x, names[1]: y})
    xs, ys, d = V.broadcast_rows(x, y, dim, names)
    return _ops.call(name, xs, ys, V.curvature(c, x), *flags), d


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1,
               project: bool = True) -> torch.Tensor:
    """Möbius addition x ⊕_c y.

        x ⊕_c y = ((1 + 2c<x,y> + c|y|²) x + (1 - c|x|²) y) / (1 + 2c<x,y> + c²|x|²|y|²)

    Args:
        x, y: points of the ball, floating tensors of one dtype and device that broadcast, with the
            same size along `dim`.
        c: the ball's curvature magnitude, > 0: a number or a scalar tensor (differentiable).
        dim: the coordinate dimension.
        project: project the result onto the ball (geoopt's default in PoincareBall).

    Returns:
        A tensor of the broadcast shape and the inputs' dtype.
    """
    out, d = _binary("mobius_add", x, y, c, dim, bool(project))
    return _vector_out(out, d)


def mobius_scalar_mul(r: torch.Tensor | float, x: torch.Tensor, c: Curvature = 1.0, *,
                      dim: int = -1, project: bool = True) -> torch.Tensor:
    """Möbius scalar multiplication r ⊗_c x = tan_c(r artan_c(|x|)) x / |x|.

    Args:
        r: the scalar: a number or a tensor that broadcasts against x with size 1 along `dim`
            (one scalar per point, e.g. shape (..., 1)); differentiable.
        x: points of the ball.
    """
    V.check_tensor("x", x)
    d = V.check_dim(dim, x.dim())
    if isinstance(r, numbers.Real) and not isinstance(r, bool):
        r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
    V.check_tensor("r", r, min_dim=0)
    V.check_same(x=x, r=r)
    if r.dim() >= x.dim() - d and r.shape[d - x.dim()] != 1:
        raise ValueError(
            f"r must broadcast against x with size 1 along dim {dim} (one scalar per point); "
            f"got r: {tuple(r.shape)}, x: {tuple(x.shape)}"
        )
    xs = x if d == x.dim() - 1 else x.movedim(d, -1)
    if d == x.dim() - 1:
        rs = r
    else:  # r lines up with |x| kept along dim (as geoopt broadcasts): give it that dim, move it last
        rs = r.reshape((1,) * max(0, x.dim() - d - r.dim()) + tuple(r.shape)).movedim(d - x.dim(), -1)
    try:
        torch.broadcast_shapes(rs.shape, tuple(xs.shape[:-1]) + (1,))
    except RuntimeError:
        raise ValueError(f"r {tuple(r.shape)} does not broadcast against x {tuple(x.shape)}") from None
    out = _ops.call("mobius_scalar_mul", rs, xs, V.curvature(c, x), bool(project))
    # r may add leading dims: the coordinate dim counts from the right.
    return out if d == x.dim() - 1 else out.movedim(-1, d - x.dim())


def mobius_matvec(m: torch.Tensor, x: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1,
                  project: bool = True) -> torch.Tensor:
    """Möbius matrix-vector product m ⊗_c x = tan_c(|mx|/|x| artan_c(|x|)) mx / |mx| (0 where mx
    is 0), for m of shape (out, in) as geoopt and x of size `in` along `dim`."""
    V.check_tensor("m", m, min_dim=2)
    V.check_tensor("x", x)
    V.check_same(x=x, m=m)
    d = V.check_dim(dim, x.dim())
    if m.dim() != 2 or m.shape[1] != x.shape[d]:
        raise ValueError(
            f"m must be (out, in) with in == x.shape[{dim}] (got m: {tuple(m.shape)}, x: {tuple(x.shape)})"
        )
    xs = x if d == x.dim() - 1 else x.movedim(d, -1)
    return _vector_out(_ops.call("mobius_matvec", m, xs, V.curvature(c, x), bool(project)), d)


def expmap(x: torch.Tensor, u: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1,
           project: bool = True) -> torch.Tensor:
    """Exponential map at x of the tangent vector u: x ⊕_c tan_c(λ_x |u| / 2) u / |u|."""
    out, d = _binary("expmap", x, u, c, dim, bool(project), names=("x", "u"))
    return _vector_out(out, d)


def logmap(x: torch.Tensor, y: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1) -> torch.Tensor:
    """Logarithmic map at x of the point y: 2 artan_c(|s|) s / (λ_x |s|) with s = (-x) ⊕_c y."""
    out, d = _binary("logmap", x, y, c, dim)
    return _vector_out(out, d)


def expmap0(u: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1, project: bool = True) -> torch.Tensor:
    """Exponential map at the origin: tan_c(|u|) u / |u|."""
    out, d = _unary("expmap0", u, c, dim, bool(project), arg="u")
    return _vector_out(out, d)


def logmap0(x: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1) -> torch.Tensor:
    """Logarithmic map at the origin: artan_c(|x|) x / |x|."""
    out, d = _unary("logmap0", x, c, dim)
    return _vector_out(out, d)


def project(x: torch.Tensor, c: Curvature = 1.0, *, dim: int = -1) -> torch.Tensor:
    """Project x onto the ball of radius (1 - eps)/sqrt(c) (geoopt's projx)."""
    out, d = _unary("project", x, c, dim)
    return _vector_out(out, d)


def dist(x: torch.Tensor, y: torch.Tensor, c: Curvature = 1.0, *, keepdim: bool = False,
         dim: int = -1) -> torch.Tensor:
    """Geodesic distance 2 artan_c(|(-x) ⊕_c y|), reduced over `dim`."""
    out, d = _binary("dist", x, y, c, dim)
    return _scalar_out(out, d, keepdim)


def dist0(x: torch.Tensor, c: Curvature = 1.0, *, keepdim: bool = False, dim: int = -1) -> torch.Tensor:
    """Distance to the origin 2 artan_c(|x|), reduced over `dim`."""
    out, d = _unary("dist0", x, c, dim)
    return _scalar_out(out, d, keepdim)


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, c: Curvature = 1.0) -> torch.Tensor:
    """All geodesic distances between the rows of x (N, D) and y (M, D): an (N, M) tensor,
    computed from the rows' norms and x yᵀ (a GEMM), never an N×M×D intermediate.

    Nearby pairs are computed from |x|², |y|² and <x, y> (as torch.cdist's matrix-product path),
    so distances below ~sqrt(eps)·|x| carry an absolute error of that size; use dist() on the
    pairs that need full precision.
    """
    V.check_tensor("x", x, min_dim=2)
    V.check_tensor("y", y, min_dim=2)
    V.check_same(x=x, y=y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (N, D) and (M, D) (got x: {tuple(x.shape)}, y: {tuple(y.shape)})"
        )
    return _ops.call("pairwise_dist", x, y, V.curvature(c, x))
