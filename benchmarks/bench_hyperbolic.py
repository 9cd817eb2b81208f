"""Hyperbolic family: lfi_fast's backends against geoopt, forward and forward+backward.

The bandwidth anchor `torch-eager:add` is torch.add(x, y): the ideal one-pass op that reads two
inputs and allocates and writes one output of the same size, as a fused Möbius addition does.
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, sync_for


def _inputs(n: int, d: int, device: torch.device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen) * (0.6 / d**0.5)  # norms ~0.6: inside the ball
    y = torch.randn(n, d, generator=gen) * (0.6 / d**0.5)
    g = torch.randn(n, d, generator=gen)
    return x.to(device, dtype), y.to(device, dtype), g.to(device, dtype)


def _providers(device):
    import lfi_fast
    from lfi_fast import hyperbolic as hyp

    provs = {}
    try:
        import geoopt

        ball = geoopt.PoincareBall(c=1.0)
        provs["geoopt"] = ball.mobius_add
    except ImportError:
        pass
    for b in lfi_backends(device):
        def op(x, y, _b=b):
            with lfi_fast.use_backend(_b):
                return hyp.mobius_add(x, y, 1.0)

        provs[f"lfi_fast:{b}"] = op
    return provs


MODES = ("forward", "full")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["geoopt", "torch-eager:add", "lfi_fast:cpp", "lfi_fast:cuda",
                                      "lfi_fast:triton", "lfi_fast:torch"])
def test_mobius_add(benchmark, provider, mode, device, quick):
    n, d = (1 << 12, 64) if quick else ((1 << 20, 64) if device.type == "cuda" else (1 << 18, 64))
    if provider == "torch-eager:add":
        if mode != "forward":
            pytest.skip("the bandwidth anchor is forward only")
        fn = torch.add
    else:
        provs = _providers(device)
        if provider not in provs:
            pytest.skip(f"{provider} is not available on {device}")
        fn = provs[provider]
    x, y, g = _inputs(n, d, device)
    sync = sync_for(device)
    if mode == "forward":
        def run():
            fn(x, y)
            sync()
    else:
        x.requires_grad_()
        y.requires_grad_()

        def run():
            x.grad = y.grad = None
            fn(x, y).backward(g)
            sync()

    benchmark.group = f"mobius_add {mode} {n}x{d} float32 {device.type}"
    benchmark.extra_info.update(provider=provider, anchor="geoopt", mode=mode, n=n, d=d)
    benchmark.pedantic(run, rounds=3 if quick else 15, warmup_rounds=1)
