"""Nuisance sampling of the supervised-VAE method, in pure PyTorch: the specification.

A latent of D dims is split into the supervised part z_s (the first `supervised_dims` = Ds dims)
and the nuisance part z_n (the other Dn = D - Ds). For each of B inputs (mu, logvar) and each of
n samples, z_s = mu_s and z_n ~ N(0, I) (prior "standard") or N(mu_n, exp(logvar_n)) (prior
"posterior", z_n = mu_n + exp(logvar_n / 2) * eps). Rows are input-major: row b * n + m.

The noise (the stream convention of csrc/philox.h): eps[r, j] of row r = b * n + m is the
normal number r * Dn4 + j of the stream (seed, offset), Dn4 = Dn rounded up to a multiple of 4, so
that each row starts on a fresh Philox counter: row r reads counters offset + r * Dn4 / 4 ...,
normals (2k, 2k + 1) by Box-Muller from lanes (2k, 2k + 1). The normals are float32, then
converted to the computing dtype. A call uses rows * Dn4 / 4 counters; input b's noise starts at
counter offset + b * n * Dn4 / 4, so a chunk of inputs starting at b0 draws the same noise as the
whole batch when its offset is shifted by b0 * n * Dn4 / 4.

sample_linear is the first decoder layer on those samples: act(z @ weight.T + bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import random as rr

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "none")


def padded_width(nuisance_dims: int) -> int:
    """Dn rounded up to a multiple of 4: the stream numbers each row of the noise takes."""
    return (nuisance_dims + 3) // 4 * 4


def counters(rows: int, nuisance_dims: int) -> int:
    """Philox counters used by the noise of `rows` rows (4 numbers per counter)."""
    return rows * padded_width(nuisance_dims) // 4


def noise(seed: int, offset: int, rows: int, nuisance_dims: int, device="cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps (rows, Dn): the standard normals of the stream (seed, offset), laid out as above."""
    dn4 = padded_width(nuisance_dims)
    if rows == 0 or nuisance_dims == 0:
        return torch.zeros(rows, nuisance_dims, dtype=dtype, device=device)
    bits = rr.randint(seed, offset, rows * dn4, device)
    return rr.normal_from_bits(bits).reshape(rows, dn4)[:, :nuisance_dims].to(dtype)


def sample(mu: torch.Tensor, logvar: torch.Tensor, supervised_dims: int, n_samples: int,
           posterior: bool, seed: int, offset: int, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z (B * n, D): rows b * n + m = [mu_s[b], z_n[b, m]]. `eps` (B * n, Dn) replaces the
    stream's noise when given (tests)."""
    b, d = mu.shape
    ds, n = supervised_dims, n_samples
    if eps is None:
        eps = noise(seed, offset, b * n, d - ds, mu.device, mu.dtype)
    eps = eps.to(mu.dtype)
    z_s = mu[:, :ds].repeat_interleave(n, dim=0)
    if posterior:
        mu_n = mu[:, ds:].repeat_interleave(n, dim=0)
        std_n = torch.exp(0.5 * logvar[:, ds:]).repeat_interleave(n, dim=0)
        z_n = mu_n + std_n * eps
    else:
        z_n = eps  # mu_n and logvar do not enter: their gradients are zero
    return torch.cat((z_s, z_n), dim=1)


def activate(h: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(h)
    if activation == "leaky_relu":
        return F.leaky_relu(h, negative_slope)
    if activation == "gelu":
        return F.gelu(h)  # the exact (erf) form, nn.GELU's default
    if activation == "silu":
        return F.silu(h)
    if activation == "none":
        return h
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")


def sample_linear(mu: torch.Tensor, logvar: torch.Tensor, supervised_dims: int, n_samples: int,
                  weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                  negative_slope: float, posterior: bool, seed: int, offset: int,
                  eps: torch.Tensor | None = None) -> torch.Tensor:
    """act(sample(...) @ weight.T + bias): (B * n, H) for weight (H, D)."""
    z = sample(mu, logvar, supervised_dims, n_samples, posterior, seed, offset, eps)
    return activate(F.linear(z, weight, bias), activation, negative_slope)
