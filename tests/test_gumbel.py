"""lfi_fast.gumbel on every backend: torch's formula given the same noise (values and gradients),
the same sample on every backend for a fixed seed, the Gumbel-max distribution (chi-square) and the
soft sample's mean, -inf logits, interventions, single_interventions, gradcheck, opcheck,
torch.compile, bad input, empty batches, layouts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, TOL, assert_rows_close, backends_for, device_backend_params, triton_kernel

import lfi_fast
from lfi_fast import gumbel
from lfi_fast.reference import gumbel as ref

PARAMS = device_backend_params("gumbel", "gumbel_softmax")
ONEHOT_PARAMS = device_backend_params("gumbel", "single_interventions")
F64, F32 = torch.float64, torch.float32
KS = (1, 2, 3, 4, 5, 17, 64, 130)


def call(backend, fn, *args, **kwargs):
    with lfi_fast.use_backend(backend):
        return fn(*args, **kwargs)


def formula(logits, noise, tau, hard, mask=None, targets=None):
    """torch.nn.functional.gumbel_softmax's formula, in float64, given the noise (and the forcing)."""
    z = (logits.double() + noise.double()) / tau
    y = torch.softmax(z, dim=-1)
    if hard:
        idx = y.argmax(dim=-1, keepdim=True)
        y = torch.zeros_like(y).scatter_(-1, idx, 1.0) - y.detach() + y
    if mask is not None:
        forced = F.one_hot(targets.clamp(0, logits.shape[-1] - 1), logits.shape[-1]).double()
        y = torch.where(mask.unsqueeze(-1), forced, y)
    return y


def logits_of(shape, gen, *, dtype=F64, device="cpu", scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(device=device, dtype=dtype)


def noise_of(shape, gen, device="cpu"):
    u = torch.rand(shape, generator=gen, dtype=F64).clamp(1e-7, 1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def softmax_grad_oracle(logits, noise, tau, w):
    """The soft sample's gradient (the hard one's too: straight-through) in float64, written
    without cancellation: y_i * sum_j y_j (w_i - w_j) / tau, and the slack any evaluation of the
    usual y * (w - <w, y>) / tau may need in the logits' dtype: twice torch's own error, plus a few
    rounding errors of the cancelling difference."""
    dtype = logits.dtype
    y = torch.softmax((logits.double() + noise.double()) / tau, -1)
    if logits.shape[-1] <= 256:
        diff = w.unsqueeze(-1) - w.unsqueeze(-2)  # (rows, K, K): w_i - w_j
        grad = y * (diff * y.unsqueeze(-2)).sum(-1) / tau
    else:  # long rows: float64's cancellation is far below the float32 tolerance they are held to
        grad = y * (w - (w * y).sum(-1, keepdim=True)) / tau
    lt = logits.clone().requires_grad_(True)
    yt = torch.softmax((lt + noise.to(ref.compute_dtype(dtype)).to(dtype)) / tau, -1)
    (gt,) = torch.autograd.grad(yt, lt, w.to(dtype))
    eps = torch.finfo(ref.compute_dtype(dtype)).eps
    slack = 2 * (gt.double() - grad).norm(dim=-1) + 8 * eps * w.abs().amax(-1) * y.norm(dim=-1) / tau
    return grad, slack


# ---- torch's formula given the noise: values and gradients ----------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("hard", (False, True))
@pytest.mark.parametrize("k", KS)
def test_formula_given_noise(device, backend, hard, k, gen):
    for dtype in (F64, F32):
        for tau in (0.1, 1.0, 3.7):
            logits = logits_of((9, k), gen, dtype=dtype, device=device)
            g = noise_of((9, k), gen, device).to(ref.compute_dtype(dtype))
            lg = logits.clone().requires_grad_(True)
            out = call(backend, gumbel.gumbel_softmax, lg, tau, hard, noise=g)
            assert out.dtype == dtype and out.shape == logits.shape and out.device == logits.device
            expect = formula(logits, g, tau, hard)
            tol = 1e-12 if dtype == F64 else TOL[F32]
            if hard:  # exact one-hot of the same choice (ties have probability 0 here)
                assert torch.equal(out.double(), expect.detach())
            else:
                slack = None
                if dtype != F64:
                    slack = 2 * (F.softmax((logits + g) / tau, -1).double() - expect).norm(dim=-1)
                assert_rows_close(out, expect, dtype=dtype, tol=tol, slack=slack)
            w = torch.randn((9, k), generator=gen, dtype=F64).to(device)
            (grad,) = torch.autograd.grad(out, lg, w.to(dtype))
            grad_e, slack = softmax_grad_oracle(logits, g, tau, w)
            assert_rows_close(grad, grad_e, dtype=dtype, tol=tol, slack=slack, what="grad")


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_types(device, backend, dtype, gen):
    logits = logits_of((33, 6), gen, dtype=dtype, device=device)
    g = noise_of((33, 6), gen, device).float()
    for hard in (False, True):
        out = call(backend, gumbel.gumbel_softmax, logits, 0.7, hard, noise=g)
        assert out.dtype == dtype
        expect = formula(logits.float(), g, 0.7, hard).to(dtype)
        assert_rows_close(out, expect.double(), dtype=dtype, tol=1e-2)


# ---- one stream: the same (seed, offset) gives the same sample on every backend ----------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", (1, 2, 3, 8, 33))
def test_same_seed_same_sample_on_every_backend(device, k, gen):
    logits = logits_of((13, 4, k), gen, dtype=F32, device=device)
    mask = torch.rand((13, 4), generator=gen).to(device) < 0.3
    targets = torch.randint(0, k, (13, 4), generator=gen).to(device)
    for hard in (False, True):
        outs = {}
        for backend in backends_for(device):
            if backend == "triton" and triton_kernel("gumbel", "gumbel_softmax") is None:
                continue
            g = torch.Generator().manual_seed(1234)
            outs[backend] = call(backend, gumbel.gumbel_softmax, logits, 0.6, hard, generator=g)
            g = torch.Generator().manual_seed(1234)
            outs[backend + "-intervene"] = call(backend, gumbel.intervene, logits, mask, targets, 0.6, hard, generator=g)
        g = torch.Generator().manual_seed(1234)
        seed, offset = lfi_fast.ops._random.next_seed_offset(g, torch.device(device), 0)
        noise = ref.noise(seed, offset, tuple(logits.shape), device)
        expect = formula(logits, noise, 0.6, hard)
        expect_i = formula(logits, noise, 0.6, hard, mask, targets)
        for name, out in outs.items():
            e = expect_i if name.endswith("intervene") else expect
            assert_rows_close(out, e, dtype=F32, tol=TOL[F32], what=name)


def test_generator_advances_and_reproduces(gen):
    logits = torch.randn(64, 5, generator=gen)
    torch.manual_seed(3)
    a = gumbel.gumbel_softmax(logits, 0.5)
    b = gumbel.gumbel_softmax(logits, 0.5)
    torch.manual_seed(3)
    assert torch.equal(gumbel.gumbel_softmax(logits, 0.5), a)
    assert not torch.equal(a, b)


# ---- distributions -------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("k", (2, 5))
def test_hard_frequencies_follow_softmax(device, backend, k):
    """Gumbel-max: the hard sample's category is distributed as softmax(logits), whatever tau.
    Chi-square at a fixed seed (the test is deterministic and fails with a wrong distribution,
    e.g. softmax(logits / tau))."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 40_000 if backend != "triton" else 8_000
    base = torch.linspace(-1.5, 1.0, k, dtype=F32)
    logits = base.expand(n, k).to(device)
    g = torch.Generator().manual_seed(20240)
    for tau in (0.3, 2.0):
        out = call(backend, gumbel.gumbel_softmax, logits, tau, True, generator=g)
        counts = out.sum(0).double().cpu()
        assert float(counts.sum()) == n
        p = torch.softmax(base.double(), 0)
        chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
        assert chi2 < scipy_stats.chi2.ppf(1 - 1e-4, k - 1), (tau, counts, n * p)


@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_soft_mean(device, backend):
    """The soft sample's mean against a float64 Monte Carlo estimate on torch's own noise (both
    estimate E[softmax((l + G) / tau)])."""
    n, k, tau = 40_000 if backend != "triton" else 8_000, 4, 0.8
    base = torch.tensor([0.5, -1.0, 1.5, 0.0])
    logits = base.expand(n, k).contiguous().to(device)
    g = torch.Generator().manual_seed(77)
    out = call(backend, gumbel.gumbel_softmax, logits, tau, False, generator=g).double().cpu()
    torch_noise = -torch.empty(400_000, k, dtype=F64).exponential_(generator=torch.Generator().manual_seed(5)).log()
    mc = torch.softmax((base.double() + torch_noise) / tau, -1)
    se = (out.std(0) / math.sqrt(n)) + (mc.std(0) / math.sqrt(mc.shape[0]))
    assert ((out.mean(0) - mc.mean(0)).abs() < 5 * se).all(), (out.mean(0), mc.mean(0))
    assert torch.allclose(out.sum(-1), torch.ones(n, dtype=F64), atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("hard", (False, True))
def test_neg_inf_logits_never_chosen(device, backend, hard, gen):
    k = 7
    logits = logits_of((500, k), gen, dtype=F32, device=device)
    blocked = torch.rand((500, k), generator=gen).to(device) < 0.5
    blocked[:, 0] = False  # a finite logit in every row
    blocked[:5] = True
    blocked[:5, 3] = False  # rows with a single finite logit
    logits = logits.masked_fill(blocked, -math.inf).requires_grad_(True)
    out = call(backend, gumbel.gumbel_softmax, logits, 0.5, hard)
    assert torch.isfinite(out).all()
    assert (out[blocked] == 0).all()
    assert torch.allclose(out.sum(-1), torch.ones(500, device=device))
    assert (out[:5, 3] == 1).all()
    (grad,) = torch.autograd.grad(out, logits, torch.randn_like(out))
    assert torch.isfinite(grad).all() and (grad[blocked] == 0).all()


# ---- interventions -------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("hard", (False, True))
@pytest.mark.parametrize("k", (2, 3, 6))
def test_intervene(device, backend, hard, k, gen):
    logits = logits_of((4, 6, k), gen, dtype=F64, device=device)
    mask = (torch.rand((4, 6), generator=gen) < 0.4).to(device)
    targets = torch.randint(0, k, (4, 6), generator=gen).to(device)
    targets[~mask] = -5  # unread where mask is unset
    g = noise_of((4, 6, k), gen, device)
    lg = logits.clone().requires_grad_(True)
    out = call(backend, gumbel.intervene, lg, mask, targets, 0.9, hard, noise=g)
    expect = formula(logits, g, 0.9, hard, mask, targets)
    assert_rows_close(out, expect, dtype=F64, tol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=F64).to(device)
    (grad,) = torch.autograd.grad(out, lg, w)
    l64 = logits.clone().requires_grad_(True)
    (grad_e,) = torch.autograd.grad(formula(l64, g, 0.9, hard, mask, targets), l64, w)
    # softmax's backward, y (w - <w, y>) / tau, cancels in rows where w is nearly <w, y>: a few
    # ulps of the exp (Triton's is not libm's) show there as ~1e-10 of the row
    assert_rows_close(grad, grad_e, dtype=F64, tol=1e-9, what="grad")
    assert (grad[mask] == 0).all()
    # mask and targets broadcast: one intervention for the whole batch
    m1 = torch.zeros(6, dtype=torch.bool, device=device)
    m1[2] = True
    t1 = torch.full((6,), k - 1, device=device)
    out1 = call(backend, gumbel.intervene, logits, m1, t1, 0.9, hard)
    assert (out1[:, 2, k - 1] == 1).all()


# ---- single interventions ------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), ONEHOT_PARAMS)
@pytest.mark.parametrize("k", (2, 3, 5))
def test_single_interventions(device, backend, k, gen):
    b, v = 6, 7
    codes = torch.randint(0, k, (b, v), generator=gen).to(device)
    out = call(backend, gumbel.single_interventions, codes, k)
    assert out.shape == (b, v * (k - 1), v) and out.dtype == torch.int64
    # written out with loops: the definition
    expect = torch.empty_like(out)
    for i in range(b):
        for var in range(v):
            others = [c for c in range(k) if c != int(codes[i, var])]
            for r, c in enumerate(others):
                row = codes[i].clone()
                row[var] = c
                expect[i, var * (k - 1) + r] = row
    assert torch.equal(out, expect)
    assert ((out != codes.unsqueeze(1)).sum(-1) == 1).all()
    oh = call(backend, gumbel.single_intervention_one_hot, codes, k, dtype=F64)
    assert oh.dtype == F64 and torch.equal(oh, F.one_hot(expect, k).double())
    # empty batch, int32 codes
    empty = call(backend, gumbel.single_interventions, codes[:0].int(), k)
    assert empty.shape == (0, v * (k - 1), v)


# ---- layouts and empty batches -------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_dim_and_non_contiguous(device, backend, gen):
    logits = logits_of((5, 6, 3), gen, dtype=F32, device=device)
    g = noise_of((5, 6, 3), gen, device).float()
    out = call(backend, gumbel.gumbel_softmax, logits, 0.5, False, dim=1, noise=g)
    expect = formula(logits.movedim(1, -1), g.movedim(1, -1), 0.5, False).movedim(-1, 1)
    assert_rows_close(out.movedim(1, -1), expect.movedim(1, -1), dtype=F32, tol=TOL[F32])
    t = logits.transpose(0, 2)  # non-contiguous, categories (5) last
    gt = g.transpose(0, 2)
    out = call(backend, gumbel.gumbel_softmax, t, 0.5, True, noise=gt)
    assert torch.equal(out.double(), formula(t, gt, 0.5, True).detach())
    empty = call(backend, gumbel.gumbel_softmax, logits[:0], 0.5, True)
    assert empty.shape == (0, 6, 3)


# ---- gradcheck -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PARAMS)
@pytest.mark.parametrize("hard", (False, True))
def test_gradcheck(device, backend, hard, gen):
    logits = logits_of((4, 5), gen, device=device, scale=1.0).requires_grad_(True)
    g = noise_of((4, 5), gen, device)
    mask = torch.tensor([True, False, False, True], device=device)
    targets = torch.tensor([1, 0, 0, 4], device=device)
    with lfi_fast.use_backend(backend):
        # hard: the output is piecewise constant, so check the straight-through gradient through
        # the soft sample: (hard + soft) has gradient 2 * soft's, and its values move with logits
        def f(lg):
            y = gumbel.gumbel_softmax(lg, 0.7, hard, noise=g)
            return y + gumbel.gumbel_softmax(lg, 0.7, False, noise=g) if hard else y

        if hard:
            w = torch.randn(4, 5, generator=gen, dtype=F64).to(device)
            (ga,) = torch.autograd.grad(gumbel.gumbel_softmax(logits, 0.7, True, noise=g), logits, w)
            (gb,) = torch.autograd.grad(gumbel.gumbel_softmax(logits, 0.7, False, noise=g), logits, w)
            assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-14)
        else:
            assert torch.autograd.gradcheck(f, (logits,))
            assert torch.autograd.gradcheck(lambda lg: gumbel.intervene(lg, mask, targets, 0.7, False, noise=g), (logits,))


# ---- bad input -----------------------------------------------------------------------------------


def _bad_cases():
    z = torch.zeros(3, 4)
    nan = z.clone()
    nan[1, 2] = math.nan
    pinf = z.clone()
    pinf[2, 0] = math.inf
    allninf = z.clone()
    allninf[1] = -math.inf
    m = torch.tensor([True, False, False])
    return {
        "tau 0": (lambda: gumbel.gumbel_softmax(z, 0.0), ValueError, "tau"),
        "tau -1": (lambda: gumbel.gumbel_softmax(z, -1.0), ValueError, "tau"),
        "tau nan": (lambda: gumbel.gumbel_softmax(z, math.nan), ValueError, "tau"),
        "tau inf": (lambda: gumbel.gumbel_softmax(z, math.inf), ValueError, "tau"),
        "tau str": (lambda: gumbel.gumbel_softmax(z, "1"), TypeError, "tau"),
        "nan logits": (lambda: gumbel.gumbel_softmax(nan), ValueError, "logits"),
        "+inf logits": (lambda: gumbel.gumbel_softmax(pinf, 1.0, True), ValueError, "logits"),
        "all -inf row": (lambda: gumbel.gumbel_softmax(allninf), ValueError, "-inf"),
        "int logits": (lambda: gumbel.gumbel_softmax(z.long()), TypeError, "logits"),
        "no categories": (lambda: gumbel.gumbel_softmax(torch.zeros(3, 0)), ValueError, "categor"),
        "dim": (lambda: gumbel.gumbel_softmax(z, dim=2), IndexError, "dim"),
        "target too big": (lambda: gumbel.intervene(z, m, torch.tensor([4, 0, 0])), ValueError, "targets"),
        "target negative": (lambda: gumbel.intervene(z, m, torch.tensor([-1, 0, 0])), ValueError, "targets"),
        "mask shape": (lambda: gumbel.intervene(z, torch.tensor([True, False]), torch.zeros(3, dtype=torch.long)), ValueError, "mask"),
        "targets shape": (lambda: gumbel.intervene(z, m, torch.zeros(4, dtype=torch.long)), ValueError, "targets"),
        "mask dtype": (lambda: gumbel.intervene(z, m.long(), torch.zeros(3, dtype=torch.long)), TypeError, "mask"),
        "targets dtype": (lambda: gumbel.intervene(z, m, torch.zeros(3)), TypeError, "targets"),
        "intervene 1-d": (lambda: gumbel.intervene(z[0], m, torch.zeros(3, dtype=torch.long)), ValueError, "logits"),
        "noise shape": (lambda: gumbel.gumbel_softmax(z, noise=torch.zeros(3, 5)), ValueError, "noise"),
        "generator": (lambda: gumbel.gumbel_softmax(z, generator=3), TypeError, "generator"),
        "codes float": (lambda: gumbel.single_interventions(z, 4), TypeError, "codes"),
        "codes 1-d": (lambda: gumbel.single_interventions(torch.zeros(3, dtype=torch.long), 4), ValueError, "codes"),
        "codes out of range": (lambda: gumbel.single_interventions(torch.full((2, 3), 4), 4), ValueError, "codes"),
        "codes negative": (lambda: gumbel.single_intervention_one_hot(torch.full((2, 3), -1), 4), ValueError, "codes"),
        "K 1": (lambda: gumbel.single_interventions(torch.zeros(2, 3, dtype=torch.long), 1), ValueError, "num_categories"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_argument(backend, case):
    if backend == "triton" and triton_kernel("gumbel", "gumbel_softmax") is None:
        pytest.skip("no Triton gumbel kernels yet")
    fn, exc, word = BAD[case]
    with lfi_fast.use_backend(backend), pytest.raises(exc, match=word):
        fn()


# ---- opcheck -------------------------------------------------------------------------------------


def _opcheck_params():
    params = []
    for device in DEVICES:
        compiled = lfi_fast.info()["backends"]["cuda" if device == "cuda" else "cpp"]["available"]
        if compiled:
            params.append(pytest.param(device, "", id=f"{device}-compiled"))
        if "triton" in backends_for(device):
            marks = [pytest.mark.triton]
            if triton_kernel("gumbel", "gumbel_softmax") is None:
                marks.append(pytest.mark.skip(reason="no Triton gumbel kernels yet"))
            params.append(pytest.param(device, "_triton", id=f"{device}-triton", marks=marks))
    return params


@pytest.mark.parametrize(("device", "suffix"), _opcheck_params())
def test_opcheck(device, suffix, gen):
    lib = torch.ops.lfi_fast
    fwd = getattr(lib, "gumbel_softmax" + suffix).default
    bwd = getattr(lib, "gumbel_softmax_backward" + suffix).default

    def lg(*shape, dtype=F64, rg=False):
        return logits_of(shape, gen, dtype=dtype, device=device).requires_grad_(rg)

    mask = torch.tensor([True, False, False, True, False], device=device)
    targets = torch.tensor([2, 0, 0, 1, 0], device=device)
    noise = noise_of((5, 3), gen, device)
    for hard in (False, True):
        cases = [
            (lg(5, 3, rg=True), None, None, None, 0.7, hard, 123, 8),
            (lg(5, 3, rg=True), mask, targets, None, 1.3, hard, 2**40 + 5, 2**33),
            (lg(5, 3, rg=True), None, None, noise, 0.7, hard, 0, 0),
            (lg(5, 3, dtype=F32, rg=True), mask, targets, noise.float(), 0.5, hard, 7, 0),
            (lg(64, 2, dtype=F32, rg=True), None, None, None, 0.5, hard, 7, 0),
            (lg(3, 300, dtype=F32), None, None, None, 0.5, hard, 7, 0),
            (lg(0, 4), None, None, None, 0.7, hard, 1, 0),
        ]
        for args in cases:
            torch.library.opcheck(fwd, args)
        grad = torch.randn(5, 3, generator=gen, dtype=F64).to(device)
        logits = lg(5, 3)
        out = fwd(logits, mask, targets, None, 0.7, hard, 3, 0)
        torch.library.opcheck(bwd, (grad, logits, out, mask, None, 0.7, hard, 3, 0))
        torch.library.opcheck(bwd, (grad, logits, out, None, noise, 0.7, hard, 3, 0))
    codes = torch.randint(0, 3, (4, 5), generator=gen).to(device)
    for c in (codes, codes[:0]):
        torch.library.opcheck(getattr(lib, "single_interventions" + suffix).default, (c, 3))
        torch.library.opcheck(getattr(lib, "single_intervention_one_hot" + suffix).default, (c, 3, F32))


# ---- torch.compile -------------------------------------------------------------------------------


def _compiled_backend_params():
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in (("cpu", "cpp"), ("cuda", "cuda"))
            if d in DEVICES and b in backends_for(d)]


@pytest.mark.parametrize(("device", "backend"), _compiled_backend_params())
def test_torch_compile(device, backend, gen):
    torch._dynamo.reset()
    logits = logits_of((6, 4, 3), gen, dtype=F32, device=device)
    noise = noise_of((6, 4, 3), gen, device).float()
    mask = (torch.rand((6, 4), generator=gen) < 0.5).to(device)
    targets = torch.randint(0, 3, (6, 4), generator=gen).to(device)

    def f(lg):  # with explicit noise: no generator state to read, fullgraph
        a = gumbel.gumbel_softmax(lg, 0.5, False, noise=noise)
        b = gumbel.intervene(lg, mask, targets, 0.8, True, noise=noise)
        return a * 2 + b

    def g(lg):  # drawing the noise: the generator is read outside the graph
        return gumbel.gumbel_softmax(lg, 0.5, True, generator=torch.Generator().manual_seed(9))

    with lfi_fast.use_backend(backend):
        lg = logits.clone().requires_grad_(True)
        out_e = f(lg)
        (grad_e,) = torch.autograd.grad(out_e.sum(), lg)
        lg = logits.clone().requires_grad_(True)
        out_c = torch.compile(f, fullgraph=True)(lg)
        (grad_c,) = torch.autograd.grad(out_c.sum(), lg)
        assert torch.equal(torch.compile(g)(logits), g(logits))
    assert_rows_close(out_c, out_e, dtype=F32, tol=1e-6, what="compiled forward")
    assert_rows_close(grad_c, grad_e, dtype=F32, tol=1e-6, what="compiled grad")


# ---- fuzz ----------------------------------------------------------------------------------------

from fuzz import ALLOWED_ERRORS, LAYOUTS, check_op_against_reference, fuzz_settings, with_layout  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALUE_KINDS = ("normal", "zeros", "tiny", "huge", "some_neg_inf", "nan", "pos_inf", "row_all_neg_inf")


@st.composite
def gumbel_cases(draw):
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    k = draw(st.sampled_from((1, 2, 3, 4, 5, 8, 33, 70)))
    dtype = draw(st.sampled_from((F64, F32, torch.float16, torch.bfloat16, torch.int64)))
    kind = draw(st.sampled_from(VALUE_KINDS))
    layout = draw(st.sampled_from(LAYOUTS))
    tau = draw(st.sampled_from((0.05, 0.7, 1.0, 8.0, 0.0, -1.0, math.nan, math.inf)))
    hard = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead + (k,), dtype, kind, layout, tau, hard, seed


def _build(shape, dtype, kind, layout, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64) * 3
    if kind == "zeros":
        x.zero_()
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "huge":
        x = x / 3 * (1e30 if dtype in (F64, F32, torch.bfloat16) else 1e4)
    elif kind == "some_neg_inf":
        blocked = torch.rand(shape, generator=gen) < 0.4
        blocked[..., 0] = False
        x = x.masked_fill(blocked, -math.inf)
    elif x.numel():
        flat = x.view(-1, shape[-1])
        row = int(torch.randint(0, flat.shape[0], (), generator=gen))
        if kind == "nan":
            flat[row, -1] = math.nan
        elif kind == "pos_inf":
            flat[row, 0] = math.inf
        elif kind == "row_all_neg_inf":
            flat[row] = -math.inf
    noise = noise_of(shape, gen, "cpu")
    x = x.to(dtype) if dtype.is_floating_point else x.round().clamp(-5, 5).to(dtype)
    noise = noise.to(F64 if dtype == F64 else F32)
    return with_layout(x.to(device), layout, -1), with_layout(noise.to(device), layout, -1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_fuzz(device, backend):
    """Random shapes, dtypes, values, layouts, tau: torch's formula given the noise (values and
    gradients, within the harness's conditioning slack) or a clear error naming the argument."""
    n = 40 if backend == "triton" else 150

    @fuzz_settings_given(n)
    def run(case):
        shape, dtype, kind, layout, tau, hard, seed = case
        logits, noise = _build(shape, dtype, kind, layout, seed, device)
        bad_tau = not 0 < tau < math.inf
        numel = logits.numel()
        # judged on the tensor as laid out: an expanded layout repeats row 0, which may not be the
        # row the bad value went to
        bad_values = numel > 0 and dtype.is_floating_point and bool(
            logits.isnan().any() or logits.isposinf().any() or (logits == -math.inf).all(-1).any())
        must_raise = (not dtype.is_floating_point) or bad_tau or bad_values
        names = ["logits"] if not dtype.is_floating_point else (["tau"] if bad_tau else ["logits", "-inf"])

        def fn(lg, nz):
            with lfi_fast.use_backend(backend):
                return gumbel.gumbel_softmax(lg, tau, hard, noise=nz)

        def ref_fn(lg, nz):
            return formula(lg, nz, tau, hard).to(lg.dtype)

        check_op_against_reference(
            fn, ref_fn, (logits, noise), error_names=names, must_raise=must_raise,
            domain=not hard,  # a hard sample may flip under the harness's perturbations: checked elsewhere
            grad_args=(0,) if kind in ("normal", "zeros", "tiny") else (),
            gen=torch.Generator().manual_seed(seed), what=f"{backend} on {device}",
            out_dtype=dtype if dtype.is_floating_point else None,
        )
        if not must_raise and hard and numel:
            out = fn(logits, noise)
            assert torch.equal(out.sum(-1), torch.ones_like(out.sum(-1)))
            assert (out[logits == -math.inf] == 0).all()

    run()


def fuzz_settings_given(n):
    from hypothesis import settings

    def deco(f):
        return settings(**fuzz_settings(n))(given(case=gumbel_cases())(f))

    return deco


@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_long_rows(device, backend, gen):
    """Rows longer than one tile (the CUDA block-per-row kernel, Triton's three-pass loop)."""
    k = 4099 * 2 if backend == "triton" else 5000
    logits = logits_of((3, k), gen, dtype=F32, device=device)
    logits[1, ::3] = -math.inf
    for hard in (False, True):
        g = torch.Generator().manual_seed(42)
        out = call(backend, gumbel.gumbel_softmax, logits, 0.9, hard, generator=g)
        g = torch.Generator().manual_seed(42)
        seed, offset = lfi_fast.ops._random.next_seed_offset(g, torch.device(device), 0)
        expect = formula(logits, ref.noise(seed, offset, (3, k), device), 0.9, hard)
        if hard:
            assert torch.equal(out.double(), expect.detach())
        else:
            assert_rows_close(out, expect, dtype=F32, tol=TOL[F32])
        lg = logits.clone().requires_grad_(True)
        w = torch.randn(3, k, generator=gen).to(device)
        g = torch.Generator().manual_seed(42)
        (grad,) = torch.autograd.grad(call(backend, gumbel.gumbel_softmax, lg, 0.9, hard, generator=g), lg, w)
        noise = ref.noise(seed, offset, (3, k), device)
        grad_e, slack = softmax_grad_oracle(logits.double(), noise, 0.9, w.double())
        slack = slack + 8 * torch.finfo(F32).eps * w.abs().amax(-1) / 0.9  # float32 accumulation over K
        assert_rows_close(grad, grad_e, dtype=F32, tol=TOL[F32] * 10, slack=slack, what="grad")
