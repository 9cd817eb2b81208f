"""Vector quantisation: nearest-codebook search without an N x K matrix, straight-through quantiser,
EMA codebook update. The hot path of VQ layers and of the hyperbolic symbolic-rule method.

    from lfi_fast import vq
    idx, d = vq.nearest(x, codebook, metric="l2")          # x (..., D), codebook (K, D)
    idx, d = vq.nearest(z, codes, metric="poincare", c=1.0, k=4)   # (..., 4), sorted
    q, idx, loss = vq.quantize(x, codebook, beta=0.25)     # q straight-through

Distances: "l2" the squared Euclidean distance, "cosine" 1 - cos, "poincare" the geodesic distance
of the Poincaré ball of curvature -c (geoopt's, not squared). Extra memory is O(N k + K D): the
kernels rank codes tile by tile from one matrix product and keep a running minimum (top-k) per row.
Ties may be broken differently by different backends.
"""
from __future__ import annotations

import numbers

import torch

from . import _validate as V
from .ops import vq as _ops
from .reference.vq import METRICS

__all__ = ["METRICS", "ema_update", "nearest", "quantize"]


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


def _check_metric(metric: object) -> str:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")
    return metric


def _check_search(x, codebook, metric, c):
    V.check_tensor("x", x)
    V.check_tensor("codebook", codebook)
    V.check_same(x=x, codebook=codebook)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be (K, D) (got shape {tuple(codebook.shape)})")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (got K = 0)")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"x must be (..., D) with D == codebook.shape[1] "
            f"(got x: {tuple(x.shape)}, codebook: {tuple(codebook.shape)})"
        )
    metric = _check_metric(metric)
    ct = V.curvature(c, x)
    _check_finite("x", x)
    _check_finite("codebook", codebook)
    return metric, ct


def _check_k(k: object, kk: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int (got {type(k).__name__})")
    if not 1 <= k <= kk:
        raise ValueError(f"k must be in [1, K] with K = codebook.shape[0] = {kk} (got k = {k})")
    return int(k)


def _distance_for(x2, codes, metric, c):
    """Differentiable distances of rows x2 (N, D) to their chosen codes (N, k, D)."""
    if metric == "poincare":
        from . import hyperbolic as hyp

        return hyp.dist(x2[:, None, :], codes, c)
    from .reference.vq import distance

    return distance(x2[:, None, :], codes, metric, c)


def nearest(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
            c: float | torch.Tensor = 1.0, k: int = 1):
    """The nearest code (k = 1) or the k nearest codes of each row of x.

    Args:
        x: (..., D) floating tensor.
        codebook: (K, D), same dtype and device, K >= 1.
        metric: "l2" (squared distance), "cosine" (1 - cos) or "poincare" (geodesic distance on the
            ball of curvature -c; points are expected inside the ball).
        c: curvature magnitude > 0 (used by "poincare").
        k: how many codes, 1 <= k <= K (k <= 16 is the fast path).

    Returns:
        (indices, distances): k == 1: int64 (...) and (...) in x's dtype; k > 1: (..., k) sorted by
        distance. The distances are differentiable with respect to x and codebook (for the chosen
        codes); the indices are not.

    On a CUDA GPU of compute capability 8.0 or newer, float16 and bfloat16 inputs (and float32
    ones when ``torch.backends.cuda.matmul.allow_tf32`` is on) are searched with tensor cores for
    k <= 29: the candidates' scores come from WMMA products with float32 accumulation, rows whose
    candidates are within the products' error bound of each other are searched again in float32,
    and the exact distances (float64) of the candidates pick the k. The result is the float32
    search's, up to ties.
    """
    metric, ct = _check_search(x, codebook, metric, c)
    k = _check_k(k, codebook.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    idx, d = _ops.call("vq_nearest", x2, codebook, metric, ct, k)
    if torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad or ct.requires_grad):
        d = _distance_for(x2, codebook[idx], metric, c)
    if k == 1:
        return idx.reshape(lead), d.reshape(lead)
    return idx.reshape(*lead, k), d.reshape(*lead, k)


def quantize(x: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, metric: str = "l2",
             c: float | torch.Tensor = 1.0):
    """Quantise each row of x to its nearest code, straight-through.

    Returns (q, indices, loss): q (..., D) has the value codebook[indices] and passes its gradient
    to x unchanged; indices int64 (...); loss = beta mean|x - sg(q)|^2 + mean|sg(x) - q|^2 (the
    commitment and codebook terms of VQ-VAE; Euclidean for every metric), whose codebook gradient
    is a scatter-add over the indices.
    """
    metric, ct = _check_search(x, codebook, metric, c)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0 (got {beta!r})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        idx, _ = _ops.call("vq_nearest", x2.detach(), codebook.detach(), metric, ct.detach(), 1)
    idx = idx.reshape(-1)
    q, loss = _ops.call("vq_quantize", x2, codebook, idx, float(beta))
    return q.reshape(x.shape), idx.reshape(lead), loss


def ema_update(x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
               decay: float = 0.99, eps: float = 1e-5):
    """One EMA codebook step, fused: per-code counts and sums of the assigned rows, decayed
    averages, Laplace smoothing (eps), new codebook = sums / smoothed counts.

    Args:
        x: (..., D) the rows that were quantised; indices: int64 (...) their codes.
        counts: (K,) running counts; sums: (K, D) running sums (float32 or float64, same dtype).
        decay: in [0, 1); eps: Laplace smoothing > 0.

    Returns (counts, sums, codebook), new tensors (the inputs are not modified). Deterministic on
    every backend (no atomics in the reduction).
    """
    V.check_tensor("x", x)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError("indices must be an int64 tensor")
    if indices.shape != x.shape[:-1]:
        raise ValueError(f"indices must have x's leading shape {tuple(x.shape[:-1])} "
                         f"(got {tuple(indices.shape)})")
    for name, t in (("counts", counts), ("sums", sums)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be a float32 or float64 tensor")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device} (got {t.device})")
    if counts.dtype != sums.dtype:
        raise TypeError(f"counts and sums must have the same dtype (got {counts.dtype}, {sums.dtype})")
    if counts.dim() != 1 or sums.dim() != 2 or sums.shape != (counts.shape[0], x.shape[-1]):
        raise ValueError(f"counts must be (K,) and sums (K, D) with D = {x.shape[-1]} "
                         f"(got {tuple(counts.shape)}, {tuple(sums.shape)})")
    if counts.shape[0] == 0:
        raise ValueError("counts must hold at least one code (got K = 0)")
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1) (got {decay})")
    if not 0 < eps < float("inf"):
        raise ValueError(f"eps must be positive (got {eps})")
    idx = indices.reshape(-1)
    if idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= counts.shape[0]:
            raise ValueError(f"indices must be in [0, {counts.shape[0]}) (got values in [{lo}, {hi}])")
    _check_finite("x", x)
    return _ops.call("vq_ema_update", x.reshape(-1, x.shape[-1]).detach(), idx, counts, sums,
                     float(decay), float(eps))
