"""The supervised-VAE invariance explainer on a reduced run (a few hundred digits at 28x28, a few
short epochs): the whole pipeline (fit, evaluate, explain, attributions, figures, save/load), the
invariant and contrast samples against a per-sample decode of the reference noise, per-example
randomness, integrated gradients against Captum, post-hoc mode, and bad input."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lfi_fast
from conftest import backends_for
from lfi_fast.data import load_dataset
from lfi_fast.explain import invariance as inv
from lfi_fast.reference import nuisance as ref

SMALL = dict(width=8, hidden=64, head_hidden=32, supervised_dims=6, nuisance_dims=4, epochs=6,
             batch_size=32, lr=3e-3, n_samples=6, eval_samples=6, ig_steps=8, ig_samples=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, loaded machine two spinning OpenMP threads are many times
    slower than one (the sizes here are too small to gain from two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", "train", image_size=28, limit=384)
    test = load_dataset("digits", "test", image_size=28, limit=128)
    return train, test


@pytest.fixture(scope="module")
def trained(digits):
    train, _ = digits
    torch.manual_seed(0)
    exp = inv.InvarianceExplainer(inv.default_config("digits", **SMALL))
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    history = exp.fit(loader, progress=False)
    return exp, history


def test_fit_and_metrics_beat_chance(trained, digits):
    exp, history = trained
    _, test = digits
    assert set(history) >= {"loss", "recon_bce", "kl", "ce", "accuracy", "seconds"}
    assert all(len(v) == SMALL["epochs"] for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    m = exp.evaluate(DataLoader(test, batch_size=50), progress=False)
    assert set(m) == {"accuracy", "invariance_rate", "flip_rate", "recon_bce"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    # chance: 0.1 accuracy; a constant predictor has invariance 1 but flip 0; a constant 0.5
    # image costs 784 ln 2 = 543 nats
    assert m["accuracy"] > 0.4, m
    assert m["invariance_rate"] > 0.5, m
    assert m["flip_rate"] > 0.3, m
    assert m["recon_bce"] < 0.8 * 784 * math.log(2), m
    assert exp.evaluate(DataLoader(test, batch_size=50), progress=False) == m  # same seed, same noise


def _expected_samples(exp, x, index, n, seed, contrast):
    """The invariant (or contrast) samples decoded one by one from the reference noise."""
    cfg = exp.config
    ds, dn = cfg.supervised_dims, cfg.nuisance_dims
    drawn = ds if contrast else dn
    stream = inv._derive_seed(seed, 1 if contrast else 0)
    out = []
    with torch.no_grad():
        mu, _ = exp.encode(x)
        for b in range(len(x)):
            eps = ref.noise(stream, int(index[b]) * ref.counters(n, drawn), n, drawn)
            kept = mu[b:b + 1].expand(n, -1)
            z = torch.cat((eps, kept[:, ds:]), 1) if contrast else torch.cat((kept[:, :ds], eps), 1)
            out.append(exp.decode(z))
    return torch.stack(out)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_samples_match_per_sample_decode(trained, digits, backend):
    exp, _ = trained
    x = digits[1].tensors[0][:5]
    index = torch.tensor([3, 4, 10, 11, 40])
    n, seed = 5, 123
    with lfi_fast.use_backend(backend):  # the fused sampling + first decoder layer
        res = exp.explain(x, index=index, seed=seed, n_samples=n, attribute=False)
    assert res.samples.shape == (5, n, 1, 28, 28) and res.contrast.shape == (5, n, 1, 28, 28)
    torch.testing.assert_close(res.samples, _expected_samples(exp, x, index, n, seed, False),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.contrast, _expected_samples(exp, x, index, n, seed, True),
                               atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        pred = exp.classify(x).argmax(1)
        cls = exp.classify(res.samples.flatten(0, 1)).argmax(1).reshape(5, n)
        con = exp.classify(res.contrast.flatten(0, 1)).argmax(1).reshape(5, n)
    assert torch.equal(res.prediction, pred) and torch.equal(res.sample_classes, cls)
    assert torch.equal(res.contrast_classes, con)
    torch.testing.assert_close(res.invariance, (cls == pred[:, None]).float().mean(1))
    torch.testing.assert_close(res.flip, (con != pred[:, None]).float().mean(1))
    # z_s kept: the samples of one input differ from each other only through z_n
    assert not torch.equal(res.samples[:, 0], res.samples[:, 1])


def test_noise_depends_on_seed_and_index_only(trained, digits):
    exp, _ = trained
    x = digits[1].tensors[0][:7]
    index = torch.tensor([20, 21, 22, 5, 6, 7, 8])
    whole = exp.explain(x, index=index, seed=7, n_samples=4, ig_samples=2)
    halves = [exp.explain(x[s], index=index[s], seed=7, n_samples=4, ig_samples=2)
              for s in (slice(0, 3), slice(3, 7))]
    for name, t in whole.tensors().items():
        torch.testing.assert_close(t, torch.cat([getattr(h, name) for h in halves]), atol=1e-5,
                                   rtol=1e-4, msg=name)
    other = exp.explain(x, index=index, seed=8, n_samples=4, attribute=False)
    assert not torch.equal(other.samples, whole.samples)


def test_attributions(trained, digits):
    exp, _ = trained
    x = digits[1].tensors[0][:3]
    res = exp.explain(x, n_samples=4, ig_samples=3, n_steps=16)
    for t in (res.attribution, res.attribution_mean, res.attribution_var):
        assert t.shape == x.shape and torch.isfinite(t).all()
    assert (res.attribution_var >= 0).all() and res.attribution.abs().sum() > 0
    # the maps are IG of the predicted class on the input and on the first 3 invariant samples
    a = exp.attribute(torch.cat((x, res.samples[:, :3].flatten(0, 1))),
                      torch.cat((res.prediction, res.prediction.repeat_interleave(3))),
                      n_steps=16, backend="builtin")
    torch.testing.assert_close(res.attribution, a[:3], atol=1e-5, rtol=1e-3)
    per = a[3:].reshape(3, 3, *x.shape[1:])
    torch.testing.assert_close(res.attribution_mean, per.mean(1), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(res.attribution_var, per.var(1, unbiased=False), atol=1e-6, rtol=1e-3)
    none = exp.explain(x, n_samples=2, attribute=False, contrast=False)
    assert none.attribution.numel() == 0 and none.contrast.shape == (3, 0, 1, 28, 28)
    fig = res.plot()
    assert len(fig.axes) > 0


def _smooth_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 4)).double()


@pytest.mark.parametrize("method", inv.IG_METHODS)
def test_builtin_ig_matches_captum(method):
    captum_attr = pytest.importorskip("captum.attr")
    net = _smooth_net()
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    base = torch.rand(5, 1, 6, 6, dtype=torch.float64) * 0.1
    target = torch.tensor([0, 3, 1, 2, 3])
    ours = inv.integrated_gradients(net, x, target, base, n_steps=12, method=method,
                                    internal_batch_size=7)
    theirs = captum_attr.IntegratedGradients(net).attribute(x, baselines=base, target=target,
                                                            n_steps=12, method=method)
    # Captum rounds its step sizes to float32 (relative 6e-8); the rest is float64 on both sides
    torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=3e-7)


def test_builtin_ig_completeness():
    net = _smooth_net()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    target = torch.tensor([1, 0, 3, 2])
    a = inv.integrated_gradients(net, x, target, None, n_steps=64)
    with torch.no_grad():
        gap = net(x).gather(1, target[:, None])[:, 0] - net(torch.zeros_like(x)).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(a.flatten(1).sum(1), gap, atol=1e-8, rtol=1e-6)


def test_explainer_ig_backends_agree(trained, digits):
    pytest.importorskip("captum")
    exp, _ = trained
    x = digits[1].tensors[0][:4]
    t = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(exp.attribute(x, t, n_steps=8, backend="captum"),
                               exp.attribute(x, t, n_steps=8, backend="builtin"), atol=1e-5, rtol=1e-3)


def test_save_load_round_trip(trained, digits, tmp_path):
    exp, _ = trained
    x = digits[1].tensors[0][:4]
    exp.save(tmp_path / "ckpt")
    back = inv.InvarianceExplainer.load(tmp_path / "ckpt")
    assert back.config == exp.config and bool(back.fitted)
    a = exp.explain(x, n_samples=3, ig_samples=2, seed=5)
    b = back.explain(x, n_samples=3, ig_samples=2, seed=5)
    for name, t in a.tensors().items():
        torch.testing.assert_close(getattr(b, name), t, atol=0, rtol=0, msg=name)
    # another method's checkpoint is refused, naming both methods
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    doc["method"] = "flint"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'flint', not 'invariance'"):
        inv.InvarianceExplainer.load(tmp_path / "ckpt")


def test_report_and_traversal(trained, digits, tmp_path):
    exp, _ = trained
    _, test = digits
    trav = exp.traversal(test.tensors[0][:2], values=(-1.0, 0.0, 1.0))
    assert trav.shape == (2, SMALL["nuisance_dims"], 3, 1, 28, 28)
    paths = exp.report(DataLoader(test, batch_size=2), tmp_path, n_inputs=2, n_samples=3)
    assert [p.name for p in paths] == ["invariant_samples.png", "nuisance_traversals.png", "attributions.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_posthoc_distils_a_frozen_classifier(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    cfg = inv.default_config("digits", mode="posthoc", classifier_epochs=2, cycle=0.3, **SMALL)
    exp = inv.InvarianceExplainer(cfg)
    assert not bool(exp.classifier_ready)
    assert any(k.startswith("classifier.") for k in exp.state_dict())
    exp.fit(DataLoader(train, batch_size=32, shuffle=True), progress=False)
    assert bool(exp.classifier_ready)
    assert all(not p.requires_grad for p in exp.classifier.parameters())
    x, y = test.tensors
    with torch.no_grad():
        teacher = exp.classifier(x).argmax(1)
        student = exp.head(exp.encode(x)[0][:, :cfg.supervised_dims]).argmax(1)
    assert (teacher == y).float().mean() > 0.5
    assert (student == teacher).float().mean() > 0.5  # the head reproduces the frozen classifier
    res = exp.explain(x[:3], n_samples=4, ig_samples=2)
    with torch.no_grad():  # in post-hoc mode the samples are classified by the frozen classifier
        assert torch.equal(res.sample_classes, exp.classifier(res.samples.flatten(0, 1)).argmax(1).reshape(3, 4))
    m = exp.evaluate(DataLoader(test, batch_size=64), progress=False)
    assert set(m) == {"accuracy", "invariance_rate", "flip_rate", "recon_bce"}
    exp.save(tmp_path / "p")
    back = inv.InvarianceExplainer.load(tmp_path / "p")
    assert bool(back.classifier_ready)
    torch.testing.assert_close(back.classify(x[:8]), exp.classify(x[:8]), atol=0, rtol=0)
    # a given (pretrained) classifier is not retrained
    given = exp.classifier
    before = {k: v.clone() for k, v in given.state_dict().items()}
    other = inv.InvarianceExplainer(dataclasses.replace(cfg, epochs=1), classifier=given)
    assert bool(other.classifier_ready)
    other.fit(DataLoader(train, batch_size=64), progress=False)
    assert all(torch.equal(before[k], v) for k, v in given.state_dict().items())


def test_cycle_term_trains_the_decoder_only(trained, digits):
    exp, _ = trained
    x = digits[1].tensors[0][:4]
    exp.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    frozen = exp._classify_frozen(x)
    torch.testing.assert_close(frozen, exp.classify(x))
    frozen.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in exp.parameters())
    exp.zero_grad(set_to_none=True)


def test_bad_input(trained):
    exp, _ = trained
    good = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"inputs must be \(N, 1, 28, 28\)"):
        exp.explain(torch.rand(2, 1, 27, 28))
    with pytest.raises(ValueError, match=r"inputs must be \(N, 1, 28, 28\)"):
        exp.explain(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        exp.explain(good, n_samples=0)
    with pytest.raises(ValueError, match="target out of range"):
        exp.explain(good, target=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="index must be"):
        exp.explain(good, index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="inputs must be finite"):
        exp.explain(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="ig_samples must be"):
        exp.explain(good, ig_samples=0)
    with pytest.raises(RuntimeError, match="not trained"):
        inv.InvarianceExplainer(inv.Config()).explain(good)
    with pytest.raises(ValueError, match="cycle_fraction must be in"):
        inv.InvarianceExplainer(inv.Config(cycle_fraction=0.0))
    with pytest.raises(ValueError, match="nuisance_beta must be a finite number"):
        inv.InvarianceExplainer(inv.Config(nuisance_beta=-1.0))
    with pytest.raises(ValueError, match="mode must be one of"):
        inv.InvarianceExplainer(inv.Config(mode="other"))
    with pytest.raises(ValueError, match="image_size must be a multiple of 4"):
        inv.InvarianceExplainer(inv.Config(image_size=30))
    with pytest.raises(ValueError, match="supervised_dims must be an int >= 1"):
        inv.InvarianceExplainer(inv.Config(supervised_dims=0))
    with pytest.raises(ValueError, match="mode 'posthoc'"):
        inv.InvarianceExplainer(inv.Config(), classifier=nn.Linear(2, 2))
    assert inv.default_config("mnist", classifier="builtin:FlintNet").mode == "posthoc"
    assert inv.default_config("mnist", classifier="builtin:FlintNet", mode="design").mode == "design"
    with pytest.raises(ValueError, match="unknown config fields"):
        inv.default_config("mnist", latent=3)
    with pytest.raises(ValueError, match="data must be one of"):
        inv.default_config("cifar")
    with pytest.raises(ValueError, match="train_loader images must be"):
        inv.InvarianceExplainer(inv.Config(epochs=1)).fit([(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))],
                                                          progress=False)


def test_command_writes_metrics(tmp_path):
    doc = inv.main(["--data", "digits", "--limit", "96", "--epochs", "1", "--out", str(tmp_path / "run"),
                    "--threads", str(torch.get_num_threads()), "--no-figures"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"accuracy", "invariance_rate", "flip_rate", "recon_bce", "train_seconds"} <= set(saved)
    assert saved["accuracy"] == doc["accuracy"] and saved["epochs"] == 1
    assert (tmp_path / "run" / "checkpoint" / "weights.safetensors").is_file()
