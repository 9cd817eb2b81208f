"""Latent intervention explainer: intervention searches per second, the batched beam search
(InterventionExplainer.search: every single change of every input in one pass of the decoder and
f_K, through lfi_fast.gumbel.single_intervention_one_hot) against the same search written as a loop
over inputs, beam entries and candidate interventions (search_loop: one decode and one f_K call per
candidate), the anchor.

Both search the same codes of the same explainer (default MNIST config: SmallCNN split at relu3,
V = 16 binary variables; random weights: the work per search does not depend on training) for
"any other class", beam 8, at most 3 changes. Shape: inputs x variables x categories; searches per
second = inputs / median time.
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, nbytes

PROVIDERS = ("torch-loop", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton", "lfi_fast:torch")


def _setup(device, quick):
    from lfi_fast.explain.intervention import InterventionConfig, InterventionExplainer

    torch.manual_seed(0)
    exp = InterventionExplainer(InterventionConfig(beam_width=8, max_changes=3)).to(device).eval()
    b = 2 if quick else (256 if device.type == "cuda" else 64)
    x = torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        _, _, code = exp.encode(x)
    target = torch.full((b,), -1, dtype=torch.int64, device=device)
    return exp, code, target


@pytest.mark.parametrize("provider", PROVIDERS)
def test_intervention_search(measure, provider, device, quick):
    import lfi_fast
    from lfi_fast.explain.intervention import search_loop

    exp, code, target = _setup(device, quick)
    cfg = exp.config
    if provider == "torch-loop":
        def run():
            return search_loop(exp, code, target, max_changes=cfg.max_changes, beam_width=cfg.beam_width)
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")

        def run():
            with lfi_fast.use_backend(backend):
                return exp.search(code, target)
    out = run()
    b, v = code.shape
    written = b * (cfg.max_changes + 1) * cfg.num_classes * 4 + nbytes(out["intervened_code"])
    measure(run, op="intervention_search", provider=provider, anchor="torch-loop", mode="forward",
            shape=(b, v, cfg.num_categories), dtype=torch.float32, bytes_read=nbytes(code, target),
            bytes_written=written)
