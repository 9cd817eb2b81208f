"""FLINT interpreter (lfi_fast.explain.flint): the reduced pipeline on digits (fit, evaluate,
explain, report, save/load), the maths (relevance, CNS, conciseness loss), batched AM+PI against
the one-pair-at-a-time loop, hooks on any module (several taps, post-hoc mode), and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lfi_fast.data import load_dataset
from lfi_fast.explain import flint
from lfi_fast.explain.flint import FlintConfig, FlintInterpreter, default_config

KEYS = {
    "accuracy_f",
    "accuracy_g",
    "fidelity",
    "cns_1.5",
    "cns_2",
    "cns_2.5",
    "cns_3",
    "cns_4",
    "cns_5",
}
FAST_AM = {"am_rounds": 2, "am_steps": 4}


@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits", "train", image_size=28, limit=400)
    te = load_dataset("digits", "test", image_size=28, limit=200)
    return tr, te


@pytest.fixture(scope="module")
def trained(digits):
    """A short run on 400 digits, 2 x 50 steps (the reduced version of the recorded MNIST run)."""
    torch.manual_seed(0)
    tr, _ = digits
    cfg = default_config(
        "digits", epochs=2, batch_size=8, lr=3e-3, beta_from=1, eta_from=2, delta_from=2, **FAST_AM
    )
    exp = FlintInterpreter(cfg)
    hist = exp.fit(
        DataLoader(tr, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
        progress=False,
    )
    return exp, hist


def test_pipeline_beats_chance_and_round_trips(trained, digits, tmp_path):
    exp, hist = trained
    _, te = digits
    assert len(hist["loss"]) == 2 and all(math.isfinite(v) for v in hist["loss"])
    assert (
        hist["conciseness"][0] == 0.0 and hist["conciseness"][1] != 0.0
    )  # delta switched on at epoch 2
    assert bool(exp.classifier_ready)
    m = exp.evaluate(DataLoader(te, batch_size=100), progress=False)
    assert set(m) == KEYS
    assert m["accuracy_f"] > 0.5 and m["accuracy_g"] > 0.3 and m["fidelity"] > 0.3  # chance: 0.1
    for t in (1.5, 2, 2.5, 3, 4, 5):
        assert 1.0 <= m[f"cns_{t:g}"] <= exp.config.n_attributes
    assert m["cns_1.5"] <= m["cns_2"] <= m["cns_3"] <= m["cns_5"]

    exp.save(tmp_path / "ck")
    back = FlintInterpreter.load(tmp_path / "ck")
    assert back.config == exp.config and bool(back.classifier_ready)
    x = te.tensors[0][:6]
    a, b = exp.explain(x), back.explain(x)
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k
    assert back.evaluate(DataLoader(te, batch_size=100), progress=False) == m
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    doc["method"] = "hyperbolic"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'hyperbolic', not 'flint'"):
        FlintInterpreter.load(tmp_path / "ck")


def test_explain_fields_and_batch_independence(trained, digits):
    exp, _ = trained
    x = digits[1].tensors[0][:4]
    res = exp.explain(x, n_visualize=2, rounds=2, steps=3)
    B, J = 4, exp.config.n_attributes
    assert res.attributes.shape == (B, J) and res.relevance.shape == (B, J)
    assert res.top_attributes.shape == (B, 3) and res.am_pi.shape == (B, 2, 1, 28, 28)
    assert torch.equal(res.target, res.prediction_g)
    # the top relevance is 1 (normalised by the largest |contribution|, which is positive here)
    assert torch.allclose(res.relevance.abs().amax(1), torch.ones(B))
    assert torch.equal(res.top_attributes[:, 0], res.relevance.argmax(1))
    # halves with their dataset indices give the same rows (no randomness, batched AM+PI exact per pair)
    h1 = exp.explain(x[:2], index=torch.arange(2), n_visualize=2, rounds=2, steps=3)
    h2 = exp.explain(x[2:], index=torch.arange(2, 4), n_visualize=2, rounds=2, steps=3)
    for k, v in res.tensors().items():
        torch.testing.assert_close(
            torch.cat([h1.tensors()[k], h2.tensors()[k]]), v, atol=1e-5, rtol=1e-5
        )
    # an explicit target changes what the relevance is computed for
    other = (res.prediction_g + 1) % 10
    res2 = exp.explain(x, target=other)
    assert torch.equal(res2.target, other)
    w = exp.weight.detach()
    expect = res.attributes * w[other]
    expect = expect / expect.abs().amax(1, keepdim=True)
    torch.testing.assert_close(res2.relevance, expect)
    fig = res.plot()
    assert len(fig.axes) == 4 * 4


def test_report_writes_figures(trained, digits, tmp_path):
    exp, _ = trained
    paths = exp.report(
        DataLoader(digits[1], batch_size=100), tmp_path, limit=120, n_local=2, rounds=1, steps=2
    )
    assert [p.name for p in paths] == [
        "flint_class_attributes.png",
        "flint_global_relevance.png",
        "flint_local_explanation.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_am_pi_batched_equals_one_pair_at_a_time():
    torch.manual_seed(1)
    exp = FlintInterpreter(FlintConfig(n_attributes=6)).eval()
    x = torch.rand(3, 1, 28, 28)
    pairs_x = x.repeat_interleave(2, 0)
    attrs = torch.tensor([0, 5, 2, 3, 1, 4])
    kw = {"rounds": 2, "steps": 3}
    batched = exp.am_pi(pairs_x, attrs, **kw)
    single = torch.cat([exp.am_pi(pairs_x[i : i + 1], attrs[i : i + 1], **kw) for i in range(6)])
    # equal up to float32 rounding (batched convolutions sum in another order)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)

    # it maximises: the objective (activation - penalties) rises from the partial initialisation
    def objective(imgs):
        with torch.no_grad():
            phi = exp.attributes(imgs)[torch.arange(6), attrs]
        c = exp.config
        outside = ((imgs > 1) | (imgs < 0)).float() * imgs.abs()
        return (
            c.am_weight * phi
            - c.am_bound * outside.flatten(1).mean(1)
            - c.am_tv * flint.total_variation(imgs)
        )

    assert (objective(batched) > objective(0.3 * pairs_x)).all()
    assert not any(p.grad is not None for p in exp.parameters())  # only the images get gradients
    assert exp.am_pi(pairs_x[:0], attrs[:0], **kw).shape == (0, 1, 28, 28)


def test_relevance_conciseness_maths():
    phi = torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.9, 1.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 4.0, 1.0]])
    r = flint.local_relevance(phi, w, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(r[0], torch.tensor([0.5, 1.0, 0.25, 0.0]))
    torch.testing.assert_close(r[1], torch.zeros(4))  # no contribution: 0, not NaN
    torch.testing.assert_close(r[2], torch.tensor([6.0, 1.0, 3.6, 1.0]) / 6)
    cns = flint.conciseness(r)
    # tau 1.5: > 2/3 -> 1, 0, 1 attributes; tau 2: > 0.5 -> 1, 0, 2; tau 5: > 0.2 -> 3, 0, 2
    assert cns["cns_1.5"] == pytest.approx(2 / 3) and cns["cns_2"] == pytest.approx(1.0)
    assert cns["cns_5"] == pytest.approx(5 / 3)
    # the conciseness loss: a batch of one-hot-like samples on different attributes is lower than a
    # batch whose samples all spread evenly
    spread = torch.ones(4, 4)
    peaked = torch.eye(4) * 20
    assert flint.conciseness_loss(peaked) < flint.conciseness_loss(spread)
    torch.testing.assert_close(flint.conciseness_loss(spread), torch.tensor(0.0))
    p = torch.softmax(peaked[0], 0)
    torch.testing.assert_close(flint.conciseness_loss(peaked), -(p * p.log()).sum() - math.log(4))
    # soft cross-entropy against equal logits is the entropy
    z = torch.randn(5, 3)
    torch.testing.assert_close(flint.soft_cross_entropy(z, z), flint._entropy(z).mean())


class TwoTapNet(nn.Module):
    """A user model that is not an nn.Sequential, tuple output, with a conv and a dense tap."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(1, 4, 3, padding=1)),
                    ("act", nn.ReLU()),
                    ("pool", nn.MaxPool2d(4)),
                ]
            )
        )
        self.dense = nn.Linear(4 * 7 * 7, 16)
        self.head = nn.Linear(16, 10)
        self.head_calls = 0

    def forward(self, x):
        h = torch.relu(self.dense(self.body(x).flatten(1)))
        self.head_calls += 1
        return self.head(h), h


def test_hooks_on_any_module_several_taps_post_hoc():
    torch.manual_seed(2)
    net = TwoTapNet()
    cfg = FlintConfig(
        classifier="module:unused",
        tap_layers=["body.pool", "dense"],
        n_attributes=5,
        post_hoc=True,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        beta_from=1,
        eta_from=1,
        delta_from=1,
    )
    exp = FlintInterpreter(cfg, classifier=net)
    assert bool(exp.classifier_ready) and len(exp.psi.branches) == 2
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    psi_before = [p.clone() for p in exp.psi.parameters()]
    hist = exp.fit(DataLoader(TensorDataset(x, y), batch_size=8), progress=False)
    assert hist["ce"] == [0.0]  # post-hoc: no CE term
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # f frozen
    assert any(not torch.equal(a, b) for a, b in zip(psi_before, exp.psi.parameters()))
    calls = net.head_calls
    phi = exp.attributes(x)
    assert net.head_calls == calls  # stopped after the last tap: the head did not run
    lf, phi2, lg = exp(x)
    torch.testing.assert_close(phi, phi2)
    assert lf.shape == lg.shape == (16, 10) and phi.shape == (16, 5)


def test_post_hoc_trains_an_unready_builtin_classifier_first():
    torch.manual_seed(3)
    cfg = FlintConfig(post_hoc=True, epochs=1, batch_size=8, classifier_epochs=1, n_attributes=4)
    exp = FlintInterpreter(cfg)
    assert not bool(exp.classifier_ready)
    ds = TensorDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    hist = exp.fit(DataLoader(ds, batch_size=8), progress=False)
    assert bool(exp.classifier_ready) and len(hist["classifier_loss"]) == 1
    assert not any(p.requires_grad for p in exp.classifier.parameters())


def test_bad_input():
    with pytest.raises(ValueError, match="tap_layers 'nope' does not exist"):
        FlintInterpreter(FlintConfig(tap_layers=["nope"]))
    with pytest.raises(ValueError, match="n_attributes must be an int >= 2"):
        FlintInterpreter(FlintConfig(n_attributes=1))
    with pytest.raises(ValueError, match="tap_layers must be a non-empty list"):
        FlintInterpreter(FlintConfig(tap_layers=[]))
    with pytest.raises(ValueError, match="num_classes=7"):
        FlintInterpreter(
            FlintConfig(num_classes=7),
            classifier=nn.Sequential(
                OrderedDict([("tap", nn.Flatten()), ("fc", nn.Linear(784, 10))])
            ),
        )
    with pytest.raises(ValueError, match="unknown FlintConfig fields"):
        default_config("mnist", J=3)
    with pytest.raises(ValueError, match="data must be one of"):
        default_config("cifar")
    exp = FlintInterpreter(FlintConfig(n_attributes=4))
    with pytest.raises(ValueError, match=r"inputs must be \(N, 1, 28, 28\)"):
        exp.explain(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"inputs must be \(N, 1, 28, 28\)"):
        exp.fit(
            DataLoader(
                TensorDataset(torch.rand(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)),
                batch_size=2,
            ),
            progress=False,
        )
    with pytest.raises(ValueError, match="inputs must be finite"):
        exp.explain(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="target out of range"):
        exp.explain(torch.rand(2, 1, 28, 28), target=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="n_visualize must be <= n_top"):
        exp.explain(torch.rand(2, 1, 28, 28), n_top=2, n_visualize=3)
    with pytest.raises(ValueError, match=r"attributes must be in \[0, 4\)"):
        exp.am_pi(torch.rand(1, 1, 28, 28), torch.tensor([4]))
    with pytest.raises(ValueError, match="unknown AM\\+PI options"):
        exp.am_pi(torch.rand(1, 1, 28, 28), torch.tensor([0]), step=3)
    with pytest.raises(ValueError, match="labels must be in"):
        exp.fit(
            DataLoader(TensorDataset(torch.rand(4, 1, 28, 28), torch.full((4,), 12)), batch_size=2),
            progress=False,
        )


def test_lr_decay_schedule():
    """The last lr_decay_epochs epochs of the schedule run at lr * lr_decay; bad values refused."""
    exp = FlintInterpreter(FlintConfig(n_attributes=3, epochs=5, lr=1e-3, lr_decay_epochs=2))
    assert [exp._lr(e) for e in range(1, 6)] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4])
    const = FlintInterpreter(FlintConfig(n_attributes=3, epochs=5, lr=1e-3))
    assert {const._lr(e) for e in range(1, 6)} == {1e-3}
    with pytest.raises(ValueError, match="lr_decay must be in"):
        FlintInterpreter(FlintConfig(lr_decay=0.0))
    with pytest.raises(ValueError, match="lr_decay_epochs"):
        FlintInterpreter(FlintConfig(lr_decay_epochs=-1))


def test_config_is_json_round_trippable():
    cfg = default_config("mnist")
    doc = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert FlintConfig(**doc) == cfg
    assert (
        FlintConfig().batch_size == 16 and FlintConfig().lr == 1e-4 and FlintConfig().epochs == 12
    )  # published


def test_by_design_trains_f_and_schedule_follows_start_epoch():
    torch.manual_seed(4)
    net = TwoTapNet()
    cfg = FlintConfig(
        classifier="module:unused",
        tap_layers=["dense"],
        n_attributes=3,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        beta_from=1,
        gamma_from=1,
        eta_from=3,
        delta_from=3,
    )
    exp = FlintInterpreter(cfg, classifier=net)
    ds = DataLoader(
        TensorDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))), batch_size=8
    )
    before = [p.clone() for p in net.parameters()]
    hist = exp.fit(ds, progress=False)
    assert hist["ce"][0] > 0 and hist["conciseness"] == [0.0]  # delta still off in epoch 1
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # f learns
    hist = exp.fit(ds, progress=False, start_epoch=3)
    assert hist["conciseness"][0] != 0.0  # epoch 3 of the schedule: delta on
    with pytest.raises(ValueError, match="start_epoch"):
        exp.fit(ds, progress=False, start_epoch=0)
