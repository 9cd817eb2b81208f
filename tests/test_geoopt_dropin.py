"""lfi_fast.geoopt.PoincareBall against geoopt.PoincareBall: every accelerated method's values and
gradients (float64, 1e-10 relative, the curvature's gradient included), isinstance, Riemannian
optimisers (same loss curve), patch()/unpatch(), and geoopt staying optional."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from conftest import assert_rows_close, row_norm

geoopt = pytest.importorskip("geoopt")

import lfi_fast
import lfi_fast.geoopt as lg

F64 = torch.float64
C_VALUES = (0.1, 1.0, 4.0)
N, D = 7, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread. (With more, each of MKL's GEMMs here waits for its
    team, which on a loaded machine costs tens of milliseconds per call.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- inputs --------------------------------------------------------------------------------------


def ball_points(n: int, d: int, c: float, gen: torch.Generator, *, zero_row: bool = True):
    """Points of the ball of radius 1/sqrt(c), norms spread over [0, 0.999] of the radius, the first
    row the origin."""
    direction = torch.randn(n, d, generator=gen, dtype=F64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    rho = torch.rand(n, 1, generator=gen, dtype=F64) * 0.999
    x = direction * rho / c**0.5
    if zero_row:
        x[0] = 0
    return x


def make_inputs(c: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    x = ball_points(N, D, c, gen)
    return {
        "x": x,
        "y": ball_points(N, D, c, gen, zero_row=False),
        # w + step: an exponential map that stays clear of the boundary. Where expmap saturates
        # (tanh(λ|u|/2) rounds to 1), its Möbius addition is ill-conditioned: geoopt and any
        # reordering of its formula (lfi_fast's reference included) differ there by ~1e-8.
        "w": ball_points(N, D, c, gen) * 0.9,
        "step": torch.randn(N, D, generator=gen, dtype=F64) * 0.15 / c**0.5,
        "u": torch.randn(N, D, generator=gen, dtype=F64) * 0.7,
        "v": torch.randn(N, D, generator=gen, dtype=F64),
        "small": torch.randn(N, D, generator=gen, dtype=F64) * 0.05,  # an optimiser's step
        "big": torch.randn(N, D, generator=gen, dtype=F64) * 2 / c**0.5,  # partly outside the ball
        "r": torch.randn(N, 1, generator=gen, dtype=F64),
        "m": torch.randn(3, D, generator=gen, dtype=F64),
    }


def make_balls(c: float, learnable: bool, exact: bool = False):
    ours = lg.PoincareBallExact if exact else lg.PoincareBall
    theirs = geoopt.PoincareBallExact if exact else geoopt.PoincareBall
    return ours(c=c, learnable=learnable).to(F64), theirs(c=c, learnable=learnable).to(F64)


# method, argument names (from make_inputs), keyword arguments. The coordinate dim is added per
# layout: "last" (N, D) and dim=-1 left to its default, "first" (D, N) and dim=0.
CASES = [
    ("mobius_add", ("x", "y"), {}),
    ("mobius_add", ("x", "y"), {"project": False}),
    ("mobius_sub", ("x", "y"), {}),
    ("mobius_sub", ("y", "x"), {"project": False}),
    ("mobius_scalar_mul", ("r", "x"), {}),
    ("mobius_scalar_mul", ("r", "y"), {"project": False}),
    ("mobius_matvec", ("m", "x"), {}),
    ("mobius_matvec", ("m", "y"), {"project": False}),
    ("expmap", ("x", "u"), {}),
    ("expmap", ("y", "u"), {"project": False}),
    ("logmap", ("x", "y"), {}),
    ("expmap0", ("u",), {}),
    ("expmap0", ("big",), {"project": False}),
    ("logmap0", ("x",), {}),
    ("dist", ("x", "y"), {}),
    ("dist", ("x", "y"), {"keepdim": True}),
    ("dist2", ("x", "y"), {}),
    ("dist0", ("x",), {}),
    ("dist0", ("y",), {"keepdim": True}),
    ("projx", ("big",), {}),
    ("proju", ("x", "u"), {}),
    ("egrad2rgrad", ("x", "u"), {}),
    ("retr", ("x", "small"), {}),
    ("retr", ("y", "big"), {}),
    ("transp", ("x", "y", "v"), {}),
    ("retr_transp", ("x", "small", "v"), {}),
    ("retr_transp", ("y", "u", "v"), {}),
    ("expmap_transp", ("w", "step", "v"), {}),
    ("transp_follow_retr", ("y", "small", "v"), {}),
    ("transp_follow_expmap", ("w", "step", "v"), {}),
    ("component_inner", ("x", "u"), {}),
    ("component_inner", ("x", "u", "v"), {}),
    ("inner", ("y", "u", "v"), {"keepdim": True}),
    ("norm", ("x", "u"), {}),
    ("norm", ("y", "v"), {"keepdim": True}),
    ("lambda_x", ("x",), {}),
    ("lambda_x", ("y",), {"keepdim": True}),
]

# No dim argument: geoopt's component_inner and proju take none.
NO_DIM = {"component_inner", "proju"}


def _case_id(case) -> str:
    name, args, kwargs = case
    return "-".join([name, *args, *(f"{k}={v}" for k, v in kwargs.items())])


def _layout(name, args, kwargs, inputs, layout):
    """The call's tensors and kwargs for a layout."""
    if layout == "last":
        return [inputs[a] for a in args], dict(kwargs)
    tensors = [inputs[a] if a == "m" else inputs[a].T for a in args]  # r: (1, N)
    return tensors, {**kwargs, "dim": 0}


def _case_params():
    params = []
    for case in CASES:
        for layout in ("last", "first"):
            # dim=0 is undefined where geoopt takes no dim, and for mobius_matvec, where geoopt
            # moves the coordinates last but takes its norms along dim 0
            if layout == "first" and (case[0] in NO_DIM or case[0] == "mobius_matvec"):
                continue
            params.append(pytest.param(case, layout, id=f"{_case_id(case)}-{layout}"))
    return params


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _run(ball, name, tensors, kwargs, weights):
    """The method's outputs and the gradients of <outputs, weights> to the tensors and to isp_c."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    outs = _outputs(getattr(ball, name)(*tensors, **kwargs))
    wrt = tensors + ([ball.isp_c] if ball.isp_c.requires_grad else [])
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def _row_dim(t: torch.Tensor, dim: int, d: int) -> int | None:
    """Compare vectors (the coordinate dim) row-wise, scalars elementwise."""
    return dim if t.dim() > 0 and t.shape[dim] == d and d > 1 else None


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed_c", "learnable_c"])
@pytest.mark.parametrize("c", C_VALUES)
@pytest.mark.parametrize(("case", "layout"), _case_params())
def test_method_matches_geoopt(case, layout, c, learnable, gen):
    name, args, kwargs = case
    inputs = make_inputs(c, gen)
    tensors, kw = _layout(name, args, kwargs, inputs, layout)
    ours, theirs = make_balls(c, learnable)
    with torch.no_grad():
        ref_outs = _outputs(getattr(theirs, name)(*tensors, **kw))
    weights = [torch.randn(o.shape, generator=gen, dtype=F64) for o in ref_outs]
    out_t, grad_t = _run(theirs, name, tensors, kw, weights)
    out_o, grad_o = _run(ours, name, tensors, kw, weights)
    with lfi_fast.use_backend("torch"):  # lfi_fast's reference: geoopt's formulas, log1p artanh
        out_r, grad_r = _run(ours, name, tensors, kw, weights)
    dim = kw.get("dim", -1)
    names = [f"output {i}" for i in range(len(out_o))] + [
        f"grad {n}" for n in list(args) + (["isp_c"] if learnable else [])]
    for what, a, b, r in zip(names, out_o + grad_o, out_t + grad_t, out_r + grad_r):
        assert a.dtype == b.dtype
        rd = _row_dim(b, dim, D)
        assert_rows_close(a, r, dtype=F64, dim=rd, slack=_roundoff(r), what=f"{name} {what} vs reference")
        # geoopt's artanh, 0.5 (log(1 + z) - log(1 - z)), drifts from the exact value at tiny z
        # (at x = 0 its gradients are off by up to ~30 %): where it does, we match the exact value,
        # so the comparison with geoopt allows geoopt's own deviation from the reference.
        own = 2 * row_norm(b - r, rd)
        assert_rows_close(a, b, dtype=F64, dim=rd, slack=_roundoff(b) + own, what=f"{name} {what} vs geoopt")


def _roundoff(ref: torch.Tensor) -> torch.Tensor:
    """An absolute allowance at 1e-12 of the gradient's scale, for its elements that are 0 in exact
    arithmetic: e.g. the gradient to r of a projected r ⊗ x, where both sides carry only round-off
    (geoopt's may be exactly 0, ours 1e-22)."""
    return 1e-12 * ref.detach().abs().max()


def test_inner_keepdim_false_is_one_value_per_point(gen):
    """geoopt's inner(keepdim=False) multiplies a (N, 1) factor by a (N,) product: (N, N). Ours
    returns the N values that geoopt's keepdim=True holds."""
    inputs = make_inputs(0.7, gen)
    ours, theirs = make_balls(0.7, True)
    x, u, v = inputs["x"], inputs["u"], inputs["v"]
    expected = theirs.inner(x, u, v, keepdim=True).squeeze(-1)
    assert_rows_close(ours.inner(x, u, v), expected, dtype=F64, dim=None)
    expected = theirs.inner(x, u, keepdim=True).squeeze(-1)
    assert_rows_close(ours.inner(x, u), expected, dtype=F64, dim=None)
    assert ours.inner(x, u).shape == (N,)


def test_batched_mobius_matvec_falls_through(gen):
    ours, theirs = make_balls(1.0, False)
    m = torch.randn(N, 3, D, generator=gen, dtype=F64)
    x = ball_points(N, D, 1.0, gen)
    assert_rows_close(ours.mobius_matvec(m, x), theirs.mobius_matvec(m, x), dtype=F64)


def test_mobius_matvec_along_dim_0(gen):
    """mobius_matvec(m, x, dim=0) keeps the coordinates along dim 0: geoopt's result of the
    transposed input, transposed (geoopt's own dim=0 result mixes the axes)."""
    ours, theirs = make_balls(1.0, False)
    x, m = ball_points(N, D, 1.0, gen), torch.randn(3, D, generator=gen, dtype=F64)
    assert_rows_close(ours.mobius_matvec(m, x.T, dim=0).T, theirs.mobius_matvec(m, x), dtype=F64)


def test_mobius_scalar_mul_number(gen):
    """A Python-number r works (geoopt's TorchScript takes only a tensor)."""
    ours, theirs = make_balls(0.5, False)
    x = ball_points(N, D, 0.5, gen)
    for r in (0.3, -2.0, 3):
        expected = theirs.mobius_scalar_mul(torch.tensor(float(r), dtype=F64), x)
        assert_rows_close(ours.mobius_scalar_mul(r, x), expected, dtype=F64)


@pytest.mark.parametrize("name", ["retr", "retr_transp", "transp_follow_retr", "expmap_transp"])
def test_exact_ball_matches_geoopt(name, gen):
    """PoincareBallExact retracts with the exponential map, as geoopt's."""
    inputs = make_inputs(0.5, gen)
    ours, theirs = make_balls(0.5, True, exact=True)
    args = {"retr": ("x", "u"), "retr_transp": ("w", "step", "v"),
            "transp_follow_retr": ("w", "step", "v"), "expmap_transp": ("w", "step", "v")}[name]
    tensors = [inputs[a] for a in args]
    ref = _outputs(getattr(theirs, name)(*tensors))
    weights = [torch.randn(o.shape, generator=gen, dtype=F64) for o in ref]
    out_t, grad_t = _run(theirs, name, tensors, {}, weights)
    out_o, grad_o = _run(ours, name, tensors, {}, weights)
    for a, b in zip(out_o + grad_o[:-1], out_t + grad_t[:-1]):
        assert_rows_close(a, b, dtype=F64)
    assert_rows_close(grad_o[-1], grad_t[-1], dtype=F64, dim=None, what="grad isp_c")


# ---- class relations -----------------------------------------------------------------------------


def test_isinstance_and_state():
    ball = lg.PoincareBall(c=0.3, learnable=True)
    assert isinstance(ball, geoopt.PoincareBall)
    assert isinstance(ball, geoopt.manifolds.Stereographic)
    assert isinstance(ball, geoopt.manifolds.Manifold)
    assert not isinstance(geoopt.PoincareBall(), lg.PoincareBall)
    assert not isinstance(geoopt.Sphere(), lg.PoincareBall)
    exact = lg.PoincareBallExact()
    assert isinstance(exact, (geoopt.PoincareBallExact)) and isinstance(exact, lg.PoincareBall)
    assert exact.reversible and not ball.reversible
    assert repr(ball) == repr(geoopt.PoincareBall()) == "PoincareBall manifold"
    assert repr(exact) == repr(geoopt.PoincareBallExact())
    # same parameters and state dict as geoopt's: checkpoints load either way
    theirs = geoopt.PoincareBall(c=0.3, learnable=True)
    names = [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ball.named_parameters()] == names == ["isp_c"]
    torch.testing.assert_close(ball.c, theirs.c)
    fresh = lg.PoincareBall(c=2.0, learnable=True)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh.c, theirs.c)
    assert fresh.isp_c.requires_grad and not lg.PoincareBall(c=2.0).isp_c.requires_grad
    clone = pickle.loads(pickle.dumps(ball))
    assert type(clone) is lg.PoincareBall
    torch.testing.assert_close(clone.c, ball.c)


def test_random_points_and_manifold_tensors(gen):
    ball = lg.PoincareBall(c=2.0).to(F64)
    torch.manual_seed(0)
    ours = ball.random_normal(4, 3, std=0.5)
    torch.manual_seed(0)
    theirs = geoopt.PoincareBall(c=2.0).to(F64).random_normal(4, 3, std=0.5)
    assert isinstance(ours, geoopt.ManifoldTensor) and ours.manifold is ball
    assert_rows_close(ours, theirs, dtype=F64)
    p = geoopt.ManifoldParameter(ours, manifold=ball)
    expected = theirs.dist(theirs.flip(0), p="g")
    assert_rows_close(p.dist(ours.flip(0), p="g"), expected, dtype=F64, dim=None)


# ---- Riemannian optimisers -----------------------------------------------------------------------


def _fit(ball, init, pairs, target, optimizer, steps=50):
    emb = geoopt.ManifoldParameter(init.clone(), manifold=ball)
    params = [emb] + ([ball.isp_c] if ball.isp_c.requires_grad else [])
    if optimizer == "adam":
        opt = geoopt.optim.RiemannianAdam(params, lr=0.03, stabilize=10)
    else:
        opt = geoopt.optim.RiemannianSGD(params, lr=2e-3, momentum=0.9, stabilize=10)
    i, j = pairs
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((ball.dist(emb[i], emb[j]) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=F64), emb.detach().clone(), ball.c.detach()


@pytest.mark.parametrize("exact", [False, True], ids=["retr", "exact"])
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed_c", "learnable_c"])
@pytest.mark.parametrize(("optimizer", "dim"), [("adam", 2), ("adam", 5), ("sgd", 5)])
def test_embedding_fit_matches_geoopt(optimizer, dim, learnable, exact, gen):
    """Fit 20 points to random target distances: the same loss curve with either ball."""
    n = 20
    init = ball_points(n, dim, 1.0, gen, zero_row=False) * 0.3
    pairs = torch.triu_indices(n, n, offset=1)
    target = torch.rand(pairs.shape[1], generator=gen, dtype=F64) * 3 + 0.5
    ours, theirs = make_balls(1.0, learnable, exact)
    loss_o, emb_o, c_o = _fit(ours, init, pairs, target, optimizer)
    loss_t, emb_t, c_t = _fit(theirs, init, pairs, target, optimizer)
    assert loss_t[-1] < 0.7 * loss_t[0]  # it does fit
    assert_rows_close(loss_o, loss_t, dtype=F64, dim=None, tol=1e-8, what="loss curve")
    assert_rows_close(emb_o, emb_t, dtype=F64, tol=1e-8, what="final embedding")
    assert_rows_close(c_o, c_t, dtype=F64, dim=None, tol=1e-8, what="final curvature")
    if learnable:
        assert float((c_o - 1.0).abs()) > 1e-4  # the curvature did move


# ---- patch() / unpatch() -------------------------------------------------------------------------

_GEOOPT_HOMES = ["geoopt", "geoopt.manifolds", "geoopt.manifolds.stereographic",
                 "geoopt.manifolds.stereographic.manifold"]


@pytest.fixture
def originals():
    saved = {m: (sys.modules[m].PoincareBall, sys.modules[m].PoincareBallExact)
             for m in _GEOOPT_HOMES}
    yield saved
    lg.unpatch()
    for m, (pb, pbe) in saved.items():  # whatever a failing test left behind
        sys.modules[m].PoincareBall, sys.modules[m].PoincareBallExact = pb, pbe


def test_patch_unpatch(originals):
    pb, pbe = originals["geoopt"]
    before = geoopt.PoincareBall(c=0.5)
    assert not lg.is_patched()
    lg.patch()
    lg.patch()  # idempotent
    assert lg.is_patched()
    for m in _GEOOPT_HOMES:
        assert issubclass(sys.modules[m].PoincareBall, lg.PoincareBall)
        assert issubclass(sys.modules[m].PoincareBallExact, lg.PoincareBallExact)
    during = geoopt.PoincareBall(c=0.5, learnable=True)
    during_exact = geoopt.manifolds.PoincareBallExact()
    assert isinstance(during, lg.PoincareBall) and isinstance(during, pb)
    assert isinstance(during_exact, lg.PoincareBallExact) and isinstance(during_exact, pbe)
    # balls built before the patch still pass isinstance against the patched name ...
    assert isinstance(before, geoopt.PoincareBall)
    assert isinstance(before, geoopt.manifolds.PoincareBall)
    assert isinstance(pbe(), geoopt.PoincareBall)
    assert issubclass(pb, geoopt.PoincareBall)
    # ... without becoming lfi_fast balls, and other manifolds do not pass
    assert not isinstance(before, lg.PoincareBall)
    assert not isinstance(geoopt.Sphere(), geoopt.PoincareBall)
    assert not isinstance(geoopt.Stereographic(), geoopt.PoincareBall)
    assert repr(during) == "PoincareBall manifold"
    assert pickle.loads(pickle.dumps(during)).c.item() == pytest.approx(0.5)

    lg.unpatch()
    lg.unpatch()  # idempotent
    assert not lg.is_patched()
    for m in _GEOOPT_HOMES:
        assert (sys.modules[m].PoincareBall, sys.modules[m].PoincareBallExact) == originals[m]
    assert type(geoopt.PoincareBall()) is pb
    # balls built while patched remain geoopt balls
    assert isinstance(during, geoopt.PoincareBall)
    assert isinstance(during_exact, geoopt.PoincareBallExact)


def test_patched_context(originals):
    with lg.patched():
        assert lg.is_patched()
        with lg.patched():
            assert lg.is_patched()
        assert lg.is_patched()  # the inner block found it patched and left it so
    assert not lg.is_patched()
    with pytest.raises(RuntimeError, match="inside"), lg.patched():
        raise RuntimeError("inside")
    assert not lg.is_patched()
    lg.patch()
    with lg.patched():
        pass
    assert lg.is_patched()


def test_patched_geoopt_code_trains_as_ours(originals, gen):
    """Code that builds geoopt.PoincareBall itself gets lfi_fast's ball, with the same results."""
    n, dim = 20, 3
    init = ball_points(n, dim, 1.0, gen, zero_row=False) * 0.3
    pairs = torch.triu_indices(n, n, offset=1)
    target = torch.rand(pairs.shape[1], generator=gen, dtype=F64) * 2 + 0.5
    with lg.patched():
        ball = geoopt.PoincareBall(c=1.0).to(F64)
        assert isinstance(ball, lg.PoincareBall)
        loss_p, _, _ = _fit(ball, init, pairs, target, "adam", steps=20)
    loss_t, _, _ = _fit(geoopt.PoincareBall(c=1.0).to(F64), init, pairs, target, "adam", steps=20)
    assert_rows_close(loss_p, loss_t, dtype=F64, dim=None, tol=1e-8)


# ---- geoopt stays optional -----------------------------------------------------------------------


def test_geoopt_is_optional():
    code = (
        "import sys\n"
        "import lfi_fast, lfi_fast.nn, lfi_fast.hyperbolic\n"
        "assert 'geoopt' not in sys.modules, 'importing lfi_fast imported geoopt'\n"
        "sys.modules['geoopt'] = None  # as if it were not installed\n"
        "try:\n"
        "    import lfi_fast.geoopt\n"
        "except ImportError as e:\n"
        "    assert 'pip install geoopt' in str(e), str(e)\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
