"""Gumbel-softmax sampling for discrete latent codes, with forced variables (interventions).

    from lfi_fast import gumbel
    y = gumbel.gumbel_softmax(logits, tau=0.5, hard=True)           # F.gumbel_softmax drop-in
    y = gumbel.intervene(logits, mask, targets, tau=0.5, hard=True)  # masked variables forced
    codes2 = gumbel.single_interventions(codes, K)                   # every one-variable change

The sampling kernels read the logits once and write the sample once; the noise is counter-based
Philox drawn from `generator` (or the global generator), uniforms strictly inside (0, 1), so the
noise is always finite. The same seed gives the same sample on every backend (see
lfi_fast.reference.gumbel for the stream layout). `noise=` passes the Gumbel noise explicitly (tests:
then every backend computes torch's formula softmax((logits + noise) / tau) on it).

-inf logits (masked categories) are never chosen and never give NaN; NaN or +inf logits, a row of
all -inf, tau <= 0 or non-finite are errors.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _validate as V
from .ops import _random
from .ops import gumbel as _ops
from .reference.gumbel import counters

__all__ = ["gumbel_softmax", "intervene", "single_interventions", "single_intervention_one_hot"]


def _tau(tau) -> float:
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau must be a number or a 1-element tensor (got shape {tuple(tau.shape)})")
        tau = float(tau.detach().reshape(()))
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive number (got {type(tau).__name__})")
    tau = float(tau)
    if not 0 < tau < math.inf:
        raise ValueError(f"tau must be positive and finite (got {tau})")
    return tau


def _noise(noise, logits: torch.Tensor) -> torch.Tensor | None:
    if noise is None:
        return None
    V.check_tensor("noise", noise)
    if noise.shape != logits.shape:
        raise ValueError(
            f"noise must have the logits' shape (got noise: {tuple(noise.shape)}, logits: {tuple(logits.shape)})"
        )
    if noise.device != logits.device:
        raise ValueError(f"noise must be on {logits.device} (got {noise.device})")
    return noise.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _sample(logits, mask, targets, noise, tau, hard, generator) -> torch.Tensor:
    """logits (..., K) with categories last; mask/targets (...,) or None."""
    k = logits.shape[-1]
    if k == 0:
        raise ValueError(f"logits must have at least one category (got shape {tuple(logits.shape)})")
    lead = logits.shape[:-1]
    rows = logits.numel() // k
    flat = logits.reshape(rows, k).contiguous()
    noise2 = noise.reshape(rows, k).contiguous() if noise is not None else None
    if mask is not None:
        mask = mask.reshape(rows).contiguous()
        targets = targets.reshape(rows).contiguous()
    if noise is None:
        seed, offset = _random.next_seed_offset(generator, logits.device, counters(rows, k))
    else:
        seed, offset = 0, 0
    out = _ops.gumbel_softmax(flat, mask, targets, noise2, tau, bool(hard), seed, offset)
    return out.reshape(*lead, k)


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10,
                   dim: int = -1, *, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """A sample of the Gumbel-softmax distribution: softmax((logits + g) / tau), g ~ Gumbel(0, 1).

    A drop-in for torch.nn.functional.gumbel_softmax (same arguments in the same order; eps is
    accepted and unused, as in torch).

    Args:
        logits: unnormalised log-probabilities, floating, categories along `dim`; -inf allowed
            (such a category is never chosen), NaN and +inf are errors, as is a row of all -inf.
        tau: temperature, > 0.
        hard: return the one-hot of the sample's argmax (exactly 0/1), whose gradient is the soft
            sample's (straight-through), as torch does. The argmax is that of logits + g: its
            distribution is softmax(logits) whatever tau.
        dim: the categories' dimension.
        generator: a torch.Generator (CPU or CUDA) for the noise; default: the global one.
        noise: the Gumbel noise itself (logits' shape), instead of drawing it: for tests.

    Returns:
        A tensor of the logits' shape and dtype.
    """
    V.check_tensor("logits", logits)
    tau = _tau(tau)
    d = V.check_dim(dim, logits.dim())
    noise = _noise(noise, logits)
    if d != logits.dim() - 1:
        logits = logits.movedim(d, -1)
        noise = noise.movedim(d, -1) if noise is not None else None
    out = _sample(logits, None, None, noise, tau, hard, generator)
    return out if d == out.dim() - 1 else out.movedim(-1, d)


def intervene(logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, tau: float = 1.0,
              hard: bool = True, *, generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel-softmax samples of categorical variables, some of them forced.

    Args:
        logits: (..., V, K): V variables of K categories.
        mask: bool, broadcastable to (..., V): where set, the variable is the one-hot of its target
            (exactly, with no gradient to its logits).
        targets: integer, broadcastable to (..., V), in [0, K) where mask is set (elsewhere unread).
        tau, hard, generator, noise: as gumbel_softmax; the unmasked variables are its samples (the
            same ones, for the same generator state).

    Returns:
        (..., V, K), the logits' dtype.
    """
    V.check_tensor("logits", logits, min_dim=2)
    tau = _tau(tau)
    lead = tuple(logits.shape[:-1])
    for name, t in (("mask", mask), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device} (got {t.device})")
        try:
            torch.broadcast_shapes(t.shape, lead)
            ok = torch.broadcast_shapes(t.shape, lead) == torch.Size(lead)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must broadcast to logits.shape[:-1] = {lead} (got {name}: {tuple(t.shape)})"
            )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (got {mask.dtype})")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (got {targets.dtype})")
    noise = _noise(noise, logits)
    mask = mask.expand(lead)
    targets = targets.to(torch.int64).expand(lead)
    return _sample(logits, mask, targets, noise, tau, hard, generator)


def _codes(codes, num_categories) -> int:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor (got {type(codes).__name__})")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (got {codes.dtype})")
    if codes.dim() != 2:
        raise ValueError(f"codes must be (B, V) (got shape {tuple(codes.shape)})")
    if isinstance(num_categories, bool) or not isinstance(num_categories, numbers.Integral):
        raise TypeError(f"num_categories must be an int (got {type(num_categories).__name__})")
    if num_categories < 2:
        raise ValueError(f"num_categories must be >= 2 (got {num_categories})")
    return int(num_categories)


def single_interventions(codes: torch.Tensor, num_categories: int) -> torch.Tensor:
    """Every one-variable change of each code: codes (B, V) -> (B, V * (K - 1), V) int64.

    Change j = v * (K - 1) + r sets variable v to the r-th category other than its current one,
    in increasing order (for binary codes: flips variable j). Built on the codes' device in one
    kernel, without a Python loop.
    """
    k = _codes(codes, num_categories)
    return _ops.single_interventions(codes.to(torch.int64).contiguous(), k)


def single_intervention_one_hot(codes: torch.Tensor, num_categories: int, *,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The decoder inputs of single_interventions in one step: (B, V * (K - 1), V, K), the
    one-hot of every one-variable change of each code, without building the codes first."""
    k = _codes(codes, num_categories)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype (got {dtype})")
    return _ops.single_intervention_one_hot(codes.to(torch.int64).contiguous(), k, dtype)
