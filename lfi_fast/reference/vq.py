"""Reference vector quantisation: nearest-codebook search, straight-through quantiser, EMA update.

The specification of the vq family and its `torch` backend. Float64-capable; half types compute in
float32. Distances (DESIGN.md):

    l2        d = ||x - c||^2                     (squared)
    cosine    d = 1 - <x, c> / (|x| |c|)          (norms clamped at 1e-12, as F.normalize)
    poincare  d = 2/sqrt(c) artanh(sqrt(c) |(-x) (+)_c y|)   geoopt's geodesic distance

The search never holds more than a chunk of rows x K scores: `nearest` ranks codes by a score that
is monotone in the distance for a fixed row, computed from one matrix product per chunk

    l2        |c_k|^2 - 2 <x, c_k>
    cosine    -<x^, c^_k>
    poincare  |x - c_k|^2 / (1 - c |c_k|^2)      (cosh d = 1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2)))

and then computes the distance of the chosen codes directly (no cancellation). `pairwise` is the
brute-force N x K distance matrix: the test oracle (small sizes only).
"""
from __future__ import annotations

import torch

from . import hyperbolic as hyp

METRICS = ("l2", "cosine", "poincare")
NORM_EPS = 1e-12  # F.normalize's clamp of |x|
MIN_DEN = 1e-15  # the Poincaré denominators' clamp, as geoopt
CHUNK_ELEMS = 1 << 22  # scores held at once by the reference search: rows x K <= this


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _c(c, like: torch.Tensor) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(device=like.device, dtype=like.dtype).reshape(())
    return torch.tensor(float(c), dtype=like.dtype, device=like.device)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def distance(x: torch.Tensor, y: torch.Tensor, metric: str = "l2", c=1.0) -> torch.Tensor:
    """Row-wise distance between broadcastable x and y (coordinates last), computed directly."""
    dtype = x.dtype
    xc, yc = x.to(compute_dtype(dtype)), y.to(compute_dtype(dtype))
    if metric == "l2":
        d = (xc - yc).pow(2).sum(-1)
    elif metric == "cosine":
        d = 1 - (_normalize(xc) * _normalize(yc)).sum(-1)
    elif metric == "poincare":
        d = hyp.dist(xc, yc, _c(c, xc))
    else:
        raise ValueError(f"metric must be one of {METRICS} (got {metric!r})")
    return d.to(dtype)


def pairwise(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", c=1.0) -> torch.Tensor:
    """The (N, K) distance matrix by the direct formula: the brute-force oracle."""
    return distance(x[:, None, :], codebook[None, :, :], metric, c)


def _scores(xs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
            xn: torch.Tensor | None) -> torch.Tensor:
    """score = bias_k + <x, w_k> (+ |x|^2 scale_k): the ranking of codes for each row of xs."""
    s = torch.addmm(bias[None, :], xs, w.t())
    if scale is not None:
        s = s + xn[:, None] * scale[None, :]
    return s


def nearest(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", c=1.0, k: int = 1):
    """The k nearest codes of each row of x (N, D) in codebook (K, D), sorted by distance.

    Returns (indices int64 (N, k), distances (N, k) in x's dtype). Ties go to the lower index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS} (got {metric!r})")
    dt = compute_dtype(x.dtype)
    xf, cb = x.to(dt), codebook.to(dt)
    n = xf.shape[0]
    scale = None
    if metric == "l2":
        w, bias = -2 * cb, cb.pow(2).sum(-1)
    elif metric == "cosine":
        xf = _normalize(xf)
        w, bias = -_normalize(cb), cb.new_zeros(cb.shape[0])
    else:
        cc = _c(c, cb)
        scale = 1 / (1 - cc * cb.pow(2).sum(-1)).clamp_min(MIN_DEN)
        w, bias = -2 * cb * scale[:, None], cb.pow(2).sum(-1) * scale
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    rows = max(1, CHUNK_ELEMS // max(cb.shape[0], 1))
    for start in range(0, n, rows):
        xs = xf[start : start + rows]
        xn = xs.pow(2).sum(-1) if scale is not None else None
        s = _scores(xs, w, bias, scale, xn)
        # topk sorted ascending; a stable sort first would make ties go to the lower index
        _, order = torch.sort(s, dim=1, stable=True)
        idx[start : start + rows] = order[:, :k]
    d = distance(x[:, None, :], codebook[idx], metric, c)
    # Re-sort the chosen k by the accurate distance (the score's rounding may swap near-ties).
    d, perm = torch.sort(d, dim=1, stable=True)
    return idx.gather(1, perm), d


def quantize_loss(x: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """beta ||x - sg(q)||^2 + ||sg(x) - q||^2, each the mean over elements."""
    return beta * (x - q.detach()).pow(2).mean() + (x.detach() - q).pow(2).mean()


def quantize(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, beta: float):
    """Straight-through quantiser for chosen codes: (q, loss).

    q has the value codebook[indices] and the gradient of x (straight-through); the loss pulls x
    toward q with weight beta (commitment) and q toward x (codebook), means over the elements of x.
    """
    q = codebook[indices]
    loss = quantize_loss(x, q, beta)
    return x + (q - x).detach(), loss


def ema_update(x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
               decay: float, eps: float):
    """One EMA codebook step (VQ-VAE-2 / van den Oord et al., appendix):

        counts <- decay counts + (1 - decay) n_k          n_k: rows assigned to code k
        sums   <- decay sums   + (1 - decay) sum_{i: idx_i = k} x_i
        codebook = sums / smoothed(counts),  smoothed = (counts + eps) / (total + K eps) * total

    (Laplace smoothing keeps unused codes finite). Returns (counts, sums, codebook); counts and
    sums in their own dtype (float32 or float64), codebook in sums' dtype.
    """
    kk = counts.shape[0]
    dt = sums.dtype
    n_k = torch.zeros(kk, dtype=dt, device=x.device).index_add_(
        0, indices, torch.ones_like(indices, dtype=dt))
    s_k = torch.zeros_like(sums).index_add_(0, indices, x.to(dt))
    counts = decay * counts + (1 - decay) * n_k.to(counts.dtype)
    sums = decay * sums + (1 - decay) * s_k
    total = counts.sum()
    smoothed = (counts + eps) / (total + kk * eps) * total
    codebook = sums / smoothed.clamp_min(MIN_DEN)[:, None].to(dt)
    return counts, sums, codebook
