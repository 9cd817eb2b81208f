"""Hyperbolic family: every op, lfi_fast's backends against geoopt, forward and forward+backward.

Bandwidth anchors (forward only): `torch-eager:add` (torch.add(x, y): reads two inputs, allocates
and writes one output of the same size, as a fused binary op must) and `torch-eager:mul`
(torch.mul(x, 2): one input, one output). The copy bandwidth that dist's forward (a small output)
is measured against is bench_memory.py's copy case, which `lfi-fast bench` always runs.

Bytes moved (GB/s, roofline): forward, the inputs read and the output written; full, that plus the
backward's: the inputs and the output's gradient read, the inputs' gradients written.
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, nbytes, rotating

C = 1.0


def _ball_points(n, d, gen, scale=0.6):
    return torch.randn(n, d, generator=gen) * (scale / d**0.5)  # norms ~scale: inside the ball


def _inputs(op: str, n: int, d: int):
    """The op's tensor arguments (float32, CPU), the same for every provider."""
    gen = torch.Generator().manual_seed(0)
    x, y = _ball_points(n, d, gen), _ball_points(n, d, gen)
    if op in ("mobius_add", "logmap", "dist"):
        return (x, y)
    if op == "expmap":
        return (x, torch.randn(n, d, generator=gen) * 0.3)
    if op in ("expmap0",):
        return (torch.randn(n, d, generator=gen) * 0.3,)
    if op in ("logmap0", "dist0", "project"):
        return (x,)
    if op == "mobius_scalar_mul":
        return (torch.rand(n, 1, generator=gen) * 2, x)
    if op == "mobius_matvec":
        return (torch.randn(d, d, generator=gen) / d**0.5, x)
    if op == "pairwise_dist":
        return (x[: n // 256], y[: n // 256])  # N x M x D stays small for the broadcast anchors
    raise KeyError(op)


def _geoopt(op: str):
    import geoopt

    ball = geoopt.PoincareBall(c=C)
    if op == "project":
        return ball.projx
    if op == "pairwise_dist":
        return lambda x, y: ball.dist(x[:, None, :], y[None, :, :])
    return getattr(ball, op)


def _lfi(op: str, backend: str):
    import lfi_fast
    from lfi_fast import hyperbolic as hyp

    fn = getattr(hyp, op)

    def run(*args):
        with lfi_fast.use_backend(backend):
            return fn(*args, C)

    return run


OPS = ("mobius_add", "mobius_scalar_mul", "mobius_matvec", "expmap0", "logmap0", "expmap",
       "logmap", "dist", "dist0", "project", "pairwise_dist")
# Each op's one-pass PyTorch counterpart that moves the same bytes (forward).
ANCHORS = {"mobius_add": "add", "expmap": "add", "logmap": "add", "dist": "add",
           "expmap0": "mul", "logmap0": "mul", "project": "mul", "dist0": "mul",
           "mobius_scalar_mul": "mul"}
PROVIDERS = ("geoopt", "torch-eager", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton",
             "lfi_fast:torch")


def _sizes(device, quick):
    if quick:
        return 1 << 12, 16
    return (1 << 20 if device.type == "cuda" else 1 << 18), 64


@pytest.mark.parametrize("mode", ("forward", "full"))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_hyperbolic(measure, op, provider, mode, device, quick):
    n, d = _sizes(device, quick)
    args = [t.to(device) for t in _inputs(op, n, d)]
    if provider == "torch-eager":
        if mode != "forward" or op not in ANCHORS:
            pytest.skip("the bandwidth anchor is forward only, for row-wise ops")
        if ANCHORS[op] == "add":
            fn = torch.add
            args = args[-2:] if len(args) >= 2 and args[-2].shape == args[-1].shape else [args[-1], args[-1]]
        else:
            fn, args = (lambda x: torch.mul(x, 2.0)), args[-1:]
        provider = f"torch-eager:{ANCHORS[op]}"
    elif provider == "geoopt":
        pytest.importorskip("geoopt")
        fn = _geoopt(op)
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")
        fn = _lfi(op, backend)
    out = fn(*args)
    if mode == "forward":
        bytes_read, bytes_written = nbytes(*args), nbytes(out)

        def build():
            inputs = [a.clone() for a in args]
            return lambda: fn(*inputs)
    else:
        bytes_read, bytes_written = 2 * nbytes(*args) + nbytes(out), nbytes(out) + nbytes(*args)
        g = torch.randn_like(out)

        def build():
            leaves = [a.clone().requires_grad_() for a in args]

            def run():
                for a in leaves:
                    a.grad = None
                fn(*leaves).backward(g)

            return run

    measure(rotating(build, device, bytes_read + bytes_written), op=op, provider=provider,
            anchor="geoopt", mode=mode, shape=args[-1].shape, dtype=args[-1].dtype,
            bytes_read=bytes_read, bytes_written=bytes_written)
