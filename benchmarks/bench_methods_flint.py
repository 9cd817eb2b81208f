"""FLINT's explanation hot path: AM+PI (activation maximisation from partial initialisation) for
10 inputs x 3 attributes, run as ONE batched optimisation (lfi_fast:batched: one image tensor of
30 problems, one Adam, 600 forward/backward passes) against the public code's way, 30 sequential
optimisations of one image each (anchor `sequential-loop`, the same maths and schedule, so the
ratio is what batching buys).

The interpreter is the published MNIST architecture (FlintNet, tap 32x14x14, J = 25) at its
initial weights: the cost of AM+PI does not depend on the trained values. Quick mode (CI) runs 1
round of 2 steps; full mode the published 12 rounds x 50 steps.

Bytes moved (for the CSV's GB/s column only; AM+PI is compute-bound): the input images read and the
optimised images written.
"""

from __future__ import annotations

import pytest
import torch
from conftest import nbytes

N_INPUTS, N_ATTRS = 10, 3


def _setup(device, quick):
    from lfi_fast.explain.flint import FlintConfig, FlintInterpreter

    torch.manual_seed(0)
    exp = FlintInterpreter(FlintConfig()).to(device).eval()
    x = torch.rand(N_INPUTS, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    pairs = x.repeat_interleave(N_ATTRS, 0)
    attrs = torch.arange(N_INPUTS * N_ATTRS, device=device) % exp.config.n_attributes
    kw = {"rounds": 1, "steps": 2} if quick else {"rounds": 12, "steps": 50}
    return exp, pairs, attrs, kw


@pytest.mark.parametrize("provider", ["sequential-loop", "lfi_fast:batched"])
def test_am_pi(measure, device, quick, provider):
    exp, pairs, attrs, kw = _setup(device, quick)
    if provider == "sequential-loop":

        def run():
            return [exp.am_pi(pairs[i : i + 1], attrs[i : i + 1], **kw) for i in range(len(pairs))]
    else:

        def run():
            return exp.am_pi(pairs, attrs, **kw)

    measure(
        run,
        op="am_pi",
        provider=provider,
        anchor="sequential-loop",
        mode="full",
        shape=(N_INPUTS, N_ATTRS, 1, 28, 28),
        dtype=pairs.dtype,
        bytes_read=nbytes(pairs),
        bytes_written=nbytes(pairs),
    )
