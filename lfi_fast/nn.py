"""Hyperbolic neural-network modules on the Poincaré ball, built on lfi_fast.hyperbolic's fused ops.

MobiusLinear is the hyperbolic linear layer of Ganea, Bécigneul and Hofmann (2018), "Hyperbolic
Neural Networks": a Möbius matrix-vector product followed by a Möbius bias translation.
HyperbolicMLR is that paper's hyperbolic multinomial logistic regression: one signed, scaled
distance to a hyperbolic hyperplane per class. Neither needs geoopt: every parameter is an ordinary
(Euclidean) nn.Parameter, the ball's points are reached through expmap0, so torch.optim trains them.

The curvature c (ball of curvature -c) is a fixed number by default; ``learn_c=True`` makes it a
parameter, stored as geoopt stores it (``isp_c``, the inverse softplus of c, so c stays positive).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import hyperbolic as hyp

__all__ = ["HyperbolicMLR", "MobiusLinear", "poincare_mlr"]

_MIN = 1e-15  # geoopt's clamp of norms and denominators


class _Curvature(nn.Module):
    """The shared curvature handling: a fixed float, or a learnable softplus-parametrised tensor."""

    def __init__(self, c: float, learn_c: bool, device=None, dtype=None):
        super().__init__()
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < math.inf:
            raise ValueError(f"c must be a positive finite number (got {c!r})")
        self.learn_c = bool(learn_c)
        if self.learn_c:
            # softplus⁻¹(c) = log(expm1(c)); for large c, c itself (expm1 overflows past ~709)
            isp = math.log(math.expm1(c)) if c < 30 else float(c)
            dtype = dtype or torch.get_default_dtype()
            self.isp_c = nn.Parameter(torch.tensor(isp, device=device, dtype=dtype))
        else:
            self._c = float(c)

    @property
    def c(self) -> float | torch.Tensor:
        """The curvature magnitude: a float, or a 0-dim tensor (softplus(isp_c)) when learnable."""
        return nn.functional.softplus(self.isp_c) if self.learn_c else self._c

    def _c_repr(self) -> str:
        c = float(nn.functional.softplus(self.isp_c.detach())) if self.learn_c else self._c
        return f"c={c:g}" + (", learn_c=True" if self.learn_c else "")


class MobiusLinear(_Curvature):
    """Hyperbolic linear layer: y = (W ⊗_c x) ⊕_c b, for x (..., in_features) in the ball.

    W ⊗_c x is the Möbius matrix-vector product (lfi_fast.hyperbolic.mobius_matvec) and ⊕_c the
    Möbius addition; both results are projected onto the ball as geoopt does.

    Args:
        in_features, out_features: sizes of the input and output points.
        c: curvature magnitude of the ball, > 0.
        bias: add the Möbius bias b.
        learn_c: make c trainable (softplus parametrisation).

    Parameters:
        weight: (out_features, in_features), initialised as nn.Linear's weight.
        bias: (out_features,), the bias *as a tangent vector at the origin*: the bias point is
            b = expmap0(bias), so the parameter is Euclidean (any torch optimiser, no projection)
            and b is always inside the ball. Initialised as nn.Linear's bias (uniform ±1/sqrt(in)).
    """

    def __init__(self, in_features: int, out_features: int, c: float = 1.0, bias: bool = True, *,
                 learn_c: bool = False, device=None, dtype=None):
        super().__init__(c, learn_c, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def bias_point(self) -> torch.Tensor | None:
        """The bias as a point of the ball, expmap0(bias); None without a bias."""
        return None if self.bias is None else hyp.expmap0(self.bias, self.c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        y = hyp.mobius_matvec(self.weight, x, c)
        if self.bias is not None:
            y = hyp.mobius_add(y, hyp.expmap0(self.bias, c), c)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._c_repr()}, bias={self.bias is not None}")


def poincare_mlr(x: torch.Tensor, p: torch.Tensor, a: torch.Tensor,
                 c: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Logits of the Poincaré multinomial logistic regression (Ganea et al. 2018):

        logit_k(x) = λ_{p_k} |a_k| / sqrt(c) · asinh(2 sqrt(c) <z_k, a_k> / ((1 - c|z_k|²) |a_k|)),
        z_k = (-p_k) ⊕_c x,

    for x (..., D) in the ball, hyperplane points p (K, D) in the ball and normals a (K, D) (tangent
    vectors at p_k). Returns (..., K).

    z_k is never formed: with A = 1 - 2c<p,x> + c|x|², B = 1 - c|p|² and
    D = 1 - 2c<p,x> + c²|p|²|x|² (the Möbius addition's denominator),
        z = (B x - A p) / D,   <z, a> = (B <x,a> - A <p,a>) / D,
        |z|² = (A²|p|² - 2AB <p,x> + B²|x|²) / D²,
    so the work is one (…, D) × (D, 2K) GEMM for <x,p> and <x,a> and O(K) elementwise terms per
    input: no (…, K, D) intermediate. Clamps as geoopt's: denominators at 1e-15, |a| at 1e-15,
    |z|² at 0. Where x is very close to p_k, <z_k, a_k> loses the relative precision of the
    difference (its absolute error stays ~eps·|x||a|).
    """
    if x.dim() < 1 or p.dim() != 2 or a.shape != p.shape or x.shape[-1] != p.shape[1]:
        raise ValueError(
            "x must be (..., D), p and a (K, D) with the same D "
            f"(got x: {tuple(x.shape)}, p: {tuple(p.shape)}, a: {tuple(a.shape)})"
        )
    if isinstance(c, torch.Tensor):
        c = c.to(x.dtype)
    else:
        c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    k = p.shape[0]
    xp_xa = x2d @ torch.cat([p, a], 0).mT  # (N, 2K): <x, p_k>, <x, a_k>
    xp, xa = xp_xa[:, :k], xp_xa[:, k:]
    x2 = (x2d * x2d).sum(-1, keepdim=True)  # (N, 1)
    p2 = (p * p).sum(-1)  # (K,)
    pa = (p * a).sum(-1)
    a_norm = a.norm(dim=-1).clamp_min(_MIN)
    big_a = 1 - 2 * c * xp + c * x2  # (N, K)
    big_b = 1 - c * p2  # (K,)
    den = (1 - 2 * c * xp + c * c * p2 * x2).clamp_min(_MIN)
    za = (big_b * xa - big_a * pa) / den
    z2 = (big_a * big_a * p2 - 2 * big_a * big_b * xp + big_b * big_b * x2) / (den * den)
    z2 = z2.clamp_min(0)
    sqrt_c = c.sqrt()
    lam_p = 2 / big_b.clamp_min(_MIN)
    arg = 2 * sqrt_c * za / ((1 - c * z2).clamp_min(_MIN) * a_norm)
    logits = (lam_p * a_norm / sqrt_c) * torch.asinh(arg)
    return logits.reshape(*lead, k)


class HyperbolicMLR(_Curvature):
    """Hyperbolic multinomial logistic regression (Ganea, Bécigneul, Hofmann 2018): logits (..., K)
    for points x (..., in_features) of the ball; see poincare_mlr for the formula and its fused
    evaluation.

    Parametrisation (all Euclidean nn.Parameters, so any torch optimiser trains them):
        p_k = expmap0(points[k]): the hyperplanes' points, always inside the ball;
        a_k = (1 - c|p_k|²) · tangents[k]: the normals, parallel-transported from the origin to p_k
            (P_{0→p}(v) = (λ_0/λ_p) v), so λ_{p_k}|a_k| = 2|tangents[k]| and their scale does not
            collapse as p_k nears the boundary (as in HNN++, Shimizu et al. 2021).

    Args:
        in_features: dimension D of the input points.
        num_classes: K.
        c: curvature magnitude of the ball, > 0.
        learn_c: make c trainable (softplus parametrisation).

    Initialisation: tangents as nn.Linear's weight (uniform ±1/sqrt(D)), points at the origin.
    """

    def __init__(self, in_features: int, num_classes: int, c: float = 1.0, *, learn_c: bool = False,
                 device=None, dtype=None):
        super().__init__(c, learn_c, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.points = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.tangents = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.points)
        nn.init.kaiming_uniform_(self.tangents, a=math.sqrt(5))

    def hyperplanes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, a): the points p_k of the ball and the normals a_k at them, each (K, D)."""
        c = self.c
        p = hyp.expmap0(self.points, c)
        a = (1 - c * (p * p).sum(-1, keepdim=True)) * self.tangents
        return p, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, a = self.hyperplanes()
        return poincare_mlr(x, p, a, self.c)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, {self._c_repr()}"


class VectorQuantizer(nn.Module):
    """The VQ-VAE quantisation layer over the last dim (channels last), on lfi_fast.vq's fused search.

    forward(x (..., dim)) -> (quantized, indices, loss): quantized has x's shape and passes its
    gradient straight through to x; indices int64 (...); loss (0-dim, a mean over elements) is
    beta |x - sg(q)|^2 + |sg(x) - q|^2, or with EMA updates (ema_decay set) beta |x - sg(q)|^2
    alone: the codebook is then a buffer that moves to the running means of its rows.

    Args:
        num_codes, dim: codebook size (K, dim).
        beta: commitment weight. metric: "l2", "cosine" or "poincare" (c: its curvature).
        ema_decay: None (codebook learnt by gradient) or the EMA decay in [0, 1).
        eps: Laplace smoothing of the EMA counts.
        dead_code_threshold: in training, codes whose usage (EMA count, or use in this batch
            without EMA) is below it are restarted at random rows of the batch; 0 disables.

    Statistics of the last training or eval batch: `perplexity` (exp of the entropy of code usage)
    and `codes_in_use` (distinct codes chosen), as 0-dim tensors; `usage` accumulates counts.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, metric: str = "l2",
                 ema_decay: float | None = None, *, c: float = 1.0, eps: float = 1e-5,
                 dead_code_threshold: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        from . import vq as _vq

        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be >= 1 (got {num_codes}, {dim})")
        _vq._check_metric(metric)
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be None or in [0, 1) (got {ema_decay})")
        self.num_codes, self.dim, self.beta, self.metric, self.c = num_codes, dim, beta, metric, c
        self.ema_decay, self.eps, self.dead_code_threshold = ema_decay, eps, dead_code_threshold
        kw = {"device": device, "dtype": dtype}
        init = torch.empty(num_codes, dim, **kw).uniform_(-1 / num_codes, 1 / num_codes)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            acc = torch.float64 if init.dtype == torch.float64 else torch.float32
            self.register_buffer("ema_counts", torch.ones(num_codes, device=device, dtype=acc))
            self.register_buffer("ema_sums", init.to(acc).clone())
        self.register_buffer("usage", torch.zeros(num_codes, device=device, dtype=torch.float64))
        self.register_buffer("perplexity", torch.zeros((), device=device))
        self.register_buffer("codes_in_use", torch.zeros((), device=device, dtype=torch.int64))

    def forward(self, x: torch.Tensor):
        from . import vq as _vq

        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be (..., {self.dim}) (got {tuple(x.shape)})")
        # Dead codes restart before the search, from the usage so far: once the codebook is in
        # this step's autograd graph it must not change in place.
        if self.training and self.dead_code_threshold > 0 and x.numel() and self._has_usage():
            self._restart_dead_codes(x.detach().reshape(-1, self.dim))
        if self.ema_decay is None:
            q, idx, loss = _vq.quantize(x, self.codebook, self.beta, self.metric, self.c)
        else:
            q, idx, _ = _vq.quantize(x, self.codebook, self.beta, self.metric, self.c)
            loss = self.beta * (x - q.detach()).pow(2).mean() if x.numel() else x.new_zeros(())
            if self.training and idx.numel():
                with torch.no_grad():
                    counts, sums, cb = _vq.ema_update(x.detach(), idx, self.ema_counts,
                                                      self.ema_sums, self.ema_decay, self.eps)
                    self.ema_counts.copy_(counts)
                    self.ema_sums.copy_(sums)
                    # a new tensor, not copy_: this step's graph holds the old codebook
                    self.codebook = cb.to(self.codebook.dtype)
        self._statistics(idx)
        return q, idx, loss

    def _has_usage(self) -> bool:
        return self.ema_decay is not None or getattr(self, "_batch_counts", None) is not None

    @torch.no_grad()
    def _statistics(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_codes).to(torch.float64)
        self.usage += counts
        total = counts.sum().clamp_min(1)
        p = counts / total
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        self.perplexity.copy_(entropy.exp())
        self.codes_in_use.copy_((counts > 0).sum())
        self._batch_counts = counts

    @torch.no_grad()
    def _restart_dead_codes(self, rows: torch.Tensor) -> None:
        usage = self.ema_counts if self.ema_decay is not None else self._batch_counts
        dead = (usage < self.dead_code_threshold).nonzero().reshape(-1)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, rows.shape[0], (dead.numel(),), device=rows.device)
        new = rows[pick].to(self.codebook.dtype)
        self.codebook[dead] = new
        if self.ema_decay is not None:
            self.ema_counts[dead] = self.dead_code_threshold
            self.ema_sums[dead] = new.to(self.ema_sums.dtype) * self.dead_code_threshold

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"metric={self.metric!r}, ema_decay={self.ema_decay}")
