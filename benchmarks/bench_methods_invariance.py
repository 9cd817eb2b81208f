"""Invariance explainer throughput: explanations per second with M = 64 samples per input.

One explanation = the input's prediction, its M invariant samples (z_s kept, z_n from the prior)
decoded and classified, and its M contrast samples (z_s from the prior) likewise; no
integrated gradients (their cost is the classifier's backward, the same for every provider).

Providers: `loop` (the anchor), a straightforward per-sample implementation: for each input and
each sample, draw the noise, build the latent, decode it and classify the image, one at a time;
`lfi_fast:<backend>`, InvarianceExplainer.explain, which samples through
nuisance.sample_decode (sampling fused with the decoder's first Linear layer, whole batches of
inputs x samples per decoder call). Explanations per second = B / median time. The weights are
random (throughput does not depend on them).
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, nbytes

M = 64


def _sizes(device, quick):
    if quick:
        return 2, 4
    return (512 if device.type == "cuda" else 16), M


def _explainer(device):
    from lfi_fast.explain.invariance import Config, InvarianceExplainer

    torch.manual_seed(0)
    exp = InvarianceExplainer(Config()).to(device).eval()
    exp.fitted.fill_(True)
    return exp


def per_sample_loop(exp, x: torch.Tensor, n: int, gen: torch.Generator):
    """The anchor: one latent, one decode and one classification at a time."""
    ds, dn = exp.config.supervised_dims, exp.config.nuisance_dims
    out = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            mu, _ = exp.encode(x[b:b + 1])
            pred = int(exp.classify(x[b:b + 1]).argmax(1))
            keep = flips = 0
            for _ in range(n):
                z = torch.cat((mu[:, :ds], torch.randn(1, dn, generator=gen).to(x.device)), 1)
                keep += int(exp.classify(exp.decode(z)).argmax(1)) == pred
                z = torch.cat((torch.randn(1, ds, generator=gen).to(x.device), mu[:, ds:]), 1)
                flips += int(exp.classify(exp.decode(z)).argmax(1)) != pred
            out.append((pred, keep / n, flips / n))
    return out


@pytest.mark.parametrize("provider", ("loop", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton",
                                      "lfi_fast:torch"))
def test_invariance_explain(measure, provider, device, quick):
    import lfi_fast

    b, n = _sizes(device, quick)
    exp = _explainer(device)
    x = torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    if provider == "loop":
        gen = torch.Generator().manual_seed(0)

        def run():
            return per_sample_loop(exp, x, n, gen)
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")

        def run():
            with lfi_fast.use_backend(backend):
                return exp.explain(x, n_samples=n, attribute=False)

    out_bytes = 2 * b * n * x[0].numel() * x.element_size()
    measure(run, op="explain", provider=provider, anchor="loop", mode="forward",
            shape=(b, n, 1, 28, 28), dtype=x.dtype, bytes_read=nbytes(x), bytes_written=out_bytes)
