"""The fuzzing harness of lfi_fast's ops: hypothesis strategies and one oracle.

Every op's fuzz test draws cases from the strategies here (shapes that broadcast, the four float
dtypes and a few wrong ones, values from zero to huge, non-contiguous layouts, good and bad
curvatures) and hands each call to `check_op_against_reference`, which demands of the op one of two
things: it raises a clear error (TypeError, ValueError, IndexError or RuntimeError naming the
offending argument), or it returns a result of the right shape, dtype and device that, wherever the
inputs lie inside the op's domain, is finite and matches the float64 reference within the dtype's
tolerance (gradients too, for float32 and float64). Outside the domain it must merely not crash.

Tensors are not drawn element by element (slow, and hypothesis would shrink toward zeros, which
hide most bugs): a case is a small spec (shape, dtype, value kind, layout, seed) and its tensors are
generated from the seed, so a failing case prints as a spec that rebuilds the same tensors.

For a Poincaré-ball op of points x, y, ... and a curvature c:

    @settings(**fuzz_settings(100))
    @given(case=poincare_cases(("x", "y")))
    def test_fuzz(case):
        built = case.build("cpu")
        check_op_against_reference(
            lambda x, y, c: hyp.mobius_add(x, y, c, dim=case.dim, project=case.project),
            lambda x, y, c: my_float64_reference(x, y, c, dim=case.dim, project=case.project),
            built.args, error_names=built.error_names, must_raise=built.must_raise,
            may_raise=built.may_raise, domain=built.domain, dim=case.dim, grad_args=(0, 1, 2))

(tests/test_hyperbolic_mobius_add.py::test_fuzz is the worked example, backends included.) An op
whose output has no coordinate dim (dist) passes its own `dim` for the per-row error (None:
elementwise) and a domain mask shaped like its output.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import torch
from conftest import FLOAT_DTYPES, FLOOR, TOL, assert_rows_close, row_norm
from hypothesis import HealthCheck, event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

BAD_DTYPES = (torch.int32, torch.int64, torch.bool)

# zeros; random points inside the ball; points within 1e-6 (relative) of its boundary; tiny
# (norms 1e-30..1e-8); huge (norms 1e8..1e30); outside the ball (1.5 to 20 radii); mixed: one of
# these per row; mixed_inside: one of the kinds inside the ball per row.
VALUE_KINDS = ("zeros", "inside", "boundary", "tiny", "huge", "outside", "mixed", "mixed_inside")
INSIDE_KINDS = ("inside", "boundary", "mixed_inside", "tiny", "zeros")
_ROW_KINDS = VALUE_KINDS[:6]

# contiguous; transposed (the last two dims swapped in memory); sliced (every other element of a
# buffer twice as wide, the gaps NaN so that reading them shows); offset (a storage offset of one
# element); expanded (a batch dim broadcast with stride 0).
LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")

ALLOWED_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)

GOOD_CURVATURES = (1e-4, 0.1, 1.0, 10.0)
BAD_CURVATURES = (0.0, -1.0, -1e-3, math.nan, math.inf, -math.inf)

# The reference's sensitivity to its inputs bounds what rounding can do in ill-conditioned rows
# (x and y nearly antipodal at the boundary; the gradient to y next to the boundary, which is
# (1 - c|x|^2) times the others): inputs are perturbed by PERTURB_ULPS units in the last place of the
# compute dtype, in PERTURB_TRIALS ways, and a row may be off by SLACK_FACTOR times the largest
# change of the reference. In a well-conditioned row that slack is far below the tolerance.
PERTURB_ULPS = 4
SLACK_FACTOR = 16
PERTURB_TRIALS = 3

# Rounding that perturbing the inputs does not show: a formula that rounds an intermediate near a
# singularity (artanh of an argument rounded next to 1, 1 - tanh^2 near saturation, lambda_x and
# 1 - c|x|^2 next to the boundary, which cancel in exact arithmetic) is off by far more than a few
# ulps of its inputs explain. Where a test passes `lowp_ref_fn` — another evaluation of the
# reference: in the compute dtype for inputs below float64 (PyTorch's own rounding of the same
# formulas), an independent implementation for float64 (geoopt's, say) — a row may also be off by
# LOWP_FACTOR times that evaluation's largest deviation from the reference (unperturbed and over
# the perturbation trials, inputs moved by one ulp), as flash-attention judges a kernel by
# PyTorch's error in the same dtype (a kernel that sums a row in the compute dtype rounds a few
# times more than PyTorch's reductions, which accumulate float32 in float64 on the CPU).
LOWP_FACTOR = 8


def fuzz_settings(max_examples: int = 100) -> dict:
    """Keyword arguments of hypothesis.settings for a bounded fuzz test (the Triton interpreter is
    slow: keep max_examples modest and sizes small)."""
    return dict(
        max_examples=max_examples,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- values --------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32 for the half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ball_points(
    shape: Sequence[int], dim: int, kind: str, c: float, gen: torch.Generator
) -> torch.Tensor:
    """float64 points of `shape` with coordinates along `dim`, on the ball of radius 1/sqrt(c)."""
    shape = tuple(shape)
    nd = len(shape)
    d = dim % nd
    D = shape[d]
    rest = shape[:d] + shape[d + 1 :]
    n = math.prod(rest)
    if n == 0 or D == 0:
        return torch.zeros(shape, dtype=torch.float64)
    kinds = [kind] * n
    if kind in ("mixed", "mixed_inside"):
        choices = _ROW_KINDS if kind == "mixed" else ("zeros", "inside", "boundary", "tiny")
        pick = torch.randint(0, len(choices), (n,), generator=gen).tolist()
        kinds = [choices[i] for i in pick]
    v = torch.randn(n, D, generator=gen, dtype=torch.float64)
    dirs = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    radius = 1.0 / math.sqrt(c)
    norms = torch.empty(n, dtype=torch.float64)
    for i, k in enumerate(kinds):
        ui = float(u[i])
        if k == "zeros":
            norms[i] = 0.0
        elif k == "inside":
            norms[i] = radius * 0.999 * ui
        elif k == "boundary":
            norms[i] = radius * (1.0 - 1e-6 * (1.0 - ui))
        elif k == "tiny":
            norms[i] = 10.0 ** (-30.0 + 22.0 * ui)
        elif k == "huge":
            norms[i] = 10.0 ** (8.0 + 22.0 * ui)
        elif k == "outside":
            norms[i] = radius * (1.5 + 18.5 * ui)
        else:
            raise ValueError(f"unknown value kind {k!r}")
    pts = dirs * norms[:, None]
    return pts.reshape(rest + (D,)).movedim(-1, d)


def with_layout(t: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """The same values as `t` (on its device), laid out as `layout` says (see LAYOUTS)."""
    if t.dim() == 0 or layout == "contiguous":
        return t.contiguous()
    fill = math.nan if t.is_floating_point() else (False if t.dtype == torch.bool else -7)
    if layout == "transposed" and t.dim() < 2:
        layout = "sliced"
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.full(t.shape[:-1] + (2 * t.shape[-1],), fill, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":
        buf = torch.full((t.numel() + 1,), fill, dtype=t.dtype, device=t.device)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    if layout == "expanded":
        d = dim % t.dim()
        batch = [i for i in range(t.dim()) if i != d and t.shape[i] > 1]
        if not batch:
            return t.contiguous()
        return t.narrow(batch[0], 0, 1).expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


# ---- specs: what a case is made of ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointSpec:
    """One tensor argument: shape (coordinates at the case's dim), dtype, values, layout, seed.
    as_list gives a nested Python list instead of a tensor (a wrong type)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    layout: str
    seed: int
    as_list: bool = False

    def make(self, c: float, dim: int, device: str) -> object:
        gen = torch.Generator().manual_seed(self.seed)
        v = ball_points(self.shape, dim, self.kind, c, gen)
        if self.dtype == torch.bool:
            t = v != 0
        elif not self.dtype.is_floating_point:
            t = (v * 10).clamp(-1e6, 1e6).to(self.dtype)
        else:
            t = v.to(self.dtype)
        if self.as_list:
            return t.tolist()
        return with_layout(t.to(device), self.layout, dim)


@dataclasses.dataclass(frozen=True)
class CurvatureSpec:
    """The curvature argument c.

    form: "float" | "int" (a Python number) | "tensor" (0-dim) | "tensor1" (shape (1,)) — valid
    forms; "tensor_int" (an int64 tensor) | "tensor_vec" (shape (2,)) | "tensor_meta" (on the meta
    device) | "bool" | "string" — always errors. A tensor c has dtype `dtype` (None: the points'),
    lives on the points' device when on_device (else on the CPU) and may require grad.
    """

    value: float
    form: str = "float"
    dtype: torch.dtype | None = None
    on_device: bool = False
    requires_grad: bool = False

    @property
    def value_ok(self) -> bool:
        return math.isfinite(self.value) and self.value > 0

    @property
    def is_tensor(self) -> bool:
        return self.form.startswith("tensor")

    def make(self, like: torch.dtype, device: str) -> object:
        if self.form == "float":
            return float(self.value)
        if self.form == "int":
            return int(self.value)
        if self.form == "bool":
            return True
        if self.form == "string":
            return str(self.value)
        dtype = self.dtype or (like if like.is_floating_point else torch.float32)
        dev = device if self.on_device else "cpu"
        if self.form == "tensor_int":
            return torch.tensor(int(self.value) if self.value_ok else 1, device=dev)
        if self.form == "tensor_vec":
            return torch.tensor([self.value, self.value], dtype=dtype, device=dev)
        if self.form == "tensor_meta":
            return torch.tensor(self.value, dtype=dtype, device="meta")
        t = torch.tensor(self.value, dtype=dtype, device=dev)
        if self.form == "tensor1":
            t = t.reshape(1)
        return t.requires_grad_(self.requires_grad)

    def actual_value(self, like: torch.dtype) -> float:
        """c as the op sees it (a float32 tensor rounds it)."""
        if self.is_tensor and self.form not in ("tensor_int",):
            dtype = self.dtype or (like if like.is_floating_point else torch.float32)
            return float(torch.tensor(self.value, dtype=dtype))
        return float(self.value)

    def problem(self, device: str) -> str | None:
        """"error": the op must reject it; "unchecked": a bad value in a CUDA tensor, which the op
        trusts (no host sync), so anything but a crash goes; None: a valid c."""
        if self.form in ("tensor_int", "tensor_vec", "tensor_meta", "bool", "string"):
            return "error"
        if self.value_ok:
            return None
        if self.is_tensor and self.on_device and device != "cpu":
            return "unchecked"
        return "error"


@dataclasses.dataclass
class BuiltCase:
    args: tuple
    error_names: set[str]  # the op must raise an error naming one of these (when must_raise)
    must_raise: bool
    may_raise: bool  # an error is allowed (any of ALLOWED_ERRORS), a crash is not
    domain: bool | torch.Tensor  # per output row: inputs finite and inside the ball
    c_value: float


@dataclasses.dataclass(frozen=True)
class PoincareCase:
    """Points (one spec per name) on the Poincaré ball of curvature c, coordinates along dim."""

    names: tuple[str, ...]
    points: tuple[PointSpec, ...]
    c: CurvatureSpec
    dim: int
    project: bool

    def build(self, device: str) -> BuiltCase:
        c_gen = self.c.value if self.c.value_ok else 1.0  # the ball the points are drawn on
        float_dtypes = [p.dtype for p in self.points if p.dtype.is_floating_point]
        like = float_dtypes[0] if float_dtypes else torch.float32
        pts = [p.make(c_gen, self.dim, device) for p in self.points]
        c = self.c.make(self.points[0].dtype, device)
        args = (*pts, c)

        errors: set[str] = set()
        for name, p in zip(self.names, self.points):
            if p.as_list or not p.dtype.is_floating_point:
                errors.add(name)
        if len({p.dtype for p in self.points}) > 1:
            errors.update(self.names)
        shapes = [p.shape for p in self.points]
        nd = max(len(s) for s in shapes)
        dim_ok = -nd <= self.dim < nd
        try:
            torch.broadcast_shapes(*shapes)
        except RuntimeError:
            errors.update(self.names)
        else:  # the coordinate sizes must agree (no broadcasting along dim, unlike torch)
            padded = [(1,) * (nd - len(s)) + s for s in shapes]
            if dim_ok and len({s[self.dim] for s in padded}) > 1:
                errors.update(self.names)
        if not dim_ok:
            errors.add("dim")
        c_problem = self.c.problem(device)
        if c_problem == "error":
            errors.add("c")

        c_value = self.c.actual_value(like)
        domain: bool | torch.Tensor = False
        if not errors and c_problem is None:
            domain = poincare_domain(pts, c_value, self.dim)
        return BuiltCase(
            args=args,
            error_names=errors,
            must_raise=bool(errors),
            may_raise=c_problem == "unchecked",
            domain=domain,
            c_value=c_value,
        )


def poincare_domain(points: Sequence[torch.Tensor], c: float, dim: int) -> torch.Tensor:
    """Per output row (the broadcast of the points' rows): every point finite and strictly
    inside the ball of radius 1/sqrt(c), judged in float64 on the values as stored."""
    radius = 1.0 / math.sqrt(c)
    masks = []
    for p in points:
        p64 = p.detach().double()
        ok = torch.isfinite(p64).all(dim=dim) & (torch.linalg.vector_norm(p64, dim=dim) < radius)
        masks.append(ok)
    shape = torch.broadcast_shapes(*(m.shape for m in masks))
    out = torch.ones(shape, dtype=torch.bool, device=masks[0].device)
    for m in masks:
        out = out & m
    return out


# ---- strategies ----------------------------------------------------------------------------------


def rarely(p_in_10: int = 1):
    """True about p_in_10 times in 10."""
    return st.integers(0, 9).map(lambda v: v < p_in_10)


def coordinate_sizes(max_d: int = 70):
    """D from 1 to max_d, with the sizes that trip block logic (powers of two and their
    neighbours) and the small ones weighted up."""
    edges = [d for d in (16, 31, 32, 33, 63, 64, 65) if d <= max_d]
    return st.one_of(st.integers(1, min(8, max_d)), st.sampled_from(edges or [max_d]), st.integers(1, max_d))


def seeds():
    return st.integers(0, 2**31 - 1)


def float_dtypes():
    return st.sampled_from(FLOAT_DTYPES)


def dtypes(allow_bad: bool = True):
    """Mostly the four float dtypes; with allow_bad, now and then int32, int64 or bool."""
    if not allow_bad:
        return float_dtypes()
    return st.one_of(float_dtypes(), float_dtypes(), float_dtypes(), st.sampled_from(BAD_DTYPES))


@st.composite
def broadcast_shapes(draw, n: int = 2, max_batch_dims: int = 3, max_side: int = 5, max_d: int = 70):
    """(D, [shape_1, ..., shape_n]) with the coordinates last: shapes that broadcast like torch's
    (leading dims dropped, sides set to 1), 1-D ones, and empty batches (a side of 0)."""
    D = draw(coordinate_sizes(max_d))
    nb = draw(st.integers(0, max_batch_dims))
    sides = st.integers(0, 19).map(lambda v: 0 if v == 0 else 1 + v % max_side)  # 0: 1 in 20
    batch = [draw(sides) for _ in range(nb)]
    shapes = []
    for _ in range(n):
        drop = draw(st.integers(0, nb))
        own = [1 if (s != 1 and draw(rarely(2))) else s for s in batch[drop:]]
        shapes.append(tuple(own) + (D,))
    return D, shapes


@st.composite
def curvatures(draw, bad: bool | None = False, devices_differ: bool = True):
    """A CurvatureSpec: good values (1e-4 to 10, the usual four weighted up) as a float, an int, a
    0-dim or (1,) tensor of float64, float32 or the points' dtype, maybe requiring grad, maybe on
    the points' device. bad=True: a bad one (0, negative, nan, inf, or a tensor of the wrong dtype,
    shape or device, a bool, a string); bad=None: bad now and then."""
    value = draw(
        st.one_of(
            st.sampled_from(GOOD_CURVATURES),
            st.floats(-4, 1).map(lambda e: float(10.0**e)),
        )
    )
    form = draw(st.sampled_from(["tensor", "float", "tensor1", "int"]))
    if bad is None:
        bad = draw(rarely(1))
    if bad:
        if draw(st.booleans()):
            value = draw(st.sampled_from(BAD_CURVATURES))
            form = draw(st.sampled_from(["float", "tensor", "tensor1"]))
        else:
            form = draw(st.sampled_from(["tensor_int", "tensor_vec", "tensor_meta", "bool", "string"]))
    if form == "int":
        value = float(max(1, round(value))) if value > 0 and math.isfinite(value) else value
        if not (math.isfinite(value) and value == int(value)):
            form = "float"
    dtype = draw(st.sampled_from([None, torch.float64, torch.float32]))
    on_device = draw(st.booleans()) if devices_differ else False
    tensor = form in ("tensor", "tensor1")
    requires_grad = tensor and draw(st.booleans())
    return CurvatureSpec(value=value, form=form, dtype=dtype, on_device=on_device, requires_grad=requires_grad)


# What a case may get wrong (one at a time; None, the usual case, is a valid call).
ERROR_KINDS = ("dtype", "mismatch", "coords", "dim", "list", "c")


@st.composite
def poincare_cases(
    draw,
    names: tuple[str, ...] = ("x", "y"),
    error_rate: float = 0.2,
    max_batch_dims: int = 3,
    max_side: int = 5,
    max_d: int = 70,
    outside_rate: float = 0.25,
    dtype_choices: Sequence[torch.dtype] = FLOAT_DTYPES,
):
    """A PoincareCase: points named `names` that broadcast together, their coordinates at a random
    dim (usually -1), a curvature, project True or False. A fraction `error_rate` of the cases get
    one thing wrong (ERROR_KINDS): an integer or bool dtype, mismatched float dtypes, mismatched
    coordinate sizes, dim out of range, a list for a tensor, a bad c. A fraction `outside_rate`
    draw their values from every kind (huge, outside the ball, ...: only "no crash" is checked
    there); the others stay inside the ball (INSIDE_KINDS), where values and gradients are compared.
    (Hypothesis biases its draws, so the fractions are rough.)"""
    error = None
    if draw(st.integers(0, 99)) < 100 * error_rate:
        error = draw(st.sampled_from(ERROR_KINDS if len(names) > 1 else ("dtype", "dim", "list", "c")))
    D, shapes = draw(broadcast_shapes(len(names), max_batch_dims, max_side, max_d))
    if error == "coords":  # coordinate sizes that differ
        j = draw(st.integers(1, len(names) - 1))
        shapes[j] = shapes[j][:-1] + (D + draw(st.integers(1, 3)),)
    # Coordinates at -p: move them there in every shape (right-aligned dims stay aligned).
    min_nd = min(len(s) for s in shapes)
    p = draw(st.one_of(st.just(1), st.integers(1, min_nd)))
    shapes = [s[: len(s) - p] + (s[-1],) + s[len(s) - p : -1] for s in shapes]
    dim = -p
    if all(len(s) == len(shapes[0]) for s in shapes) and draw(st.booleans()):
        dim = len(shapes[0]) - p  # the same dim, counted from the left
    if error == "dim":
        nd = max(len(s) for s in shapes)
        dim = draw(st.sampled_from([nd, nd + 1, -nd - 1]))

    main = draw(st.sampled_from(list(dtype_choices)))
    dts = [main] * len(shapes)
    if error == "dtype":
        for j in draw(st.sets(st.integers(0, len(shapes) - 1), min_size=1)):
            dts[j] = draw(st.sampled_from(BAD_DTYPES))
    elif error == "mismatch":
        j = draw(st.integers(1, len(shapes) - 1))
        dts[j] = draw(st.sampled_from([d for d in FLOAT_DTYPES if d != main]))
    everywhere = draw(st.integers(0, 99)) < 100 * outside_rate
    kinds = VALUE_KINDS if everywhere else INSIDE_KINDS
    as_list = [False] * len(shapes)
    if error == "list":
        as_list[draw(st.integers(0, len(shapes) - 1))] = True
    points = tuple(
        PointSpec(
            shape=s,
            dtype=dts[j],
            kind=draw(st.sampled_from(list(kinds))),
            layout=draw(st.sampled_from(LAYOUTS)),
            seed=draw(seeds()),
            as_list=as_list[j],
        )
        for j, s in enumerate(shapes)
    )
    c = draw(curvatures(bad=error == "c"))
    return PoincareCase(names=tuple(names), points=points, c=c, dim=dim, project=draw(st.booleans()))


# ---- the oracle ----------------------------------------------------------------------------------


def _event(label: str) -> None:
    """Count an outcome in hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    try:
        event(label)
    except InvalidArgument:  # not inside a hypothesis test
        pass


def names_argument(message: str, names: Sequence[str]) -> bool:
    """Whether the message names one of `names` as a word ("x must ...", "(got c: ...)")."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _is_float_tensor(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _upcast(args: Sequence, grad_args: Sequence[int] = ()) -> list:
    out = []
    for i, a in enumerate(args):
        if _is_float_tensor(a):
            a = a.detach().double()
            if i in grad_args:
                a.requires_grad_(True)
        out.append(a)
    return out


def _perturbed(args64: Sequence, rel: float, gen: torch.Generator, trial: int) -> list:
    """The arguments, each float scaled elementwise by 1 ± rel. Trial 0 scales everything up (a
    radial move: what matters next to the ball's boundary), trial 1 moves the arguments in
    alternating directions, later trials take random signs per element."""
    out = []
    for j, a in enumerate(args64):
        if _is_float_tensor(a):
            if trial < 2:
                sign = torch.full(a.shape, 1.0 if trial == 0 or j % 2 == 0 else -1.0, dtype=torch.float64)
            else:
                sign = (torch.randint(0, 2, a.shape, generator=gen) * 2 - 1).to(torch.float64)
            b = (a.detach() * (1 + rel * sign.to(a.device))).requires_grad_(a.requires_grad)
            out.append(b)
        elif isinstance(a, float):
            sign = 1 if trial == 0 or j % 2 == 0 else -1
            if trial >= 2:
                sign = 2 * int(torch.randint(0, 2, (), generator=gen)) - 1
            out.append(a * (1 + rel * sign))
        else:
            out.append(a)
    return out


def _row_dim(t: torch.Tensor, dim: int | None) -> int | None:
    """`dim` where t has it (points), else None: elementwise (a 0-dim or (1,) c, say)."""
    return dim if dim is not None and -t.dim() <= dim < t.dim() else None


def _row_change(a: torch.Tensor | None, b: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
    if a is None or b is None:
        return None
    return row_norm(a.detach() - b.detach(), _row_dim(a, dim)).nan_to_num(0.0, posinf=0.0)


def _snapshot(args: Sequence) -> list:
    return [a.detach().clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else None for a in args]


def _unchanged(a: torch.Tensor, before: torch.Tensor) -> bool:
    a = a.detach()
    if a.is_floating_point():
        return bool(((a == before) | (a.isnan() & before.isnan())).all())
    return torch.equal(a, before)


def check_op_against_reference(
    fn: Callable,
    ref_fn: Callable,
    args: Sequence,
    kwargs: dict | None = None,
    *,
    error_names: Sequence[str] = (),
    must_raise: bool = False,
    may_raise: bool = False,
    domain: bool | torch.Tensor = True,
    dim: int | None = -1,
    out_dtype: torch.dtype | None = None,
    tol: float | None = None,
    grad_args: Sequence[int] = (),
    gen: torch.Generator | None = None,
    what: str = "",
    lowp_ref_fn: Callable | None = None,
    sum_floor: bool = False,
) -> torch.Tensor | None:
    """Call fn(*args, **kwargs) and judge it against ref_fn (the float64 reference).

    - must_raise: fn must raise one of ALLOWED_ERRORS whose message names one of `error_names`.
      may_raise: fn may raise one of ALLOWED_ERRORS (any message), or return anything but crash.
      Otherwise fn must return, and must not modify its inputs.
    - The result has ref_fn's shape, dtype `out_dtype` (default: the first float tensor argument's)
      and the inputs' device.
    - Where `domain` holds (a bool, or a bool per output row: the output without `dim`) and the
      inputs are finite, the result is finite and each row is within the dtype's tolerance of
      ref_fn evaluated on the inputs in float64 (plus a slack for ill-conditioned rows: the
      reference's own change under a few ulps of input perturbation).
    - grad_args: positions of tensor arguments whose gradients, when domain holds everywhere and
      the dtype is float32 or float64, must match the reference's (shape and dtype of the input;
      same per-row tolerance, with an absolute floor of tol times the upstream gradient flowing
      into the row, for rows whose gradient cancels to ~0). A 0-dim argument (c) is one row.
    - lowp_ref_fn (optional): another evaluation of the reference, called with the arguments in the
      compute dtype (float32 for float32 and the half types: PyTorch's own rounding; for float64,
      an independent float64 implementation); values and gradients may also be off by LOWP_FACTOR
      times its deviation from ref_fn.
    - sum_floor: the gradient to a one-element argument (c, a scalar r) sums one term per output
      element, which may cancel; it may also be off by tol times the sum of the terms' magnitudes
      (taken from the reference by forward-mode differentiation).

    Returns the result, or None when fn raised.
    """
    kwargs = kwargs or {}
    gen = gen or torch.Generator().manual_seed(0)
    ctx = f"{what}: " if what else ""
    before = _snapshot(args)
    try:
        out = fn(*args, **kwargs)
    except ALLOWED_ERRORS as e:
        _event(f"raised {type(e).__name__}")
        if may_raise and not must_raise:
            return None
        if not must_raise:
            raise AssertionError(f"{ctx}raised {type(e).__name__} on valid input: {e}") from e
        assert names_argument(str(e), error_names), (
            f"{ctx}the error does not name the offending argument (one of {sorted(error_names)}): "
            f"{type(e).__name__}: {e}"
        )
        return None
    except Exception as e:  # any other exception type is a crash, not a clear error
        raise AssertionError(f"{ctx}raised {type(e).__name__} (not one of {ALLOWED_ERRORS}): {e}") from e
    if must_raise:
        raise AssertionError(f"{ctx}expected an error naming one of {sorted(error_names)}, got a result")

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    floats = [a for a in tensors if a.is_floating_point()]
    out_dtype = out_dtype or (floats[0].dtype if floats else None)
    for a, b in zip(args, before):
        if b is not None:
            assert _unchanged(a, b), f"{ctx}the op modified an input in place"
    assert isinstance(out, torch.Tensor), f"{ctx}returned {type(out).__name__}, not a tensor"
    if may_raise:
        return out
    args64 = _upcast(args)
    with torch.no_grad():
        ref = ref_fn(*args64, **kwargs)
    assert out.shape == ref.shape, f"{ctx}shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out_dtype is not None:
        assert out.dtype == out_dtype, f"{ctx}dtype {out.dtype}, expected {out_dtype}"
    if floats:
        assert out.device == floats[0].device, f"{ctx}device {out.device}, expected {floats[0].device}"

    mask = _domain_mask(domain, ref, dim)
    if mask is None or out.numel() == 0 or not bool(mask.any()):
        _event("returned, nothing to compare (empty or outside the domain)")
        return out
    _event("compared " + ("every row" if bool(mask.all()) else "the rows inside the domain"))
    dtype = out_dtype or out.dtype
    rel = PERTURB_ULPS * torch.finfo(compute_dtype(dtype)).eps
    slack = None
    with torch.no_grad():
        for trial in range(PERTURB_TRIALS):
            change = _row_change(ref_fn(*_perturbed(args64, rel, gen, trial), **kwargs), ref, dim)
            slack = change if slack is None else torch.maximum(slack, change)
    slack = SLACK_FACTOR * slack
    low_dtype = compute_dtype(dtype)
    use_lowp = lowp_ref_fn is not None
    if use_lowp:
        with torch.no_grad():
            for trial in range(-1, PERTURB_TRIALS):
                low = lowp_ref_fn(*_in_dtype(_trial_args(args64, low_dtype, gen, trial), low_dtype), **kwargs)
                slack = torch.maximum(slack, LOWP_FACTOR * _row_change(low, ref, dim).to(slack.device))
    sel = _select_rows(mask, dim)
    o, r = sel(out), sel(ref)
    assert bool(torch.isfinite(o).all()), f"{ctx}non-finite output for inputs inside the domain"
    assert_rows_close(o, r, dtype=dtype, dim=None if dim is None else -1, tol=tol,
                      slack=slack[mask], what=f"{ctx}output")

    if grad_args and bool(mask.all()) and dtype in (torch.float32, torch.float64):
        _event("compared gradients")
        _check_grads(fn, ref_fn, args, kwargs, grad_args, dim, dtype, tol, rel, gen, ctx,
                     lowp_ref_fn if use_lowp else None, sum_floor)
    return out


def _trial_args(args64: Sequence, low_dtype: torch.dtype, gen: torch.Generator, trial: int) -> list:
    """The float64 arguments as given (trial -1) or perturbed by one ulp of low_dtype (trials 0..)."""
    return list(args64) if trial < 0 else _perturbed(args64, torch.finfo(low_dtype).eps, gen, trial)


def _in_dtype(args: Sequence, dtype: torch.dtype) -> list:
    """Float tensors cast to dtype (leaves again where they required grad); the rest as they are."""
    out = []
    for a in args:
        if _is_float_tensor(a):
            a = a.detach().to(dtype).requires_grad_(a.requires_grad)
        out.append(a)
    return out


def _domain_mask(domain: bool | torch.Tensor, ref: torch.Tensor, dim: int | None) -> torch.Tensor | None:
    """The domain as a bool tensor over the output's rows (ref without `dim`), or None if empty."""
    rows_shape = list(ref.shape)
    if dim is not None and ref.dim() > 0:
        del rows_shape[dim]
    if isinstance(domain, torch.Tensor):
        return domain.to(ref.device).expand(rows_shape)
    return torch.full(rows_shape, bool(domain), dtype=torch.bool, device=ref.device) if domain else None


def _select_rows(mask: torch.Tensor, dim: int | None):
    """A function taking a tensor of the output's shape to its rows where mask holds, as (n, D)."""

    def sel(t: torch.Tensor) -> torch.Tensor:
        if dim is None or t.dim() == 0:
            return t[mask]
        return t.movedim(dim, -1)[mask]

    return sel


def _check_grads(fn, ref_fn, args, kwargs, grad_args, dim, dtype, tol, rel, gen, ctx, lowp_ref_fn=None,
                 sum_floor=False) -> None:
    grad_args = [i for i in grad_args if _is_float_tensor(args[i])]
    if not grad_args:
        return
    targs = list(args)
    for i in grad_args:
        targs[i] = args[i].detach().requires_grad_(True)
    out = fn(*targs, **kwargs)
    if out.numel() == 0:
        return
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    got = torch.autograd.grad(out, [targs[i] for i in grad_args], g, allow_unused=True)

    def ref_grads(a64, fn=ref_fn):
        leaves = [a64[i] for i in grad_args]
        r = fn(*a64, **kwargs)
        gs = torch.autograd.grad(r, leaves, g.to(r.dtype), allow_unused=True)
        return [torch.zeros_like(l) if x is None else x for x, l in zip(gs, leaves)]

    args64 = _upcast(args, grad_args)
    want = ref_grads(args64)
    slack = [torch.zeros(())] * len(grad_args)
    for trial in range(PERTURB_TRIALS):
        pert = ref_grads(_perturbed(args64, rel, gen, trial))
        slack = [torch.maximum(s.to(w.device), _row_change(p, w, dim)) for s, p, w in zip(slack, pert, want)]
    lowp = [torch.zeros(())] * len(grad_args)
    if lowp_ref_fn is not None:
        low_dtype = compute_dtype(dtype)
        for trial in range(-1, PERTURB_TRIALS):
            low = ref_grads(_in_dtype(_trial_args(args64, low_dtype, gen, trial), low_dtype), lowp_ref_fn)
            lowp = [torch.maximum(s.to(w.device), _row_change(p.double(), w, dim)) for s, p, w in zip(lowp, low, want)]
    # A gradient is a sum of terms of the size of the upstream gradient times the Jacobian; where
    # those cancel (a row whose output the projection holds fixed, the gradient to y next to the
    # boundary) its relative error means nothing, so each row is also allowed tol times the upstream
    # gradient that flows into it: the mean row norm of g times how many output rows feed the row.
    g_rows = _rows(g, dim)
    g_row_norm = float(row_norm(g, _row_dim(g, dim)).mean())
    for k, i in enumerate(grad_args):
        a = args[i]
        gk = torch.zeros_like(targs[i]) if got[k] is None else got[k]
        assert gk.shape == a.shape, f"{ctx}grad {i}: shape {tuple(gk.shape)}, expected {tuple(a.shape)}"
        assert gk.dtype == a.dtype, f"{ctx}grad {i}: dtype {gk.dtype}, expected {a.dtype}"
        assert bool(torch.isfinite(gk).all()), f"{ctx}grad {i}: not finite inside the domain"
        # A gradient is stored in its input's dtype (a float32 c of float64 points gets a float32
        # gradient): judge it by the coarser of the two dtypes.
        gdtype = dtype if TOL[dtype] >= TOL.get(a.dtype, 0.0) else a.dtype
        gtol = TOL[gdtype] if tol is None else tol
        fan_in = g_rows / max(_rows(gk, dim), 1)
        allowance = SLACK_FACTOR * slack[k] + LOWP_FACTOR * lowp[k] + gtol * g_row_norm * fan_in
        if sum_floor and a.numel() == 1:
            allowance = allowance + gtol * _term_magnitudes(ref_fn, args64, kwargs, i, g)
        assert_rows_close(gk, want[k], dtype=gdtype, dim=_row_dim(gk, dim), tol=tol,
                          slack=allowance, what=f"{ctx}grad of argument {i}")


def _term_magnitudes(ref_fn, args64, kwargs, i, g) -> torch.Tensor:
    """sum_j |g_j d ref_j / d args[i]| for a one-element args[i] (forward mode), or 0 where the
    reference cannot be differentiated forward."""
    import torch.autograd.forward_ad as fwAD

    try:
        with fwAD.dual_level():
            dual = [a.detach() if isinstance(a, torch.Tensor) else a for a in args64]
            dual[i] = fwAD.make_dual(dual[i], torch.ones_like(dual[i]))
            tangent = fwAD.unpack_dual(ref_fn(*dual, **kwargs)).tangent
    except (RuntimeError, NotImplementedError):
        return torch.zeros(())
    if tangent is None:
        return torch.zeros(())
    return (g.double().to(tangent.device) * tangent).abs().sum().nan_to_num(0.0, posinf=0.0)


def _rows(t: torch.Tensor, dim: int | None) -> int:
    d = _row_dim(t, dim)
    return t.numel() if d is None else t.numel() // max(t.shape[d], 1)


__all__ = [
    "ALLOWED_ERRORS",
    "BAD_CURVATURES",
    "BAD_DTYPES",
    "BuiltCase",
    "CurvatureSpec",
    "FLOOR",
    "GOOD_CURVATURES",
    "LAYOUTS",
    "PointSpec",
    "PoincareCase",
    "TOL",
    "INSIDE_KINDS",
    "LOWP_FACTOR",
    "VALUE_KINDS",
    "ball_points",
    "broadcast_shapes",
    "check_op_against_reference",
    "ERROR_KINDS",
    "coordinate_sizes",
    "curvatures",
    "dtypes",
    "float_dtypes",
    "fuzz_settings",
    "names_argument",
    "poincare_cases",
    "poincare_domain",
    "with_layout",
]
