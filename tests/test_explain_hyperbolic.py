"""The hierarchical symbolic-rules explainer (lfi_fast.explain.hyperbolic): a reduced run of the
whole pipeline on digits at 28x28 (classifier, symbols, hierarchy, surrogate, decoder, metrics,
rules, figures, save/load), the pieces against straightforward implementations, and bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from lfi_fast.data import load_dataset
from lfi_fast.explain import load_explainer
from lfi_fast.explain.hyperbolic import (HyperbolicRuleExplainer, HyperbolicRuleResult, StraightforwardOps,
                                         default_config, geodesics, local_rules, rule_text)

METRIC_KEYS = {"accuracy_f", "fidelity", "symbols_level_0", "symbols_level_1", "symbols_level_2",
               "rules_per_class", "robustness_0.05", "robustness_0.1", "ig_robustness_0.05",
               "ig_robustness_0.1"}


def _small_config(**kw):
    base = dict(classifier_epochs=3, epochs=6, batch_size=25, robustness_samples=24, noise_draws=3,
                ig_steps=4, codebook_sizes=[32, 16, 4], lr=4e-3)
    base.update(kw)
    return default_config("digits", **base)


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", "train", image_size=28, limit=400)
    test = load_dataset("digits", "test", image_size=28, limit=200)
    return train, test


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    train, test = digits
    exp = HyperbolicRuleExplainer(_small_config())
    loader = DataLoader(train, batch_size=25, shuffle=True, generator=torch.Generator().manual_seed(0))
    history = exp.fit(loader, progress=False)
    metrics = exp.evaluate(DataLoader(test, batch_size=100), progress=False)
    return exp, history, metrics


def test_reduced_pipeline_beats_chance(trained):
    exp, history, metrics = trained
    assert set(metrics) == METRIC_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["accuracy_f"] > 0.6            # chance: 0.1
    assert metrics["fidelity"] > 0.4              # the surrogate agrees with f far above chance
    for lev, k in enumerate([32, 16, 4]):
        assert 2 <= metrics[f"symbols_level_{lev}"] <= k
    assert metrics["rules_per_class"] >= 1
    for key in ("robustness_0.05", "robustness_0.1", "ig_robustness_0.05", "ig_robustness_0.1"):
        assert 0 <= metrics[key] <= 1             # variance of maps normalised to [-1, 1]
    assert metrics["robustness_0.1"] > 0          # noise does move the explanations
    assert history["ce"][-1] < history["ce"][0]   # the surrogate learns
    assert len(history["edges"]) == exp.config.epochs


def test_explain_outputs_and_records(trained, digits):
    exp, _, _ = trained
    x, _y = digits[1].tensors
    res = exp.explain(x[:6])
    assert isinstance(res, HyperbolicRuleResult) and len(res) == 6
    n, levels, channels = res.codes.shape
    assert (n, levels, channels) == (6, 3, exp.channels)
    for lev, k in enumerate(exp.config.codebook_sizes):
        assert 0 <= int(res.codes[:, lev].min()) and int(res.codes[:, lev].max()) < k
    assert torch.equal(res.target, res.logits.argmax(-1))
    # the surrogate is linear: the channel contributions add up to its logit
    logit = res.surrogate_logits.gather(1, res.target[:, None])[:, 0]
    bias = exp.surrogate.bias.detach()[res.target]
    torch.testing.assert_close(res.contributions.sum(1) + bias, logit, rtol=1e-4, atol=1e-4)
    s = 1 + 2 * exp.config.semantics_per_level
    assert res.semantics.shape == (6, s, 1, 28, 28) and res.semantic_symbols.shape == (6, s, 2)
    assert res.attribution.shape == (6, 1, 28, 28) and torch.isfinite(res.attribution).all()
    recs = res.records()
    json.dumps(recs)  # JSON-able
    for b, r in enumerate(recs):
        assert r["target"] == int(res.target[b])
        for rule, text in zip(r["rules"], r["text"]):
            assert rule["contribution"] > 0 and rule["level"] == 2
            assert text.startswith(f"{r['target']} <- s2_{rule['id']}")
        # the top slot is the strongest rule's symbol
        if r["rules"]:
            assert r["rules"][0]["id"] == int(res.semantic_symbols[b, 0, 1])
        assert set(r["tree"]["levels"][0]) == set(res.codes[b, 0].tolist())
    light = exp.explain(x[:6], semantics=False)  # rules only: the same symbols and contributions
    assert torch.equal(light.codes, res.codes) and light.semantics.shape[1] == 0
    torch.testing.assert_close(light.contributions, res.contributions)
    assert [r["text"] for r in light.records()] == [r["text"] for r in recs]
    fig = res.plot(max_rows=3)
    assert fig is not None


def test_batch_independence_and_target(trained, digits):
    exp, _, _ = trained
    x, _ = digits[1].tensors
    idx = torch.arange(100, 110)
    whole = exp.explain(x[:10], index=idx)
    a, b = exp.explain(x[:4], index=idx[:4]), exp.explain(x[4:10], index=idx[4:])
    for k, v in whole.tensors().items():
        torch.testing.assert_close(torch.cat([getattr(a, k), getattr(b, k)]), v, rtol=1e-5, atol=1e-5)
    other = exp.explain(x[:10], target=3)
    assert (other.target == 3).all()
    torch.testing.assert_close(other.contributions.sum(1) + exp.surrogate.bias.detach()[3],
                               other.surrogate_logits[:, 3], rtol=1e-4, atol=1e-4)


def test_fast_path_matches_straightforward(trained, digits):
    pytest.importorskip("geoopt")
    exp, _, _ = trained
    x, _ = digits[1].tensors
    fast = exp.explain(x[:8])
    slow = exp.explain(x[:8], ops=StraightforwardOps(exp.config.curvature))
    # ties may be broken differently: compare codes where they agree is the rule, and demand most
    agree = (fast.codes == slow.codes).float().mean()
    assert agree > 0.99
    if bool((fast.codes == slow.codes).all()):
        torch.testing.assert_close(fast.semantics, slow.semantics, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.surrogate_logits, slow.surrogate_logits, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_foreign_checkpoint(trained, digits, tmp_path):
    exp, _, _ = trained
    x, _ = digits[1].tensors
    path = exp.save(tmp_path / "ckpt")
    again = HyperbolicRuleExplainer.load(path)
    r1, r2 = exp.explain(x[:8]), again.explain(x[:8])
    assert torch.equal(r1.codes, r2.codes)
    torch.testing.assert_close(r1.surrogate_logits, r2.surrogate_logits)
    torch.testing.assert_close(r1.semantics, r2.semantics)
    assert isinstance(load_explainer(path), HyperbolicRuleExplainer)
    doc = json.loads((path / "config.json").read_text())
    doc["method"] = "flint"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="flint"):
        HyperbolicRuleExplainer.load(path)


def test_report_writes_figures_and_rules(trained, digits, tmp_path):
    exp, _, _ = trained
    loader = DataLoader(digits[1], batch_size=100)
    paths = exp.report(loader, tmp_path)
    names = {p.name for p in paths}
    assert {"tree.png", "semantics.png", "rules.json", "rules.txt", "tree.json"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    tree = json.loads((tmp_path / "tree.json").read_text())
    used = {(s["level"], s["id"]) for s in tree["symbols"]}
    for e in tree["edges"]:  # pruned by usage: both ends used
        assert (e["level"], e["parent"]) in used and (e["level"] + 1, e["child"]) in used
    assert "<-" in (tmp_path / "rules.txt").read_text()


def test_hierarchy_loss_uses_the_adjacency():
    torch.manual_seed(0)
    exp = HyperbolicRuleExplainer(_small_config(codebook_sizes=[8, 4, 2]))
    with torch.no_grad():
        exp.codebook0.copy_(torch.randn(8, exp.code_dim) * 0.3)
        part = torch.full((8, 4), -2.0)
        part[torch.arange(8), torch.arange(8) % 4] = 2.0
        exp.adjacency_logits[0].copy_(part)
    pos, trans, adjs = exp.codebooks()
    from lfi_fast import hyperbolic as hyp

    # the adjacency that links every parent to its nearest child beats a shuffled one
    d = hyp.pairwise_dist(trans[0], pos[1])
    near = torch.nn.functional.one_hot(d.argmin(1), 4).float()
    shuffled = near[:, torch.tensor([1, 2, 3, 0])]
    l_near = exp.hierarchy_loss(trans[:1], pos[:2], [near])
    l_shuf = exp.hierarchy_loss(trans[:1], pos[:2], [shuffled])
    assert l_near.item() < l_shuf.item()


def test_adjacency_edges_can_be_added_and_removed():
    exp = HyperbolicRuleExplainer(_small_config(codebook_sizes=[4, 2]))
    with torch.no_grad():
        exp.adjacency_logits[0].copy_(torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0]]))
    a = exp.adjacency(0)
    assert torch.equal(a.detach(), (exp.adjacency_logits[0] > 0).float())
    # straight-through: a loss asking for the transposed pattern flips edges both ways
    want = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    opt = torch.optim.SGD(exp.adjacency_logits.parameters(), lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        ((exp.adjacency(0) - want) ** 2).sum().backward()
        opt.step()
    assert torch.equal(exp.adjacency(0, straight_through=False), want)
    # a child without a parent gets its most likely one
    with torch.no_grad():
        exp.adjacency_logits[0].copy_(torch.tensor([[1.0, -3.0], [1.0, -1.0], [1.0, -2.0], [1.0, -4.0]]))
    assert exp.adjacency(0, straight_through=False)[:, 1].tolist() == [0, 1, 0, 0]


def test_geodesics_are_geodesic():
    from lfi_fast import hyperbolic as hyp

    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 2, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(5, 2, generator=g, dtype=torch.float64) * 0.4
    pts = geodesics(a, b, 1.0, steps=9)
    torch.testing.assert_close(pts[:, 0], a)
    torch.testing.assert_close(pts[:, -1], b)
    total = hyp.dist(a, b)
    via = hyp.dist(a[:, None], pts) + hyp.dist(pts, b[:, None])
    torch.testing.assert_close(via, total[:, None].expand_as(via), rtol=1e-6, atol=1e-6)


def test_rules_from_codes():
    codes = [[0, 1, 2, 3], [0, 0, 1, 1], [1, 1, 1, 0]]
    rules, tree = local_rules(codes, [1.0, 2.0, 0.5, -1.0])
    assert [r["symbol"] for r in rules] == ["s2_1"]          # s2_0 contributes -1: no rule
    assert rule_text(7, rules[0]) == "7 <- s2_1 <- (s1_0 <- (s0_1, s0_0), s1_1 <- (s0_2))"
    assert [0, 2, 1] in tree["edges"] and [1, 1, 0] in tree["edges"] and len(tree["edges"]) == 7


def test_bad_input(trained, digits):
    exp, _, _ = trained
    with pytest.raises(ValueError, match="feature_layer 'nope' does not exist"):
        HyperbolicRuleExplainer(_small_config(feature_layer="nope"))
    with pytest.raises(ValueError, match="shrink"):
        HyperbolicRuleExplainer(_small_config(codebook_sizes=[16, 32, 4]))
    with pytest.raises(ValueError, match="codebook_sizes"):
        HyperbolicRuleExplainer(_small_config(codebook_sizes=[]))
    with pytest.raises(ValueError, match="feature_layer 'fc' must output"):
        HyperbolicRuleExplainer(_small_config(feature_layer="fc"))
    with pytest.raises(ValueError, match="unknown config fields"):
        default_config("mnist", codebooks=[4])
    with pytest.raises(ValueError, match="inputs must be"):
        exp.explain(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="target must be in"):
        exp.explain(torch.zeros(2, 1, 28, 28), target=10)
    with pytest.raises(RuntimeError, match="not trained"):
        HyperbolicRuleExplainer(_small_config()).explain(torch.zeros(2, 1, 28, 28))
