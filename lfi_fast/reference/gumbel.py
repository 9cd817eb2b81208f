"""Gumbel-softmax sampling with forced variables, and single-variable interventions, in pure PyTorch.

The specification of lfi_fast.gumbel (and its `torch` backend). Every op works on logits whose last
dim holds the K categories; the rows are everything before it.

Noise: the Gumbel noise of element (row, k) of a (rows, K) problem is number row * K4 + k of the
Philox stream (seed, offset) of lfi_fast/reference/random.py, K4 = K rounded up to a multiple of 4
(a row starts on a fresh counter; a call uses rows * K4 / 4 counters). Every backend draws exactly
these numbers, so the same (seed, offset) gives the same sample on every backend.

Sampling, for logits l, noise g, temperature tau (torch.nn.functional.gumbel_softmax's formula):
    soft = softmax((l + g) / tau)
    hard = one_hot(argmax(l + g)); its gradient is the soft sample's (straight-through)
Rows whose mask is set are the one-hot of their target instead, with no gradient. Half types compute
in float32; float64 computes in float64 (the noise itself is float32, then widened).
"""
from __future__ import annotations

import torch

from . import random as rr


def counters(rows: int, k: int) -> int:
    """Philox counters used by a (rows, K) call: one per 4 numbers, each row starting on a fresh one."""
    return rows * ((k + 3) // 4)


def noise(seed: int, offset: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """The float32 Gumbel noise that every backend adds to logits of `shape` (categories last)."""
    k = shape[-1] if len(shape) else 1
    rows = 1
    for s in shape[:-1]:
        rows *= s
    k4 = (k + 3) // 4 * 4
    g = rr.gumbel(rr.check_seed(seed), offset, rows * k4, device).reshape(rows, k4)[:, :k]
    return g.reshape(shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_softmax(
    logits: torch.Tensor,
    noise: torch.Tensor,
    tau: float,
    hard: bool,
    mask: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Gumbel-softmax sample over the last dim given the noise; rows with `mask` set are the
    one-hot of `targets` (mask and targets of shape logits.shape[:-1]). Differentiable in logits."""
    ct = compute_dtype(logits.dtype)
    z = (logits.to(ct) + noise.to(ct)) / tau
    soft = torch.softmax(z, dim=-1)
    if hard:
        # argmax of l + g (the Gumbel-max sample, whatever tau), as one-hot; gradient of `soft`
        idx = (logits.to(ct) + noise.to(ct)).argmax(dim=-1, keepdim=True)
        one = torch.zeros_like(soft).scatter_(-1, idx, 1.0)
        y = one + (soft - soft.detach())
    else:
        y = soft
    if mask is not None:
        k = logits.shape[-1]
        forced = torch.nn.functional.one_hot(targets.clamp(0, k - 1), k).to(ct)
        y = torch.where(mask.unsqueeze(-1), forced, y)
    return y.to(logits.dtype)


def gumbel_softmax_seeded(logits, mask, targets, tau, hard, seed, offset):
    """gumbel_softmax with the noise of (seed, offset): what every backend computes."""
    g = noise(seed, offset, tuple(logits.shape), logits.device)
    return gumbel_softmax(logits, g, tau, hard, mask, targets)


def single_interventions(codes: torch.Tensor, num_categories: int) -> torch.Tensor:
    """Every one-variable change of each code: (B, V) -> (B, V * (K - 1), V).

    Change j = v * (K - 1) + r sets variable v to the r-th category other than its current one
    (in increasing order); the other variables keep their values. Built without a Python loop.
    """
    b, v = codes.shape
    k1 = num_categories - 1
    j = torch.arange(v * k1, device=codes.device)
    var, r = j // k1, j % k1
    cur = codes[:, var]  # (B, V(K-1))
    new = r + (r >= cur).to(r.dtype)
    out = codes.unsqueeze(1).expand(b, v * k1, v).clone()
    out.scatter_(2, var.expand(b, -1).unsqueeze(-1), new.unsqueeze(-1))
    return out


def single_intervention_one_hot(codes: torch.Tensor, num_categories: int, dtype: torch.dtype) -> torch.Tensor:
    """The one-hot decoder inputs of single_interventions(codes, K): (B, V * (K - 1), V, K)."""
    return torch.nn.functional.one_hot(single_interventions(codes, num_categories), num_categories).to(dtype)
