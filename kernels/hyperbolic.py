"""Triton kernels of the hyperbolic family: every op of lfi_fast/ops/hyperbolic.py and its backward.

Launchers of the custom ops lfi_fast::<op>_triton and lfi_fast::<op>_backward_triton: each public
function here takes the arguments of the op's schema (csrc/bindings.cpp), positionally, and returns
what csrc/cpu/hyperbolic.cpp returns (shapes, dtypes, gradients, errors).

The per-row math is csrc/hyperbolic_math.h, written once: each op's coefficients are a @triton.jit
function over dual numbers, tuples (value, d/dv0, d/dv1, ...). The forward evaluates it on 1-tuples
(plain values); the backward seeds the row's Gram entries and c as the variables (forward-mode AD
over a few scalars), so clamps and branches differentiate as torch's autograd does through geoopt's
graph, exactly as the C++ kernels do. Four kernels serve all ops, each parameterised by the op's
name (a constexpr) and a BWD flag:

    _binary_kernel  out = a x + b y              mobius_add, expmap, logmap
    _unary_kernel   out = f x, r per row         project, expmap0, logmap0, mobius_scalar_mul,
                                                 mobius_matvec's row op (x = m x, r = |x|^2)
    _dist_kernel    out = F(|s|^2), s = sa x + sb y (or s = x)     dist, dist0
    _pair_kernel    out[i, j] from |x_i|^2, |y_j|^2, <x_i, y_j>   pairwise_dist (after a GEMM)

float16 computes in float32, bfloat16 and float64 in float64. c on the CPU is read on the host and passed as
an fp64 scalar; c on the inputs' device is loaded by the kernel (never read back).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Elements per tile: enough bytes in flight per program on a GPU without spilling; backwards hold
# more live tiles, hence smaller ones. The interpreter pays per program and per op rather than per
# element, so it gets far fewer, larger tiles.
_TILE_FWD = 1 << 16 if _INTERPRETED else 8192
_TILE_BWD = 1 << 16 if _INTERPRETED else 4096
_PAIR_FWD = (256, 256) if _INTERPRETED else (64, 64)  # (BLOCK_N, BLOCK_M) of pairwise_dist
_PAIR_BWD = (256, 256) if _INTERPRETED else (32, 64)

MIN_NORM = tl.constexpr(1e-15)  # geoopt's clamp of norms and denominators
TANH_CLAMP = tl.constexpr(15.0)  # geoopt's tanh argument clamp
ARTANH_MAX = tl.constexpr(1 - 1e-7)  # geoopt's artanh argument clamp
ZERO_CURVATURE = tl.constexpr(1e-8)  # torch.isclose(k, 0): geoopt's Taylor branch


# ---- plain scalar functions ----------------------------------------------------------------------


@triton.jit
def _fdiv(a, b):
    # A plain fp32 '/' is approximate on NVIDIA GPUs; div_rn rounds as the C++ kernels do.
    if b.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _fsqrt(a):
    # tl.sqrt is approximate in fp32 on NVIDIA GPUs; sqrt_rn is IEEE, like std::sqrt.
    if a.dtype == tl.float32:
        r = tl.sqrt_rn(a)
    else:
        r = tl.sqrt(a)
    return r


@triton.jit
def _ftanh(z):
    # tanh without libdevice, for |z| <= 15: 1 - 2 / (exp(2z) + 1), which cancels for small |z|
    # (relative error ~eps/|z|); there the odd series to z^13 (truncation < 2e-17 for |z| < 0.1).
    z2 = z * z
    p = z2 * (21844.0 / 6081075.0) - 1382.0 / 155925.0
    p = z2 * p + 62.0 / 2835.0
    p = z2 * p - 17.0 / 315.0
    p = z2 * p + 2.0 / 15.0
    p = z2 * p - 1.0 / 3.0
    series = z + z * (z2 * p)
    return tl.where(tl.abs(z) < 0.1, series, 1.0 - _fdiv(2.0, tl.exp(2.0 * z) + 1.0))


# ---- dual numbers: tuples (value, d0, d1, ...) ---------------------------------------------------
# Each helper follows the C++ operator of hyperbolic_math.h (same operand order); "k" arguments are
# plain constants (no derivatives), as a C++ constant converted to a Dual. A constexpr k goes on
# the right of a tensor: the interpreter's constexpr.__add__(tensor) does not defer to the tensor.


@triton.jit
def _dadd(a, b):
    r = (a[0] + b[0],)
    for i in tl.static_range(1, len(a)):
        r = r + (a[i] + b[i],)
    return r


@triton.jit
def _dsub(a, b):
    r = (a[0] - b[0],)
    for i in tl.static_range(1, len(a)):
        r = r + (a[i] - b[i],)
    return r


@triton.jit
def _dmul(a, b):
    r = (a[0] * b[0],)
    for i in tl.static_range(1, len(a)):
        r = r + (a[i] * b[0] + a[0] * b[i],)
    return r


@triton.jit
def _ddiv(a, b):
    q = _fdiv(a[0], b[0])
    r = (q,)
    for i in tl.static_range(1, len(a)):
        r = r + (_fdiv(a[i] - q * b[i], b[0]),)
    return r


@triton.jit
def _ddivk(a, k):  # a / k
    kk = _k(k, a[0])
    r = (_fdiv(a[0], kk),)
    for i in tl.static_range(1, len(a)):
        r = r + (_fdiv(a[i], kk),)
    return r


@triton.jit
def _dchain(a, f, df):  # a unary function with value f and derivative df at a[0]
    r = (f,)
    for i in tl.static_range(1, len(a)):
        r = r + (df * a[i],)
    return r


@triton.jit
def _dneg(a):
    return _dchain(a, -a[0], -1.0)


@triton.jit
def _dscale(a, k):  # k * a
    return _dchain(a, a[0] * k, k)


@triton.jit
def _dshift(a, k):  # k + a
    return _dchain(a, a[0] + k, 1.0)


@triton.jit
def _drsub(k, a):  # k - a
    return _dchain(a, k - a[0], -1.0)


@triton.jit
def _drdiv(k, a):  # k / a
    q = _fdiv(k, a[0])
    r = (q,)
    for i in tl.static_range(1, len(a)):
        r = r + (_fdiv(-(q * a[i]), a[0]),)
    return r


@triton.jit
def _dsqrt(a):
    s = _fsqrt(a[0])
    return _dchain(a, s, _fdiv(0.5, s))


@triton.jit
def _dtanh(a):
    t = _ftanh(a[0])
    return _dchain(a, t, 1.0 - t * t)


@triton.jit
def _dlog(a):
    return _dchain(a, tl.log(a[0]), _fdiv(1.0, a[0]))


@triton.jit
def _flog1p(z):
    # log1p without libdevice: log(u) * z / (u - 1) with u = 1 + z corrects the rounding of u
    # (Goldberg); exact z where u rounds to 1.
    u = 1.0 + z
    d = u - 1.0
    return tl.where(d == 0.0, z, tl.log(u) * _fdiv(z, tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _dlog1p(a):
    return _dchain(a, _flog1p(a[0]), _fdiv(1.0, 1.0 + a[0]))


@triton.jit
def _dwhere(cond, a, b):
    r = (tl.where(cond, a[0], b[0]),)
    for i in tl.static_range(1, len(a)):
        r = r + (tl.where(cond, a[i], b[i]),)
    return r


@triton.jit
def _dwhere_k(cond, a, k):  # cond ? a : the constant k
    r = (tl.where(cond, a[0], k),)
    for i in tl.static_range(1, len(a)):
        r = r + (tl.where(cond, a[i], 0.0),)
    return r


@triton.jit
def _k(v, like):
    # A constant in like's type. Comparisons need it: tensor.__lt__ & co. turn a Python float into
    # an fp32 constant first, so `x_fp64 > 1 - 1e-7` would test against fp32(1 - 1e-7).
    return tl.full([], v, like.dtype)


@triton.jit
def _to_out(v, ptr):
    # The store's conversion to the output dtype; to bfloat16 through float32 (the interpreter's
    # float64 -> bfloat16 conversion reinterprets bits instead of rounding).
    if ptr.dtype.element_ty == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _dclamp_min(a, lo):  # torch's clamp: the gradient passes where lo <= a
    return _dwhere_k(a[0] >= _k(lo, a[0]), a, lo)


@triton.jit
def _dclamp(a, lo, hi):  # v < lo ? lo : (v > hi ? hi : a)
    below = a[0] < _k(lo, a[0])
    above = a[0] > _k(hi, a[0])
    r = (tl.where(below, lo, tl.where(above, hi, a[0])),)
    for i in tl.static_range(1, len(a)):
        r = r + (tl.where(below | above, 0.0, a[i]),)
    return r


@triton.jit
def _dnorm(sq):  # the norm from its square, as torch's norm(): 0 with a zero gradient at <= 0
    return _dwhere_k(sq[0] > 0.0, _dsqrt(sq), 0.0)


# ---- geoopt's building blocks (k = -c < 0) -------------------------------------------------------


@triton.jit
def _tan_k(x, c):  # tanh(sqrt(c) x) / sqrt(c); x + c x^3 / 3 for c <= 1e-8
    taylor = _dadd(x, _ddivk(_dmul(_dmul(_dmul(c, x), x), x), 3.0))
    sc = _dsqrt(_dshift(c, MIN_NORM))
    full = _ddiv(_dtanh(_dclamp(_dmul(x, sc), -TANH_CLAMP, TANH_CLAMP)), sc)
    return _dwhere(c[0] <= _k(ZERO_CURVATURE, c[0]), taylor, full)


@triton.jit
def _artan_k(x, c):  # artanh(sqrt(c) x) / sqrt(c); x - c x^3 / 3 for c <= 1e-8
    taylor = _dsub(x, _ddivk(_dmul(_dmul(_dmul(c, x), x), x), 3.0))
    sc = _dsqrt(_dshift(c, MIN_NORM))
    z = _dclamp(_dmul(x, sc), -ARTANH_MAX, ARTANH_MAX)
    at = _dscale(_dsub(_dlog1p(z), _dlog1p(_dscale(z, -1.0))), 0.5)  # as hyperbolic_math.h
    return _dwhere(c[0] <= _k(ZERO_CURVATURE, c[0]), taylor, _ddiv(at, sc))


@triton.jit
def _lambda_x(x2, c):  # 2 / max(1 - c |x|^2, 1e-15)
    return _drdiv(2.0, _dclamp_min(_drsub(1.0, _dmul(c, x2)), MIN_NORM))


@triton.jit
def _project_scale(n2, c, EPS: tl.constexpr):
    # The factor mapping a point of squared norm n2 into the ball of radius (1 - eps)/sqrt(c+1e-15).
    maxnorm = _drdiv(1.0 - _k(EPS, n2[0]), _dsqrt(_dshift(c, MIN_NORM)))
    n = _dclamp_min(_dnorm(n2), MIN_NORM)
    return _dwhere_k(n[0] > maxnorm[0], _ddiv(maxnorm, n), 1.0)


@triton.jit
def _mobius_add_raw(x2, y2, xy, c):  # x ⊕ y = a x + b y, denominator clamped at 1e-15
    c2xy = _dshift(_dmul(_dscale(c, 2.0), xy), 1.0)
    den = _dadd(c2xy, _dmul(_dmul(_dmul(c, c), x2), y2))
    inv = _drdiv(1.0, _dclamp_min(den, MIN_NORM))
    return _dmul(_dadd(c2xy, _dmul(c, y2)), inv), _dmul(_drsub(1.0, _dmul(c, x2)), inv)


@triton.jit
def _combo_sq(a, b, x2, y2, xy):  # |a x + b y|^2 from the Gram entries
    t = _dadd(_dmul(_dmul(a, a), x2), _dmul(_dmul(_dscale(a, 2.0), b), xy))
    return _dadd(t, _dmul(_dmul(b, b), y2))


@triton.jit
def _dist_sub(x2, y2, xy, c):  # (-x) ⊕ y = sa x + sb y
    a, b = _mobius_add_raw(x2, y2, _dneg(xy), c)
    return _dneg(a), b


@triton.jit
def _dist_from_sq(s2, c):  # 2 artan_k(|s|)
    return _dscale(_artan_k(_dnorm(s2), c), 2.0)


# ---- the ops' coefficients -----------------------------------------------------------------------


@triton.jit
def _binary_coef(x2, y2, xy, c, OP: tl.constexpr, PROJECT: tl.constexpr, EPS: tl.constexpr):
    """(a, b) of out = a x + b y from (|x|^2, |y|^2, <x, y>, c)."""
    if OP == "mobius_add":
        a, b = _mobius_add_raw(x2, y2, xy, c)
    elif OP == "expmap":  # x ⊕ t u, t = tan_k(lambda_x |u| / 2) / |u|
        un = _dclamp_min(_dnorm(y2), MIN_NORM)
        t = _ddiv(_tan_k(_dmul(_dscale(_lambda_x(x2, c), 0.5), un), c), un)
        a, b = _mobius_add_raw(x2, _dmul(_dmul(t, t), y2), _dmul(t, xy), c)
        b = _dmul(b, t)
    else:
        tl.static_assert(OP == "logmap")  # 2 artan_k(|s|) s / (lambda_x |s|), s = (-x) ⊕ y
        nxy = _dneg(xy)
        a, b = _mobius_add_raw(x2, y2, nxy, c)
        sn = _dclamp_min(_dnorm(_combo_sq(a, b, x2, y2, nxy)), MIN_NORM)
        f = _ddiv(_dscale(_artan_k(sn, c), 2.0), _dmul(_lambda_x(x2, c), sn))
        a = _dmul(_dneg(a), f)
        b = _dmul(b, f)
    if PROJECT:
        s = _project_scale(_combo_sq(a, b, x2, y2, xy), c, EPS)
        a = _dmul(a, s)
        b = _dmul(b, s)
    return a, b


@triton.jit
def _unary_coef(v2, c, r, OP: tl.constexpr, PROJECT: tl.constexpr, EPS: tl.constexpr):
    """f of out = f v from (|v|^2, c, r). For mobius_matvec, v = m x and r = |x|^2."""
    if OP == "project":
        f = _project_scale(v2, c, EPS)
    else:
        vn = _dclamp_min(_dnorm(v2), MIN_NORM)
        if OP == "logmap0":
            f = _ddiv(_artan_k(vn, c), vn)
        else:
            if OP == "expmap0":
                t = vn
            elif OP == "mobius_scalar_mul":
                t = _dmul(r, _artan_k(vn, c))
            else:
                tl.static_assert(OP == "mobius_matvec")
                xn = _dclamp_min(_dnorm(r), MIN_NORM)
                t = _dmul(_ddiv(vn, xn), _artan_k(xn, c))
            f = _ddiv(_tan_k(t, c), vn)
            if PROJECT:
                f = _dmul(f, _project_scale(_dmul(_dmul(f, f), v2), c, EPS))
    return f


@triton.jit
def _pair_dist(x2, y2, xy, c):
    sa, sb = _dist_sub(x2, y2, xy, c)
    return _dist_from_sq(_combo_sq(sa, sb, x2, y2, xy), c)


# ---- kernels: one BLOCK_M x BLOCK_D tile of rows per program ----------------------------------


@triton.jit
def _curvature(c_ptr, c_val, CDT: tl.constexpr, C_ON_DEVICE: tl.constexpr):
    if C_ON_DEVICE:
        c = tl.load(c_ptr).to(CDT)
    else:
        c = tl.full([], c_val, CDT)
    return c


@triton.jit
def _tile(ptr, rows, cols, stride, mask, CDT: tl.constexpr):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(CDT)


@triton.jit
def _binary_kernel(
    x_ptr, y_ptr, g_ptr, out_ptr, gy_ptr, gc_ptr, c_ptr, c_val: tl.float64, n_rows, D,
    stride_x, stride_y, stride_g,
    OP: tl.constexpr, BWD: tl.constexpr, CDT: tl.constexpr, EPS: tl.constexpr,
    PROJECT: tl.constexpr, C_ON_DEVICE: tl.constexpr, NEEDS_GC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: out = a x + b y. Backward (out_ptr is grad_x): grad_x = a g + 2 L_x2 x + L_xy y,
    grad_y = b g + L_xy x + 2 L_y2 y, with L_. = <g,x> da/d. + <g,y> db/d. ; per-row d/dc."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = _tile(x_ptr, rows, cols, stride_x, mask, CDT)
    y = _tile(y_ptr, rows, cols, stride_y, mask, CDT)
    x2 = tl.sum(x * x, axis=1)
    y2 = tl.sum(y * y, axis=1)
    xy = tl.sum(x * y, axis=1)
    z = tl.zeros_like(x2)
    c = z + _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    offs = rows[:, None] * D + cols[None, :]
    if BWD:
        g = _tile(g_ptr, rows, cols, stride_g, mask, CDT)
        gx = tl.sum(g * x, axis=1)
        gy = tl.sum(g * y, axis=1)
        o = z + 1.0
        a, b = _binary_coef(
            (x2, o, z, z, z), (y2, z, o, z, z), (xy, z, z, o, z), (c, z, z, z, o), OP, PROJECT, EPS
        )
        l_x2 = gx * a[1] + gy * b[1]
        l_y2 = gx * a[2] + gy * b[2]
        l_xy = gx * a[3] + gy * b[3]
        grad_x = a[0][:, None] * g + (2.0 * l_x2)[:, None] * x + l_xy[:, None] * y
        grad_y = b[0][:, None] * g + l_xy[:, None] * x + (2.0 * l_y2)[:, None] * y
        tl.store(out_ptr + offs, _to_out(grad_x, out_ptr), mask=mask)
        tl.store(gy_ptr + offs, _to_out(grad_y, gy_ptr), mask=mask)
        if NEEDS_GC:
            gc = gx * a[4] + gy * b[4]
            tl.store(gc_ptr + rows, _to_out(gc, gc_ptr), mask=rows < n_rows)
    else:
        a, b = _binary_coef((x2,), (y2,), (xy,), (c,), OP, PROJECT, EPS)
        out = a[0][:, None] * x + b[0][:, None] * y
        tl.store(out_ptr + offs, _to_out(out, out_ptr), mask=mask)


@triton.jit
def _unary_kernel(
    x_ptr, r_ptr, g_ptr, out_ptr, gr_ptr, gc_ptr, c_ptr, c_val: tl.float64, n_rows, D,
    stride_x, stride_r, stride_g,
    OP: tl.constexpr, BWD: tl.constexpr, HAS_R: tl.constexpr, CDT: tl.constexpr,
    EPS: tl.constexpr, PROJECT: tl.constexpr, C_ON_DEVICE: tl.constexpr, NEEDS_GC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: out = f x. Backward (out_ptr is grad_x): grad_x = f g + 2 <g,x> df/dx2 x ;
    per-row d/dr (if HAS_R) and d/dc. mobius_matvec: f = 0 on all-zero rows (no gradient)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < D)[None, :]
    x = _tile(x_ptr, rows, cols, stride_x, mask, CDT)
    x2 = tl.sum(x * x, axis=1)
    z = tl.zeros_like(x2)
    c = z + _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    if HAS_R:
        r = tl.load(r_ptr + rows * stride_r, mask=row_mask, other=0.0).to(CDT)
    else:
        r = z
    keep = rows >= 0
    if OP == "mobius_matvec":  # geoopt's torch.where(all(mx == 0), 0, ...)
        keep = tl.sum((x != 0).to(tl.int32), axis=1) > 0
    offs = rows[:, None] * D + cols[None, :]
    if BWD:
        g = _tile(g_ptr, rows, cols, stride_g, mask, CDT)
        gx = tl.sum(g * x, axis=1)
        o = z + 1.0
        f = _unary_coef((x2, o, z, z), (c, z, o, z), (r, z, z, o), OP, PROJECT, EPS)
        fv = tl.where(keep, f[0], 0.0)
        k_x = tl.where(keep, 2.0 * gx * f[1], 0.0)
        grad_x = fv[:, None] * g + k_x[:, None] * x
        tl.store(out_ptr + offs, _to_out(grad_x, out_ptr), mask=mask)
        if HAS_R:
            gr = tl.where(keep, gx * f[3], 0.0)
            tl.store(gr_ptr + rows, _to_out(gr, gr_ptr), mask=row_mask)
        if NEEDS_GC:
            gc = tl.where(keep, gx * f[2], 0.0)
            tl.store(gc_ptr + rows, _to_out(gc, gc_ptr), mask=row_mask)
    else:
        f = _unary_coef((x2,), (c,), (r,), OP, PROJECT, EPS)
        fv = tl.where(keep, f[0], 0.0)
        tl.store(out_ptr + offs, _to_out(fv[:, None] * x, out_ptr), mask=mask)


@triton.jit
def _dist_kernel(
    x_ptr, y_ptr, g_ptr, out_ptr, gy_ptr, gc_ptr, c_ptr, c_val: tl.float64, n_rows, D,
    stride_x, stride_y,
    HAS_Y: tl.constexpr, BWD: tl.constexpr, CDT: tl.constexpr, C_ON_DEVICE: tl.constexpr,
    NEEDS_GC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dist (HAS_Y): s = (-x) ⊕ y = sa x + sb y formed element by element, out = 2 artan_k(|s|);
    dist0: s = x. Backward (out_ptr is grad_x, g one value per row): through |s|^2 and (sa, sb),
    d|s|^2 = 2 sa <s,dx> + 2 sb <s,dy> + 2 <s,x> dsa + 2 <s,y> dsb."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < D)[None, :]
    x = _tile(x_ptr, rows, cols, stride_x, mask, CDT)
    x2 = tl.sum(x * x, axis=1)
    z = tl.zeros_like(x2)
    o = z + 1.0
    c = z + _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    if HAS_Y:
        y = _tile(y_ptr, rows, cols, stride_y, mask, CDT)
        y2 = tl.sum(y * y, axis=1)
        xy = tl.sum(x * y, axis=1)
        if BWD:
            sa, sb = _dist_sub(
                (x2, o, z, z, z), (y2, z, o, z, z), (xy, z, z, o, z), (c, z, z, z, o)
            )
        else:
            sa, sb = _dist_sub((x2,), (y2,), (xy,), (c,))
        s = sa[0][:, None] * x + sb[0][:, None] * y
        s2 = tl.sum(s * s, axis=1)
    else:
        s2 = x2
    if BWD:
        f = _dist_from_sq((s2, o, z), (c, z, o))
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(CDT)
        ks = 2.0 * (g * f[1])  # 2 dL/d|s|^2
        offs = rows[:, None] * D + cols[None, :]
        gc = g * f[2]
        if HAS_Y:
            sx = tl.sum(s * x, axis=1)
            sy = tl.sum(s * y, axis=1)
            l_x2 = ks * (sx * sa[1] + sy * sb[1])
            l_y2 = ks * (sx * sa[2] + sy * sb[2])
            l_xy = ks * (sx * sa[3] + sy * sb[3])
            gc = ks * (sx * sa[4] + sy * sb[4]) + gc
            gx_x = ks * sa[0] * sa[0] + 2.0 * l_x2
            gx_y = ks * sa[0] * sb[0] + l_xy
            gy_x = ks * sb[0] * sa[0] + l_xy
            gy_y = ks * sb[0] * sb[0] + 2.0 * l_y2
            grad_x = gx_x[:, None] * x + gx_y[:, None] * y
            grad_y = gy_x[:, None] * x + gy_y[:, None] * y
            tl.store(gy_ptr + offs, _to_out(grad_y, gy_ptr), mask=mask)
        else:
            grad_x = ks[:, None] * x
        tl.store(out_ptr + offs, _to_out(grad_x, out_ptr), mask=mask)
        if NEEDS_GC:
            tl.store(gc_ptr + rows, _to_out(gc, gc_ptr), mask=row_mask)
    else:
        f = _dist_from_sq((s2,), (c,))
        tl.store(out_ptr + rows, _to_out(f[0], out_ptr), mask=row_mask)


@triton.jit
def _pair_kernel(
    x2_ptr, y2_ptr, xy_ptr, g_ptr, out_ptr, px_ptr, py_ptr, pc_ptr, c_ptr, c_val: tl.float64,
    N, M, n_blocks_m,
    BWD: tl.constexpr, CDT: tl.constexpr, C_ON_DEVICE: tl.constexpr, NEEDS_GC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[i, j] = dist from (|x_i|^2, |y_j|^2, <x_i, y_j>). Backward (out_ptr is dL/d<x_i,y_j>):
    partial sums of dL/d|x_i|^2 and dL/dc per (row, column block) and of dL/d|y_j|^2 per (row
    block, column), summed by the launcher (deterministic, unlike atomics)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    z = tl.zeros([BLOCK_N, BLOCK_M], CDT)
    x2 = z + tl.load(x2_ptr + rows, mask=rows < N, other=0.0).to(CDT)[:, None]
    y2 = z + tl.load(y2_ptr + cols, mask=cols < M, other=0.0).to(CDT)[None, :]
    offs = rows[:, None] * M + cols[None, :]
    xy = tl.load(xy_ptr + offs, mask=mask, other=0.0).to(CDT)
    c = z + _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    if BWD:
        o = z + 1.0
        f = _pair_dist((x2, o, z, z, z), (y2, z, o, z, z), (xy, z, z, o, z), (c, z, z, z, o))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CDT)
        tl.store(out_ptr + offs, _to_out(g * f[3], out_ptr), mask=mask)
        tl.store(px_ptr + rows * n_blocks_m + pid_m, tl.sum(tl.where(mask, g * f[1], 0.0), axis=1),
                 mask=rows < N)
        tl.store(py_ptr + pid_n.to(tl.int64) * M + cols,
                 tl.sum(tl.where(mask, g * f[2], 0.0), axis=0), mask=cols < M)
        if NEEDS_GC:
            tl.store(pc_ptr + rows * n_blocks_m + pid_m,
                     tl.sum(tl.where(mask, g * f[4], 0.0), axis=1), mask=rows < N)
    else:
        f = _pair_dist((x2,), (y2,), (xy,), (c,))
        tl.store(out_ptr + offs, _to_out(f[0], out_ptr), mask=mask)


# ---- launchers: the checks and shapes of csrc/cpu/hyperbolic.cpp ---------------------------------


def _check_vec(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise RuntimeError(f"{name} must be a floating tensor (got {t.dtype})")
    if t.dim() < 1:
        raise RuntimeError(f"{name} must have at least 1 dim (the coordinates)")


def _check_pair(x: torch.Tensor, y: torch.Tensor, xn: str, yn: str) -> None:
    _check_vec(x, xn)
    _check_vec(y, yn)
    if y.dtype != x.dtype:
        raise RuntimeError(f"{xn} and {yn} must have the same dtype (got {x.dtype} and {y.dtype})")
    if y.device != x.device:
        raise RuntimeError(f"{yn} must be on {x.device} (got {y.device})")


def _check_c(c: torch.Tensor, x: torch.Tensor) -> None:
    if c.dim() != 0 or not c.is_floating_point():
        raise RuntimeError(
            f"c must be a 0-dim floating tensor (got {c.dtype}, shape {tuple(c.shape)})"
        )
    if c.device.type != "cpu" and c.device != x.device:
        raise RuntimeError(f"c must be on the CPU or on {x.device} (got {c.device})")


def _check_grad(grad: torch.Tensor, like: torch.Tensor, shape) -> None:
    if grad.dtype != like.dtype or grad.device != like.device:
        raise RuntimeError(
            f"grad must be {like.dtype} on {like.device} (got {grad.dtype} on {grad.device})"
        )
    if tuple(grad.shape) != tuple(shape):
        raise RuntimeError(f"grad must have shape {tuple(shape)} (got {tuple(grad.shape)})")


def _broadcast_shape(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    return list(torch.broadcast_shapes(x.shape, y.shape))


def _row_view(t: torch.Tensor, shape) -> tuple[torch.Tensor, int]:
    """row_view of csrc/common.h: t broadcast to shape as (rows, D) with a unit inner stride and
    one row stride (0 for a broadcast row), copying only when that cannot be expressed."""
    d = shape[-1]
    v = t.expand(shape).reshape(-1, d)
    if d > 1 and v.stride(1) != 1:
        v = v.contiguous()
    return v, (v.stride(0) if v.size(0) > 1 else d)


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _compute_types(dtype: torch.dtype):
    """(Triton compute type, its torch dtype, projection eps) for an input dtype: as the C++
    kernels' compute_t, float32 for float16 and float32, float64 for float64 and for bfloat16
    (float32's range: the squared norm of a finite bfloat16 vector can overflow float32)."""
    if dtype == torch.float64:
        return tl.float64, torch.float64, 1e-5
    if dtype == torch.bfloat16:
        return tl.float64, torch.float64, 4e-3
    return tl.float32, torch.float32, 4e-3


def _c_args(c: torch.Tensor, placeholder: torch.Tensor) -> dict:
    """c_ptr, c_val, C_ON_DEVICE. A CPU c is read here; the placeholder pointer (never loaded) is a
    device tensor because the GPU launcher rejects host pointers."""
    if c.device.type == "cpu":
        return {"c_ptr": placeholder, "c_val": float(c), "C_ON_DEVICE": False}
    return {"c_ptr": c, "c_val": 0.0, "C_ON_DEVICE": True}


def _grad_c(rows: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    # Per-row (or per-block) contributions summed in double as the C++ kernels do, then rounded
    # once to c's dtype; zeros when not asked for.
    if rows is None:
        return torch.zeros((), dtype=c.dtype, device=c.device)
    return rows.sum(dtype=torch.float64).to(device=c.device, dtype=c.dtype)


def _launch_rows(kernel, n_rows: int, d: int, tile: int, like: torch.Tensor, *args, **kwargs):
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    num_warps = max(4, min(16, block_m * block_d // 1024))
    grid = (triton.cdiv(n_rows, block_m),)
    with _device_of(like):
        kernel[grid](*args, n_rows=n_rows, D=d, BLOCK_M=block_m, BLOCK_D=block_d,
                     num_warps=num_warps, **kwargs)


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the inputs' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- binary row ops: mobius_add, expmap, logmap --------------------------------------------------


def _binary_fwd(op: str, x, y, c, project: bool, names=("x", "y")) -> torch.Tensor:
    _check_pair(x, y, *names)
    _check_c(c, x)
    shape = _broadcast_shape(x, y)
    out = _empty(shape, x)
    if out.numel() == 0:
        return out
    (xv, sx), (yv, sy) = _row_view(x, shape), _row_view(y, shape)
    cdt, _, eps = _compute_types(x.dtype)
    _launch_rows(
        _binary_kernel, out.numel() // shape[-1], shape[-1], _TILE_FWD, x,
        xv, yv, xv, out, out, out, **_c_args(c, out), stride_x=sx, stride_y=sy, stride_g=0,
        OP=op, BWD=False, CDT=cdt, EPS=eps, PROJECT=bool(project), NEEDS_GC=False,
    )
    return out


def _binary_bwd(op: str, grad, x, y, c, project: bool, needs_grad_c: bool, names=("x", "y")):
    _check_pair(x, y, *names)
    _check_c(c, x)
    shape = _broadcast_shape(x, y)
    _check_grad(grad, x, shape)
    gx, gy = _empty(shape, x), _empty(shape, x)
    if gx.numel() == 0:
        return gx, gy, _grad_c(None, c)
    d = shape[-1]
    n_rows = gx.numel() // d
    (gv, sg), (xv, sx), (yv, sy) = _row_view(grad, shape), _row_view(x, shape), _row_view(y, shape)
    cdt, acc, eps = _compute_types(x.dtype)
    gc = _empty(n_rows, x, acc) if needs_grad_c else None
    _launch_rows(
        _binary_kernel, n_rows, d, _TILE_BWD, x,
        xv, yv, gv, gx, gy, gx if gc is None else gc, **_c_args(c, gx),
        stride_x=sx, stride_y=sy, stride_g=sg,
        OP=op, BWD=True, CDT=cdt, EPS=eps, PROJECT=bool(project), NEEDS_GC=gc is not None,
    )
    return gx, gy, _grad_c(gc, c)


def mobius_add(x, y, c, project):
    return _binary_fwd("mobius_add", x, y, c, project)


def mobius_add_backward(grad, x, y, c, project, needs_grad_c):
    return _binary_bwd("mobius_add", grad, x, y, c, project, needs_grad_c)


def expmap(x, u, c, project):
    return _binary_fwd("expmap", x, u, c, project, ("x", "u"))


def expmap_backward(grad, x, u, c, project, needs_grad_c):
    return _binary_bwd("expmap", grad, x, u, c, project, needs_grad_c, ("x", "u"))


def logmap(x, y, c):
    return _binary_fwd("logmap", x, y, c, False)


def logmap_backward(grad, x, y, c, needs_grad_c):
    return _binary_bwd("logmap", grad, x, y, c, False, needs_grad_c)


# ---- unary row ops: project, expmap0, logmap0, mobius_scalar_mul ---------------------------------


def _unary_shape(x, r, name: str) -> list[int]:
    """x's shape, or with r (one scalar per row, broadcast as (..., 1)) the broadcast one."""
    shape = list(x.shape)
    if r is None:
        return shape
    if r.dtype != x.dtype or r.device != x.device:
        raise RuntimeError(f"r and {name} must have the same dtype and device")
    shape = list(torch.broadcast_shapes(r.shape, tuple(shape[:-1]) + (1,)))
    if shape[-1] != 1:
        raise RuntimeError(
            f"r must broadcast against the rows of {name} as (..., 1) (got r: {tuple(r.shape)})"
        )
    shape[-1] = x.shape[-1]
    return shape


def _row_scalar(r, shape) -> tuple[torch.Tensor, int]:
    v = r.expand(list(shape[:-1]) + [1]).reshape(-1)
    return v, (v.stride(0) if v.numel() > 1 else 1)


def _unary_launch(op, x, r, g, out, gr, gc, c, project, shape, bwd, eps_dtype=None):
    d = shape[-1]
    n_rows = out.numel() // d
    xv, sx = _row_view(x, shape)
    gv, sg = _row_view(g, shape) if g is not None else (xv, 0)
    rv, sr = _row_scalar(r, shape) if r is not None else (xv, 0)
    cdt, _, eps = _compute_types(eps_dtype or x.dtype)
    _launch_rows(
        _unary_kernel, n_rows, d, _TILE_BWD if bwd else _TILE_FWD, out,
        xv, rv, gv, out, out if gr is None else gr, out if gc is None else gc, **_c_args(c, out),
        stride_x=sx, stride_r=sr, stride_g=sg, OP=op, BWD=bwd, HAS_R=r is not None, CDT=cdt,
        EPS=eps, PROJECT=bool(project), NEEDS_GC=gc is not None,
    )


def _unary_fwd(op: str, x, c, r, project: bool, name: str) -> torch.Tensor:
    _check_vec(x, name)
    _check_c(c, x)
    shape = _unary_shape(x, r, name)
    out = _empty(shape, x)
    if out.numel() > 0:
        _unary_launch(op, x, r, None, out, None, None, c, project, shape, False)
    return out


def _unary_bwd(op: str, grad, x, c, r, project: bool, needs_grad_c: bool, name: str):
    """(grad_x, grad_r or None, grad_c); grad_r has the rows' shape (..., 1)."""
    _check_vec(x, name)
    _check_c(c, x)
    shape = list(grad.shape)
    if not shape or shape[-1] != x.shape[-1]:
        raise RuntimeError(f"grad must be (..., {x.shape[-1]}) (got {tuple(grad.shape)})")
    _check_grad(grad, x, shape)
    if r is not None:
        _unary_shape(x, r, name)
    gx = _empty(shape, x)
    gr = _empty(shape[:-1] + [1], x) if r is not None else None
    if gx.numel() == 0:  # no output: r gets a zero gradient
        return gx, (gr.zero_() if gr is not None else None), _grad_c(None, c)
    gc = _empty(gx.numel() // shape[-1], x, _compute_types(x.dtype)[1]) if needs_grad_c else None
    _unary_launch(op, x, r, grad, gx, gr, gc, c, project, shape, True)
    return gx, gr, _grad_c(gc, c)


def project(x, c):
    return _unary_fwd("project", x, c, None, True, "x")


def project_backward(grad, x, c, needs_grad_c):
    gx, _, gc = _unary_bwd("project", grad, x, c, None, True, needs_grad_c, "x")
    return gx, gc


def expmap0(u, c, project):
    return _unary_fwd("expmap0", u, c, None, project, "u")


def expmap0_backward(grad, u, c, project, needs_grad_c):
    gu, _, gc = _unary_bwd("expmap0", grad, u, c, None, project, needs_grad_c, "u")
    return gu, gc


def logmap0(y, c):
    return _unary_fwd("logmap0", y, c, None, False, "y")


def logmap0_backward(grad, y, c, needs_grad_c):
    gy, _, gc = _unary_bwd("logmap0", grad, y, c, None, False, needs_grad_c, "y")
    return gy, gc


def mobius_scalar_mul(r, x, c, project):
    return _unary_fwd("mobius_scalar_mul", x, c, r, project, "x")


def mobius_scalar_mul_backward(grad, r, x, c, project, needs_grad_c):
    gx, gr, gc = _unary_bwd("mobius_scalar_mul", grad, x, c, r, project, needs_grad_c, "x")
    return gr, gx, gc


# ---- mobius_matvec: mx = x m^T by torch's GEMM (compute type), then the unary row op on mx -------


def _matvec_prep(m, x, c):
    _check_pair(x, m, "x", "m")
    if m.dim() != 2 or m.shape[1] != x.shape[-1]:
        raise RuntimeError(
            f"m must be (out, in) with in == x.shape[-1] "
            f"(got m: {tuple(m.shape)}, x: {tuple(x.shape)})"
        )
    _check_c(c, x)
    acc = _compute_types(x.dtype)[1]
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(acc).contiguous()
    ma = m.to(acc)
    return x2d, ma, torch.matmul(x2d, ma.t()).contiguous(), x2d.square().sum(-1, keepdim=True)


def mobius_matvec(m, x, c, project):
    x2d, _, mx, x2 = _matvec_prep(m, x, c)
    out = _empty(list(x.shape[:-1]) + [m.shape[0]], x)
    if out.numel() > 0:
        _unary_launch("mobius_matvec", mx, x2, None, out, None, None, c, project,
                      [mx.shape[0], mx.shape[1]], False, eps_dtype=x.dtype)
    return out


def mobius_matvec_backward(grad, m, x, c, project, needs_grad_c):
    x2d, ma, mx, x2 = _matvec_prep(m, x, c)
    n, dout = mx.shape
    _check_grad(grad, x, list(x.shape[:-1]) + [dout])
    g = grad.reshape(n, dout).to(mx.dtype)  # grad_mx = f g + 2 L_m2 mx ; grad_x = 2 L_x2 x + ...
    gmx, gx2 = torch.empty_like(mx), torch.zeros_like(x2)
    gc = torch.zeros(n, dtype=mx.dtype, device=mx.device) if needs_grad_c else None
    if mx.numel() > 0:
        _unary_launch("mobius_matvec", mx, x2, g, gmx, gx2, gc, c, project, [n, dout], True,
                      eps_dtype=x.dtype)
    else:
        gmx.zero_()
    gx = (x2d * (2.0 * gx2)).add_(torch.matmul(gmx, ma))
    gm = torch.matmul(gmx.t(), x2d).to(m.dtype)
    return gm, gx.to(x.dtype).reshape(x.shape), _grad_c(gc, c)


# ---- dist and dist0: a scalar per row ------------------------------------------------------------


def _dist_fwd(x, y, c) -> torch.Tensor:
    _check_c(c, x)
    shape = _broadcast_shape(x, y) if y is not None else list(x.shape)
    out = _empty(shape[:-1], x)
    if out.numel() == 0:
        return out
    if shape[-1] == 0:
        return out.zero_()
    xv, sx = _row_view(x, shape)
    yv, sy = _row_view(y, shape) if y is not None else (xv, 0)
    _launch_rows(
        _dist_kernel, out.numel(), shape[-1], _TILE_FWD, x,
        xv, yv, xv, out, out, out, **_c_args(c, out), stride_x=sx, stride_y=sy,
        HAS_Y=y is not None, BWD=False, CDT=_compute_types(x.dtype)[0], NEEDS_GC=False,
    )
    return out


def _dist_bwd(grad, x, y, c, needs_grad_c: bool):
    _check_c(c, x)
    shape = _broadcast_shape(x, y) if y is not None else list(x.shape)
    _check_grad(grad, x, shape[:-1])
    gx = _empty(shape, x)
    gy = _empty(shape, x) if y is not None else None
    if gx.numel() == 0:
        return gx, gy, _grad_c(None, c)
    n_rows = gx.numel() // shape[-1]
    xv, sx = _row_view(x, shape)
    yv, sy = _row_view(y, shape) if y is not None else (xv, 0)
    cdt, acc, _ = _compute_types(x.dtype)
    gc = _empty(n_rows, x, acc) if needs_grad_c else None
    _launch_rows(
        _dist_kernel, n_rows, shape[-1], _TILE_BWD, x,
        xv, yv, grad.contiguous(), gx, gx if gy is None else gy, gx if gc is None else gc,
        **_c_args(c, gx), stride_x=sx, stride_y=sy,
        HAS_Y=y is not None, BWD=True, CDT=cdt, NEEDS_GC=gc is not None,
    )
    return gx, gy, _grad_c(gc, c)


def dist(x, y, c):
    _check_pair(x, y, "x", "y")
    return _dist_fwd(x, y, c)


def dist_backward(grad, x, y, c, needs_grad_c):
    _check_pair(x, y, "x", "y")
    return _dist_bwd(grad, x, y, c, needs_grad_c)


def dist0(x, c):
    _check_vec(x, "x")
    return _dist_fwd(x, None, c)


def dist0_backward(grad, x, c, needs_grad_c):
    _check_vec(x, "x")
    gx, _, gc = _dist_bwd(grad, x, None, c, needs_grad_c)
    return gx, gc


# ---- pairwise_dist: (N, D) x (M, D) -> (N, M) from |x|^2, |y|^2 and the GEMM x y^T ---------------


def _pair_prep(x, y, c):
    _check_pair(x, y, "x", "y")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise RuntimeError(
            f"x and y must be (N, D) and (M, D) (got x: {tuple(x.shape)}, y: {tuple(y.shape)})"
        )
    _check_c(c, x)
    cdt, acc, _ = _compute_types(x.dtype)
    xa, ya = x.to(acc), y.to(acc)
    return cdt, xa, ya


def _launch_pair(n, m, blocks, like, *args, **kwargs):
    bn = max(1, min(blocks[0], triton.next_power_of_2(n)))
    bm = max(1, min(blocks[1], triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    with _device_of(like):
        _pair_kernel[grid](*args, N=n, M=m, n_blocks_m=grid[1], BLOCK_N=bn, BLOCK_M=bm,
                           num_warps=4, **kwargs)
    return grid


def pairwise_dist(x, y, c):
    cdt, xa, ya = _pair_prep(x, y, c)
    n, m = x.shape[0], y.shape[0]
    out = _empty((n, m), x)
    if out.numel() == 0:
        return out
    x2, y2, xy = xa.square().sum(-1), ya.square().sum(-1), torch.matmul(xa, ya.t())
    _launch_pair(n, m, _PAIR_FWD, x, x2, y2, xy, xy, out, out, out, out, **_c_args(c, out),
                 BWD=False, CDT=cdt, NEEDS_GC=False)
    return out


def pairwise_dist_backward(grad, x, y, c, needs_grad_c):
    cdt, xa, ya = _pair_prep(x, y, c)
    n, m = x.shape[0], y.shape[0]
    _check_grad(grad, x, (n, m))
    if n == 0 or m == 0 or x.shape[1] == 0:
        return torch.zeros_like(x), torch.zeros_like(y), _grad_c(None, c)
    x2, y2, xy = xa.square().sum(-1), ya.square().sum(-1), torch.matmul(xa, ya.t())
    bn = max(1, min(_PAIR_BWD[0], triton.next_power_of_2(n)))
    bm = max(1, min(_PAIR_BWD[1], triton.next_power_of_2(m)))
    gxy = torch.empty_like(xy)  # dL/d<x_i, y_j>
    px = _empty((n, triton.cdiv(m, bm)), xy)  # partial dL/d|x_i|^2 (and dL/dc) per column block
    py = _empty((triton.cdiv(n, bn), m), xy)  # partial dL/d|y_j|^2 per row block
    pc = torch.empty_like(px) if needs_grad_c else None
    _launch_pair(n, m, (bn, bm), x, x2, y2, xy, grad.contiguous(), gxy, px, py,
                 px if pc is None else pc, **_c_args(c, gxy), BWD=True, CDT=cdt,
                 NEEDS_GC=pc is not None)
    gx = torch.matmul(gxy, ya).add_(xa * (2.0 * px.sum(1)).unsqueeze(1))
    gy = torch.matmul(gxy.t(), xa).add_(ya * (2.0 * py.sum(0)).unsqueeze(1))
    return gx.to(x.dtype), gy.to(y.dtype), _grad_c(pc, c)
