"""Batched nuisance sampling with decode: the hot path of the supervised-VAE invariance method.

For B inputs encoded as (mu, logvar) (B, D), the first `supervised_dims` latent dims z_s are kept
(z_s = mu_s) and the others, the nuisance dims z_n, are resampled n_samples times per input:
z_n ~ N(0, I) (prior="standard") or N(mu_n, exp(logvar_n)) (prior="posterior"). Decoding the
samples and re-classifying them shows the transformations a classifier is invariant to.

    from lfi_fast import nuisance
    z = nuisance.sample(mu, logvar, 8, 64)                        # (B * 64, D), row b * 64 + m
    h = nuisance.sample_linear(mu, logvar, 8, 64, lin.weight, lin.bias, "relu")
    x_hat = nuisance.sample_decode(decoder, mu, logvar, 8, 64)    # (B, 64, *decoder output)
    score = nuisance.invariance_score(classifier, x_hat, labels)  # (B,) in [0, 1]

sample_linear fuses sampling with the decoder's first Linear layer: W_s·mu_s + b is computed once
per input and W_n·z_n once per sample, with z_n drawn inside the kernel and never stored.

Randomness: the noise is the counter-based Philox stream (seed, offset) of
lfi_fast.reference.nuisance, the same on every backend. By default `generator` (or the global
generator of mu's device) supplies (seed, offset) and advances; `seed=` and `offset=` give them
explicitly (input b's noise starts at counter offset + b * n_samples * Dn4 / 4, see
`counters_per_input`, so an input's samples do not depend on the batch it is in when the offsets
are chosen that way). Gradients flow to mu, logvar, weight and bias; the backward regenerates
the noise from (seed, offset).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _validate as V
from .ops import _random
from .ops import nuisance as _ops
from .reference.nuisance import ACTIVATIONS, counters

__all__ = [
    "ACTIVATIONS",
    "counters_per_input",
    "invariance_score",
    "sample",
    "sample_decode",
    "sample_linear",
]

PRIORS = ("standard", "posterior")


def counters_per_input(n_samples: int, nuisance_dims: int) -> int:
    """Philox counters that one input's n_samples nuisance draws use (the offset stride)."""
    return counters(n_samples, nuisance_dims)


def _int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int (got {type(v).__name__})")
    return int(v)


def _check_latent(mu, logvar, supervised_dims, n_samples, prior):
    V.check_tensor("mu", mu)
    V.check_tensor("logvar", logvar)
    if mu.dim() != 2:
        raise ValueError(f"mu must be (B, D) (got shape {tuple(mu.shape)})")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)} (got {tuple(logvar.shape)})")
    V.check_same(mu=mu, logvar=logvar)
    d = mu.shape[1]
    ds = _int("supervised_dims", supervised_dims)
    if not 0 < ds < d:
        raise ValueError(
            f"supervised_dims must be in (0, D) with D = mu.shape[1] = {d}, so that both the "
            f"supervised and the nuisance part are non-empty (got {ds})"
        )
    n = _int("n_samples", n_samples)
    if n < 1:
        raise ValueError(f"n_samples must be >= 1 (got {n})")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)} (got {prior!r})")
    return ds, n, prior == "posterior"


def _seed_offset(mu, ds, n, generator, seed, offset) -> tuple[int, int]:
    """(seed, offset) of the call: explicit, or drawn from the generator (which advances)."""
    if seed is not None:
        seed = _int("seed", seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63) (got {seed})")
        offset = _int("offset", 0 if offset is None else offset)
        if offset < 0:
            raise ValueError(f"offset must be >= 0 (got {offset})")
        if generator is not None:
            raise ValueError("give either generator or seed, not both")
        return seed, offset
    if offset is not None:
        raise ValueError("offset needs seed")
    used = counters(mu.shape[0] * n, mu.shape[1] - ds)
    return _random.next_seed_offset(generator, mu.device, used)


def _check_noise(noise, mu, ds, n):
    if noise is None:
        return None
    V.check_tensor("noise", noise)
    shape = (mu.shape[0] * n, mu.shape[1] - ds)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must be (B * n_samples, D - supervised_dims) = {shape} (got {tuple(noise.shape)})")
    if noise.device != mu.device:
        raise ValueError(f"noise must be on mu's device {mu.device} (got {noise.device})")
    return noise.to(mu.dtype)


def sample(mu: torch.Tensor, logvar: torch.Tensor, supervised_dims: int, n_samples: int, *,
           prior: str = "standard", generator: torch.Generator | None = None,
           seed: int | None = None, offset: int | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """n_samples latents per input with the supervised part fixed.

    Args:
        mu, logvar: (B, D) posterior means and log-variances, one dtype and device.
        supervised_dims: Ds in (0, D): the first Ds dims are z_s = mu_s.
        n_samples: samples per input, >= 1.
        prior: "standard" (z_n ~ N(0, I)) or "posterior" (z_n ~ N(mu_n, exp(logvar_n))).
        generator: supplies the noise's (seed, offset) and advances; None: the global generator.
        seed, offset: the Philox stream explicitly (instead of generator).
        noise: (B * n, D - Ds) standard normals to use instead of the stream (testing).

    Returns:
        (B * n_samples, D), input-major: row b * n_samples + m.
    """
    ds, n, posterior = _check_latent(mu, logvar, supervised_dims, n_samples, prior)
    noise = _check_noise(noise, mu, ds, n)
    s, o = _seed_offset(mu, ds, n, generator, seed, offset)
    return _ops.sample(mu, logvar, ds, n, posterior, s, o, noise)


def _check_activation(activation: str) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
    return activation


def _check_layer(mu, weight, bias):
    V.check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != mu.shape[1]:
        raise ValueError(
            f"weight must be (H, D) with D = mu.shape[1] = {mu.shape[1]}, as nn.Linear(D, H).weight "
            f"(got weight: {tuple(weight.shape)})"
        )
    V.check_same(mu=mu, weight=weight)
    if bias is not None:
        V.check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be (H,) = ({weight.shape[0]},) (got {tuple(bias.shape)})")
        V.check_same(mu=mu, bias=bias)


def sample_linear(mu: torch.Tensor, logvar: torch.Tensor, supervised_dims: int, n_samples: int,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "relu",
                  *, negative_slope: float = 0.01, prior: str = "standard",
                  generator: torch.Generator | None = None, seed: int | None = None,
                  offset: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The first decoder layer on the samples of `sample`: act(z @ weight.T + bias), fused.

    Args:
        weight: (H, D), as nn.Linear(D, H).weight; bias: (H,) or None.
        activation: "relu", "leaky_relu" (slope `negative_slope`), "gelu" (exact), "silu" or
            "none".
        The other arguments as in `sample`.

    Returns:
        (B * n_samples, H), row b * n_samples + m; equal to
        act(F.linear(sample(mu, logvar, ...), weight, bias)) with the same noise.
    """
    ds, n, posterior = _check_latent(mu, logvar, supervised_dims, n_samples, prior)
    _check_layer(mu, weight, bias)
    activation = _check_activation(activation)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a number (got {type(negative_slope).__name__})")
    noise = _check_noise(noise, mu, ds, n)
    s, o = _seed_offset(mu, ds, n, generator, seed, offset)
    return _ops.sample_linear(mu, logvar, ds, n, weight, bias, activation, float(negative_slope),
                              posterior, s, o, noise)


_FUSABLE = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu"}


def _split_decoder(decoder: nn.Module):
    """(first Linear, fused activation name, its slope, the rest as a callable) or None when the
    decoder does not start with nn.Linear."""
    if isinstance(decoder, nn.Linear):
        return decoder, "none", 0.01, None
    if isinstance(decoder, nn.Sequential) and len(decoder) > 0 and isinstance(decoder[0], nn.Linear):
        rest = list(decoder)[1:]
        act, slope = "none", 0.01
        if rest and type(rest[0]) in _FUSABLE and not (
            isinstance(rest[0], nn.GELU) and rest[0].approximate != "none"
        ):
            act = _FUSABLE[type(rest[0])]
            slope = float(getattr(rest[0], "negative_slope", 0.01))
            rest = rest[1:]
        return decoder[0], act, slope, (nn.Sequential(*rest) if rest else None)
    return None


def _auto_chunk(b: int, n: int, width: int) -> int:
    """Inputs per chunk so that one chunk's widest known activation holds about 2^22 elements."""
    return max(1, min(b, (1 << 22) // max(1, n * width)))


def sample_decode(decoder: nn.Module, mu: torch.Tensor, logvar: torch.Tensor, supervised_dims: int,
                  n_samples: int, chunk_size: int | None = None, *, prior: str = "standard",
                  generator: torch.Generator | None = None, seed: int | None = None,
                  offset: int | None = None) -> torch.Tensor:
    """Decode n_samples nuisance samples per input, a chunk of inputs at a time.

    When the decoder is an nn.Linear, or an nn.Sequential that starts with one, its first layer
    (and a following ReLU, LeakyReLU, exact GELU or SiLU) runs fused with the sampling
    (`sample_linear`) and the rest of the decoder runs on the chunk's hidden rows; otherwise the
    samples are drawn with `sample` and decoded by `decoder`.

    Args:
        decoder: maps (rows, D) latents to (rows, *out_shape).
        chunk_size: inputs per chunk (each chunk decodes chunk_size * n_samples rows); None picks
            a size that keeps about 2^22 elements of the first layer's output per chunk. The
            result does not depend on it: chunk k draws the stream at the offset of its first
            input.
        The other arguments as in `sample`.

    Returns:
        (B, n_samples, *out_shape).
    """
    if not isinstance(decoder, nn.Module) and not callable(decoder):
        raise TypeError(f"decoder must be an nn.Module or a callable (got {type(decoder).__name__})")
    ds, n, posterior = _check_latent(mu, logvar, supervised_dims, n_samples, prior)
    if chunk_size is not None:
        chunk_size = _int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None (got {chunk_size})")
    b, d = mu.shape
    s, o = _seed_offset(mu, ds, n, generator, seed, offset)
    per_input = counters(n, d - ds)
    split = _split_decoder(decoder) if isinstance(decoder, nn.Module) else None
    if split is not None:
        first = split[0]
        _check_layer(mu, first.weight, first.bias)
    width = split[0].out_features if split is not None else d
    chunk = chunk_size or _auto_chunk(b, n, width)
    out = None
    pieces = []
    for b0 in range(0, max(b, 1), chunk):  # an empty batch runs one empty chunk (output shape)
        b1 = min(b, b0 + chunk)
        m, lv, off = mu[b0:b1], logvar[b0:b1], o + b0 * per_input
        if split is not None:
            lin, act, slope, rest = split
            h = _ops.sample_linear(m, lv, ds, n, lin.weight, lin.bias, act, slope, posterior, s, off)
            y = rest(h) if rest is not None else h
        else:
            y = decoder(_ops.sample(m, lv, ds, n, posterior, s, off))
        y = y.reshape((b1 - b0, n) + tuple(y.shape[1:]))
        if torch.is_grad_enabled() and y.requires_grad:
            pieces.append(y)
            continue
        if out is None:
            out = y.new_empty((b,) + tuple(y.shape[1:]))
        out[b0:b1] = y
    if pieces:
        return torch.cat(pieces)
    return out


def invariance_score(classifier, samples: torch.Tensor, labels: torch.Tensor, *,
                     batch_size: int = 4096) -> torch.Tensor:
    """Per input, the fraction of its decoded samples that `classifier` assigns to its label.

    Args:
        classifier: maps (rows, *shape) to logits (rows, classes).
        samples: (B, n, *shape), e.g. from sample_decode.
        labels: (B,) int64 class per input (e.g. the prediction on the original input).
        batch_size: rows classified at a time.

    Returns:
        (B,) float32 in [0, 1]; computed without gradients.
    """
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        raise ValueError(f"samples must be a (B, n, ...) tensor (got {getattr(samples, 'shape', type(samples))})")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError("labels must be an integer tensor (B,)")
    b, n = samples.shape[:2]
    if tuple(labels.shape) != (b,):
        raise ValueError(f"labels must be (B,) = ({b},) (got {tuple(labels.shape)})")
    batch_size = _int("batch_size", batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    flat = samples.reshape((b * n,) + tuple(samples.shape[2:]))
    target = labels.to(samples.device, torch.int64).repeat_interleave(n)
    hits = torch.zeros(b * n, dtype=torch.float32, device=samples.device)
    with torch.no_grad():
        for r0 in range(0, b * n, batch_size):
            logits = classifier(flat[r0:r0 + batch_size])
            if logits.dim() != 2 or logits.shape[0] != min(batch_size, b * n - r0):
                raise ValueError(f"classifier must return (rows, classes) logits (got {tuple(logits.shape)})")
            hits[r0:r0 + batch_size] = (logits.argmax(dim=1) == target[r0:r0 + batch_size]).float()
    return hits.reshape(b, n).mean(dim=1) if n else hits.new_zeros(b)
