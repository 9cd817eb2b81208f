"""Gumbel family: Gumbel-softmax sampling, soft and hard, lfi_fast's backends against
torch.nn.functional.gumbel_softmax (the anchor, `torch-eager:F.gumbel_softmax`), forward and
forward+backward; and intervene (forced variables, binary codes).

Sizes: logits 65,536 x 512 on the CPU, 2^20 x 512 on a GPU (float32); quick: 1,024 x 64.
Bytes moved (GB/s, roofline): forward, the logits read and the sample written; full, that plus the
backward's: the output's gradient and the logits (hard: recomputed soft sample) or the saved sample
(soft) read, the logits' gradient written.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import lfi_backends, nbytes, rotating

TAU = 0.5
PROVIDERS = ("torch-eager:F.gumbel_softmax", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton",
             "lfi_fast:torch")


def _sizes(device, quick, k=512):
    if quick:
        return 1 << 10, min(k, 64)
    return (1 << 20 if device.type == "cuda" else 1 << 16), k


def _fn(provider: str, op: str, hard: bool, device):
    if provider.startswith("torch-eager"):
        if op != "gumbel_softmax":
            pytest.skip("the anchor samples without forcing")
        return lambda lg, *rest: F.gumbel_softmax(lg, TAU, hard)
    backend = provider.split(":")[1]
    if backend not in lfi_backends(device):
        pytest.skip(f"{provider} is not available on {device}")
    import lfi_fast
    from lfi_fast import gumbel

    def run(lg, *rest):
        with lfi_fast.use_backend(backend):
            if op == "gumbel_softmax":
                return gumbel.gumbel_softmax(lg, TAU, hard)
            return gumbel.intervene(lg, *rest, TAU, hard)

    return run


@pytest.mark.parametrize("mode", ("forward", "full"))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("hard", (False, True), ids=("soft", "hard"))
@pytest.mark.parametrize("op", ("gumbel_softmax", "intervene_binary"))
def test_gumbel(measure, op, hard, provider, mode, device, quick):
    if op == "gumbel_softmax":
        n, k = _sizes(device, quick)
        gen = torch.Generator().manual_seed(0)
        args = [torch.randn(n, k, generator=gen).to(device)]
    else:  # binary codes: (rows, V variables, 2), a quarter of the variables forced
        n, k = _sizes(device, quick, k=2)
        v = 64
        gen = torch.Generator().manual_seed(0)
        lg = torch.randn(n * k // (2 * v), v, 2, generator=gen)
        mask = torch.rand(lg.shape[:-1], generator=gen) < 0.25
        targets = torch.randint(0, 2, lg.shape[:-1], generator=gen)
        args = [lg.to(device), mask.to(device), targets.to(device)]
    fn = _fn(provider, "gumbel_softmax" if op == "gumbel_softmax" else "intervene", hard, device)
    out = fn(*args)
    name = f"{op}_{'hard' if hard else 'soft'}"
    if mode == "forward":
        bytes_read, bytes_written = nbytes(args[0]), nbytes(out)

        def build():
            inputs = [a.clone() for a in args]
            return lambda: fn(*inputs)
    else:
        bytes_read, bytes_written = 3 * nbytes(args[0]), 2 * nbytes(out)
        g = torch.randn_like(out)

        def build():
            leaf = args[0].clone().requires_grad_()
            rest = args[1:]

            def run():
                leaf.grad = None
                fn(leaf, *rest).backward(g)

            return run

    measure(rotating(build, device, bytes_read + bytes_written), op=name, provider=provider,
            anchor="torch-eager:F.gumbel_softmax", mode=mode, shape=args[0].shape, dtype=args[0].dtype,
            bytes_read=bytes_read, bytes_written=bytes_written)
