"""Hyperbolic symbolic rules: explanations per second of HyperbolicRuleExplainer.explain (symbols
of every level, rules' contributions, visual semantics of the top-level symbols and of the main
rule's symbols) with lfi_fast's ops against the straightforward implementation: torch.cdist +
argmin and geoopt's broadcast Poincaré distance + argmin for every channel of every input, geoopt's
Möbius ops, one decoder call per (input, symbol).

The explainer is untrained (codebooks initialised from the data, as fit() starts): the work per
explanation does not depend on the training. Explanations per second = batch / median time.
Modes: "rules" (symbols of every level, contributions, rules; semantics=False) and
"rules+semantics" (also the visual semantics and the attribution map: the decoder dominates).
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, nbytes

PROVIDERS = ("straightforward", "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:torch")


def _explainer(device):
    from lfi_fast.explain.hyperbolic import HyperbolicRuleExplainer, default_config

    torch.manual_seed(0)
    exp = HyperbolicRuleExplainer(default_config("mnist")).to(device)
    x = torch.rand(256, 1, 28, 28, device=device)
    with torch.no_grad():
        _, feats = exp.features(x)
        exp._initialise_codebooks(exp.modulator(feats).flatten(2))
    exp.classifier_ready.fill_(True)
    return exp.eval()


@pytest.fixture(scope="module")
def explainer(device):
    return _explainer(device)


@pytest.mark.parametrize("what", ("rules", "rules+semantics"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_explain_throughput(measure, explainer, provider, what, device, quick):
    import lfi_fast
    from lfi_fast.explain.hyperbolic import FastOps, StraightforwardOps

    batch = 16 if quick else 128
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    if provider == "straightforward":
        pytest.importorskip("geoopt")
        ops, backend = StraightforwardOps(explainer.config.curvature), None
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")
        ops = FastOps()

    semantics = what == "rules+semantics"

    def run():
        if backend is None:
            return explainer.explain(x, ops=ops, semantics=semantics)
        with lfi_fast.use_backend(backend):
            return explainer.explain(x, ops=ops, semantics=semantics)

    out = run()
    written = sum(nbytes(t) for t in out.tensors().values())
    measure(run, op=f"explain_{what}", provider=provider, anchor="straightforward", mode="forward",
            shape=x.shape, dtype=x.dtype, bytes_read=nbytes(x), bytes_written=written)
