"""The Philox stream that every random op draws (lfi_fast/reference/random.py, csrc/philox.h).

Known answers are Random123's kat_vectors for philox4x32_10; the reference must equal Triton's
tl.randint4x on the same (seed, offset) (run under the interpreter here), so that the Triton
kernels, which call it, and the C++ kernels, which implement the same rounds, draw one stream.
"""
from __future__ import annotations

import math

import pytest
import torch

from lfi_fast.ops._random import next_seed_offset
from lfi_fast.reference import random as rr

KAT = [  # (counter, key) -> output, Random123 kat_vectors, philox4x32 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = rr.philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(o) for o in out) == expected


def test_stream_layout_and_offsets():
    seed = 0x123456789ABCDEF
    a = rr.randint(seed, 10, 41)
    assert a.shape == (41,) and int(a.min()) >= 0 and int(a.max()) < 2**32
    # number i is lane i % 4 of counter offset + i // 4: a later offset is the same stream shifted
    b = rr.randint(seed, 12, 33)
    assert torch.equal(a[8:41], b)
    assert not torch.equal(rr.randint(seed + 1, 10, 41), a)


def test_uniforms_strictly_inside_and_noise_finite():
    bits = torch.tensor([0, 1, 255, 256, 2**32 - 1, 2**31], dtype=torch.int64)
    u = rr.uniform_from_bits(bits)
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(rr.gumbel_from_bits(bits)).all()
    assert torch.isfinite(rr.normal_from_bits(bits)).all()


def test_distributions():
    n = 200_000
    u = rr.uniform(7, 0, n).double()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    g = rr.gumbel(7, 1000, n).double()
    assert abs(g.mean().item() - 0.5772156649) < 5 * math.sqrt(math.pi**2 / 6 / n)
    z = rr.normal(7, 5000, n).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert torch.isfinite(z).all()


@pytest.mark.triton
def test_reference_equals_triton_randint4x():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _kernel(out_ptr, seed, offset, n_ctr, BLOCK: tl.constexpr):
        j = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, offset + j)
        m = j < n_ctr
        tl.store(out_ptr + 4 * j, r0.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * j + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * j + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * j + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=m)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed, offset, n_ctr = 0x0F1E2D3C4B5A6978, 2**32 - 3, 13  # the counter's high word changes
    out = torch.zeros(4 * n_ctr, dtype=torch.int64, device=device)
    _kernel[(1,)](out, seed, offset, n_ctr, BLOCK=16)
    assert torch.equal(out.cpu(), rr.randint(seed, offset, 4 * n_ctr))


def test_next_seed_offset_cpu_generator():
    g = torch.Generator().manual_seed(3)
    s1, o1 = next_seed_offset(g, torch.device("cpu"), 100)
    s2, _ = next_seed_offset(g, torch.device("cpu"), 100)
    assert o1 == 0 and 0 <= s1 < 2**63 and s1 != s2
    g.manual_seed(3)
    assert next_seed_offset(g, torch.device("cpu"), 100)[0] == s1
    torch.manual_seed(5)
    a = next_seed_offset(None, torch.device("cpu"), 1)
    torch.manual_seed(5)
    assert next_seed_offset(None, torch.device("cpu"), 1) == a
    with pytest.raises(TypeError, match="generator"):
        next_seed_offset(3, torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="seed"):
        rr.randint(-1, 0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_next_seed_offset_cuda_generator_advances_without_sync():
    g = torch.Generator("cuda").manual_seed(3)
    s1, o1 = next_seed_offset(g, torch.device("cuda"), 10)
    s2, o2 = next_seed_offset(g, torch.device("cuda"), 10)
    assert s1 == s2 == 3 and o2 >= o1 + 10 // 4 and o2 % 4 == 0
