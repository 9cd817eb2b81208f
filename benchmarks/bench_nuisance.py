"""Nuisance family: sample_linear (nuisance sampling fused with the decoder's first layer) at the
issue's size, B = 1,024 inputs x M = 64 samples, latent 16 (8 supervised), first layer 16 -> 512,
ReLU, float32.

Providers: `loop` (a per-sample Python loop as a straightforward implementation writes it: for
each input, for each sample, draw z_n, concatenate, apply the layer), `torch-eager` (batched:
randn, repeat, cat, Linear, ReLU; the anchor) and lfi_fast's backends. Modes: forward, and full
(forward + backward to mu, logvar, weight and bias; the loop is forward only: its backward through
65,536 little graphs is not a design anyone would keep).

Bytes (GB/s): forward reads mu, logvar, weight, bias and writes the (B * M, H) output; full adds the
output's gradient read and the inputs' gradients written.

`python benchmarks/bench_nuisance.py [--rounds R]` times cpp, the loop and torch-eager interleaved
in one process (the robust comparison on a loaded machine) and prints the ratios.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import lfi_backends, nbytes

PROVIDERS = ("loop", "torch-eager", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton", "lfi_fast:torch")
D, DS, H = 16, 8, 512


def _sizes(quick: bool) -> tuple[int, int]:
    return (16, 4) if quick else (1024, 64)


def _inputs(b: int, device):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(b, D, generator=gen)
    logvar = torch.randn(b, D, generator=gen) * 0.1
    w = torch.randn(H, D, generator=gen) / D**0.5
    bias = torch.randn(H, generator=gen) * 0.1
    return [t.to(device) for t in (mu, logvar, w, bias)]


def loop(mu, logvar, w, bias, n):
    """Per input, per sample: z = [mu_s, z_n ~ N(0, I)], h = relu(W z + b)."""
    rows = []
    for b in range(mu.shape[0]):
        for _ in range(n):
            z_n = torch.randn(D - DS, device=mu.device, dtype=mu.dtype)
            z = torch.cat((mu[b, :DS], z_n))
            rows.append(torch.relu(F.linear(z, w, bias)))
    return torch.stack(rows)


def eager(mu, logvar, w, bias, n):
    """Batched eager PyTorch: randn, repeat, cat, Linear, ReLU."""
    z_n = torch.randn(mu.shape[0] * n, D - DS, device=mu.device, dtype=mu.dtype)
    z = torch.cat((mu[:, :DS].repeat_interleave(n, dim=0), z_n), dim=1)
    return torch.relu(F.linear(z, w, bias))


def lfi(backend: str):
    import lfi_fast
    from lfi_fast import nuisance

    def run(mu, logvar, w, bias, n):
        with lfi_fast.use_backend(backend):
            return nuisance.sample_linear(mu, logvar, DS, n, w, bias, "relu")

    return run


@pytest.mark.parametrize("mode", ("forward", "full"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_linear(measure, provider, mode, device, quick):
    b, n = _sizes(quick)
    args = _inputs(b, device)
    if provider == "loop":
        if mode != "forward":
            pytest.skip("the per-sample loop is timed forward only")
        fn = loop
    elif provider == "torch-eager":
        fn = eager
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")
        fn = lfi(backend)
    out_bytes = b * n * H * args[0].element_size()
    if mode == "forward":
        bytes_read, bytes_written = nbytes(*args), out_bytes

        def run():
            return fn(*args, n)
    else:
        bytes_read, bytes_written = nbytes(*args) + out_bytes, out_bytes + nbytes(*args)
        g = torch.randn(b * n, H, device=device)
        leaves = [a.clone().requires_grad_() for a in args]

        def run():
            for a in leaves:
                a.grad = None
            fn(*leaves, n).backward(g)

    measure(run, op="sample_linear", provider=provider, anchor="torch-eager", mode=mode,
            shape=(b, n, D, H), dtype=args[0].dtype, bytes_read=bytes_read, bytes_written=bytes_written)


def _interleaved(rounds: int) -> None:
    """Median times of cpp, the loop and torch-eager, timed in turn in one process."""
    import statistics
    import time

    b, n = _sizes(False)
    args = _inputs(b, "cpu")
    fns = {"lfi_fast:cpp": lfi("cpp"), "torch-eager": eager, "loop": loop}
    times = {k: [] for k in fns}
    for k, f in fns.items():  # warm-up
        f(*args, n)
    for r in range(rounds):
        for k, f in fns.items():
            if k == "loop" and r % 4:  # the loop takes seconds: time it every 4th round
                continue
            t0 = time.perf_counter()
            f(*args, n)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"B={b} M={n} latent {D} ({DS} supervised), {D}->{H} relu, float32, "
          f"{torch.get_num_threads()} threads, {rounds} rounds")
    for k, v in med.items():
        print(f"  {k:14s} median {v:9.2f} ms  ({len(times[k])} timings)")
    print(f"  cpp vs loop  {med['loop'] / med['lfi_fast:cpp']:.1f}x")
    print(f"  cpp vs eager {med['torch-eager'] / med['lfi_fast:cpp']:.2f}x")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    _interleaved(p.parse_args().rounds)
