"""Philox-4x32-10 in pure PyTorch: the specification of the random numbers every backend draws.

The stream convention (csrc/philox.h says the same): for a 64-bit `seed` and an `offset`, the i-th
number of a call is lane i % 4 of philox4x32_10(counter = (n_lo, n_hi, 0, 0), key = (seed_lo,
seed_hi)) with n = offset + i // 4 — what Triton's tl.randint4x(seed, offset + i // 4) returns.
Uniforms are (top 23 bits + 0.5) * 2^-23 (exact in float32), strictly inside (0, 1); Gumbel noise is -log(-log(u));
normals come from pairs of lanes by Box-Muller. The C++, CUDA and Triton kernels compute these
numbers bit for bit (the float transforms up to their libm's last bit), so with the same seed every
backend draws the same noise as this module.

Everything here works on int64 tensors holding 32-bit values, on any device.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 32 bits of a * b for a constant a < 2^32 and b holding 32-bit values, without
    overflowing int64: b is split into 16-bit halves."""
    p1 = a * (b & 0xFFFF)  # < 2^48
    p2 = a * (b >> 16)  # < 2^48
    mid = p1 + ((p2 & 0xFFFF) << 16)  # < 2^49
    return mid & _M32, (p2 >> 16) + (mid >> 32)


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten Philox rounds on counters (int64 tensors of 32-bit values) with key (k0, k1)."""
    for _ in range(10):
        lo_b, hi_b = _mulhilo(_ROUND_B, c2)
        lo_a, hi_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def check_seed(seed: int) -> int:
    """The seed as the kernels take it: an int in [0, 2^63) (a signed int64 on the C++ side)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) (got {seed!r})")
    return seed


def randint(seed: int, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first n 32-bit numbers of the stream (seed, offset), as int64 values in [0, 2^32)."""
    check_seed(seed)
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (got {offset})")
    counters = offset + torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    lanes = philox4x32_10(
        counters & _M32, (counters >> 32) & _M32, torch.zeros_like(counters), torch.zeros_like(counters),
        seed & _M32, (seed >> 32) & _M32,
    )
    return torch.stack(lanes, dim=-1).reshape(-1)[:n]


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniforms strictly inside (0, 1) from 32-bit values."""
    return ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 standard Gumbel noise, -log(-log(u)): always finite."""
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def normal_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 standard normals by Box-Muller: numbers (2j, 2j+1) from lanes (2j, 2j+1) as
    (u1, u2): r cos(2 pi u2), r sin(2 pi u2) with r = sqrt(-2 log u1). len(bits) must be even."""
    if bits.numel() % 2:
        raise ValueError("normal_from_bits needs an even number of lanes")
    u = uniform_from_bits(bits).reshape(-1, 2)
    r = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    t = (2.0 * math.pi) * u[:, 1]
    return torch.stack((r * torch.cos(t), r * torch.sin(t)), dim=-1).reshape(-1)


def uniform(seed: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    return uniform_from_bits(randint(seed, offset, n, device))


def gumbel(seed: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    return gumbel_from_bits(randint(seed, offset, n, device))


def normal(seed: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    """n standard normals (n rounded up to even lanes, the extra one dropped)."""
    return normal_from_bits(randint(seed, offset, n + (n % 2), device))[:n]
