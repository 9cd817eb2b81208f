"""lfi_fast.hyperbolic.mobius_add on every backend: values and gradients against the reference and
geoopt, half precision, broadcasting, layouts, gradcheck, opcheck, torch.compile, bad input, fuzz."""
from __future__ import annotations

import math

import geoopt
import pytest
import torch
from conftest import (
    DEVICES,
    TOL,
    assert_rows_close,
    backends_for,
    device_backend_params,
    triton_kernel,
)
from fuzz import (
    ALLOWED_ERRORS,
    ball_points,
    check_op_against_reference,
    fuzz_settings,
    names_argument,
    poincare_cases,
    with_layout,
)
from geoopt.manifolds.stereographic import math as gm
from hypothesis import given, settings

import lfi_fast
from lfi_fast import hyperbolic as hyp
from lfi_fast.reference import hyperbolic as ref

PARAMS = device_backend_params("hyperbolic", "mobius_add")
C_VALUES = (1e-4, 0.1, 1.0, 10.0)
F64, F32 = torch.float64, torch.float32


# ---- oracles -------------------------------------------------------------------------------------


def ball_eps(dtype: torch.dtype) -> float:
    """geoopt's projection margin for an input dtype (the half types take float32's)."""
    return 1e-5 if dtype == F64 else 4e-3


def _c64(c):
    return c.double() if isinstance(c, torch.Tensor) else float(c)


def project64(v: torch.Tensor, c, eps: float, dim: int) -> torch.Tensor:
    """geoopt's projection, written out: onto the ball of radius (1 - eps)/sqrt(c)."""
    c = torch.as_tensor(c, dtype=v.dtype, device=v.device)
    maxnorm = (1 - eps) / c.abs().clamp_min(1e-15) ** 0.5
    norm = v.norm(dim=dim, keepdim=True).clamp_min(1e-15)
    return torch.where(norm > maxnorm, v / norm * maxnorm, v)


def ref64(x, y, c, *, dim=-1, project=True, dtype=F64):
    """The float64 oracle for inputs of `dtype`: lfi_fast.reference in float64, projected with the
    margin of `dtype` (so float32 inputs are judged against float32's ball, as geoopt does)."""
    x64, y64, c64 = x.double(), y.double(), _c64(c)
    if dtype == F64:
        return ref.mobius_add(x64, y64, c64, dim=dim, project=project)
    out = ref.mobius_add(x64, y64, c64, dim=dim, project=False)
    return project64(out, c64, ball_eps(dtype), dim) if project else out


def geoopt64(x, y, c, *, dim=-1, project=True, dtype=F64):
    """geoopt in float64, as PoincareBall computes it: project(mobius_add(x, y, k), k), k = -c."""
    c64 = _c64(c)
    k = -(c64 if isinstance(c64, torch.Tensor) else torch.tensor(c64, dtype=F64, device=x.device))
    out = gm.mobius_add(x.double(), y.double(), k=k, dim=dim)
    return gm.project(out, k=k, dim=dim, eps=ball_eps(dtype)) if project else out


def call(backend, *args, **kwargs):
    with lfi_fast.use_backend(backend):
        return hyp.mobius_add(*args, **kwargs)


def points(shape, kind, c, gen, *, dim=-1, dtype=F64, device="cpu") -> torch.Tensor:
    return ball_points(shape, dim, kind, c, gen).to(device=device, dtype=dtype)


def grads_of(fn, inputs, g):
    """Gradients of <fn(*inputs), g> to each tensor in `inputs` (fresh leaves), and the output."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, leaves, g.to(out.dtype))
    return out, gs


def check_against_oracles(backend, x, y, c, *, dim=-1, project=True, gen=None, what=""):
    """Values and gradients (x, y and a tensor c) of the backend against lfi_fast's reference and
    against geoopt, both in float64, within the dtype's tolerance per row (plus, in ill-conditioned
    rows only, the slack of check_op_against_reference: near the boundary the gradient to y is
    ~1e-6 of the others and no float64 evaluation, geoopt's included, gets it to 1e-10)."""
    dtype = x.dtype

    def fn(a, b, cc):
        return call(backend, a, b, cc, dim=dim, project=project)

    for name, oracle in (("reference", ref64), ("geoopt", geoopt64)):
        out = check_op_against_reference(
            fn,
            lambda a, b, cc, oracle=oracle: oracle(a, b, cc, dim=dim, project=project, dtype=dtype),
            (x, y, c),
            dim=dim,
            grad_args=(0, 1, 2),
            gen=gen,
            what=f"{backend} {what} vs {name}",
        )
        assert out.dtype == dtype and out.device == x.device
        assert out.shape == torch.broadcast_shapes(x.shape, y.shape)


# ---- values and gradients against the reference and geoopt -----------------------------------

KINDS = ("inside", "boundary", "zero_x", "zero_y", "zero_both", "tiny", "outside")


def make_pair(kind, c, gen, *, shape=(6, 5), dim=-1, dtype=F64, device="cpu"):
    base = {"zero_x": ("zeros", "inside"), "zero_y": ("inside", "zeros"), "zero_both": ("zeros", "zeros")}
    kx, ky = base.get(kind, (kind, kind))
    x = points(shape, kx, c, gen, dim=dim, dtype=dtype, device=device)
    y = points(shape, ky, c, gen, dim=dim, dtype=dtype, device=device)
    return x, y


@pytest.mark.parametrize("project", [True, False], ids=["project", "noproject"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_values_and_grads_match_reference_and_geoopt(device, backend, dtype, kind, project, gen):
    for c in C_VALUES:
        what = f"{dtype} {kind} c={c} project={project}"
        x, y = make_pair(kind, c, gen, dtype=dtype, device=device)
        check_against_oracles(backend, x, y, torch.tensor(c, dtype=dtype), project=project, gen=gen, what=what)
        # c as a Python number: the same values
        out_f = call(backend, x, y, c, project=project)
        assert_rows_close(out_f, call(backend, x, y, torch.tensor(c, dtype=F64), project=project), dtype=dtype,
                          what=f"{backend} {what}: float c vs tensor c")
        if kind.startswith("zero"):  # x = 0 or y = 0: x (+) 0 = x, 0 (+) y = y, before projection
            want = y if kind == "zero_x" else x
            if not project:
                assert_rows_close(out_f, want, dtype=dtype, what=f"{backend} {what}: identity")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_matches_geoopt_poincareball(device, backend, dtype, gen):
    """geoopt.PoincareBall(c).mobius_add(x, y) (project=True, its default), c a float."""
    for c in C_VALUES:
        ball = geoopt.PoincareBall(torch.tensor(c, dtype=F64)).to(device)
        c_ball = float(-ball.k)  # the c the ball really has (it stores softplus^-1(c))
        for kind in ("inside", "boundary"):
            x, y = make_pair(kind, c_ball, gen, shape=(8, 7), dtype=dtype, device=device)
            if dtype == F64:
                want = ball.mobius_add(x, y)
            else:  # the ball in float64 with float32's margin (geoopt's own float32 rounds)
                want = geoopt64(x, y, c_ball, dtype=dtype)
            got = call(backend, x, y, c_ball)
            assert_rows_close(got, want, dtype=dtype, what=f"{backend} {dtype} {kind} c={c}")


@pytest.mark.parametrize("dim_case", ["0_of_2", "1_of_3", "-2_of_3", "0_of_3"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_dim_other_than_last(device, backend, dtype, dim_case, gen):
    dim, nd = (int(v) for v in dim_case.split("_of_"))
    shape = {2: (5, 4), 3: (3, 5, 4)}[nd]
    c = 0.3
    for project, kind in ((True, "inside"), (False, "inside"), (True, "boundary")):
        x, y = make_pair(kind, c, gen, shape=shape, dim=dim, dtype=dtype, device=device)
        what = f"{dtype} dim={dim} project={project} {kind}"
        check_against_oracles(backend, x, y, torch.tensor(c, dtype=dtype), dim=dim, project=project, gen=gen,
                              what=what)
        # the same as with the coordinates moved last
        out = call(backend, x, y, c, dim=dim, project=project)
        last = call(backend, x.movedim(dim, -1), y.movedim(dim, -1), c, project=project)
        assert_rows_close(out.movedim(dim, -1), last, dtype=dtype, what=f"{backend} {what} vs dim=-1")


# ---- half precision --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_half_precision(device, backend, dtype, gen):
    for c in C_VALUES:
        radius = 1 / math.sqrt(c)
        what = f"{backend} {dtype} c={c}"
        # norms up to 0.9 / sqrt(c): within 2e-2 of the float64 reference, finite gradients
        x = (points((64, 16), "inside", c, gen) * (0.9 / 0.999)).to(device, dtype)
        y = (points((64, 16), "inside", c, gen) * (0.9 / 0.999)).to(device, dtype)
        for project in (True, False):
            out = call(backend, x, y, c, project=project)
            assert out.dtype == dtype and out.shape == x.shape
            assert bool(torch.isfinite(out).all()), f"{what}: NaN/inf output"
            assert_rows_close(out, ref64(x, y, c, project=project, dtype=dtype), dtype=dtype, what=what)
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        call(backend, xl, yl, c).backward(torch.randn(x.shape, generator=gen).to(device, dtype))
        assert xl.grad.dtype == dtype and bool(torch.isfinite(xl.grad).all() & torch.isfinite(yl.grad).all())
        # every finite input inside the ball, however close to its boundary: finite output
        for kx, ky in (("boundary", "boundary"), ("boundary", "inside"), ("inside", "boundary"), ("boundary", "zeros")):
            xb = points((64, 16), kx, c, gen).to(device, dtype)
            yb = points((64, 16), ky, c, gen).to(device, dtype)
            inside = (xb.double().norm(dim=-1) < radius) & (yb.double().norm(dim=-1) < radius)
            assert bool(inside.any())
            for project in (True, False):
                out = call(backend, xb[inside], yb[inside], c, project=project)
                assert bool(torch.isfinite(out).all()), f"{what} {kx}/{ky} project={project}: NaN/inf"
            out = call(backend, xb[inside], yb[inside], c)
            maxnorm = (1 - 4e-3) * radius
            assert float(out.double().norm(dim=-1).max()) <= maxnorm * (1 + 2 * torch.finfo(dtype).eps)


# ---- broadcasting, layouts, empty --------------------------------------------------------------

BROADCAST = {
    "x(N,D)+y(D)": ((6, 5), (5,)),
    "x(D)+y(N,D)": ((5,), (6, 5)),
    "x(A,1,D)+y(B,D)": ((3, 1, 5), (4, 5)),
    "x(1,D)+y(N,D)": ((1, 5), (6, 5)),
    "x(A,B,D)+y(B,D)": ((2, 3, 5), (3, 5)),
    "x(D)+y(D)": ((5,), (5,)),
}


@pytest.mark.parametrize("case", list(BROADCAST))
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_broadcasting_like_geoopt(device, backend, case, gen):
    """Shapes broadcast as in geoopt; gradients come back summed to each input's shape."""
    sx, sy = BROADCAST[case]
    for dtype in (F64, F32):
        for kind in ("inside", "boundary"):
            x = points(sx, kind, 0.5, gen, dtype=dtype, device=device)
            y = points(sy, "inside", 0.5, gen, dtype=dtype, device=device)
            check_against_oracles(backend, x, y, torch.tensor(0.5, dtype=dtype), gen=gen, what=f"{case} {dtype}")


LAYOUT_CASES = [
    ("transposed", "contiguous"),
    ("contiguous", "sliced"),
    ("sliced", "transposed"),
    ("offset", "offset"),
    ("expanded", "sliced"),
    ("transposed", "expanded"),
]


@pytest.mark.parametrize(("lx", "ly"), LAYOUT_CASES, ids=[f"{a}-{b}" for a, b in LAYOUT_CASES])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_noncontiguous_inputs(device, backend, lx, ly, gen):
    """Strided views (the sliced ones have NaN in their gaps, so reading a gap shows)."""
    for dtype in (F64, F32):
        x0 = points((4, 6, 5), "inside", 2.0, gen, dtype=dtype, device=device)
        y0 = points((4, 6, 5), "boundary", 2.0, gen, dtype=dtype, device=device)
        x, y = with_layout(x0, lx, -1), with_layout(y0, ly, -1)
        plain = [t.is_contiguous() and t.storage_offset() == 0 for t in (x, y)]
        assert not all(plain), "the layouts did not take"
        check_against_oracles(backend, x, y, torch.tensor(2.0, dtype=dtype), gen=gen, what=f"{lx}/{ly} {dtype}")
        contiguous = call(backend, x.contiguous(), y.contiguous(), 2.0)
        assert_rows_close(call(backend, x, y, 2.0), contiguous, dtype=dtype, what=f"{lx}/{ly} vs contiguous")


EMPTY = {
    "x(0,D)+y(0,D)": ((0, 5), (0, 5)),
    "x(0,D)+y(D)": ((0, 5), (5,)),
    "x(3,0,D)+y(D)": ((3, 0, 5), (5,)),
    "x(0,1,D)+y(4,D)": ((0, 1, 5), (4, 5)),
    "x(N,0)+y(N,0)": ((4, 0), (4, 0)),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_empty(device, backend, case):
    sx, sy = EMPTY[case]
    shape = torch.broadcast_shapes(sx, sy)
    for dtype in (F64, F32, torch.float16, torch.bfloat16):
        x = torch.zeros(sx, dtype=dtype, device=device, requires_grad=True)
        y = torch.zeros(sy, dtype=dtype, device=device, requires_grad=True)
        c = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        for project in (True, False):
            out = call(backend, x, y, c, project=project)
            assert out.shape == shape and out.dtype == dtype and out.device == x.device
            gx, gy, gc = torch.autograd.grad(out.sum() if out.numel() else out.sum(), (x, y, c), allow_unused=True)
            assert gx is None or gx.shape == x.shape
            assert gy is None or gy.shape == y.shape
            assert gc is None or (gc.shape == () and float(gc) == 0.0)
            if gx is not None:
                assert bool((gx == 0).all())


# ---- gradcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3), (3,))], ids=["same", "broadcast"])
@pytest.mark.parametrize("project", [True, False], ids=["project", "noproject"])
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_gradcheck(device, backend, project, shapes, gen):
    c = 0.7
    sx, sy = shapes
    r = 1 / math.sqrt(c)
    # Row 0: x outside the ball (1.5 radii) and y (0.2 radii) along the same direction, so that
    # x (+) y lies outside too (1.31 radii) and with project=True the projection is active; row 1:
    # both within 0.3 radii, so it is not (at most 0.53 radii). Both far from the projection's
    # switch, which gradcheck's finite differences must not cross.
    u = torch.nn.functional.normalize(torch.randn(sx[-1], generator=gen, dtype=F64), dim=0)
    x = torch.nn.functional.normalize(torch.randn(sx, generator=gen, dtype=F64), dim=-1) * 0.3 * r
    y = torch.nn.functional.normalize(torch.randn(sy, generator=gen, dtype=F64), dim=-1) * 0.3 * r
    x[0] = 1.5 * r * u
    if y.dim() > 1:
        y[0] = 0.2 * r * u
    else:  # one y for every row
        y = 0.2 * r * u
    x, y = x.to(device), y.to(device)
    ct = torch.tensor(c, dtype=F64)
    unprojected = ref64(x, y, c, project=False).norm(dim=-1) / r
    assert float(unprojected[0]) > 1.2 and float(unprojected[1]) < 0.6
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, y, ct))
    with lfi_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b, cc: hyp.mobius_add(a, b, cc, project=project), inputs, eps=1e-6, atol=1e-6, rtol=1e-4
        )


# ---- opcheck -----------------------------------------------------------------------------------


def _op_params():
    params = []
    for device in DEVICES:
        params.append(pytest.param(device, "mobius_add", id=f"{device}-mobius_add"))
        if "triton" in backends_for(device):
            try:
                missing = triton_kernel("hyperbolic", "mobius_add") is None
            except Exception:
                missing = False
            marks = [pytest.mark.triton]
            if missing or not hasattr(torch.ops.lfi_fast, "mobius_add_triton"):
                marks.append(pytest.mark.skip(reason="mobius_add_triton is not registered or written yet"))
            params.append(pytest.param(device, "mobius_add_triton", id=f"{device}-mobius_add_triton", marks=marks))
    return params


@pytest.mark.parametrize(("device", "op_name"), _op_params())
def test_opcheck(device, op_name, gen):
    if op_name == "mobius_add" and not lfi_fast.info()["backends"]["cuda" if device == "cuda" else "cpp"]["available"]:
        pytest.skip(f"the compiled op has no {device} kernel in this build")
    op = getattr(torch.ops.lfi_fast, op_name).default
    bwd = getattr(torch.ops.lfi_fast, op_name.replace("mobius_add", "mobius_add_backward")).default

    def pts(shape, dtype=F64, kind="inside", rg=False):
        return points(shape, kind, 1.0, gen, dtype=dtype, device=device).requires_grad_(rg)

    c64 = torch.tensor(1.0, dtype=F64)
    cases = [
        (pts((5, 4)), pts((5, 4)), c64, True),
        (pts((5, 4), rg=True), pts((4,), rg=True), torch.tensor(0.5, dtype=F64, requires_grad=True), True),
        (pts((3, 1, 4), F32, rg=True), pts((2, 4), F32), torch.tensor(2.0, dtype=F32), False),
        (pts((6, 3), F32, "boundary", rg=True), pts((6, 3), F32, "boundary", rg=True), torch.tensor(1.0, requires_grad=True), True),
        (pts((0, 4)), pts((4,)), c64, True),
    ]
    if device == "cuda":  # c may live on the device as well
        cases.append((pts((5, 4), rg=True), pts((5, 4)), torch.tensor(0.5, dtype=F64, device=device), True))
    for args in cases:
        torch.library.opcheck(op, args)
    x, y = pts((5, 4)), pts((5, 4))
    grad = torch.randn((5, 4), generator=gen, dtype=F64).to(device)
    for needs_c in (True, False):
        torch.library.opcheck(bwd, (grad, x, y, c64, True, needs_c))


# ---- torch.compile -------------------------------------------------------------------------------


def _compiled_backend_params():
    params = []
    for device, backend in (("cpu", "cpp"), ("cuda", "cuda")):
        if device in DEVICES and backend in backends_for(device):
            params.append(pytest.param(device, backend, id=f"{device}-{backend}"))
    return params


@pytest.mark.parametrize(("device", "backend"), _compiled_backend_params())
def test_torch_compile_fullgraph(device, backend, gen):
    torch._dynamo.reset()

    def f(x, y, c):
        # a tensor c (differentiable) and a Python-number c, projected and not
        return hyp.mobius_add(x, y, c) + hyp.mobius_add(y, x, 0.5, project=False).sin()

    x = points((8, 5), "inside", 1.0, gen, device=device)
    y = points((8, 5), "boundary", 1.0, gen, device=device)
    ct = torch.tensor(0.8, dtype=F64)
    g = torch.randn((8, 5), generator=gen, dtype=F64).to(device)
    with lfi_fast.use_backend(backend):
        out_e, grads_e = grads_of(f, (x, y, ct), g)
        compiled = torch.compile(f, fullgraph=True)
        out_c, grads_c = grads_of(compiled, (x, y, ct), g)
    assert_rows_close(out_c, out_e, dtype=F64, what="compiled forward")
    for name, a, b in zip("xyc", grads_c, grads_e):
        assert_rows_close(a, b, dtype=F64, dim=-1 if a.dim() else None, what=f"compiled grad {name}")


# ---- bad input -----------------------------------------------------------------------------------


def _t(*shape, dtype=F32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


# name -> (builder of (args, kwargs), exception type, names the message must mention)
BAD_INPUTS = {
    "shape mismatch x(4,3) y(4,5)": (lambda: ((_t(4, 3), _t(4, 5)), {}), ValueError, ["x", "y"]),
    "batch mismatch x(4,3) y(5,3)": (lambda: ((_t(4, 3), _t(5, 3)), {}), ValueError, ["x", "y"]),
    "coordinate broadcast x(4,3) y(4,1)": (lambda: ((_t(4, 3), _t(4, 1)), {}), ValueError, ["x", "y"]),
    "dtype mismatch f32/f64": (lambda: ((_t(4, 3), _t(4, 3, dtype=F64)), {}), TypeError, ["x", "y"]),
    "dtype mismatch f16/bf16": (
        lambda: ((_t(4, 3, dtype=torch.float16), _t(4, 3, dtype=torch.bfloat16)), {}), TypeError, ["x", "y"]),
    "x int32": (lambda: ((_t(4, 3, dtype=torch.int32), _t(4, 3)), {}), TypeError, ["x"]),
    "y int64": (lambda: ((_t(4, 3), _t(4, 3, dtype=torch.int64)), {}), TypeError, ["y"]),
    "both int64": (lambda: ((_t(4, 3, dtype=torch.int64), _t(4, 3, dtype=torch.int64)), {}), TypeError, ["x"]),
    "x bool": (lambda: ((_t(4, 3, dtype=torch.bool), _t(4, 3)), {}), TypeError, ["x"]),
    "x complex": (lambda: ((_t(4, 3, dtype=torch.complex64), _t(4, 3)), {}), TypeError, ["x"]),
    "c = 0": (lambda: ((_t(4, 3), _t(4, 3), 0.0), {}), ValueError, ["c"]),
    "c = 0 (int)": (lambda: ((_t(4, 3), _t(4, 3), 0), {}), ValueError, ["c"]),
    "c < 0": (lambda: ((_t(4, 3), _t(4, 3), -1.0), {}), ValueError, ["c"]),
    "c nan": (lambda: ((_t(4, 3), _t(4, 3), math.nan), {}), ValueError, ["c"]),
    "c inf": (lambda: ((_t(4, 3), _t(4, 3), math.inf), {}), ValueError, ["c"]),
    "c -inf": (lambda: ((_t(4, 3), _t(4, 3), -math.inf), {}), ValueError, ["c"]),
    "c tensor 0": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(0.0)), {}), ValueError, ["c"]),
    "c tensor < 0": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(-0.5, dtype=F64)), {}), ValueError, ["c"]),
    "c tensor nan": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(math.nan)), {}), ValueError, ["c"]),
    "c tensor inf": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(math.inf)), {}), ValueError, ["c"]),
    "c tensor int64": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(1)), {}), TypeError, ["c"]),
    "c tensor bool": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(True)), {}), TypeError, ["c"]),
    "c tensor (2,)": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor([1.0, 2.0])), {}), ValueError, ["c"]),
    "c tensor (4,3)": (lambda: ((_t(4, 3), _t(4, 3), torch.ones(4, 3)), {}), ValueError, ["c"]),
    "c bool": (lambda: ((_t(4, 3), _t(4, 3), True), {}), TypeError, ["c"]),
    "c string": (lambda: ((_t(4, 3), _t(4, 3), "1.0"), {}), TypeError, ["c"]),
    "c None": (lambda: ((_t(4, 3), _t(4, 3), None), {}), TypeError, ["c"]),
    "y on meta": (lambda: ((_t(4, 3), _t(4, 3, device="meta")), {}), ValueError, ["x", "y"]),
    "x on meta": (lambda: ((_t(4, 3, device="meta"), _t(4, 3)), {}), ValueError, ["x", "y"]),
    "c on meta": (lambda: ((_t(4, 3), _t(4, 3), torch.tensor(1.0, device="meta")), {}), ValueError, ["c"]),
    "dim = 2 of 2": (lambda: ((_t(4, 3), _t(4, 3)), {"dim": 2}), IndexError, ["dim"]),
    "dim = -3 of 2": (lambda: ((_t(4, 3), _t(4, 3)), {"dim": -3}), IndexError, ["dim"]),
    "dim = 1 of 1": (lambda: ((_t(3), _t(3)), {"dim": 1}), IndexError, ["dim"]),
    "dim float": (lambda: ((_t(4, 3), _t(4, 3)), {"dim": 1.0}), TypeError, ["dim"]),
    "dim None": (lambda: ((_t(4, 3), _t(4, 3)), {"dim": None}), TypeError, ["dim"]),
    "x list": (lambda: (([[0.0, 0.0, 0.0]], _t(1, 3)), {}), TypeError, ["x"]),
    "y float": (lambda: ((_t(4, 3), 0.5), {}), TypeError, ["y"]),
    "x None": (lambda: ((None, _t(4, 3)), {}), TypeError, ["x"]),
    "x 0-dim": (lambda: ((torch.tensor(0.1), torch.tensor(0.2)), {}), ValueError, ["x"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_bad_input_names_the_argument(backend, case):
    build, exc, names = BAD_INPUTS[case]
    args, kwargs = build()
    with pytest.raises(exc) as info:
        call(backend, *args, **kwargs)
    assert names_argument(str(info.value), names), f"{case}: {type(info.value).__name__}: {info.value}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", *backends_for("cuda")])
def test_tensors_on_different_devices(backend):
    x, y = _t(4, 3, device="cuda"), _t(4, 3)
    for a, b in ((x, y), (y, x)):
        with pytest.raises(ValueError) as info:
            call(backend, a, b)
        assert names_argument(str(info.value), ["x", "y"]), str(info.value)
    with pytest.raises(ValueError) as info:  # c on a CUDA device, the points on the CPU
        call("auto", y, y, torch.tensor(1.0, device="cuda"))
    assert names_argument(str(info.value), ["c"]), str(info.value)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError):
            call(backend, x, _t(4, 3, device="cuda:1"))


def test_named_backend_on_the_wrong_device():
    """cpp cannot run on meta (or CUDA) tensors: an error listing what can, not a fallback."""
    x = _t(4, 3, device="meta")
    with pytest.raises(RuntimeError) as info:
        call("cpp", x, x)
    assert "cpp" in str(info.value) and "torch" in str(info.value)
    assert call("torch", x, x).shape == (4, 3)  # the reference runs anywhere


def _direct_op_params():
    params = [pytest.param("mobius_add", id="mobius_add")]
    try:
        missing = triton_kernel("hyperbolic", "mobius_add") is None
    except Exception:
        missing = False
    marks = [pytest.mark.triton]
    if missing or "triton" not in backends_for("cpu") or not hasattr(torch.ops.lfi_fast, "mobius_add_triton"):
        marks.append(pytest.mark.skip(reason="mobius_add_triton not available on the CPU here"))
    params.append(pytest.param("mobius_add_triton", id="mobius_add_triton", marks=marks))
    return params


@pytest.mark.parametrize("op_name", _direct_op_params())
def test_op_boundary_checks(op_name):
    """A direct torch.ops call skips the Python checks: the kernels' own checks must still give an
    error (naming the argument), never a crash or garbage."""
    if op_name == "mobius_add" and "cpp" not in backends_for("cpu"):
        pytest.skip("no compiled CPU kernels")
    op = getattr(torch.ops.lfi_fast, op_name)
    c = torch.tensor(1.0, dtype=F64)
    bad = [
        ((_t(4, 3, dtype=torch.int32), _t(4, 3, dtype=torch.int32), c, True), ["x"]),
        ((_t(4, 3), _t(4, 3, dtype=F64), c, True), ["x", "y"]),
        ((_t(4, 3), _t(4, 3), torch.tensor([1.0, 2.0]), True), ["c"]),
        ((_t(4, 3), _t(4, 3), torch.tensor(1), True), ["c"]),
    ]
    for args, names in bad:
        with pytest.raises(RuntimeError) as info:
            op(*args)
        assert names_argument(str(info.value), names), str(info.value)
    with pytest.raises(ALLOWED_ERRORS):  # not broadcastable: torch's own message
        op(_t(4, 3), _t(5, 3), c, True)


@pytest.mark.parametrize("op_name", _direct_op_params())
@pytest.mark.parametrize("which", ["y", "c"])
def test_op_boundary_rejects_mixed_devices(op_name, which):
    """CPU and meta tensors in one direct call dispatch to the fake kernel: it must check devices
    as the real kernels do, not return an uninitialised tensor."""
    op = getattr(torch.ops.lfi_fast, op_name)
    x = _t(4, 3)
    y = _t(4, 3, device="meta") if which == "y" else _t(4, 3)
    c = torch.tensor(1.0, device="meta" if which == "c" else "cpu")
    with pytest.raises(ALLOWED_ERRORS) as info:
        op(x, y, c, True)
    assert names_argument(str(info.value), [which]), str(info.value)


# ---- fuzz ----------------------------------------------------------------------------------------


# Huge inputs overflow inside the kernels by design (outside the domain only "no crash" is asked);
# the Triton interpreter computes with numpy, which warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize(("device", "backend"), PARAMS)
def test_fuzz(device, backend):
    """Random shapes, dtypes, values, layouts and curvatures: a match or a clear error, never a crash."""
    n = 100 if backend == "triton" and device == "cpu" else 150

    @settings(**fuzz_settings(n))
    @given(case=poincare_cases(("x", "y")))
    def run(case):
        built = case.build(device)
        dtype = case.points[0].dtype

        def fn(x, y, c):
            with lfi_fast.use_backend(backend):
                return hyp.mobius_add(x, y, c, dim=case.dim, project=case.project)

        def ref_fn(x, y, c):
            return ref64(x, y, c, dim=case.dim, project=case.project, dtype=dtype)

        check_op_against_reference(
            fn,
            ref_fn,
            built.args,
            error_names=built.error_names,
            must_raise=built.must_raise,
            may_raise=built.may_raise,
            domain=well_conditioned(built, case.dim),
            dim=case.dim,
            grad_args=(0, 1, 2),
            gen=torch.Generator().manual_seed(case.points[0].seed),
            what=f"{backend} on {device}",
            lowp_ref_fn=lambda x, y, c: geoopt_native(x, y, c, dim=case.dim, project=case.project, dtype=dtype),
        )

    run()


def well_conditioned(built, dim):
    """The case's domain without nearly antipodal pairs next to the boundary, whose Möbius sum
    divides by 1 + 2c<x,y> + c^2|x|^2|y|^2 < 1e-6: there the gradient is ill-conditioned beyond
    any float64 evaluation (the backward, which works from |x|^2, |y|^2 and <x,y>, is within 1e-4
    of the exact value, autograd of the reference within 1e-7), so only the rows outside it are
    compared (and the gradients only when no row is excluded)."""
    domain = built.domain
    x, y, c = built.args
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.numel() == 0 or y.numel() == 0:
        return domain
    try:
        cv = float(c)
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        xy = (x64 * y64).sum(dim)
        den = 1 + 2 * cv * xy + cv**2 * x64.square().sum(dim) * y64.square().sum(dim)
    except (RuntimeError, TypeError, ValueError, IndexError):  # bad input: nothing to decide
        return domain
    ok = ~(den.abs() < 1e-6)
    if isinstance(domain, torch.Tensor):
        return domain & ok.to(domain.device)
    return ok if domain is True or domain is None else domain


def geoopt_native(x, y, c, *, dim=-1, project=True, dtype=F64):
    """geoopt in the arguments' own dtype: an independent rounding of the same formulas (nearly
    antipodal boundary points make the Möbius sum ill-conditioned: there two correct float64
    evaluations differ by far more than a few ulps of the inputs explain)."""
    k = -(c if isinstance(c, torch.Tensor) else torch.tensor(float(c), dtype=x.dtype, device=x.device))
    out = gm.mobius_add(x, y, k=k.to(x.dtype), dim=dim)
    return gm.project(out, k=k.to(x.dtype), dim=dim, eps=ball_eps(dtype)) if project else out


def test_fuzz_harness_catches_a_wrong_op(gen):
    """The harness itself must be able to fail: an op off by one ulp-scale bug, a wrong gradient,
    a NaN, an error that names nothing, a missing error."""
    x = points((6, 5), "inside", 1.0, gen)
    y = points((6, 5), "inside", 1.0, gen)
    c = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def ref_fn(a, b, cc):
        return ref64(a, b, cc)

    def wrong_value(a, b, cc):
        return hyp.mobius_add(a, b, cc) * (1 + 1e-8)

    def wrong_grad(a, b, cc):
        out = hyp.mobius_add(a, b, cc)
        return out + (a - a.detach()) * 1e-6  # same value, gradient to x off by 1e-6

    def nan_row(a, b, cc):
        out = hyp.mobius_add(a, b, cc).clone()
        out[2, 1] = math.nan
        return out

    def vague(a, b, cc):
        raise ValueError("something went wrong")

    for fn, kw in ((wrong_value, {}), (wrong_grad, {"grad_args": (0, 1, 2)}), (nan_row, {})):
        with pytest.raises(AssertionError):
            check_op_against_reference(fn, ref_fn, (x, y, c), **kw)
    with pytest.raises(AssertionError):
        check_op_against_reference(vague, ref_fn, (x, y, c), error_names=["c"], must_raise=True)
    with pytest.raises(AssertionError):
        check_op_against_reference(hyp.mobius_add, ref_fn, (x, y, c), error_names=["c"], must_raise=True)
    # and the right op passes, gradients included
    check_op_against_reference(hyp.mobius_add, ref_fn, (x, y, c), grad_args=(0, 1, 2))
    assert TOL[F64] == 1e-10 and TOL[F32] == 1e-5
