"""lfi_fast.nn.MobiusLinear and HyperbolicMLR: shapes, parity with plain-PyTorch references written
here (the MLR's reference forms every (-p_k) ⊕ x, a B×K×D broadcast), gradcheck, dtype/device,
torch.compile, and small training sanity checks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_rows_close

import lfi_fast
from lfi_fast import hyperbolic as hyp
from lfi_fast.nn import HyperbolicMLR, MobiusLinear, poincare_mlr
from lfi_fast.reference import hyperbolic as ref

F64 = torch.float64
C_VALUES = (0.1, 1.0, 4.0)


def ball_points(shape, c, gen, *, max_rho=0.99, dtype=F64):
    """Points of the ball of radius 1/sqrt(c), norms uniform in [0, max_rho] of the radius."""
    v = torch.randn(*shape, generator=gen, dtype=F64)
    v = v / v.norm(dim=-1, keepdim=True)
    rho = torch.rand(*shape[:-1], 1, generator=gen, dtype=F64) * max_rho
    return (v * rho / math.sqrt(c)).to(dtype)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread. (With more, each of MKL's GEMMs here waits for its
    team, which on a loaded machine costs tens of milliseconds per call.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- references ----------------------------------------------------------------------------------


def mlr_reference(x, p, a, c):
    """Ganea et al. 2018's MLR term by term: z_k = (-p_k) ⊕_c x formed for every (x, k) pair
    (a (..., K, D) broadcast), geoopt's clamps (denominators and |a| at 1e-15)."""
    xb = x.unsqueeze(-2)  # (..., 1, D)
    u = -p  # (K, D)
    u2 = (u * u).sum(-1, keepdim=True)
    v2 = (xb * xb).sum(-1, keepdim=True)
    uv = (u * xb).sum(-1, keepdim=True)
    num = (1 + 2 * c * uv + c * v2) * u + (1 - c * u2) * xb
    z = num / (1 + 2 * c * uv + c**2 * u2 * v2).clamp_min(1e-15)  # (..., K, D)
    lam_p = 2 / (1 - c * (p * p).sum(-1)).clamp_min(1e-15)
    a_norm = a.norm(dim=-1).clamp_min(1e-15)
    za = (z * a).sum(-1)
    z2 = (z * z).sum(-1)
    sqrt_c = c**0.5
    arg = 2 * sqrt_c * za / ((1 - c * z2).clamp_min(1e-15) * a_norm)
    return lam_p * a_norm / sqrt_c * torch.asinh(arg)


def mobius_linear_reference(x, weight, bias, c):
    """(W ⊗_c x) ⊕_c expmap0(bias), with lfi_fast's pure-PyTorch reference ops (geoopt's math)."""
    y = ref.mobius_matvec(weight, x, c)
    if bias is not None:
        y = ref.mobius_add(y, ref.expmap0(bias, c), c)
    return y


# ---- HyperbolicMLR -------------------------------------------------------------------------------


def _mlr_inputs(n, k, d, c, gen, *, requires_grad=False):
    x = ball_points((n, d), c, gen)
    p = ball_points((k, d), c, gen, max_rho=0.9)
    a = torch.randn(k, d, generator=gen, dtype=F64)
    ct = torch.tensor(c, dtype=F64)
    if requires_grad:
        for t in (x, p, a, ct):
            t.requires_grad_()
    return x, p, a, ct


@pytest.mark.parametrize("c", C_VALUES)
def test_poincare_mlr_matches_reference(c, gen):
    x, p, a, ct = _mlr_inputs(64, 7, 6, c, gen, requires_grad=True)
    out = poincare_mlr(x, p, a, ct)
    expected = mlr_reference(x, p, a, ct)
    assert out.shape == (64, 7)
    assert_rows_close(out, expected, dtype=F64, what="logits")
    g = torch.randn(out.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((out * g).sum(), (x, p, a, ct))
    grads_ref = torch.autograd.grad((expected * g).sum(), (x, p, a, ct))
    for name, gr, ge in zip(("x", "p", "a", "c"), grads, grads_ref):
        assert_rows_close(gr, ge, dtype=F64, dim=-1 if gr.dim() else None, what=f"grad {name}")


def test_poincare_mlr_edges(gen):
    c = 1.0
    x, p, a, ct = _mlr_inputs(16, 5, 4, c, gen)
    x[0] = 0  # the origin
    x[1] = p[2]  # on a hyperplane's point: z = 0, logit 0
    p[0] = 0  # a hyperplane through the origin
    a[1] = 0  # a degenerate normal: logit 0 (|a| clamped)
    out = poincare_mlr(x, p, a, ct)
    expected = mlr_reference(x, p, a, ct)
    assert torch.isfinite(out).all()
    # x == p_k makes <z, a> a cancellation: an absolute error of order eps·|x||a| there
    assert_rows_close(out, expected, dtype=F64, slack=torch.full((16,), 1e-13))
    assert out[1, 2].abs() < 1e-12 and (out[:, 1] == 0).all()


def test_poincare_mlr_shapes_and_errors(gen):
    x, p, a, _ = _mlr_inputs(12, 3, 4, 0.5, gen)
    assert poincare_mlr(x.reshape(2, 6, 4), p, a, 0.5).shape == (2, 6, 3)
    assert poincare_mlr(x[0], p, a, 0.5).shape == (3,)
    assert poincare_mlr(x[:0], p, a, 0.5).shape == (0, 3)
    batched = poincare_mlr(x.reshape(2, 6, 4), p, a, 0.5)
    torch.testing.assert_close(batched.reshape(12, 3), poincare_mlr(x, p, a, 0.5))
    with pytest.raises(ValueError, match="same D"):
        poincare_mlr(x, p[:, :3], a[:, :3], 0.5)


def test_poincare_mlr_gradcheck(gen):
    x, p, a, ct = _mlr_inputs(4, 3, 3, 0.7, gen, requires_grad=True)
    assert torch.autograd.gradcheck(poincare_mlr, (x, p, a, ct))
    assert torch.autograd.gradgradcheck(poincare_mlr, (x, p, a, ct))


@pytest.mark.parametrize("learn_c", [False, True])
def test_hyperbolic_mlr_module(learn_c, gen):
    c = 0.5
    mlr = HyperbolicMLR(6, 4, c=c, learn_c=learn_c, dtype=F64)
    with torch.no_grad():
        mlr.points.copy_(torch.randn(4, 6, generator=gen, dtype=F64) * 0.5)
    x = ball_points((3, 5, 6), c, gen)
    out = mlr(x)
    assert out.shape == (3, 5, 4) and out.dtype == F64
    # the parametrisation: p = expmap0(points), a = (1 - c|p|²)·tangents (transported from 0)
    p = ref.expmap0(mlr.points.detach(), c)
    a = (1 - c * (p * p).sum(-1, keepdim=True)) * mlr.tangents.detach()
    assert_rows_close(out, mlr_reference(x, p, a, c), dtype=F64)
    pk, ak = mlr.hyperplanes()
    assert_rows_close(pk, p, dtype=F64)
    assert_rows_close(ak, a, dtype=F64)
    assert isinstance(mlr.c, torch.Tensor if learn_c else float)
    assert float(torch.as_tensor(mlr.c).detach()) == pytest.approx(c)
    names = {n for n, _ in mlr.named_parameters()}
    assert names == ({"points", "tangents", "isp_c"} if learn_c else {"points", "tangents"})
    assert "in_features=6, num_classes=4, c=0.5" in repr(mlr)
    assert ("learn_c=True" in repr(mlr)) == learn_c


def test_hyperbolic_mlr_gradcheck(gen):
    mlr = HyperbolicMLR(3, 2, c=0.8, learn_c=True, dtype=F64)
    with torch.no_grad():
        mlr.points.copy_(torch.randn(2, 3, generator=gen, dtype=F64) * 0.4)
    x = ball_points((4, 3), 0.8, gen).requires_grad_()
    params = dict(mlr.named_parameters())
    names = list(params)

    def f(x, *ps):
        return torch.func.functional_call(mlr, dict(zip(names, ps)), (x,))

    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_hyperbolic_mlr_learns_two_clusters():
    """Two separable clusters in the ball: > 90 % train accuracy within 25 Adam steps."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 128, 4, 1.0
    centers = torch.zeros(2, d)
    centers[0, 0], centers[1, 0] = 0.6, -0.6
    labels = torch.arange(n) % 2
    x = hyp.expmap0(centers[labels] + 0.25 * torch.randn(n, d, generator=g), c)
    torch.manual_seed(0)
    mlr = HyperbolicMLR(d, 2, c=c)
    opt = torch.optim.Adam(mlr.parameters(), lr=0.05)
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(mlr(x), labels)
        loss.backward()
        opt.step()
    accuracy = (mlr(x).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9, f"train accuracy {accuracy:.3f}"


# ---- MobiusLinear --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c", C_VALUES)
def test_mobius_linear_matches_reference(c, bias, gen):
    layer = MobiusLinear(5, 3, c=c, bias=bias, dtype=F64)
    x = ball_points((2, 8, 5), c, gen).requires_grad_()
    out = layer(x)
    assert out.shape == (2, 8, 3) and out.dtype == F64
    expected = mobius_linear_reference(x, layer.weight, layer.bias, c)
    assert_rows_close(out, expected, dtype=F64)
    g = torch.randn(out.shape, generator=gen, dtype=F64)
    wrt = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad((out * g).sum(), wrt)
    grads_ref = torch.autograd.grad((expected * g).sum(), wrt)
    for gr, ge in zip(grads, grads_ref):
        assert_rows_close(gr, ge, dtype=F64)
    assert (out.norm(dim=-1) < 1 / math.sqrt(c)).all()


def test_mobius_linear_module(gen):
    layer = MobiusLinear(4, 6, c=2.0, learn_c=True)
    assert layer.weight.shape == (6, 4) and layer.bias.shape == (6,)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias", "isp_c"}
    assert "in_features=4, out_features=6, c=2, learn_c=True, bias=True" in repr(layer)
    assert "bias=False" in repr(MobiusLinear(4, 6, bias=False))
    # like nn.Linear's initialisation: |w| <= 1/sqrt(in), |bias| <= 1/sqrt(in)
    assert layer.weight.abs().max() <= 0.5 and layer.bias.abs().max() <= 0.5
    expected = ref.expmap0(layer.bias.detach(), 2.0)
    assert_rows_close(layer.bias_point().detach(), expected, dtype=torch.float32)
    assert MobiusLinear(4, 6, bias=False).bias_point() is None
    # dtype follows the parameters
    layer64 = layer.double()
    assert layer64.isp_c.dtype == F64 and layer64.weight.dtype == F64
    x = ball_points((3, 4), 2.0, gen)
    assert layer64(x).dtype == F64
    assert layer64(x[0]).shape == (6,)
    # the curvature's gradient reaches isp_c
    layer64(x).sum().backward()
    assert layer64.isp_c.grad is not None and torch.isfinite(layer64.isp_c.grad)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c must be a positive"):
            MobiusLinear(4, 6, c=bad)
        with pytest.raises(ValueError, match="c must be a positive"):
            HyperbolicMLR(4, 6, c=bad)


def test_mobius_linear_gradcheck(gen):
    layer = MobiusLinear(3, 2, c=0.6, learn_c=True, dtype=F64)
    x = ball_points((4, 3), 0.6, gen).requires_grad_()
    params = dict(layer.named_parameters())
    names = list(params)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_mobius_linear_and_mlr_train_on_clusters():
    """MobiusLinear → HyperbolicMLR on two clusters: > 90 % train accuracy within 30 steps."""
    g = torch.Generator().manual_seed(1)
    n, d, c = 128, 4, 1.0
    labels = torch.arange(n) % 2
    centers = torch.zeros(2, d)
    centers[0, 1], centers[1, 1] = 0.5, -0.5
    x = hyp.expmap0(centers[labels] + 0.2 * torch.randn(n, d, generator=g), c)
    torch.manual_seed(1)
    model = torch.nn.Sequential(MobiusLinear(d, 8, c=c), HyperbolicMLR(8, 2, c=c))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    accuracy = (model(x).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9, f"train accuracy {accuracy:.3f}"


# ---- torch.compile -------------------------------------------------------------------------------


def test_modules_compile_fullgraph(gen):
    """The modules trace whole (the ops have fake kernels), a fixed and a learnable c: aot_eager,
    forward and backward."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(MobiusLinear(5, 4, c=0.5), HyperbolicMLR(4, 3, c=0.5, learn_c=True))
    model = model.double()
    x = ball_points((6, 5), 0.5, gen)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out_e, out_c = model(x), compiled(x)
    assert_rows_close(out_c, out_e, dtype=F64)
    grads_e = torch.autograd.grad(out_e.sum(), list(model.parameters()))
    grads_c = torch.autograd.grad(out_c.sum(), list(model.parameters()))
    for a, b in zip(grads_c, grads_e):
        assert_rows_close(a, b, dtype=F64, dim=-1 if a.dim() else None)


def test_modules_on_reference_backend(gen):
    """The same numbers on the pure-PyTorch backend (the modules only call the public ops)."""
    layer = MobiusLinear(5, 4, c=0.5, dtype=F64)
    x = ball_points((6, 5), 0.5, gen)
    fast = layer(x)
    with lfi_fast.use_backend("torch"):
        slow = layer(x)
    assert_rows_close(fast, slow, dtype=F64)
