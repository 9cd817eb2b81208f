"""geoopt drop-in: a PoincareBall whose hot methods run lfi_fast's fused ops.

`PoincareBall` subclasses `geoopt.PoincareBall` (same constructor: ``c=1.0, learnable=False``), so
``isinstance(ball, geoopt.PoincareBall)`` holds and geoopt.ManifoldParameter,
geoopt.optim.RiemannianAdam and RiemannianSGD work with it unchanged. The Möbius operations, the
exponential and logarithmic maps, the distances and the projection run lfi_fast.hyperbolic (fused
kernels, with the gradient to the curvature); what the Riemannian optimisers call on every
step (egrad2rgrad, component_inner, retr_transp / parallel transport, retr, projx, proju) is
geoopt's math written with those ops and plain PyTorch, without TorchScript. Methods not
overridden here (geodesic, gyration, weighted_midpoint, dist2plane, …) are geoopt's.

    import geoopt
    from lfi_fast.geoopt import PoincareBall
    ball = PoincareBall(c=1.0)
    emb = geoopt.ManifoldParameter(ball.random_normal(100, 16, std=0.1), manifold=ball)
    opt = geoopt.optim.RiemannianAdam([emb], lr=1e-2)

Code that builds ``geoopt.PoincareBall`` itself can be switched without changing its imports::

    lfi_fast.geoopt.patch()        # geoopt.PoincareBall(...) now builds an accelerated ball
    lfi_fast.geoopt.unpatch()      # back to geoopt's classes
    with lfi_fast.geoopt.patched():
        ...

Values and gradients equal geoopt's (float64: within 1e-10 relative), with two deliberate
differences where geoopt's result has the wrong shape: ``inner(x, u, v, keepdim=False)`` returns one
value per point (geoopt broadcasts its (..., 1) conformal factor against the (...) product, giving
(..., ...)), and ``mobius_matvec(m, x, dim=d)`` with d not the last axis keeps the coordinates along
``d`` (geoopt moves them last but takes its norms along ``d``). float16/bfloat16 inputs are computed
in float32 and stay finite (geoopt's can give NaN).

geoopt is optional for lfi_fast: only this module imports it.
"""
from __future__ import annotations

import abc
import contextlib
import sys
from collections.abc import Iterator

import torch

try:
    import geoopt as _geoopt
    from geoopt.manifolds.stereographic import manifold as _geoopt_manifold
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "lfi_fast.geoopt needs geoopt, which is not installed: pip install geoopt"
    ) from e

from . import hyperbolic as hyp

__all__ = ["PoincareBall", "PoincareBallExact", "is_patched", "patch", "patched", "unpatch"]

_MIN = 1e-15  # geoopt's clamp of norms and denominators


def _original(name: str) -> type:
    """geoopt's own class `name`, even when this module is imported (or reloaded) while patched."""
    cls = getattr(_geoopt_manifold, name)
    return cls.__dict__.get("_lfi_fast_original", cls)


_GeooptPoincareBall = _original("PoincareBall")
_GeooptPoincareBallExact = _original("PoincareBallExact")
_Stereographic = _geoopt_manifold.Stereographic


def _sqnorm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return (x * x).sum(dim=dim, keepdim=True)


def _dot(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    return (x * y).sum(dim=dim, keepdim=True)


def _one_minus_cx2(x: torch.Tensor, c: torch.Tensor, dim: int, keepdim: bool = True):
    """1 - c|x|², clamped as geoopt clamps it: 2 / this is the conformal factor λ_x."""
    return (1 - c * (x * x).sum(dim=dim, keepdim=keepdim)).clamp_min(_MIN)


def _transp(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, c: torch.Tensor, dim: int):
    """Parallel transport of v from x to y: gyr[y, -x] v · λ_x / λ_y (geoopt's formula, k = -c)."""
    x2, y2 = _sqnorm(x, dim), _sqnorm(y, dim)
    xy, xv, yv = _dot(x, y, dim), _dot(x, v, dim), _dot(y, v, dim)
    c2 = c * c
    a = -c2 * yv * x2 - c * xv + 2 * c2 * xy * xv
    b = c2 * xv * y2 - c * yv
    d = (1 - 2 * c * xy + c2 * x2 * y2).clamp_min(_MIN)
    gyr = v + 2 * (a * y - b * x) / d
    return gyr * ((1 - c * y2).clamp_min(_MIN) / (1 - c * x2).clamp_min(_MIN))


class _BallMeta(abc.ABCMeta):
    """Metaclass of lfi_fast's balls: subclass checks are real ones (no ABC registry), except that
    a class patch() installs also counts geoopt's original class (and its subclasses) as its own,
    so ``isinstance(ball, geoopt.PoincareBall)`` stays true, while patched, for balls built before.
    Real checks keep that from leaking to the parents: a geoopt ball never passes for an
    lfi_fast.geoopt.PoincareBall."""

    def __instancecheck__(cls, obj) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub) -> bool:
        if type.__subclasscheck__(cls, sub):
            return True
        original = cls.__dict__.get("_lfi_fast_original")
        return original is not None and issubclass(sub, original)


class PoincareBall(_GeooptPoincareBall, metaclass=_BallMeta):
    """geoopt.PoincareBall on lfi_fast's fused ops: the Poincaré ball of curvature -c.

    Args:
        c: the curvature magnitude, > 0 (stored as geoopt stores it: ``isp_c``, the inverse
            softplus of c; ``self.c`` is a tensor).
        learnable: make c a trainable parameter; gradients reach it through every method.

    A drop-in for geoopt.PoincareBall: same constructor, parameters, state dict and method
    signatures (``dim``, ``keepdim``, ``project`` keywords with geoopt's defaults).
    """

    # ---- distances ----------------------------------------------------------------------------

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False, dim=-1) -> torch.Tensor:
        return hyp.dist(x, y, self.c, keepdim=keepdim, dim=dim)

    def dist2(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False, dim=-1) -> torch.Tensor:
        return hyp.dist(x, y, self.c, keepdim=keepdim, dim=dim) ** 2

    def dist0(self, x: torch.Tensor, *, dim=-1, keepdim=False) -> torch.Tensor:
        return hyp.dist0(x, self.c, keepdim=keepdim, dim=dim)

    # ---- Möbius operations --------------------------------------------------------------------

    def mobius_add(self, x: torch.Tensor, y: torch.Tensor, *, dim=-1, project=True) -> torch.Tensor:
        return hyp.mobius_add(x, y, self.c, dim=dim, project=project)

    def mobius_sub(self, x: torch.Tensor, y: torch.Tensor, *, dim=-1, project=True) -> torch.Tensor:
        return hyp.mobius_add(x, -y, self.c, dim=dim, project=project)

    def mobius_scalar_mul(self, r, x: torch.Tensor, *, dim=-1, project=True) -> torch.Tensor:
        return hyp.mobius_scalar_mul(r, x, self.c, dim=dim, project=project)

    def mobius_matvec(self, m: torch.Tensor, x: torch.Tensor, *, dim=-1, project=True):
        if m.dim() != 2:  # a batch of matrices: geoopt's broadcasting matmul path
            return super().mobius_matvec(m, x, dim=dim, project=project)
        return hyp.mobius_matvec(m, x, self.c, dim=dim, project=project)

    # ---- exponential and logarithmic maps -----------------------------------------------------

    def expmap(self, x: torch.Tensor, u: torch.Tensor, *, project=True, dim=-1) -> torch.Tensor:
        return hyp.expmap(x, u, self.c, dim=dim, project=project)

    def logmap(self, x: torch.Tensor, y: torch.Tensor, *, dim=-1) -> torch.Tensor:
        return hyp.logmap(x, y, self.c, dim=dim)

    def expmap0(self, u: torch.Tensor, *, dim=-1, project=True) -> torch.Tensor:
        return hyp.expmap0(u, self.c, dim=dim, project=project)

    def logmap0(self, x: torch.Tensor, *, dim=-1) -> torch.Tensor:
        return hyp.logmap0(x, self.c, dim=dim)

    # ---- what the Riemannian optimisers call ----------------------------------------------------

    def projx(self, x: torch.Tensor, *, dim=-1) -> torch.Tensor:
        return hyp.project(x, self.c, dim=dim)

    def proju(self, x: torch.Tensor, u: torch.Tensor, *, dim=-1) -> torch.Tensor:
        # Every vector is tangent: geoopt only broadcasts u to the points' shape.
        return u.expand(torch.broadcast_shapes(x.shape, u.shape))

    def retr(self, x: torch.Tensor, u: torch.Tensor, *, dim=-1) -> torch.Tensor:
        return hyp.project(x + u, self.c, dim=dim)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor, *, dim=-1) -> torch.Tensor:
        # u / λ_x² with λ_x = 2 / (1 - c|x|²)
        return u * (_one_minus_cx2(x, self.c, dim) * 0.5) ** 2

    def lambda_x(self, x: torch.Tensor, *, dim=-1, keepdim=False) -> torch.Tensor:
        return 2 / _one_minus_cx2(x, self.c, dim, keepdim)

    def inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *,
              keepdim=False, dim=-1) -> torch.Tensor:
        """λ_x² <u, v>, one value per point (geoopt's keepdim=False broadcasts to (..., ...))."""
        uv = _sqnorm(u, dim) if v is None else _dot(u, v, dim)
        out = uv * (2 / _one_minus_cx2(x, self.c, dim)) ** 2
        return out if keepdim else out.squeeze(dim)

    def component_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None):
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim=False, dim=-1) -> torch.Tensor:
        return 2 / _one_minus_cx2(x, self.c, dim, keepdim) * u.norm(dim=dim, keepdim=keepdim, p=2)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, dim=-1) -> torch.Tensor:
        return _transp(x, y, v, self.c, dim)

    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *, dim=-1):
        c = self.c
        y = hyp.project(x + u, c, dim=dim)
        return y, _transp(x, y, v, c, dim)

    def expmap_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *, dim=-1,
                      project=True):
        c = self.c
        y = hyp.expmap(x, u, c, dim=dim, project=project)
        return y, _transp(x, y, v, c, dim)

    # transp_follow_retr / transp_follow_expmap are geoopt's: they call retr, expmap and transp.


class PoincareBallExact(PoincareBall, _GeooptPoincareBallExact):
    """geoopt.PoincareBallExact on lfi_fast's fused ops: the retraction is the exponential map."""

    reversible = True
    retr = PoincareBall.expmap
    retr_transp = PoincareBall.expmap_transp
    transp_follow_retr = _Stereographic.transp_follow_expmap

    def extra_repr(self):
        return "exact"


# ---- patching geoopt -----------------------------------------------------------------------------


class _PatchedPoincareBall(PoincareBall):
    _lfi_fast_original = _GeooptPoincareBall


class _PatchedPoincareBallExact(PoincareBallExact):
    _lfi_fast_original = _GeooptPoincareBallExact


# The installed classes print and report their name as geoopt's do; pickle finds them by qualname.
_PatchedPoincareBall.__name__ = "PoincareBall"
_PatchedPoincareBallExact.__name__ = "PoincareBallExact"

_REPLACEMENTS = {
    "PoincareBall": (_GeooptPoincareBall, _PatchedPoincareBall),
    "PoincareBallExact": (_GeooptPoincareBallExact, _PatchedPoincareBallExact),
}


def _geoopt_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "geoopt" or name.startswith("geoopt."))]


def patch() -> None:
    """Make ``geoopt.PoincareBall`` (and ``PoincareBallExact``) build lfi_fast's balls.

    Every geoopt module that exports geoopt's class (geoopt, geoopt.manifolds,
    geoopt.manifolds.stereographic, geoopt.manifolds.stereographic.manifold) gets a subclass of
    lfi_fast.geoopt.PoincareBall instead; isinstance against it also accepts balls built before.
    Names imported before the call (``from geoopt import PoincareBall``) keep geoopt's class.
    Idempotent; undo with unpatch().
    """
    for module in _geoopt_modules():
        for name, (original, replacement) in _REPLACEMENTS.items():
            if module.__dict__.get(name) is original:
                setattr(module, name, replacement)


def unpatch() -> None:
    """Restore geoopt's classes wherever patch() installed lfi_fast's. Idempotent."""
    for module in _geoopt_modules():
        for name, (original, replacement) in _REPLACEMENTS.items():
            if module.__dict__.get(name) is replacement:
                setattr(module, name, original)


def is_patched() -> bool:
    """Whether ``geoopt.PoincareBall`` currently builds lfi_fast's ball."""
    return _geoopt.PoincareBall is _PatchedPoincareBall


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """patch() inside the block; on exit, unpatch() unless geoopt was already patched before it."""
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()
