"""lfi_fast.nuisance on every backend: the noise stream's layout, parity with the reference on
explicit noise (float64 to 1e-10), the same noise for the same seed on every backend, the noise's
distribution, gradients (gradcheck in float64, both priors), opcheck, torch.compile, every
activation, bad input, empty batch, non-contiguous inputs, sample_decode chunking, invariance_score
and the fuzz harness."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, TOL, assert_rows_close, backends_for, device_backend_params, triton_kernel
from fuzz import check_op_against_reference, fuzz_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lfi_fast
from lfi_fast import nuisance
from lfi_fast.reference import nuisance as ref
from lfi_fast.reference import random as rr

F64, F32 = torch.float64, torch.float32
PARAMS_SAMPLE = device_backend_params("nuisance", "nuisance_sample")
PARAMS_LINEAR = device_backend_params("nuisance", "nuisance_sample_linear")
PRIORS = ("standard", "posterior")


def latent(gen, b, d, dtype=F64, device="cpu", scale=1.0):
    mu = (torch.randn(b, d, generator=gen, dtype=F64) * scale).to(dtype).to(device)
    logvar = (torch.randn(b, d, generator=gen, dtype=F64) * 0.5).to(dtype).to(device)
    return mu, logvar


def layer(gen, h, d, dtype=F64, device="cpu", bias=True):
    w = (torch.randn(h, d, generator=gen, dtype=F64) / math.sqrt(d)).to(dtype).to(device)
    b = (torch.randn(h, generator=gen, dtype=F64) * 0.1).to(dtype).to(device) if bias else None
    return w, b


def eps_for(gen, rows, dn, device="cpu"):
    return torch.randn(rows, dn, generator=gen, dtype=F64).to(device)


def run(backend, fn, *args, **kwargs):
    with lfi_fast.use_backend(backend):
        return fn(*args, **kwargs)


# ---- the stream ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dn", [1, 3, 4, 5, 8, 13])
def test_noise_layout_is_the_documented_stream(dn, seed):
    """eps[r, j] is normal number r * Dn4 + j of the stream: row r starts at counter
    offset + r * Dn4 / 4 (checked against rr.normal, row by row)."""
    rows, offset, dn4 = 7, 2**32 - 5, (dn + 3) // 4 * 4
    eps = ref.noise(seed, offset, rows, dn)
    assert eps.shape == (rows, dn) and eps.dtype == F32
    for r in range(rows):
        expect = rr.normal(seed, offset + r * dn4 // 4, dn)
        assert torch.equal(eps[r], expect)
    # a later block of rows is the same stream at a shifted offset
    assert torch.equal(ref.noise(seed, offset + 3 * dn4 // 4, rows - 3, dn), eps[3:])


# ---- parity with the reference on explicit noise ---------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize(("device", "backend"), PARAMS_SAMPLE)
def test_sample_explicit_noise(device, backend, prior, dtype, gen):
    b, d, ds, n = 6, 11, 4, 5
    mu, logvar = latent(gen, b, d, dtype, device)
    eps = eps_for(gen, b * n, d - ds, device)
    out = run(backend, nuisance.sample, mu, logvar, ds, n, prior=prior, noise=eps)
    expect = ref.sample(mu.double(), logvar.double(), ds, n, prior == "posterior", 0, 0, eps.to(dtype).double())
    assert out.dtype == dtype and out.device.type == device
    assert_rows_close(out, expect, dtype=dtype)
    # the supervised part is mu_s, exactly
    assert torch.equal(out[:, :ds], mu[:, :ds].repeat_interleave(n, 0))


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_sample_linear_explicit_noise(device, backend, dtype, activation, gen):
    b, d, ds, n, h = 5, 10, 3, 4, 37
    for prior in PRIORS:
        for bias in (True, False):
            mu, logvar = latent(gen, b, d, dtype, device, scale=2.0)
            w, bb = layer(gen, h, d, dtype, device, bias)
            eps = eps_for(gen, b * n, d - ds, device)
            out = run(backend, nuisance.sample_linear, mu, logvar, ds, n, w, bb, activation,
                      negative_slope=0.2, prior=prior, noise=eps)
            expect = ref.sample_linear(mu.double(), logvar.double(), ds, n, w.double(),
                                       None if bb is None else bb.double(), activation, 0.2,
                                       prior == "posterior", 0, 0, eps.to(dtype).double())
            assert out.shape == (b * n, h) and out.dtype == dtype
            assert_rows_close(out, expect, dtype=dtype, tol=TOL[dtype] * (1 if dtype == F64 else 4),
                              what=f"{prior} bias={bias}")


@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_edges_huge_tiny_zeros(device, backend, gen):
    d, ds, n, h = 9, 4, 3, 16
    w, bb = layer(gen, h, d, F64, device)
    cases = {
        "zeros": torch.zeros(4, d, dtype=F64),
        "tiny": torch.full((4, d), 1e-300, dtype=F64),
        "huge": torch.full((4, d), 1e150, dtype=F64) * torch.randn(4, d, generator=gen, dtype=F64).sign(),
    }
    for name, mu in cases.items():
        mu = mu.to(device)
        logvar = torch.zeros_like(mu)
        eps = eps_for(gen, 4 * n, d - ds, device)
        for prior in PRIORS:
            out = run(backend, nuisance.sample_linear, mu, logvar, ds, n, w, bb, "silu", prior=prior, noise=eps)
            expect = ref.sample_linear(mu, logvar, ds, n, w, bb, "silu", 0.01, prior == "posterior", 0, 0, eps)
            assert_rows_close(out, expect, dtype=F64, what=f"{name} {prior}")
            z = run(backend, nuisance.sample, mu, logvar, ds, n, prior=prior, noise=eps)
            assert_rows_close(z, ref.sample(mu, logvar, ds, n, prior == "posterior", 0, 0, eps),
                              dtype=F64, what=f"sample {name} {prior}")


@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_empty_batch_and_non_contiguous(device, backend, gen):
    d, ds, n, h = 8, 3, 4, 12
    w, bb = layer(gen, h, d, F64, device)
    mu0 = torch.zeros(0, d, dtype=F64, device=device)
    out = run(backend, nuisance.sample_linear, mu0, mu0, ds, n, w, bb, "relu", seed=3)
    assert out.shape == (0, h)
    assert run(backend, nuisance.sample, mu0, mu0, ds, n, seed=3).shape == (0, d)
    # non-contiguous mu, logvar (transposed, strided) and weight (transposed)
    mu_t = torch.randn(d, 6, generator=gen, dtype=F64).to(device).t()
    lv_s = torch.randn(6, 2 * d, generator=gen, dtype=F64).to(device)[:, ::2]
    w_t = torch.randn(d, h, generator=gen, dtype=F64).to(device).t()
    assert not mu_t.is_contiguous() and not lv_s.is_contiguous() and not w_t.is_contiguous()
    eps = eps_for(gen, 6 * n, d - ds, device)
    for prior in PRIORS:
        out = run(backend, nuisance.sample_linear, mu_t, lv_s, ds, n, w_t, bb, "gelu", prior=prior, noise=eps)
        expect = ref.sample_linear(mu_t, lv_s, ds, n, w_t, bb, "gelu", 0.01, prior == "posterior", 0, 0, eps)
        assert_rows_close(out, expect, dtype=F64)
        out = run(backend, nuisance.sample_linear, mu_t, lv_s, ds, n, w_t, bb, "gelu", prior=prior, seed=11)
        expect = ref.sample_linear(mu_t, lv_s, ds, n, w_t, bb, "gelu", 0.01, prior == "posterior", 11, 0)
        assert_rows_close(out, expect, dtype=F64, tol=1e-6)


# ---- the same seed, the same noise, on every backend ---------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_same_seed_same_noise_as_reference(device, backend, gen):
    """With a fixed (seed, offset) every backend draws the reference's noise (the float transforms
    of Box-Muller may differ in float32's last bit, hence 1e-6)."""
    b, d, ds, n, h = 7, 13, 5, 6, 20  # Dn = 8; and below Dn = 3 (padded lanes unused)
    seed, offset = 0x1234_5678_9ABC, 2**32 - 7
    for d_, ds_ in ((d, ds), (8, 5)):
        mu, logvar = latent(gen, b, d_, F64, device)
        w, bb = layer(gen, h, d_, F64, device)
        for prior in PRIORS:
            z = run(backend, nuisance.sample, mu, logvar, ds_, n, prior=prior, seed=seed, offset=offset)
            assert_rows_close(z, ref.sample(mu, logvar, ds_, n, prior == "posterior", seed, offset),
                              dtype=F64, tol=1e-6, what=f"sample {prior}")
            out = run(backend, nuisance.sample_linear, mu, logvar, ds_, n, w, bb, "leaky_relu",
                      prior=prior, seed=seed, offset=offset)
            expect = ref.sample_linear(mu, logvar, ds_, n, w, bb, "leaky_relu", 0.01,
                                       prior == "posterior", seed, offset)
            assert_rows_close(out, expect, dtype=F64, tol=1e-6, what=f"sample_linear {prior}")


def test_same_seed_equal_across_backends(gen):
    """Outputs for one seed agree between every backend available on each device."""
    b, d, ds, n, h = 9, 16, 8, 5, 24
    outs = {}
    for device in DEVICES:
        mu, logvar = latent(gen, b, d, F32, "cpu")
        w, bb = layer(gen, h, d, F32, "cpu")
        for backend in backends_for(device):
            if backend == "triton" and triton_kernel("nuisance", "nuisance_sample_linear") is None:
                continue
            args = [t.to(device) for t in (mu, logvar)]
            outs[(device, backend)] = run(backend, nuisance.sample_linear, *args, ds, n, w.to(device),
                                          bb.to(device), "relu", seed=99, offset=5).cpu()
        first = next(iter(outs.values()))
        for key, out in outs.items():
            assert_rows_close(out, first, dtype=F32, tol=1e-5, what=str(key))
        outs.clear()


@pytest.mark.parametrize(("device", "backend"), PARAMS_SAMPLE)
def test_noise_distribution(device, backend, seed):
    """z_n under the standard prior: mean 0, standard deviation 1, no correlation between dims."""
    n_rows = 20_000 if backend != "triton" else 4_000
    b, n, d, ds = n_rows // 50, 50, 13, 5
    mu = torch.full((b, d), 3.0, dtype=F32, device=device)
    z = run(backend, nuisance.sample, mu, torch.zeros_like(mu), ds, n, seed=seed)[:, ds:].double().cpu()
    k = z.numel()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5 / math.sqrt(k)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(0.5 / k)
    per_dim = z.mean(0)  # each dim on its own (lanes of different parity, padding)
    assert per_dim.abs().max().item() < 5 / math.sqrt(z.shape[0])
    c = torch.corrcoef(z.t())
    assert (c - torch.eye(d - ds, dtype=F64)).abs().max().item() < 6 / math.sqrt(z.shape[0])
    # the posterior prior shifts and scales: z_n = mu_n + exp(logvar_n / 2) eps
    lv = torch.full_like(mu, math.log(4.0))
    zp = run(backend, nuisance.sample, mu, lv, ds, n, prior="posterior", seed=seed)[:, ds:].double().cpu()
    assert abs(zp.mean().item() - 3.0) < 10 / math.sqrt(k)
    assert abs(zp.std().item() - 2.0) < 10 * math.sqrt(0.5 / k)


def test_generator_reproduces_and_advances():
    mu = torch.randn(4, 6)
    g = torch.Generator().manual_seed(5)
    a = nuisance.sample(mu, mu, 2, 3, generator=g)
    b = nuisance.sample(mu, mu, 2, 3, generator=g)
    assert not torch.equal(a, b)
    g.manual_seed(5)
    assert torch.equal(nuisance.sample(mu, mu, 2, 3, generator=g), a)
    torch.manual_seed(1)
    c = nuisance.sample(mu, mu, 2, 3)
    torch.manual_seed(1)
    assert torch.equal(nuisance.sample(mu, mu, 2, 3), c)


@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_offsets_make_inputs_independent_of_the_batch(device, backend, gen):
    """Inputs b0.. of a batch, drawn alone at offset + b0 * counters_per_input, get the same noise."""
    b, d, ds, n, h = 6, 7, 2, 3, 9
    mu, logvar = latent(gen, b, d, F64, device)
    w, bb = layer(gen, h, d, F64, device)
    per = nuisance.counters_per_input(n, d - ds)
    full = run(backend, nuisance.sample_linear, mu, logvar, ds, n, w, bb, seed=42, offset=10)
    part = run(backend, nuisance.sample_linear, mu[2:5], logvar[2:5], ds, n, w, bb, seed=42, offset=10 + 2 * per)
    assert_rows_close(part, full[2 * n:5 * n], dtype=F64)


# ---- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_gradcheck(device, backend, prior, gen):
    b, d, ds, n, h = 3, 7, 3, 2, 5
    mu, logvar = latent(gen, b, d, F64, device)
    w, bb = layer(gen, h, d, F64, device)
    mu, logvar, w, bb = (t.requires_grad_() for t in (mu, logvar, w, bb))
    # the interpreted Triton kernels are slow: random projections (fast mode) and fewer activations
    fast = backend == "triton"
    acts = ("gelu", "leaky_relu") if fast else ("gelu", "silu", "none", "leaky_relu")
    with lfi_fast.use_backend(backend):
        for act in acts:  # relu's kink is away from the samples (leaky_relu has it too)
            torch.autograd.gradcheck(
                lambda m, lv, w_, b_: nuisance.sample_linear(m, lv, ds, n, w_, b_, act, negative_slope=0.3,
                                                             prior=prior, seed=7, offset=3),
                (mu, logvar, w, bb), fast_mode=fast)
        torch.autograd.gradcheck(
            lambda m, lv: nuisance.sample(m, lv, ds, n, prior=prior, seed=7, offset=3), (mu, logvar),
            fast_mode=fast)


@pytest.mark.parametrize("explicit", [True, False], ids=["noise", "stream"])
@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_gradients_match_reference(device, backend, explicit, gen):
    """Gradients of the backward ops against autograd through the reference: on explicit noise
    to float64 precision; on the stream (the backward regenerates the noise) up to the float32
    rounding of the Box-Muller transforms."""
    b, d, ds, n, h = 5, 12, 4, 6, 33
    # weight and bias gradients sum B * n terms that may cancel: 1e-8 on explicit float64 noise
    tol = 1e-8 if explicit else 1e-6
    for prior in PRIORS:
        for act in ref.ACTIVATIONS:
            mu, logvar = latent(gen, b, d, F64, device)
            w, bb = layer(gen, h, d, F64, device)
            eps = eps_for(gen, b * n, d - ds, device) if explicit else None
            leaves = [t.requires_grad_() for t in (mu, logvar, w, bb)]
            g = torch.randn(b * n, h, generator=gen, dtype=F64).to(device)
            out = run(backend, nuisance.sample_linear, *leaves[:2], ds, n, leaves[2], leaves[3], act,
                      prior=prior, seed=3, offset=1, noise=eps)
            got = torch.autograd.grad(out, leaves, g, allow_unused=True)
            ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
            ro = ref.sample_linear(ref_leaves[0], ref_leaves[1], ds, n, ref_leaves[2], ref_leaves[3], act, 0.01,
                                   prior == "posterior", 3, 1, eps)
            want = torch.autograd.grad(ro, ref_leaves, g, allow_unused=True)
            for name, a, e, t in zip(("mu", "logvar", "weight", "bias"), got, want, leaves):
                a = torch.zeros_like(t) if a is None else a
                e = torch.zeros_like(t) if e is None else e
                # the bias gradient sums B * n terms: judged as one row
                assert_rows_close(a, e, dtype=F64, tol=tol, dim=-1 if a.dim() == 2 else 0,
                                  what=f"grad {name} {prior} {act}")
            # the sample op too
            z = run(backend, nuisance.sample, leaves[0], leaves[1], ds, n, prior=prior, seed=3, offset=1, noise=eps)
            gz = torch.randn(b * n, d, generator=gen, dtype=F64).to(device)
            got = torch.autograd.grad(z, leaves[:2], gz, allow_unused=True)
            rz = ref.sample(ref_leaves[0], ref_leaves[1], ds, n, prior == "posterior", 3, 1, eps)
            want = torch.autograd.grad(rz, ref_leaves[:2], gz, allow_unused=True)
            for name, a, e, t in zip(("mu", "logvar"), got, want, leaves):
                a = torch.zeros_like(t) if a is None else a
                e = torch.zeros_like(t) if e is None else e
                assert_rows_close(a, e, dtype=F64, tol=tol, what=f"sample grad {name} {prior}")


# ---- opcheck ---------------------------------------------------------------------------------------


def _op_params():
    params = []
    for device in DEVICES:
        for op in ("nuisance_sample", "nuisance_sample_linear"):
            base = "cuda" if device == "cuda" else "cpp"
            if base in backends_for(device):
                params.append(pytest.param(device, op, id=f"{device}-{op}"))
            if "triton" in backends_for(device):
                marks = [pytest.mark.triton]
                if not hasattr(torch.ops.lfi_fast, f"{op}_triton") or triton_kernel("nuisance", op) is None:
                    marks.append(pytest.mark.skip(reason=f"{op}_triton is not registered"))
                params.append(pytest.param(device, f"{op}_triton", id=f"{device}-{op}_triton", marks=marks))
    return params


@pytest.mark.parametrize(("device", "op_name"), _op_params())
def test_opcheck(device, op_name, gen):
    if not hasattr(torch.ops.lfi_fast, op_name):
        pytest.skip(f"{op_name} is not compiled in yet")
    op = getattr(torch.ops.lfi_fast, op_name).default
    bwd_name = op_name.replace("_triton", "") + "_backward" + ("_triton" if op_name.endswith("_triton") else "")
    bwd = getattr(torch.ops.lfi_fast, bwd_name).default
    linear = "linear" in op_name
    b, d, ds, n, h = 4, 9, 3, 3, 6
    for dtype, prior, with_noise in ((F64, False, False), (F64, True, True), (F32, True, False)):
        mu, logvar = latent(gen, b, d, dtype, device)
        mu.requires_grad_()
        logvar.requires_grad_()
        noise = eps_for(gen, b * n, d - ds, device).to(dtype) if with_noise else None
        if linear:
            w, bb = layer(gen, h, d, dtype, device)
            w.requires_grad_()
            for bias, act in ((bb.requires_grad_(), "gelu"), (None, "leaky_relu")):
                args = (mu, logvar, ds, n, w, bias, act, 0.2, prior, 5, 8, noise)
                torch.library.opcheck(op, args)
                grad = torch.randn(b * n, h, generator=gen, dtype=F64).to(dtype).to(device)
                torch.library.opcheck(bwd, (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))
        else:
            args = (mu, logvar, ds, n, prior, 5, 8, noise)
            torch.library.opcheck(op, args)
            grad = torch.randn(b * n, d, generator=gen, dtype=F64).to(dtype).to(device)
            torch.library.opcheck(bwd, (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))
    empty = torch.zeros(0, d, dtype=F64, device=device)
    if linear:
        torch.library.opcheck(op, (empty, empty, ds, n, layer(gen, h, d, F64, device)[0], None, "relu", 0.01,
                                   False, 1, 0, None))
    else:
        torch.library.opcheck(op, (empty, empty, ds, n, False, 1, 0, None))


# ---- torch.compile ---------------------------------------------------------------------------------


def _compiled_params():
    return [pytest.param(dev, be, id=f"{dev}-{be}") for dev, be in (("cpu", "cpp"), ("cuda", "cuda"))
            if dev in DEVICES and be in backends_for(dev)]


@pytest.mark.parametrize(("device", "backend"), _compiled_params())
def test_torch_compile(device, backend, gen):
    torch._dynamo.reset()
    b, d, ds, n, h = 4, 10, 4, 3, 8
    mu, logvar = latent(gen, b, d, F64, device)
    w, bb = layer(gen, h, d, F64, device)

    def f(mu, logvar, w, bb):
        h1 = nuisance.sample_linear(mu, logvar, ds, n, w, bb, "silu", prior="posterior", seed=3, offset=4)
        return h1.sum(1) + nuisance.sample(mu, logvar, ds, n, seed=3).pow(2).sum(1)

    with lfi_fast.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (mu, logvar, w, bb)]
        out_e = f(*leaves)
        ge = torch.autograd.grad(out_e.sum(), leaves)
        compiled = torch.compile(f, fullgraph=True)
        leaves_c = [t.clone().requires_grad_() for t in (mu, logvar, w, bb)]
        out_c = compiled(*leaves_c)
        gc = torch.autograd.grad(out_c.sum(), leaves_c)
    assert_rows_close(out_c, out_e, dtype=F64, dim=None)
    for a, e in zip(gc, ge):
        assert_rows_close(a, e, dtype=F64, dim=None)


# ---- sample_decode and invariance_score --------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS_LINEAR)
def test_sample_decode_chunking_equals_unchunked(device, backend, gen):
    torch.manual_seed(0)
    b, d, ds, n = 7, 10, 4, 5
    mu, logvar = latent(gen, b, d, F64, device)
    decoders = {
        "sequential": nn.Sequential(nn.Linear(d, 16), nn.LeakyReLU(0.2), nn.Linear(16, 12), nn.Unflatten(1, (3, 4))),
        "linear": nn.Linear(d, 5),
        "gelu-tanh (not fused)": nn.Sequential(nn.Linear(d, 8), nn.GELU(approximate="tanh")),
        "other (fallback)": nn.Sequential(nn.Identity(), nn.Linear(d, 6), nn.Sigmoid()),
    }
    for name, dec in decoders.items():
        dec = dec.double().to(device)
        with lfi_fast.use_backend(backend), torch.no_grad():
            full = nuisance.sample_decode(dec, mu, logvar, ds, n, None, prior="posterior", seed=5, offset=2)
            for chunk in (1, 3, b):
                part = nuisance.sample_decode(dec, mu, logvar, ds, n, chunk, prior="posterior", seed=5, offset=2)
                # the same noise; only the GEMMs' blocking (rounding) may differ with the batch
                assert_rows_close(part.reshape(b * n, -1), full.reshape(b * n, -1), dtype=F64,
                                  what=f"{name} chunk {chunk}")
            # the decoder applied to sample(), with the same stream
            z = nuisance.sample(mu, logvar, ds, n, prior="posterior", seed=5, offset=2)
            want = dec(z).reshape(full.shape)
        assert full.shape[:2] == (b, n)
        assert_rows_close(full.reshape(b * n, -1), want.reshape(b * n, -1), dtype=F64, what=name)
    with lfi_fast.use_backend(backend):
        empty = nuisance.sample_decode(decoders["sequential"], mu[:0], logvar[:0], ds, n, seed=1)
    assert empty.shape == (0, n, 3, 4)


def test_sample_decode_gradients_flow():
    dec = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mu = torch.randn(5, 6, requires_grad=True)
    out = nuisance.sample_decode(dec, mu, torch.zeros(5, 6), 2, 4, chunk_size=2, seed=0)
    out.sum().backward()
    assert mu.grad is not None and dec[0].weight.grad is not None and torch.isfinite(mu.grad).all()


def test_invariance_score(gen):
    b, n, k = 6, 7, 4
    samples = torch.randn(b, n, 5, generator=gen)
    clf = nn.Linear(5, k)
    labels = torch.randint(0, k, (b,), generator=gen)
    with torch.no_grad():
        pred = clf(samples.reshape(b * n, 5)).argmax(1).reshape(b, n)
    want = (pred == labels[:, None]).float().mean(1)
    for bs in (1, 5, 4096):
        assert torch.equal(nuisance.invariance_score(clf, samples, labels, batch_size=bs), want)
    # labels that are every sample's prediction give 1
    const = nn.Linear(5, k)
    with torch.no_grad():
        const.weight.zero_()
        const.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(nuisance.invariance_score(const, samples, torch.full((b,), 2)), torch.ones(b))
    with pytest.raises(ValueError, match="labels"):
        nuisance.invariance_score(clf, samples, labels[:3])
    with pytest.raises(TypeError, match="labels"):
        nuisance.invariance_score(clf, samples, labels.float())


# ---- bad input -------------------------------------------------------------------------------------

_MU = torch.zeros(4, 6)
_W = torch.zeros(5, 6)

BAD = {
    "supervised_dims 0": (lambda: nuisance.sample(_MU, _MU, 0, 2), ValueError, "supervised_dims"),
    "supervised_dims D": (lambda: nuisance.sample(_MU, _MU, 6, 2), ValueError, "supervised_dims"),
    "supervised_dims -1": (lambda: nuisance.sample_linear(_MU, _MU, -1, 2, _W), ValueError, "supervised_dims"),
    "supervised_dims float": (lambda: nuisance.sample(_MU, _MU, 2.0, 2), TypeError, "supervised_dims"),
    "n_samples 0": (lambda: nuisance.sample(_MU, _MU, 2, 0), ValueError, "n_samples"),
    "n_samples -3": (lambda: nuisance.sample_linear(_MU, _MU, 2, -3, _W), ValueError, "n_samples"),
    "weight (5, 7)": (lambda: nuisance.sample_linear(_MU, _MU, 2, 2, torch.zeros(5, 7)), ValueError, "weight"),
    "weight 1-d": (lambda: nuisance.sample_linear(_MU, _MU, 2, 2, torch.zeros(6)), ValueError, "weight"),
    "weight float64": (lambda: nuisance.sample_linear(_MU, _MU, 2, 2, _W.double()), TypeError, "weight"),
    "bias (4,)": (lambda: nuisance.sample_linear(_MU, _MU, 2, 2, _W, torch.zeros(4)), ValueError, "bias"),
    "activation tanh": (lambda: nuisance.sample_linear(_MU, _MU, 2, 2, _W, None, "tanh"), ValueError, "activation"),
    "mu 1-d": (lambda: nuisance.sample(torch.zeros(6), torch.zeros(6), 2, 2), ValueError, "mu"),
    "mu int": (lambda: nuisance.sample(torch.zeros(4, 6, dtype=torch.int64), _MU, 2, 2), TypeError, "mu"),
    "logvar shape": (lambda: nuisance.sample(_MU, torch.zeros(4, 5), 2, 2), ValueError, "logvar"),
    "prior": (lambda: nuisance.sample(_MU, _MU, 2, 2, prior="uniform"), ValueError, "prior"),
    "seed negative": (lambda: nuisance.sample(_MU, _MU, 2, 2, seed=-1), ValueError, "seed"),
    "noise shape": (lambda: nuisance.sample(_MU, _MU, 2, 2, noise=torch.zeros(8, 3)), ValueError, "noise"),
    "generator": (lambda: nuisance.sample(_MU, _MU, 2, 2, generator=3), TypeError, "generator"),
    "chunk_size 0": (lambda: nuisance.sample_decode(nn.Linear(6, 3), _MU, _MU, 2, 2, 0), ValueError, "chunk_size"),
    "decoder weight": (lambda: nuisance.sample_decode(nn.Linear(5, 3), _MU, _MU, 2, 2), ValueError, "weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    fn, exc, name = BAD[case]
    with pytest.raises(exc, match=name):
        fn()


@pytest.mark.parametrize("op", ["nuisance_sample", "nuisance_sample_linear"])
def test_bad_input_at_the_op_boundary(op):
    """Direct torch.ops calls are checked in C++ too: an error naming the argument, never a crash."""
    if not hasattr(torch.ops.lfi_fast, op):
        pytest.skip("not compiled in yet")
    f = getattr(torch.ops.lfi_fast, op)
    extra = (_W, None, "relu", 0.01) if "linear" in op else ()
    tail = (False, 1, 0, None)
    with pytest.raises(RuntimeError, match="supervised_dims"):
        f(_MU, _MU, 6, 2, *extra, *tail)
    with pytest.raises(RuntimeError, match="n_samples"):
        f(_MU, _MU, 2, 0, *extra, *tail)
    with pytest.raises(RuntimeError, match="noise"):
        f(_MU, _MU, 2, 2, *extra, False, 1, 0, torch.zeros(3, 3))
    if extra:
        with pytest.raises(RuntimeError, match="weight"):
            f(_MU, _MU, 2, 2, torch.zeros(5, 4), None, "relu", 0.01, *tail)
        with pytest.raises(RuntimeError, match="activation"):
            f(_MU, _MU, 2, 2, _W, None, "tanh", 0.01, *tail)


# ---- fuzz ------------------------------------------------------------------------------------------


FUZZ_BACKENDS = backends_for("cpu")


@settings(**fuzz_settings(40))
@given(
    b=st.integers(0, 5), dn=st.integers(1, 9), ds=st.integers(-1, 6), n=st.integers(0, 4),
    h=st.integers(1, 40), dtype=st.sampled_from([F64, F32, torch.float16, torch.bfloat16]),
    act=st.sampled_from(ref.ACTIVATIONS), posterior=st.booleans(), bias=st.booleans(),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 30.0]), backend=st.sampled_from(FUZZ_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_fuzz(b, dn, ds, n, h, dtype, act, posterior, bias, scale, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    d = max(ds, 0) + dn
    mu, logvar = latent(gen, b, d, dtype, scale=scale)
    w, bb = layer(gen, h, d, dtype, bias=bias)
    valid = 0 < ds < d and n >= 1
    eps = eps_for(gen, b * max(n, 1), d - ds if valid else 1).to(dtype)
    prior = "posterior" if posterior else "standard"
    grad_args = (0, 1, 2, 3) if bias else (0, 1, 2)

    def fn(mu, logvar, w, bb):
        with lfi_fast.use_backend(backend):
            return nuisance.sample_linear(mu, logvar, ds, n, w, bb, act, prior=prior, noise=eps)

    def ref_fn(mu, logvar, w, bb):
        return ref.sample_linear(mu, logvar, ds, n, w, bb, act, 0.01, posterior, 0, 0, eps.double())

    check_op_against_reference(
        fn, ref_fn, (mu, logvar, w, bb), error_names=("supervised_dims", "n_samples"),
        must_raise=not valid, grad_args=grad_args if dtype in (F64, F32) else (), gen=gen,
        what=f"{backend} {act}",
    )
