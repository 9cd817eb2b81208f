"""The hyperbolic family beyond mobius_add — mobius_scalar_mul, mobius_matvec, expmap, logmap,
expmap0, logmap0, project, dist, dist0, pairwise_dist — on every device and backend: values and
gradients against geoopt and lfi_fast's reference (float64 and float32), half precision, each op's
own arguments (r, m, keepdim, dim, pairwise_dist's Gram formulation and memory), gradcheck,
opcheck, torch.compile, bad input and the fuzz harness.

One table (OPS) says what each op takes; the tests that apply to every op are parametrised over it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

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
    INSIDE_KINDS,
    LAYOUTS,
    VALUE_KINDS,
    PointSpec,
    ball_points,
    check_op_against_reference,
    compute_dtype,
    coordinate_sizes,
    curvatures,
    fuzz_settings,
    names_argument,
    poincare_cases,
    poincare_domain,
    seeds,
)
import geoopt
from geoopt.manifolds.stereographic import math as gm
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import lfi_fast
from lfi_fast import hyperbolic as hyp
from lfi_fast.reference import hyperbolic as ref

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
C_VALUES = (1e-4, 0.1, 1.0, 10.0)
C_TAYLOR = 1e-9  # <= 1e-8: geoopt's first-order Taylor branch of tan_k and artan_k
C_ALL = C_VALUES + (C_TAYLOR,)


# ---- the ops -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    args: tuple[str, ...]  # the tensor arguments, named as the public function names them
    roles: tuple[str, ...]  # per argument: "point" (of the ball), "tangent", "scalar" (r), "matrix" (m)
    project: bool  # takes project=
    reduces: bool  # the coordinate dim is reduced away (takes keepdim=)


OPS = {
    "mobius_scalar_mul": Op(("r", "x"), ("scalar", "point"), True, False),
    "mobius_matvec": Op(("m", "x"), ("matrix", "point"), True, False),
    "expmap": Op(("x", "u"), ("point", "tangent"), True, False),
    "logmap": Op(("x", "y"), ("point", "point"), False, False),
    "expmap0": Op(("u",), ("tangent",), True, False),
    "logmap0": Op(("x",), ("point",), False, False),
    "project": Op(("x",), ("point",), False, False),
    "dist": Op(("x", "y"), ("point", "point"), False, True),
    "dist0": Op(("x",), ("point",), False, True),
    "pairwise_dist": Op(("x", "y"), ("point", "point"), False, True),
}
ROW_OPS = [name for name in OPS if name != "pairwise_dist"]


def op_params(names, devices=None) -> list:
    """pytest params (op, device, backend), the Triton ones skipped while the op's launcher is missing."""
    params = []
    for name in names:
        for p in device_backend_params("hyperbolic", name, devices):
            params.append(pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks))
    return params


def ours(name, *tensors, c, dim=-1, project=True, keepdim=True):
    """The public function `name`, with the keyword arguments that it takes."""
    op, fn = OPS[name], getattr(hyp, name)
    if name == "pairwise_dist":
        return fn(*tensors, c)
    kw = {"dim": dim}
    if op.project:
        kw["project"] = project
    if op.reduces:
        kw["keepdim"] = keepdim
    return fn(*tensors, c, **kw)


def call(backend, name, *tensors, **kw):
    with lfi_fast.use_backend(backend):
        return ours(name, *tensors, **kw)


# ---- the float64 oracles -------------------------------------------------------------------------


def ball_eps(dtype: torch.dtype) -> float:
    """geoopt's projection margin for an input dtype (the half types compute in float32: its margin)."""
    return 1e-5 if dtype == F64 else 4e-3


def _f64(a, like=None) -> torch.Tensor:
    """A float64 tensor (a Python number r or c becomes one); a float64 tensor keeps its graph."""
    if isinstance(a, torch.Tensor):
        return a.double()
    return torch.tensor(float(a), dtype=F64, device=None if like is None else like.device)


def onto_ball(v: torch.Tensor, c: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    """geoopt's projection for k = -c (math._project): onto radius (1 - eps)/sqrt(c + 1e-15)."""
    maxnorm = (1 - eps) / (c.abs() + 1e-15) ** 0.5
    norm = v.norm(dim=dim, keepdim=True).clamp_min(1e-15)
    return torch.where(norm > maxnorm, v / norm * maxnorm, v)


@contextlib.contextmanager
def artanh_clamp_of(dtype: torch.dtype):
    """The reference's artanh with its argument clamped to +-(1 - 1e-7) as `dtype`'s compute type
    holds that bound (float32: 1 - 1.19e-7), as geoopt's clamp is in that dtype: beyond it the
    distance is the clamp's (artanh(1 - 1.19e-7) is 1 % below artanh(1 - 1e-7))."""
    cdt = compute_dtype(dtype)
    if cdt == F64:
        yield
        return
    hi = float(torch.tensor(1 - 1e-7, dtype=cdt))
    original = ref._artanh

    def artanh(x):
        x = x.clamp(-hi, hi)
        return 0.5 * (torch.log1p(x) - torch.log1p(-x))  # as lfi_fast.reference

    ref._artanh = artanh
    try:
        yield
    finally:
        ref._artanh = original


def reference64(name, *tensors, c, dim=-1, project=True, keepdim=True, dtype=F64):
    """lfi_fast.reference in float64, with the projection margin and the artanh clamp of inputs of
    `dtype` (float32 inputs are judged against float32's ball, as geoopt judges them)."""
    like = next(t for t in tensors if isinstance(t, torch.Tensor))
    t = [_f64(a, like) for a in tensors]
    c = _f64(c, like)
    with artanh_clamp_of(dtype):
        if dtype == F64 or not (OPS[name].project or name == "project"):
            return _reference(name, t, c, dim, project, keepdim)
        out = t[0] if name == "project" else _reference(name, t, c, dim, False, keepdim)
        return onto_ball(out, c, ball_eps(dtype), dim) if project else out


def reference_lowp(name, *tensors, c, dim=-1, project=True, keepdim=True):
    """lfi_fast.reference evaluated in the inputs' own dtype (float32: PyTorch's rounding of the same
    formulas), for the harness's lowp_ref_fn; its artanh is torch.atanh of the same clamped argument
    (geoopt's (log(1 + z) - log(1 - z)) / 2 loses small z in float32: a flaw of its own, which
    test_small_points_keep_their_precision holds the kernels to avoid, so not one to allow for)."""
    like = next(t for t in tensors if isinstance(t, torch.Tensor))
    t = [a if isinstance(a, torch.Tensor) else torch.tensor(float(a), dtype=like.dtype, device=like.device)
         for a in tensors]
    original = ref._artanh
    ref._artanh = lambda x: x.clamp(-1 + 1e-7, 1 - 1e-7).atanh()
    try:
        return _reference(name, t, c, dim, project, keepdim)
    finally:
        ref._artanh = original


def _reference(name, t, c, dim, project, keepdim):
    fn = getattr(ref, name)
    if name == "pairwise_dist":
        return fn(*t, c)
    if name == "project":
        return fn(t[0], c, dim=dim)
    if OPS[name].reduces:
        return fn(*t, c, keepdim=keepdim, dim=dim)
    if not OPS[name].project:
        return fn(*t, c, dim=dim)
    return fn(*t, c, dim=dim, project=project)


def geoopt64(name, *tensors, c, dim=-1, project=True, keepdim=True, dtype=F64):
    """geoopt in float64 (k = -c), as geoopt.PoincareBall computes it: its methods with project=True
    project their result with the margin of `dtype`."""
    like = next(t for t in tensors if isinstance(t, torch.Tensor))
    t = [_f64(a, like) for a in tensors]
    k = -_f64(c, like)
    if name == "mobius_scalar_mul":
        out = gm.mobius_scalar_mul(t[0], t[1], k=k, dim=dim)
    elif name == "mobius_matvec":
        # geoopt's mobius_matvec puts m x's coordinates last but reduces over `dim`: call it with the
        # coordinates last (the op's meaning) and move them back.
        out = gm.mobius_matvec(t[0], t[1].movedim(dim, -1), k=k).movedim(-1, dim)
    elif name == "expmap":
        out = gm.expmap(t[0], t[1], k=k, dim=dim)
    elif name == "logmap":
        return gm.logmap(t[0], t[1], k=k, dim=dim)
    elif name == "expmap0":
        out = gm.expmap0(t[0], k=k, dim=dim)
    elif name == "logmap0":
        return gm.logmap0(t[0], k=k, dim=dim)
    elif name == "project":
        return gm.project(t[0], k=k, dim=dim, eps=ball_eps(dtype))
    elif name == "dist":
        return gm.dist(t[0], t[1], k=k, keepdim=keepdim, dim=dim)
    elif name == "dist0":
        return gm.dist0(t[0], k=k, keepdim=keepdim, dim=dim)
    elif name == "pairwise_dist":
        return gm.dist(t[0][:, None, :], t[1][None, :, :], k=k)
    else:
        raise KeyError(name)
    return gm.project(out, k=k, dim=dim, eps=ball_eps(dtype)) if project else out


ORACLES = {"reference": reference64, "geoopt": geoopt64}


# A factor that is not a power of two: every length times RESCALE (c over RESCALE^2) is the same
# problem with other roundings.
RESCALE = 1 + 2.0**-20


def _rescaled(oracle, name, k, **kw):
    """oracle on the problem with every length times RESCALE**k: points and tangent vectors times
    it, c over its square, the result over it (r and m have no length)."""
    roles, s = OPS[name].roles, RESCALE**k

    def fn(*a):
        t = [v * s if role in ("point", "tangent") else v for v, role in zip(a[:-1], roles)]
        return oracle(name, *t, c=a[-1] / s**2, **kw) / s

    return fn


def second_opinion(name, oracle_name, dtype, *, dim=-1, project=True):
    """The harness's lowp_ref_fn for an oracle, (*tensors, c) -> output: other evaluations of the
    same formulas, whose deviation from the oracle is rounding that the kernels cannot avoid either.
    Each evaluation solves the problem rescaled by RESCALE**k, which rounds every intermediate
    differently; in each output row the one farthest from the oracle counts (one may be lucky).

    float64: the oracle itself, k = 1..4 (for geoopt, lfi_fast's reference too). Where they disagree, the formulas' own rounding decides,
    which perturbing the inputs does not show when the function is insensitive to a quantity that
    the formulas compute with cancellation (lambda_x times 1 - c|x|^2 next to the boundary,
    1 - tanh^2 times artanh' near saturation).

    Below float64: reference_lowp (PyTorch's float32 rounding of the formulas), k = 0..7: a distance
    whose tanh(d/2) lies within a few float32 steps of 1 is off by up to 1e-2, depending on how one
    rounding falls."""
    kw = dict(dim=dim, project=project)
    oracle = ORACLES[oracle_name]
    if dtype == F64:
        evals = [_rescaled(oracle, name, k, dtype=dtype, **kw) for k in range(1, 5)]
        if oracle_name == "geoopt":  # a second float64 implementation of the same formulas
            evals.append(_rescaled(ORACLES["reference"], name, 0, dtype=dtype, **kw))
    else:
        lowp = lambda n, *t, c, **k2: reference_lowp(n, *t, c=c, **k2)  # noqa: E731
        evals = [_rescaled(lowp, name, k, **kw) for k in range(8)]

    def worst(*a):
        with torch.no_grad():
            want = oracle(name, *a[:-1], c=a[-1], dtype=dtype, **kw)
        best, best_dev = None, None
        for e in evals:
            o = e(*a)
            d = (o.detach().double() - want).abs().nan_to_num(0.0, posinf=0.0)
            if dim is not None and d.dim() > 0:
                d = d.amax(dim=dim, keepdim=True)
            if best is None:
                best, best_dev = o, d
                continue
            best, best_dev = torch.where(d > best_dev, o, best), torch.maximum(d, best_dev)
        return best

    return worst


def gram_slack(x: torch.Tensor, y: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """pairwise_dist's documented error, per pair (N, M), in float64: it takes |s|^2 of
    s = (-x) ⊕ y = sa x + sb y from |x|^2, |y|^2 and the GEMM <x, y>, which loses about
    eps (D + 2) (|sa||x| + |sb||y|)^2 to rounding, and squares below the dtype's smallest normal
    number underflow; |s| is then off by at most the square root of that (near pairs) or that over
    2|s| (the others), and the distance by 2 / (1 - c|s|^2) times the error of |s|."""
    x, y = x.detach().double(), y.detach().double()
    cdt = compute_dtype(dtype)
    eps = torch.finfo(cdt).eps * 4 * (x.shape[-1] + 2)
    xn, yn = x.norm(dim=-1)[:, None], y.norm(dim=-1)[None, :]
    xy = x @ y.T
    x2, y2 = xn * xn, yn * yn
    den = (1 - 2 * c * xy + c * c * x2 * y2).clamp_min(1e-15)
    sa, sb = (1 - 2 * c * xy + c * y2) / den, (1 - c * x2) / den
    lost = eps * (sa.abs() * xn + sb.abs() * yn) ** 2
    s = ref._mobius_add(-x[:, None, :], y[None, :, :], torch.tensor(c, dtype=F64), -1).norm(dim=-1)
    err = torch.minimum(lost.sqrt(), lost / (2 * s).clamp_min(1e-300))
    err = err + 4 * math.sqrt(torch.finfo(cdt).tiny)
    return err * 2 / (1 - c * (s + err) ** 2).clamp_min(2e-7)


# ---- inputs --------------------------------------------------------------------------------------


def tangents(n: int, d: int, kind: str, c: float, gen: torch.Generator) -> torch.Tensor:
    """float64 tangent vectors (n, d): "rand" (norms up to 2/sqrt(c)), "zeros", "tiny" (norm 1e-9),
    "large" (norm 1e3)."""
    v = torch.randn(n, d, generator=gen, dtype=F64)
    v = v / v.norm(dim=-1, keepdim=True)
    norms = {"zeros": 0.0, "tiny": 1e-9, "large": 1e3}
    if kind == "rand":
        return v * torch.rand(n, 1, generator=gen, dtype=F64) * 2 / math.sqrt(c)
    return v * norms[kind]


def scalars(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """r (n, 1): "rand" (normal, sd 2: both signs), "zero"."""
    r = torch.randn(n, 1, generator=gen, dtype=F64) * 2
    return r * 0 if kind == "zero" else r


def matrix(out: int, d: int, gen: torch.Generator, *, zero_row: int | None = 2) -> torch.Tensor:
    """m (out, d) for mobius_matvec, with an all-zero row (that coordinate of m x is 0)."""
    m = torch.randn(out, d, generator=gen, dtype=F64) / math.sqrt(d)
    if zero_row is not None:
        m[zero_row] = 0
    return m


F32_KINDS = {"boundary": "boundary32", "inside": "inside32"}  # see float32_blocks


def points(shape, kind: str, c: float, gen: torch.Generator, dtype: torch.dtype = F64) -> torch.Tensor:
    """float64 points of `shape` (coordinates last) of a kind, float32's kind for a lower dtype."""
    kind = F32_KINDS.get(kind, kind) if dtype != F64 else kind
    return make_arg("point", kind, math.prod(shape[:-1]), shape[-1], c, gen).reshape(shape)


def make_arg(role: str, kind: str, n: int, d: int, c: float, gen: torch.Generator) -> torch.Tensor:
    if role == "point" and kind in ("boundary32", "inside32"):
        x = ball_points((n, d), -1, "inside", c, gen)
        u = torch.rand(n, 1, generator=gen, dtype=F64)
        # boundary32: 2e-3 to 1e-2 (relative) inside the boundary; inside32: norms 0.05 to 0.999 of
        # the radius (sqrt(c)|x| >= 0.05, where float32's artanh keeps its precision)
        scale = 1 - 2e-3 * 5**u if kind == "boundary32" else 0.05 + 0.949 * u
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300) * scale / math.sqrt(c)
    if role == "point":
        return ball_points((n, d), -1, kind, c, gen)
    if role == "tangent":
        return tangents(n, d, kind, c, gen)
    if role == "scalar":
        return scalars(n, kind, gen)
    raise ValueError(role)


# Per op: blocks of rows, each the kinds of the op's arguments (m, shared by every row, has None;
# "rand@x": a tangent vector at the previous argument's point x of Riemannian length
# lambda_x |u| up to 4/sqrt(c); "same", in test_coincident_points: the previous argument's rows).
# Points "boundary" lie within 1e-6 (relative) of the ball's boundary, clearly beyond the
# projection radius (1 - 1e-5)/sqrt(c): no input sits at that radius, where geoopt's projection
# jumps.
BLOCKS = {
    "mobius_scalar_mul": (
        ("rand", "inside"), ("rand", "boundary"), ("rand", "zeros"), ("rand", "tiny"), ("zero", "inside"),
        ("rand", "outside"),
    ),
    "mobius_matvec": ((None, "inside"), (None, "boundary"), (None, "zeros"), (None, "tiny")),
    "expmap": (
        ("inside", "rand"), ("boundary", "rand@x"), ("zeros", "rand"), ("inside", "zeros"),
        ("zeros", "zeros"), ("inside", "tiny"), ("boundary", "tiny"), ("inside", "large"), ("zeros", "large"),
    ),
    "logmap": (
        ("inside", "inside"), ("boundary", "inside"), ("inside", "boundary"), ("boundary", "boundary"),
        ("zeros", "inside"), ("inside", "zeros"),
    ),
    "expmap0": (("rand",), ("zeros",), ("tiny",), ("large",)),
    "logmap0": (("inside",), ("boundary",), ("zeros",), ("tiny",), ("outside",)),
    "project": (("inside",), ("boundary",), ("zeros",), ("tiny",), ("outside",)),
    "dist": (
        ("inside", "inside"), ("boundary", "inside"), ("inside", "boundary"), ("boundary", "boundary"),
        ("zeros", "inside"), ("inside", "zeros"),
    ),
    "dist0": (("inside",), ("boundary",), ("zeros",), ("tiny",), ("outside",)),
}


def float32_blocks(name):
    """BLOCKS[name] for float32 inputs (float64 tests them all).

    Points next to the boundary lie 2e-3 to 1e-2 inside it ("boundary32", on both sides of float32's
    projection radius): within 1e-6 of it float32 holds ~17 values, 1 - c|x|^2 keeps about one
    significant digit, and a distance between two such points is rounding noise near the artanh
    clamp (1 - 1.19e-7 in float32), where it jumps with the last bit. Points near the origin are
    test_small_points_keep_their_precision's: tiny points, points inside the ball nearer than 0.05
    radii ("inside32" stays beyond) and, for the ops whose gradient there is
    artan_k(1e-15)/1e-15, the origin. r times a point outside the ball overflows float32 in geoopt's
    Taylor branch (c <= 1e-8: r (|x| - c|x|^3/3) cubed again)."""
    op = OPS[name]
    out = []
    for kinds in BLOCKS[name]:
        point_kinds = [k for r, k in zip(op.roles, kinds) if r == "point"]
        if "tiny" in point_kinds:
            continue
        if "zeros" in point_kinds and name in ("mobius_scalar_mul", "logmap0"):
            continue
        if "outside" in point_kinds and name == "mobius_scalar_mul":
            continue
        out.append(tuple(F32_KINDS.get(k, k) if r == "point" else k for r, k in zip(op.roles, kinds)))
    return tuple(out)


def block_inputs(name, c, gen, *, dtype=F64, device="cpu", rows=3, d=6, blocks=None):
    """The op's tensor arguments with `rows` rows per block of BLOCKS[name], and a legend of the
    rows (for failure messages)."""
    op = OPS[name]
    blocks = blocks or BLOCKS[name]
    cols: list[list[torch.Tensor]] = [[] for _ in op.args]
    legend = []
    for b, kinds in enumerate(blocks):
        legend.append(f"rows {b * rows}-{b * rows + rows - 1}: " + "/".join(k for k in kinds if k))
        for j, (role, kind) in enumerate(zip(op.roles, kinds)):
            if role == "matrix":
                continue
            if kind == "same":
                t = cols[j - 1][-1]
            elif kind == "rand@x":
                x = cols[j - 1][-1]
                t = tangents(rows, d, "rand", c, gen) * (1 - c * x.pow(2).sum(-1, keepdim=True))
            else:
                t = make_arg(role, kind, rows, d, c, gen)
            cols[j].append(t)
    tensors = [matrix(7, d, gen) if role == "matrix" else torch.cat(col) for role, col in zip(op.roles, cols)]
    return [t.to(device=device, dtype=dtype) for t in tensors], "; ".join(legend)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(fn, inputs, g):
    """fn(*inputs) on fresh leaves and the gradients of <fn(...), g> to each input."""
    ls = leaves(*inputs)
    out = fn(*ls)
    return out, torch.autograd.grad(out, ls, g.to(out.dtype), allow_unused=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are small: one thread (with more, every GEMM waits for its team, which on
    a loaded machine costs more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- values and gradients against geoopt and the reference ---------------------------------------


def default_oracles(dtype: torch.dtype) -> tuple[str, ...]:
    """float64: geoopt and the reference. float32: the reference in float64 with float32's margin
    and artanh clamp (geoopt's float64 functions fix both to float64's; the float64 tests tie the
    reference to geoopt)."""
    return ("reference", "geoopt") if dtype == F64 else ("reference",)


def check_against_oracles(backend, name, tensors, c, *, dtype, project=True, oracles=None, dim=-1, gen=None,
                          grads=True, what=""):
    """Values and gradients (to every tensor argument and to c) of the backend against each oracle
    in float64, per row, within the dtype's tolerance plus the harness's slack in ill-conditioned
    rows (artanh next to the boundary, the Möbius sums of nearly antipodal boundary points)."""
    n = len(tensors)
    for oracle_name in oracles or default_oracles(dtype):
        oracle = ORACLES[oracle_name]
        check_op_against_reference(
            lambda *a: call(backend, name, *a[:n], c=a[n], dim=dim, project=project),
            lambda *a: oracle(name, *a[:n], c=a[n], dim=dim, project=project, dtype=dtype),
            (*tensors, c),
            dim=dim,
            grad_args=tuple(range(n + 1)) if grads else (),
            gen=gen,
            what=f"{name} on {backend} vs {oracle_name}: {what}",
            lowp_ref_fn=second_opinion(name, oracle_name, dtype, dim=dim, project=project),
            sum_floor=True,
            tol=_tol(backend, oracle_name, dtype),
        )


def _tol(backend, oracle_name, dtype):
    """The Triton kernels compute tanh and log1p from exp and log (no libdevice under the
    interpreter): a few ulps in float64, which the gradients of boundary rows amplify (seen: 4e-10
    against the reference, 1.1e-9 against geoopt). Allowed: 1e-9 and 5e-9."""
    if backend == "triton" and dtype == F64:
        return 5e-9 if oracle_name == "geoopt" else 1e-9
    return None


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(ROW_OPS))
def test_values_and_grads_match_geoopt_and_reference(name, device, backend, dtype, gen):
    """Every kind of row of BLOCKS, c from 1e-4 to 10 and in geoopt's Taylor branch (c <= 1e-8), a
    tensor c that requires grad; float64 against geoopt and the reference (project=False: geoopt),
    float32 against the reference."""
    op = OPS[name]
    blocks = BLOCKS[name] if dtype == F64 else float32_blocks(name)
    # geoopt's artanh, 0.5 (log(1 + z) - log(1 - z)), is off by ~1e-16/z at tiny z (at x = 0 its
    # gradients by up to ~30 %; logmap0 of |x| = 1e-20 at c = 1e-4 is 0); lfi_fast's log1p is not.
    # Rows of zero or tiny norm are held to the reference only (test_geoopt_dropin compares them
    # with geoopt allowing geoopt's own deviation).
    geoopt_blocks = [b for b in blocks if not any(k in ("zeros", "tiny") for k in b)]
    for c in C_ALL:
        tensors, legend = block_inputs(name, c, gen, dtype=dtype, device=device, blocks=blocks)
        ct = torch.tensor(c, dtype=dtype)
        for project in (True, False) if op.project else (True,):
            for oracle in default_oracles(dtype):
                t, leg = tensors, legend
                if oracle == "geoopt":
                    t, leg = block_inputs(name, c, gen, dtype=dtype, device=device, blocks=geoopt_blocks)
                check_against_oracles(backend, name, t, ct, dtype=dtype, project=project, oracles=(oracle,),
                                      gen=gen, what=f"{dtype} c={c} project={project} ({leg})")
        # c as a Python number: the same values as the tensor c
        assert_rows_close(call(backend, name, *tensors, c=c), call(backend, name, *tensors, c=ct),
                          dtype=dtype, what=f"{name} on {backend}: float c vs tensor c")


@pytest.mark.parametrize(("name", "device", "backend"), op_params(["dist", "logmap"]))
def test_coincident_points(name, device, backend, gen):
    """dist(x, x) and logmap(x, x): 0 up to rounding, like geoopt's, and finite gradients. No more:
    dist's gradient is undefined there (the direction of (-x) ⊕ x, a vector of rounding errors),
    and geoopt's gradient of logmap there is rounding noise (artanh(z)/z of a z of the order of
    the rounding error, through (log(1 + z) - log(1 - z)) / 2: 0.88 instead of 1, say)."""
    blocks = (("inside", "same"), ("boundary", "same"), ("zeros", "same"), ("tiny", "same"))
    for dtype in (F64, F32):
        for c in C_ALL:
            (x, y), legend = block_inputs(name, c, gen, dtype=dtype, device=device, blocks=blocks)
            ct = torch.tensor(c, dtype=dtype)
            check_against_oracles(backend, name, (x, y), ct, dtype=dtype, gen=gen, grads=False,
                                  what=f"{dtype} c={c} ({legend})")
            shape = (x.shape[0], 1) if name == "dist" else x.shape
            out, grads = grads_of(lambda a, b, cc: call(backend, name, a, b, c=cc), (x, y, ct),
                                  torch.randn(shape, generator=gen, dtype=F64).to(device))
            for g, arg in zip(grads, ("x", "y", "c")):
                assert g is not None and bool(torch.isfinite(g).all()), f"{backend} {dtype} c={c}: grad {arg}"


@pytest.mark.parametrize(("name", "device", "backend"), op_params(ROW_OPS))
def test_dim_other_than_last(name, device, backend, gen):
    """Coordinates along dim 1 of 3: the same values and gradients as with them last, and the
    reference's (the matrix m keeps its (out, in) layout)."""
    op = OPS[name]
    c = 0.3
    tensors, legend = block_inputs(name, c, gen, device=device, rows=4, blocks=BLOCKS[name][:3])
    # (3 blocks x 4 rows, D) -> (3, D, 4): coordinates at dim 1
    moved = [t if r == "matrix" else t.reshape(3, 4, -1).movedim(-1, 1) for t, r in zip(tensors, op.roles)]
    ct = torch.tensor(c, dtype=F64)
    check_against_oracles(backend, name, moved, ct, dtype=F64, dim=1, oracles=("reference",), gen=gen,
                          what=legend)
    out = call(backend, name, *moved, c=c, dim=1)
    last = call(backend, name, *tensors, c=c).reshape(3, 4, -1).movedim(-1, 1)
    assert_rows_close(out, last, dtype=F64, dim=1, what=f"{name} on {backend}: dim=1 vs dim=-1")


@pytest.mark.parametrize(("name", "device", "backend"), op_params(["dist", "dist0"]))
def test_keepdim(name, device, backend, gen):
    """keepdim=True keeps the reduced coordinate dim (size 1), at dim -1 and at dim 0."""
    tensors, _ = block_inputs(name, 1.0, gen, device=device, rows=4, blocks=BLOCKS[name][:4])
    moved = [t.reshape(2, -1, t.shape[-1]).movedim(-1, 0) for t in tensors]  # coordinates at dim 0
    for dim, args in ((-1, tensors), (0, moved)):
        kept = call(backend, name, *args, c=1.0, dim=dim, keepdim=True)
        flat = call(backend, name, *args, c=1.0, dim=dim, keepdim=False)
        assert kept.shape[dim] == 1 and kept.dim() == args[0].dim()
        assert flat.shape == kept.squeeze(dim).shape
        assert torch.equal(kept.squeeze(dim), flat)


SMALL_POINT_OPS = [n for n in ROW_OPS if "point" in OPS[n].roles]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(SMALL_POINT_OPS))
def test_small_points_keep_their_precision(name, device, backend, dtype, gen):
    """Points near the origin (sqrt(c)|x| from 1e-2 down to 1e-30, and the origin) in float32 and
    bfloat16: values (and float32 gradients) within the dtype's tolerance of the float64 reference,
    like any other point. geoopt's artanh(z) = (log(1 + z) - log(1 - z)) / 2, evaluated in float32,
    is off by ~3e-8/z: 0.3 % at z = 1e-5, 0 instead of z below 6e-8 (so logmap0(x) = 0, and a zero
    gradient at the origin, where it is artan_k(1e-15)/1e-15 = 1). Its float64 evaluation, the
    reference, is off by ~1e-16/z: far below float32's tolerance."""
    op = OPS[name]
    norms = torch.cat([torch.logspace(-2, -30, 9, dtype=F64), torch.zeros(1, dtype=F64)])[:, None]
    if name == "dist":  # dist(0, 0) has no gradient (test_coincident_points)
        norms = norms[:-1]
    n = norms.shape[0]
    legend = "rows: sqrt(c)|x| = " + ", ".join(f"{float(v):.0e}" for v in norms.flatten())
    for c in (1e-4, 1.0, 10.0):
        args = []
        for role in op.roles:
            if role == "point":
                v = torch.randn(n, 6, generator=gen, dtype=F64)
                args.append(v / v.norm(dim=-1, keepdim=True) * norms / math.sqrt(c))
            elif role == "matrix":
                args.append(matrix(7, 6, gen, zero_row=None))
            else:
                args.append(make_arg(role, "rand", n, 6, c, gen) * 0.1)
        if name == "dist":  # y: x moved by a tenth of its norm (so that |(-x) ⊕ y| is small too)
            v = torch.randn(n, 6, generator=gen, dtype=F64)
            args[1] = args[0] + v / v.norm(dim=-1, keepdim=True) * norms * 0.1 / math.sqrt(c)
        args = [a.to(device, dtype) for a in args]
        ct = torch.tensor(c, dtype=dtype)
        nt = len(args)
        check_op_against_reference(
            lambda *a: call(backend, name, *a[:nt], c=a[nt]),
            lambda *a: reference64(name, *a[:nt], c=a[nt], dtype=dtype),
            (*args, ct), grad_args=tuple(range(nt + 1)), gen=gen,
            what=f"{name} on {backend}, {dtype}, c={c}, {legend}",
            lowp_ref_fn=second_opinion(name, "reference", dtype),
            sum_floor=True,
        )


# ---- mobius_scalar_mul: the forms of r -----------------------------------------------------------

SCALAR_FORMS = {
    # name -> (r from a generator, x's shape with its coordinates last, the coordinate dim)
    "number": (lambda gen: -1.7, (6, 5), -1),
    "(N,1)": (lambda gen: scalars(6, "rand", gen), (6, 5), -1),
    "0-dim": (lambda gen: scalars(1, "rand", gen).reshape(()), (6, 5), -1),
    "(1,1)": (lambda gen: scalars(1, "rand", gen), (6, 5), -1),
    "(A,1,1) with x (B,D)": (lambda gen: scalars(3, "rand", gen).reshape(3, 1, 1), (4, 5), -1),
    "(A,1,1) with x (A,B,D)": (lambda gen: scalars(2, "rand", gen).reshape(2, 1, 1), (2, 4, 5), -1),
    "(1,N) with x (D,N), dim=0": (lambda gen: scalars(6, "rand", gen).reshape(1, 6), (6, 5), 0),
    "(N,) with x (D,N), dim=0": (lambda gen: scalars(6, "rand", gen).reshape(6), (6, 5), 0),
}


@pytest.mark.parametrize("form", list(SCALAR_FORMS))
@pytest.mark.parametrize(("name", "device", "backend"), op_params(["mobius_scalar_mul"]))
def test_scalar_mul_forms_of_r(name, device, backend, form, gen):
    """r a number, a tensor per row, one 0-dim tensor (its gradient sums over every row), a tensor
    that broadcasts x to more dims, or one without the coordinate dim (geoopt's broadcasting: r
    broadcasts against |x| kept along the coordinate dim)."""
    make_r, shape, dim = SCALAR_FORMS[form]
    for dtype in (F64, F32):
        for c in (0.1, 1.0):
            x = points(shape, "inside", c, gen, dtype).movedim(-1, dim).to(device, dtype)
            r = make_r(gen)
            want_shape = x.shape
            if isinstance(r, torch.Tensor):
                r = r.to(device, dtype)
                want_shape = torch.broadcast_shapes(r.shape, x.shape)
            ct = torch.tensor(c, dtype=dtype)
            grad_args = (0, 1, 2) if isinstance(r, torch.Tensor) else (1, 2)
            for oracle_name in default_oracles(dtype):
                oracle = ORACLES[oracle_name]
                out = check_op_against_reference(
                    lambda rr, xx, cc: call(backend, name, rr, xx, c=cc, dim=dim),
                    lambda rr, xx, cc: oracle(name, rr, xx, c=cc, dim=dim, dtype=dtype),
                    (r, x, ct), dim=dim, grad_args=grad_args, gen=gen,
                    what=f"{backend} r {form} {dtype} c={c} vs {oracle_name}",
                    lowp_ref_fn=second_opinion(name, oracle_name, dtype, dim=dim),
                    sum_floor=True,
                )
                assert out.shape == want_shape
    if form == "0-dim":  # its gradient is the sum of the per-row gradients
        x = ball_points((6, 5), -1, "inside", 1.0, gen).to(device)
        r0 = torch.tensor(0.8, dtype=F64, requires_grad=True)
        rn = torch.full((6, 1), 0.8, dtype=F64, requires_grad=True)
        g = torch.randn(6, 5, generator=gen, dtype=F64).to(device)
        call(backend, name, r0, x, c=1.0).backward(g)
        call(backend, name, rn, x, c=1.0).backward(g)
        assert r0.grad.shape == ()
        assert_rows_close(r0.grad, rn.grad.sum(), dtype=F64, dim=None, what="0-dim r: summed gradient")


# ---- mobius_matvec: shapes of m, zero rows, dim ----------------------------------------------------


@pytest.mark.parametrize(("name", "device", "backend"), op_params(["mobius_matvec"]))
def test_matvec_shapes_and_zero_rule(name, device, backend, gen):
    """m (out, in) with out > in, out < in and out == 1; an all-zero row of m (that coordinate is 0),
    an all-zero m and rows x = 0 (geoopt's rule: m x = 0 gives 0, gradients included); the
    coordinates along a dim other than the last."""
    c = 0.5
    d = 5
    for dtype in (F64, F32):
        x = torch.cat([points((3, d), k, c, gen, dtype) for k in ("inside", "zeros", "boundary")])
        ct = torch.tensor(c, dtype=dtype)
        xs = x.to(device, dtype)
        for label, m in (
            ("out>in", matrix(8, d, gen)),
            ("out<in", matrix(3, d, gen, zero_row=0)),
            ("out=1", matrix(1, d, gen, zero_row=None)),
            ("m=0", torch.zeros(4, d, dtype=F64)),
        ):
            m = m.to(device, dtype)
            for project in (True, False):
                check_against_oracles(backend, name, (m, xs), ct, dtype=dtype, project=project, gen=gen,
                                      what=f"{label} {dtype} project={project}")
            out = call(backend, name, m, xs, c=c)
            assert out.shape == (x.shape[0], m.shape[0])
            zero_rows = (m == 0).all(dim=1)
            assert bool((out[:, zero_rows] == 0).all()), f"{label}: a zero row of m gives a zero coordinate"
            assert bool((out[3:6] == 0).all()), f"{label}: x = 0 gives 0"
            if label == "m=0":
                assert bool((out == 0).all())
                _, (gm_, gx) = grads_of(lambda a, b: call(backend, name, a, b, c=c), (m, xs),
                                        torch.ones_like(out, dtype=F64))
                assert bool(torch.isfinite(gm_).all() & torch.isfinite(gx).all())
                assert bool((gx == 0).all())  # the result is 0 whatever x: no gradient to x
        # coordinates along dim 0 of x (in, N) and dim 1 of x (A, in, B)
        m = matrix(4, d, gen).to(device, dtype)
        for dim, xd in ((0, xs.T), (1, xs.reshape(3, 3, d).movedim(-1, 1))):
            check_against_oracles(backend, name, (m, xd), ct, dtype=dtype, dim=dim, gen=gen,
                                  what=f"dim={dim}")
            out = call(backend, name, m, xd, c=c, dim=dim)
            assert out.shape[dim] == 4
            last = call(backend, name, m, xd.movedim(dim, -1), c=c)
            assert_rows_close(out.movedim(dim, -1), last, dtype=dtype, what=f"dim={dim} vs dim=-1")


# ---- pairwise_dist ---------------------------------------------------------------------------------


def pairwise_points(c, gen, *, near: bool, dtype=F64):
    """x (8, 6), y (6, 6) float64. Far: points inside the ball, next to its boundary, and the origin
    in x (float32's kinds for float32: see float32_blocks). Near: y's first rows are x's rows moved
    by 1e-9 to 1e-3 of the radius, or equal to them (coincident), and (float64) tiny points."""
    r = 1 / math.sqrt(c)
    x = torch.cat([points((4, 6), "inside", c, gen, dtype), points((3, 6), "boundary", c, gen, dtype),
                   torch.zeros(1, 6, dtype=F64)])
    y = torch.cat([points((4, 6), "inside", c, gen, dtype), points((2, 6), "boundary", c, gen, dtype)])
    if near:
        x = x[:6].clone() * 0.9 / 0.999
        if dtype == F64:
            x[5] = ball_points((1, 6), -1, "tiny", c, gen)[0]
        step = torch.randn(6, 6, generator=gen, dtype=F64)
        scale = torch.tensor([1e-9, 1e-7, 1e-5, 1e-3, 0.0, 1e-9], dtype=F64)[:, None] * r
        y = x + step / step.norm(dim=-1, keepdim=True) * scale
        y[5] = x[5] * 0.5
    return x, y


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(["pairwise_dist"]))
def test_pairwise_dist_matches_geoopt_and_reference(name, device, backend, dtype, gen):
    """Pairs apart (as a hyperbolic VQ sees them): every distance, and the gradients (x, y, c) per
    row, within the dtype's tolerance of geoopt's and the reference's dist(x[:, None], y[None])."""
    for c in C_ALL:
        x, y = (t.to(device, dtype) for t in pairwise_points(c, gen, near=False, dtype=dtype))
        ct = torch.tensor(c, dtype=dtype)
        for oracle_name in default_oracles(dtype):
            oracle = ORACLES[oracle_name]
            # values distance by distance (dim None), then gradients row by row (dim -1)
            for dim, grad_args in ((None, ()), (-1, (0, 1, 2))):
                out = check_op_against_reference(
                    lambda a, b, cc: call(backend, name, a, b, c=cc),
                    lambda a, b, cc: oracle(name, a, b, c=cc, dtype=dtype),
                    (x, y, ct), dim=dim, grad_args=grad_args, gen=gen,
                    what=f"pairwise_dist on {backend} vs {oracle_name}: {dtype} c={c}",
                    lowp_ref_fn=second_opinion(name, oracle_name, dtype),
                    sum_floor=True,
                )
                assert out.shape == (8, 6)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(["pairwise_dist"]))
def test_pairwise_dist_equals_dist(name, device, backend, dtype, gen):
    """pairwise_dist(x, y) = dist(x[:, None], y[None]) on the same backend, and the float64
    reference, within the dtype's tolerance plus the documented error of the Gram-matrix
    formulation (gram_slack: sqrt(eps)-sized for near pairs, ~2e-7 absolute at c = 1 in float64;
    eps/|s|-sized for pairs apart), near and coincident pairs included; gradients finite."""
    tol = TOL[dtype]
    for c in C_ALL:
        for near in (False, True):
            x, y = (t.to(device, dtype) for t in pairwise_points(c, gen, near=near, dtype=dtype))
            got = call(backend, name, x, y, c=c)
            slack = gram_slack(x, y, c, dtype).to(device)
            with lfi_fast.use_backend(backend):
                rowwise = hyp.dist(x[:, None, :], y[None, :, :], c)
            want64 = reference64(name, x, y, c=c)
            for what, want in (("dist(x[:, None], y[None])", rowwise), ("the reference", want64)):
                err = (got.double() - want.double()).abs()
                allowed = tol * want.double().abs() + slack + (tol * want64.abs() if want is rowwise else 0)
                bad = ~(err <= allowed)
                if bool(bad.any()):
                    i = tuple(bad.nonzero()[0].tolist())
                    raise AssertionError(
                        f"pairwise_dist on {backend} vs {what} ({dtype} c={c} near={near}): {int(bad.sum())} "
                        f"pairs off, first {i}: {float(got[i])} vs {float(want[i])}, "
                        f"allowed {float(allowed[i]):.3g}"
                    )
            _, grads = grads_of(lambda a, b, cc: call(backend, name, a, b, c=cc),
                                (x, y, torch.tensor(c, dtype=dtype)),
                                torch.randn(got.shape, generator=gen, dtype=F64).to(device))
            for g, arg in zip(grads, "xyc"):
                assert g is not None and bool(torch.isfinite(g).all()), f"{dtype} c={c} {near=}: grad {arg}"


@contextlib.contextmanager
def address_space_limit(extra_bytes: int):
    """Cap this process's address space at what it maps now plus `extra_bytes` (Linux): a larger
    allocation fails at once with an error instead of filling the machine's memory."""
    resource = pytest.importorskip("resource")
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
    except OSError:
        pytest.skip("needs /proc/self/statm")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + extra_bytes
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the address-space limit is already lower")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif("cpp" not in backends_for("cpu"), reason="needs the compiled CPU kernels")
def test_pairwise_dist_never_allocates_n_by_m_by_d(gen):
    """N = M = 2048, D = 256 in float64: an N×M×D intermediate would take 8.6 GB; the process may
    map 1.5 GB more than it does, and pairwise_dist's forward and backward (x, y: 4 MB each; the
    N×M output, Gram matrix and gradient buffers: 34 MB each) must run within it. The reference,
    which broadcasts to N×M×D, must not (the limit bites)."""
    n, d, c = 2048, 256, 1.0
    x = ball_points((n, d), -1, "inside", c, gen)
    y = ball_points((n, d), -1, "inside", c, gen)
    xl, yl, cl = leaves(x, y, torch.tensor(c, dtype=F64))
    g = torch.randn(n, n, generator=gen, dtype=F64)
    assert n * n * d * 8 > 8e9
    with address_space_limit(1536 << 20):
        with lfi_fast.use_backend("cpp"):
            out = hyp.pairwise_dist(xl, yl, cl)
            out.backward(g)
        with pytest.raises(RuntimeError):
            ref.pairwise_dist(x, y, c)
    assert out.shape == (n, n) and bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(xl.grad).all() & torch.isfinite(yl.grad).all() & torch.isfinite(cl.grad))
    idx = torch.randint(0, n, (16,), generator=gen)
    jdx = torch.randint(0, n, (16,), generator=gen)
    assert_rows_close(out[idx, jdx], ref.dist(x[idx], y[jdx], c), dtype=F64, dim=None, what="spot check")


# ---- half precision ------------------------------------------------------------------------------


def half_inputs(name, c, gen, *, d=16):
    """float64 arguments of the op whose points and tangent vectors have norms <= 0.9/sqrt(c)."""
    op = OPS[name]
    n = 8 if name == "pairwise_dist" else 32
    out = []
    for j, role in enumerate(op.roles):
        if role == "matrix":
            out.append(matrix(6, d, gen))
        elif role == "scalar":
            out.append(torch.rand(n, 1, generator=gen, dtype=F64) * 4 - 2)
        elif role == "point":
            rows = n - 2 * j if name == "pairwise_dist" else n
            out.append(ball_points((rows, d), -1, "inside", c, gen) * (0.9 / 0.999))
        else:
            out.append(tangents(n, d, "rand", c, gen) * 0.45)
    return out


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(list(OPS)))
def test_half_precision_matches_float64(name, device, backend, dtype, gen):
    """float16/bfloat16 inputs of norm <= 0.9/sqrt(c): output in the input dtype, finite, within 2e-2
    per row of the float64 reference on the same (rounded) inputs; gradients finite, in the dtype."""
    op = OPS[name]
    for c in C_VALUES:
        tensors = [t.to(device, dtype) for t in half_inputs(name, c, gen)]
        for project in (True, False) if op.project else (True,):
            out = call(backend, name, *tensors, c=c, project=project)
            want = reference64(name, *tensors, c=c, project=project, dtype=dtype)
            what = f"{name} on {backend}: {dtype} c={c} project={project}"
            assert out.dtype == dtype and out.shape == want.shape, what
            assert bool(torch.isfinite(out).all()), f"{what}: NaN/inf"
            if name == "pairwise_dist":
                err = (out.double() - want).abs()
                assert bool((err <= TOL[dtype] * want.abs() + gram_slack(*tensors, c, dtype)).all()), what
            else:
                assert_rows_close(out, want, dtype=dtype, what=what)
        ls = leaves(*tensors)
        out = call(backend, name, *ls, c=c)
        grads = torch.autograd.grad(out, ls, torch.randn(out.shape, generator=gen).to(device, dtype))
        for g, t, arg in zip(grads, ls, op.args):
            assert g.dtype == dtype and g.shape == t.shape, f"{name} c={c}: grad {arg}"
            assert bool(torch.isfinite(g).all()), f"{name} c={c}: grad {arg} not finite"


# Kinds of finite inputs: zeros, tiny, inside, next to the boundary, outside the ball (1.5 to 20
# radii); tangent vectors up to norm 1e3 (huge ones: test_bfloat16_huge_inputs_stay_finite).
HALF_EDGE_KINDS = {
    "point": ("zeros", "tiny", "inside", "boundary", "outside"),
    "tangent": ("zeros", "tiny", "rand", "large"),
    "scalar": ("rand", "zero"),
}


def half_edge_inputs(name, c, gen, dtype, device, *, d=8):
    """The op's arguments, one block of rows per kind (cycled over the arguments), cast to dtype,
    rows that are not finite in the dtype dropped."""
    op = OPS[name]
    nblocks = max(len(HALF_EDGE_KINDS[r]) for r in op.roles if r != "matrix")
    cols = []
    for j, role in enumerate(op.roles):
        if role == "matrix":
            cols.append(matrix(4, d, gen).to(device, dtype))
            continue
        kinds = HALF_EDGE_KINDS[role]
        blocks = []
        for b in range(nblocks):
            kind = kinds[(b + j) % len(kinds)]
            blocks.append(make_arg(role, kind, 4, d, c, gen))
        cols.append(torch.cat(blocks).to(device, dtype))
    rows = [t for t, role in zip(cols, op.roles) if role != "matrix"]
    if name == "pairwise_dist":
        return [t[torch.isfinite(t).all(-1)] for t in cols]
    finite = torch.stack([torch.isfinite(t).all(-1) for t in rows]).all(0)
    return [t if role == "matrix" else t[finite] for t, role in zip(cols, op.roles)]


def assert_finite_and_inside(name, out, c, what):
    """Finite; and a point that an op projects lies strictly inside the ball of radius 1/sqrt(c)."""
    assert bool(torch.isfinite(out).all()), f"{what}: NaN/inf for finite inputs"
    if name in ("mobius_scalar_mul", "mobius_matvec", "expmap", "expmap0", "project"):
        norm = out.double().norm(dim=-1) * math.sqrt(c)
        assert bool((norm < 1).all()), f"{what}: a point outside the ball (|x| sqrt(c) = {float(norm.max())})"


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize(("name", "device", "backend"), op_params(list(OPS)))
def test_half_precision_never_nonfinite(name, device, backend, dtype, gen):
    """Finite float16/bfloat16 inputs — the origin, tiny, next to the boundary, outside the ball —
    give a finite output, and a projected point strictly inside the ball."""
    for c in C_VALUES:
        tensors = half_edge_inputs(name, c, gen, dtype, device)
        assert all(t.shape[0] > 0 for t in tensors)
        out = call(backend, name, *tensors, c=c)
        assert_finite_and_inside(name, out, c, f"{name} on {backend} {dtype} c={c}")


@pytest.mark.parametrize(("name", "device", "backend"), op_params(list(OPS)))
def test_bfloat16_huge_inputs_stay_finite(name, device, backend, gen):
    """bfloat16 has float32's range: a finite point or tangent vector of norm 1e20 to 1e30 (whose
    squared norm overflows float32, the compute type) still gives a finite output, and a
    projected point strictly inside the ball."""
    op = OPS[name]
    c = 1.0
    for j, role in enumerate(op.roles):
        if role not in ("point", "tangent"):
            continue
        args = [t.to(device, BF16) for t in half_inputs(name, c, gen, d=8)]
        n = args[j].shape[0]
        big = torch.randn(n, 8, generator=gen, dtype=F64)
        big = big / big.norm(dim=-1, keepdim=True) * torch.logspace(20, 30, n, dtype=F64)[:, None]
        args[j] = big.to(device, BF16)
        assert bool(torch.isfinite(args[j]).all())
        assert_finite_and_inside(name, call(backend, name, *args, c=c), c,
                                 f"{name} on {backend}: {op.args[j]} of norm 1e20..1e30 in bfloat16")


def geoopt_bf16_inputs(name, c, gen):
    """bfloat16 inputs on which geoopt's own bfloat16 arithmetic fails (see the next test)."""
    if name == "logmap0":  # next to the boundary: geoopt's margin 1e-5 rounds away in bfloat16
        return [ball_points((64, 16), -1, "boundary", c, gen).to(BF16)]
    if name == "dist":
        return [ball_points((64, 16), -1, "boundary", c, gen).to(BF16),
                (ball_points((64, 16), -1, "inside", c, gen) * 0.9).to(BF16)]
    return [tangents(64, 16, "rand", c, gen).mul(10).to(BF16)]  # expmap0: saturating tangent vectors


@pytest.mark.parametrize(
    "impl", ["lfi_fast", pytest.param("geoopt", marks=pytest.mark.xfail(strict=True, reason=(
        "geoopt in bfloat16: NaN from logmap0 and dist, points outside the ball from expmap0")))],
)
@pytest.mark.parametrize("name", ["logmap0", "dist", "expmap0"])
def test_bfloat16_where_geoopt_fails(name, impl, gen):
    """The inputs on which geoopt.PoincareBall fails in bfloat16 (its float64 margin 1e-5 rounds to 0
    in bfloat16: artanh(1) = inf, projections that stay on or beyond the boundary) — lfi_fast must
    not. The geoopt run is the proof that the test can fail (strict xfail)."""
    for c in C_VALUES:
        tensors = geoopt_bf16_inputs(name, c, gen)
        if impl == "geoopt":
            ball = geoopt.PoincareBall(c=c)
            fn = {"logmap0": ball.logmap0, "dist": ball.dist, "expmap0": ball.expmap0}[name]
            out = fn(*tensors)
        else:
            out = ours(name, *tensors, c=c, keepdim=False)
        assert out.dtype == BF16
        assert_finite_and_inside(name, out, c, f"{impl} {name} c={c}")


# ---- gradcheck -----------------------------------------------------------------------------------


def gradcheck_inputs(name, c, gen):
    """Small float64 arguments away from every switch (clamps, the projection radius) that the
    finite differences could cross; where the op projects, one row is projected (well beyond the
    radius) and one is not."""
    r = 1 / math.sqrt(c)

    def pts(n, *radii):
        v = torch.randn(n, 3, generator=gen, dtype=F64)
        return v / v.norm(dim=-1, keepdim=True) * torch.tensor(radii, dtype=F64)[:, None] * r

    return {
        # r = 8: tanh(8 artanh(0.9)) = 1 - 1e-10, projected
        "mobius_scalar_mul": [torch.tensor([[1.7], [8.0]], dtype=F64), pts(2, 0.6, 0.9)],
        "mobius_matvec": [torch.randn(2, 3, generator=gen, dtype=F64) * 0.5, pts(2, 0.3, 0.7)],
        "expmap": [pts(2, 0.4, 0.5), pts(2, 0.5, 9.0)],  # |u| = 9 radii: projected
        "logmap": [pts(2, 0.4, 0.6), pts(2, 0.5, 0.2)],
        "expmap0": [pts(2, 0.8, 8.0)],  # tanh(8) = 1 - 2e-7: beyond the radius 1 - 1e-5, projected
        "logmap0": [pts(2, 0.3, 0.8)],
        "project": [pts(2, 0.5, 1.5)],
        "dist": [pts(2, 0.4, 0.6), pts(2, 0.5, 0.2)],
        "dist0": [pts(2, 0.3, 0.8)],
        "pairwise_dist": [pts(2, 0.4, 0.6), pts(3, 0.5, 0.2, 0.7)],
    }[name]


@pytest.mark.parametrize(("name", "device", "backend"), op_params(list(OPS)))
def test_gradcheck(name, device, backend, gen):
    """torch.autograd.gradcheck in float64 to every tensor argument and a tensor c (interpreted Triton:
    gradcheck's fast mode)."""
    c = 0.7
    tensors = [t.to(device) for t in gradcheck_inputs(name, c, gen)]
    inputs = leaves(*tensors, torch.tensor(c, dtype=F64))
    fast = backend == "triton"  # interpreted: the full Jacobian would take minutes
    for project in (True, False) if OPS[name].project else (True,):
        with lfi_fast.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda *a: ours(name, *a[:-1], c=a[-1], project=project),
                inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast,
            )


# ---- opcheck ---------------------------------------------------------------------------------------


def _opcheck_params():
    params = []
    for device in DEVICES:
        for name in OPS:
            params.append(pytest.param(device, name, id=f"{device}-{name}"))
            if "triton" in backends_for(device):
                try:
                    missing = triton_kernel("hyperbolic", name) is None
                except Exception:
                    missing = False
                marks = [pytest.mark.triton]
                if missing or not hasattr(torch.ops.lfi_fast, f"{name}_triton"):
                    marks.append(pytest.mark.skip(reason=f"{name}_triton is not registered or written yet"))
                tid = f"{device}-{name}_triton"
                params.append(pytest.param(device, f"{name}_triton", id=tid, marks=marks))
    return params


@pytest.mark.parametrize(("device", "op_name"), _opcheck_params())
def test_opcheck(device, op_name, gen):
    """torch.library.opcheck of the op's default overload and of its backward op (schema, fake
    kernel, autograd registration, AOT dispatch), float64 with gradients to every input and c,
    float32 without; the arguments as the op layer passes them (coordinates last, c a 0-dim tensor)."""
    triton = op_name.endswith("_triton")
    name = op_name.removesuffix("_triton")
    if not triton and not lfi_fast.info()["backends"]["cuda" if device == "cuda" else "cpp"]["available"]:
        pytest.skip(f"the compiled op has no {device} kernel in this build")
    op = getattr(torch.ops.lfi_fast, op_name).default
    bwd = getattr(torch.ops.lfi_fast, f"{name}_backward" + ("_triton" if triton else "")).default
    flags = (True,) if OPS[name].project else ()
    tensors = [t.to(device) for t in gradcheck_inputs(name, 0.7, gen)]
    cases = [
        (*leaves(*tensors), torch.tensor(0.7, dtype=F64, requires_grad=True), *flags),
        (*(t.float() for t in tensors), torch.tensor(0.7, dtype=F64), *((False,) if flags else ())),
    ]
    for args in cases:
        torch.library.opcheck(op, args)
    out = op(*tensors, torch.tensor(0.7, dtype=F64), *flags)
    grad = torch.randn(out.shape, generator=gen, dtype=F64).to(device)
    torch.library.opcheck(bwd, (grad, *tensors, torch.tensor(0.7, dtype=F64), *flags, True))


# ---- torch.compile -------------------------------------------------------------------------------


@pytest.mark.skipif("cpp" not in backends_for("cpu"), reason="needs the compiled CPU kernels")
def test_torch_compile_chain_fullgraph(gen):
    """expmap0 -> mobius_matvec -> mobius_add -> dist0 (and logmap0, mobius_scalar_mul with a number
    r) in one graph on the cpp backend: the compiled forward and backward match eager."""
    torch._dynamo.reset()

    def chain(u, m, y, c):
        z = hyp.mobius_matvec(m, hyp.expmap0(u, c), c)
        w = hyp.mobius_add(z, y, c)
        return hyp.dist0(w, c) + hyp.logmap0(hyp.mobius_scalar_mul(0.5, w, c), c).sum(-1)

    u = tangents(8, 5, "rand", 1.0, gen) * 0.5
    m = matrix(4, 5, gen)
    y = ball_points((8, 4), -1, "inside", 1.0, gen)
    ct = torch.tensor(0.8, dtype=F64)
    g = torch.randn(8, generator=gen, dtype=F64)
    with lfi_fast.use_backend("cpp"):
        out_e, grads_e = grads_of(chain, (u, m, y, ct), g)
        out_c, grads_c = grads_of(torch.compile(chain, fullgraph=True), (u, m, y, ct), g)
    assert_rows_close(out_c, out_e, dtype=F64, dim=None, what="compiled forward")
    for arg, a, b in zip(("u", "m", "y", "c"), grads_c, grads_e):
        assert_rows_close(a, b, dtype=F64, dim=-1 if a.dim() else None, what=f"compiled grad {arg}")


# ---- bad input -----------------------------------------------------------------------------------


def _z(*shape, dtype=F32):
    return torch.zeros(shape, dtype=dtype)


GOOD_SHAPES = {
    "mobius_scalar_mul": ((4, 1), (4, 3)),
    "mobius_matvec": ((2, 3), (4, 3)),
    "pairwise_dist": ((4, 3), (5, 3)),
}


def bad_input_cases(name):
    """(id, args, kwargs, exception type, names the message must mention) for op `name`."""
    op = OPS[name]
    shapes = GOOD_SHAPES.get(name, ((4, 3),) * len(op.args))
    good = [_z(*s) for s in shapes]
    cases = []
    for j, arg in enumerate(op.args):
        for dt in (torch.int64, torch.int32, torch.bool):
            args = list(good)
            args[j] = _z(*shapes[j], dtype=dt)
            cases.append((f"{arg} {dt}", args, {}, TypeError, [arg]))
    if len(op.args) == 2:
        cases.append(("dtype mismatch", [good[0], good[1].double()], {}, TypeError, list(op.args)))
    for label, c in (("c=0", 0.0), ("c<0", -1.0), ("c nan", math.nan), ("c inf", math.inf),
                     ("c tensor<0", torch.tensor(-0.5)), ("c tensor nan", torch.tensor(math.nan)),
                     ("c tensor 0", torch.tensor(0.0, dtype=F64))):
        cases.append((label, good + [c], {}, ValueError, ["c"]))
    cases.append(("c int tensor", good + [torch.tensor(1)], {}, TypeError, ["c"]))
    cases.append(("c (2,)", good + [torch.tensor([1.0, 2.0])], {}, ValueError, ["c"]))
    if name != "pairwise_dist":
        cases.append(("dim out of range", good, {"dim": 2}, IndexError, ["dim"]))
    if name in ("expmap", "logmap", "dist", "pairwise_dist"):
        cases.append(("last dim mismatch", [good[0], _z(*shapes[1][:-1], 5)], {}, ValueError, list(op.args)))
    if name in ("expmap", "logmap", "dist"):
        cases.append(("batch mismatch", [_z(4, 3), _z(5, 3)], {}, ValueError, list(op.args)))
    if name == "mobius_matvec":
        cases += [
            ("m (out, in != D)", [_z(2, 5), good[1]], {}, ValueError, ["m"]),
            ("m 1-D", [_z(3), good[1]], {}, ValueError, ["m"]),
            ("m 3-D", [_z(2, 2, 3), good[1]], {}, ValueError, ["m"]),
        ]
    if name == "mobius_scalar_mul":
        cases += [
            ("r (3,1) vs x (4,3)", [_z(3, 1), good[1]], {}, ValueError, ["r"]),
            ("r (4,3): not 1 along dim", [_z(4, 3), good[1]], {}, ValueError, ["r"]),
            ("r (4,) vs x (4,3)", [_z(4), good[1]], {}, ValueError, ["r"]),
            ("r list", [[0.5], good[1]], {}, TypeError, ["r"]),
        ]
    if name == "pairwise_dist":
        cases += [
            ("x 1-D", [_z(3), good[1]], {}, ValueError, ["x"]),
            ("y 1-D", [good[0], _z(3)], {}, ValueError, ["y"]),
            ("x 3-D", [_z(2, 4, 3), good[1]], {}, ValueError, ["x"]),
            ("y 3-D", [good[0], _z(2, 5, 3)], {}, ValueError, ["y"]),
        ]
    return cases


BAD_INPUTS = [(name, *case) for name in OPS for case in bad_input_cases(name)]


@pytest.mark.parametrize(("name", "label", "args", "kwargs", "exc", "names"), BAD_INPUTS,
                         ids=[f"{n}-{lab}" for n, lab, *_ in BAD_INPUTS])
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_bad_input_names_the_argument(backend, name, label, args, kwargs, exc, names):
    """Mismatched coordinates, bad c, integer dtypes, r that does not broadcast, m of the wrong
    shape, pairwise_dist with inputs that are not (N, D): the error's type, and a message that
    names the argument."""
    with pytest.raises(exc) as info:
        with lfi_fast.use_backend(backend):
            getattr(hyp, name)(*args, **kwargs)
    msg = f"{name} {label}: {type(info.value).__name__}: {info.value}"
    assert names_argument(str(info.value), names), msg


# ---- fuzz ----------------------------------------------------------------------------------------


@st.composite
def op_cases(draw, name):
    """A case of op `name`: a PoincareCase of its point and tangent arguments (poincare_cases: shapes
    that broadcast, dtypes, values, layouts, curvatures, dims, one wrong thing now and then) and
    how to make r or m (form, size, seed)."""
    op = OPS[name]
    names = tuple(a for a, role in zip(op.args, op.roles) if role in ("point", "tangent"))
    case = draw(poincare_cases(names, max_side=4, max_d=40))
    extra = {"seed": draw(seeds())}
    if name == "mobius_scalar_mul":
        extra["r"] = draw(st.sampled_from(["number", "0-dim", "rows", "more dims"]))
    if name == "mobius_matvec":
        extra["out"] = draw(st.integers(1, 9))
        extra["zero_row"] = draw(st.booleans())
    return case, extra


def _extra_arg(name, case, extra, device):
    """r or m for a built case (plain when the case's x or dim is invalid)."""
    gen = torch.Generator().manual_seed(extra["seed"])
    spec = case.points[0]
    dtype = spec.dtype if spec.dtype.is_floating_point else F32
    nd = len(spec.shape)
    dim_ok = -nd <= case.dim < nd
    if name == "mobius_matvec":
        d = spec.shape[case.dim] if dim_ok else spec.shape[-1]
        m = matrix(extra["out"], d, gen, zero_row=0 if extra["zero_row"] else None)
        return m.to(device, dtype)
    form = extra["r"]
    if form == "number":
        return float(torch.randn((), generator=gen) * 2)
    rows = [1 if i == case.dim % nd else s for i, s in enumerate(spec.shape)] if dim_ok else []
    if form == "0-dim" or not rows:
        shape = ()
    elif form == "broadcast":  # the leading dim dropped, or set to 1
        shape = rows[1:] if len(rows) > 1 and rows[0] % 2 else [1] + rows[1:]
    elif form == "more dims":
        shape = [2] + rows
    else:
        shape = rows
    return (torch.randn(shape, generator=gen, dtype=F64) * 2).to(device, dtype)


def mobius_error_bound(x: torch.Tensor, y: torch.Tensor, c: float, dim: int, eps: float) -> torch.Tensor:
    """First-order bound, per row, on the relative rounding error of geoopt's x ⊕ y formula,
    ((1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y) / (1 + 2c<x,y> + c^2|x|^2|y|^2): the size of its
    terms over the size of its numerator and denominator, times eps. Large where the terms cancel:
    nearly antipodal points at the boundary (x and y on one side of a 1-D ball, or x ⊕ v for a
    saturated v ≈ -x), where geoopt's own float64 result is off by 1e-4 and a gradient's sign is
    rounding noise."""
    x2, y2 = (x * x).sum(dim), (y * y).sum(dim)
    xn, yn = x2.sqrt(), y2.sqrt()
    xy = (x * y).sum(dim)
    a, b = 1 + 2 * c * xy + c * y2, 1 - c * x2
    num = (a.unsqueeze(dim) * x + b.unsqueeze(dim) * y).norm(dim=dim)
    den = 1 + 2 * c * xy + c * c * x2 * y2
    terms_num = (1 + 2 * c * xn * yn + c * y2) * xn + (1 + c * x2) * yn
    terms_den = 1 + 2 * c * xn * yn + c * c * x2 * y2
    return eps * (terms_num / num.clamp_min(1e-300) + terms_den / den.abs().clamp_min(1e-300))


def fuzz_domain(name, built, case, device):
    """Per output row: point arguments finite and inside the ball, tangent vectors finite and not
    huge (norm below 1e6: their squares stay finite in float32); below float64, points no nearer to
    the boundary than float32 resolves (sqrt(c)|x| <= 0.998, see float32_blocks); and the op's
    Möbius sum ((-x) ⊕ y, x ⊕ v) within the dtype's tolerance of its own rounding
    (mobius_error_bound)."""
    if not isinstance(built.domain, torch.Tensor):
        return built.domain
    op = OPS[name]
    dtype = case.points[0].dtype
    c, dim = built.c_value, case.dim
    named = dict(zip([a for a, r in zip(op.args, op.roles) if r in ("point", "tangent")], built.args))
    pts = [named[a] for a, r in zip(op.args, op.roles) if r == "point"]
    mask = poincare_domain(pts, c, dim) if pts else None
    for a, r in zip(op.args, op.roles):
        t = named.get(a)
        if t is None:
            continue
        t64 = t.detach().double()
        norm = torch.linalg.vector_norm(t64, dim=dim)
        if r == "tangent":
            ok = torch.isfinite(t64).all(dim=dim) & (norm < 1e6)
        elif dtype != F64:
            ok = norm * math.sqrt(c) <= 0.998
        else:
            continue
        mask = ok if mask is None else mask & ok
    if name in ("logmap", "dist", "expmap") and bool(mask.any()):
        x, y = (t.detach().double() for t in built.args[:2])
        x, y = torch.broadcast_tensors(x, y)
        if name == "expmap":  # x ⊕ v, v = tan_k(lambda_x |u| / 2) u / |u|
            cc = torch.tensor(c, dtype=F64, device=x.device)
            un = y.norm(dim=dim, keepdim=True).clamp_min(1e-15)
            y = ref.tan_k(ref._lambda_x(x, cc, dim) / 2 * un, cc) * (y / un)
        else:
            x = -x
        bound = mobius_error_bound(x, y, c, dim, torch.finfo(compute_dtype(dtype)).eps)
        mask = mask & (bound <= TOL[dtype]).to(mask.device)
    return mask


@st.composite
def pairwise_cases(draw):
    """pairwise_dist's own cases: x (N, D), y (M, D), or one thing wrong: not 2-D, D differs, an
    integer or mismatched dtype, a bad c."""
    error = draw(st.sampled_from([None] * 16 + ["ndim", "coords", "dtype", "mismatch", "c"]))
    d = draw(coordinate_sizes(40))
    shapes = [(draw(st.integers(0, 6)), d), (draw(st.integers(0, 6)), d)]
    bad = set()
    if error == "ndim":
        j = draw(st.integers(0, 1))
        shapes[j] = draw(st.sampled_from([(d,), (2,) + shapes[j]]))
        bad.add("xy"[j])
    if error == "coords":
        shapes[1] = (shapes[1][0], d + draw(st.integers(1, 3)))
        bad.update("xy")
    main = draw(st.sampled_from([F64, F32, F16, BF16]))
    dts = [main, main]
    if error == "dtype":
        j = draw(st.integers(0, 1))
        dts[j] = draw(st.sampled_from([torch.int64, torch.int32, torch.bool]))
        bad.add("xy"[j])
    if error == "mismatch":
        dts[1] = draw(st.sampled_from([t for t in (F64, F32, F16, BF16) if t != main]))
        bad.update("xy")
    kinds = VALUE_KINDS if draw(st.integers(0, 3)) == 0 else INSIDE_KINDS
    points = tuple(
        PointSpec(shape=s, dtype=dt, kind=draw(st.sampled_from(list(kinds))),
                  layout=draw(st.sampled_from(LAYOUTS)), seed=draw(seeds()))
        for s, dt in zip(shapes, dts)
    )
    cspec = draw(curvatures(bad=error == "c"))
    return points, cspec, bad


def _fuzz_pairwise(device, backend, cfg):
    @settings(**cfg)
    @given(case=pairwise_cases())
    def run(case):
        points, cspec, bad = case
        c_gen = cspec.value if cspec.value_ok else 1.0
        x, y = (p.make(c_gen, -1, device) for p in points)
        c = cspec.make(points[0].dtype, device)
        problem = cspec.problem(device)
        if problem == "error":
            bad.add("c")
        dtype = points[0].dtype
        domain = False
        if not bad and problem is None:
            cv = cspec.actual_value(dtype)
            inside = poincare_domain([x], cv, -1)[:, None] & poincare_domain([y], cv, -1)[None, :]
            # Pairs nearer than the Gram formulation resolves are judged by its documented error.
            x64, y64 = x.double(), y.double()
            want = reference64("pairwise_dist", x64, y64, c=cv) if x.numel() and y.numel() else None
            near = torch.zeros_like(inside)
            if want is not None:
                near = gram_slack(x64, y64, cv, dtype).to(device) > TOL[dtype] * want.abs() / 4
            domain = inside & ~near
        out = check_op_against_reference(
            lambda a, b, cc: call(backend, "pairwise_dist", a, b, c=cc),
            lambda a, b, cc: reference64("pairwise_dist", a, b, c=cc, dtype=dtype),
            (x, y, c), error_names=bad, must_raise=bool(bad), may_raise=problem == "unchecked",
            domain=domain, dim=None, grad_args=(0, 1, 2), gen=torch.Generator().manual_seed(points[0].seed),
            what=f"pairwise_dist on {backend}",
            lowp_ref_fn=second_opinion("pairwise_dist", "reference", dtype),
            sum_floor=True,
        )
        if isinstance(domain, torch.Tensor) and bool((inside & near).any()):
            sel = inside & near
            err = (out.double() - want)[sel].abs()
            allowed = TOL[dtype] * want[sel].abs() + gram_slack(x64, y64, cv, dtype).to(device)[sel]
            assert bool((err <= allowed).all()), "pairwise_dist: near pairs off by more than gram_slack"

    run()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize(("name", "device", "backend"), op_params(list(OPS)))
def test_fuzz(name, device, backend):
    """Random shapes, dtypes, values, layouts, dims and curvatures for every op: a match with the
    float64 reference (values and gradients) or a clear error, never a crash."""
    interpreted = backend == "triton" and device == "cpu"
    cfg = fuzz_settings(12 if interpreted else 40)
    if interpreted:  # report a failing case as drawn: shrinking it through the interpreter takes minutes
        cfg["phases"] = (Phase.explicit, Phase.reuse, Phase.generate)
    if name == "pairwise_dist":
        return _fuzz_pairwise(device, backend, cfg)
    op = OPS[name]

    @settings(**cfg)
    @given(case=op_cases(name))
    def run(case):
        case, extra = case
        built = case.build(device)
        dtype = case.points[0].dtype
        args = list(built.args)
        if op.roles[0] in ("scalar", "matrix"):
            args.insert(0, _extra_arg(name, case, extra, device))
        nt = len(op.args)
        # The result's coordinate dim counted from the right: r may add leading dims.
        nd = len(case.points[0].shape)
        out_dim = case.dim - nd if 0 <= case.dim < nd else case.dim
        check_op_against_reference(
            lambda *a: call(backend, name, *a[:nt], c=a[nt], dim=case.dim, project=case.project),
            # the reference takes the dim counted from the right too: with an r that adds leading
            # dims, a dim counted from the left would name another axis of the result
            lambda *a: reference64(name, *a[:nt], c=a[nt], dim=out_dim, project=case.project, dtype=dtype),
            tuple(args),
            error_names=built.error_names,
            must_raise=built.must_raise,
            may_raise=built.may_raise,
            domain=fuzz_domain(name, built, case, device),
            dim=out_dim,
            grad_args=tuple(i for i in range(nt + 1) if isinstance(args[i], torch.Tensor)),
            gen=torch.Generator().manual_seed(case.points[0].seed),
            what=f"{name} on {backend} ({device})",
            lowp_ref_fn=second_opinion(name, "reference", dtype, dim=out_dim, project=case.project),
            sum_floor=True,
        )

    run()
