"""Triton kernels of the hyperbolic family: Möbius addition on the Poincaré ball and its backward.

Launchers of the custom ops lfi_fast::mobius_add_triton and lfi_fast::mobius_add_backward_triton
(lfi_fast/ops/hyperbolic.py). The per-row math is csrc/hyperbolic_math.h ported expression for
expression (same clamps, projection and evaluation order), and the (rows, D) views are those of
row_view in csrc/common.h, so this backend agrees with the C++ kernels to rounding.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Elements per tile: enough bytes in flight per program on a GPU without spilling; the backward
# holds three input tiles, hence its smaller tile. The interpreter pays per program and per op
# rather than per element, so it gets far fewer, larger tiles.
_TILE_FWD = 1 << 16 if _INTERPRETED else 8192
_TILE_BWD = 1 << 16 if _INTERPRETED else 4096

MIN_NORM = tl.constexpr(1e-15)  # geoopt's clamp of norms and denominators (kMinNorm)


# ---- per-row math (csrc/hyperbolic_math.h) -------------------------------------------------------


@triton.jit
def _div(a, b):
    # A plain fp32 '/' is approximate on NVIDIA GPUs; div_rn rounds as the C++ kernels do.
    if b.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _sqrt(a):
    # tl.sqrt is approximate in fp32 on NVIDIA GPUs; sqrt_rn is IEEE, like std::sqrt.
    if a.dtype == tl.float32:
        r = tl.sqrt_rn(a)
    else:
        r = tl.sqrt(a)
    return r


@triton.jit
def _clamp_abs(v, eps):
    # geoopt.utils.clamp_abs: keeps the sign, 0 counts as +.
    a = tl.abs(v)
    m = tl.where(a < eps, eps, a)
    return tl.where(v < 0, -m, m)


@triton.jit
def _curvature(c_ptr, c_val, CDT: tl.constexpr, C_ON_DEVICE: tl.constexpr):
    # A c on the device is read here so the host never waits for the GPU; a CPU c came as a scalar
    # (an fp64 argument, so float64 inputs see all of it).
    if C_ON_DEVICE:
        c = tl.load(c_ptr).to(CDT)
    else:
        c = tl.full([], c_val, CDT)
    return c


@triton.jit
def _max_norm(c, EPS: tl.constexpr):
    # (1 - eps) / sqrt(max(c, 1e-15)), with 1 - eps rounded in the compute type as in C++.
    one_minus_eps = 1.0 - tl.full([], EPS, c.dtype)
    return _div(one_minus_eps, _sqrt(tl.where(c < MIN_NORM, MIN_NORM, c)))


@triton.jit
def _mobius_add_fwd(x2, y2, xy, c, maxnorm, PROJECT: tl.constexpr):
    A = 1.0 + 2.0 * c * xy + c * y2
    B = 1.0 - c * x2
    den = 1.0 + 2.0 * c * xy + c * c * x2 * y2
    inv = _div(1.0, _clamp_abs(den, MIN_NORM))
    s = tl.full(x2.shape, 1.0, x2.dtype)
    if PROJECT:
        n2 = (A * A * x2 + 2.0 * A * B * xy + B * B * y2) * inv * inv
        n = _sqrt(tl.where(n2 > 0, n2, 0.0))
        n = tl.where(n < MIN_NORM, MIN_NORM, n)
        s = tl.where(n > maxnorm, _div(maxnorm, n), s)
    return s * A * inv, s * B * inv


@triton.jit
def _mobius_add_bwd(x2, y2, xy, gx, gy, c, maxnorm, PROJECT: tl.constexpr):
    A = 1.0 + 2.0 * c * xy + c * y2
    B = 1.0 - c * x2
    den = 1.0 + 2.0 * c * xy + c * c * x2 * y2
    adn = tl.abs(den)
    inv = _div(1.0, _clamp_abs(den, MIN_NORM))
    rx = (A * x2 + B * xy) * inv  # <r, x>
    ry = (A * xy + B * y2) * inv  # <r, y>
    gr_dot = (A * gx + B * gy) * inv  # <g, r>
    n2 = (A * rx + B * ry) * inv  # |r|^2
    n2 = tl.where(n2 > 0, n2, 0.0)

    # Projection: out = s r with s = m / n when |r| > m; then d out = s dr - k <r, dr> r.
    s = tl.full(x2.shape, 1.0, x2.dtype)
    k = tl.zeros(x2.shape, x2.dtype)
    gc = tl.zeros(x2.shape, x2.dtype)
    if PROJECT:
        n_true = _sqrt(n2)
        n = tl.where(n_true < MIN_NORM, MIN_NORM, n_true)
        over = n > maxnorm
        s = tl.where(over, _div(maxnorm, n), s)
        k = tl.where(over & (n_true >= MIN_NORM), _div(maxnorm * gr_dot, n * n * n), k)
        max_norm_dc = tl.where(c < MIN_NORM, 0.0, _div(-0.5 * maxnorm, c))
        gc = tl.where(over, _div(gr_dot, n) * max_norm_dc, gc)
    # gr = dL/dr = s g - k r ; gn = dL/dnum = gr / dcl ; dL/d den through the clamp.
    gA = (s * gx - k * rx) * inv  # <gn, x>
    gB = (s * gy - k * ry) * inv  # <gn, y>
    grr = s * gr_dot - k * n2  # <gr, r>
    gden = tl.where(adn >= MIN_NORM, -grr * inv, 0.0)

    g_xy = 2.0 * c * (gA + gden)
    g_x2 = -c * gB + c * c * y2 * gden
    g_y2 = c * gA + c * c * x2 * gden
    gc = gc + (gA * (2.0 * xy + y2) - gB * x2 + gden * (2.0 * xy + 2.0 * c * x2 * y2))

    # gn = (s/dcl) g - (k/dcl^2) (A x + B y)
    kk = k * inv * inv
    gx_g = A * s * inv
    gx_x = -A * A * kk + 2.0 * g_x2
    gx_y = -A * B * kk + g_xy
    gy_g = B * s * inv
    gy_x = -A * B * kk + g_xy
    gy_y = -B * B * kk + 2.0 * g_y2
    return gx_g, gx_x, gx_y, gy_g, gy_x, gy_y, gc


# ---- kernels: one BLOCK_M x BLOCK_D tile of rows per program ----------------------------------


@triton.jit
def _mobius_add_fwd_kernel(
    x_ptr, y_ptr, out_ptr, c_ptr, c_val: tl.float64, n_rows, D, stride_x, stride_y,
    CDT: tl.constexpr, EPS: tl.constexpr, PROJECT: tl.constexpr, C_ON_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(CDT)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(CDT)
    c = _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    maxnorm = _max_norm(c, EPS)

    x2 = tl.sum(x * x, axis=1)
    y2 = tl.sum(y * y, axis=1)
    xy = tl.sum(x * y, axis=1)
    alpha, beta = _mobius_add_fwd(x2, y2, xy, c, maxnorm, PROJECT)
    out = alpha[:, None] * x + beta[:, None] * y
    offs = rows[:, None] * D + cols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mobius_add_bwd_kernel(
    g_ptr, x_ptr, y_ptr, gx_ptr, gy_ptr, gc_ptr, c_ptr, c_val: tl.float64, n_rows, D,
    stride_g, stride_x, stride_y,
    CDT: tl.constexpr, EPS: tl.constexpr, PROJECT: tl.constexpr, C_ON_DEVICE: tl.constexpr,
    NEEDS_GC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < D)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(CDT)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(CDT)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(CDT)
    c = _curvature(c_ptr, c_val, CDT, C_ON_DEVICE)
    maxnorm = _max_norm(c, EPS)

    x2 = tl.sum(x * x, axis=1)
    y2 = tl.sum(y * y, axis=1)
    xy = tl.sum(x * y, axis=1)
    gxd = tl.sum(g * x, axis=1)
    gyd = tl.sum(g * y, axis=1)
    gx_g, gx_x, gx_y, gy_g, gy_x, gy_y, gc = _mobius_add_bwd(
        x2, y2, xy, gxd, gyd, c, maxnorm, PROJECT
    )

    offs = rows[:, None] * D + cols[None, :]
    grad_x = gx_g[:, None] * g + gx_x[:, None] * x + gx_y[:, None] * y
    grad_y = gy_g[:, None] * g + gy_x[:, None] * x + gy_y[:, None] * y
    tl.store(gx_ptr + offs, grad_x.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gy_ptr + offs, grad_y.to(gy_ptr.dtype.element_ty), mask=mask)
    if NEEDS_GC:
        tl.store(gc_ptr + rows, gc, mask=row_mask)


# ---- launchers -----------------------------------------------------------------------------------


def _check(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> None:
    # The checks of csrc/cpu/hyperbolic.cpp, so a direct torch.ops call errors instead of crashing.
    if not x.is_floating_point():
        raise RuntimeError(f"x must be a floating tensor (got {x.dtype})")
    if y.dtype != x.dtype:
        raise RuntimeError(f"x and y must have the same dtype (got {x.dtype} and {y.dtype})")
    if y.device != x.device:
        raise RuntimeError(f"y must be on {x.device} (got {y.device})")
    if c.dim() != 0 or not c.is_floating_point():
        raise RuntimeError(
            f"c must be a 0-dim floating tensor (got {c.dtype}, shape {tuple(c.shape)})"
        )
    if c.device.type != "cpu" and c.device != x.device:
        raise RuntimeError(f"c must be on the CPU or on {x.device} (got {c.device})")


def _broadcast_shape(x: torch.Tensor, y: torch.Tensor) -> torch.Size:
    shape = torch.broadcast_shapes(x.shape, y.shape)
    if len(shape) == 0:
        raise RuntimeError("x and y must have at least 1 dim (the coordinates)")
    return shape


def _row_view(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """row_view of csrc/common.h: t broadcast to shape as (rows, D) with a unit inner stride and
    one row stride (0 for a broadcast row), copying only when that cannot be expressed."""
    d = shape[-1]
    v = t.expand(shape).reshape(-1, d)
    if d > 1 and v.stride(1) != 1:
        v = v.contiguous()
    return v, (v.stride(0) if v.size(0) > 1 else d)


def _curvature_args(c: torch.Tensor, placeholder: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(c_ptr, c_val, C_ON_DEVICE). A CPU c is read here; the placeholder pointer (never loaded)
    is a device tensor because the GPU launcher rejects host pointers."""
    if c.device.type == "cpu":
        return placeholder, float(c), False
    return c, 0.0, True


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the inputs' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_config(n_rows: int, d: int, tile: int) -> dict:
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    num_warps = max(4, min(16, block_m * block_d // 1024))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps}


def _compute_types(dtype: torch.dtype):
    """(compute type, torch type of the per-row c gradients, projection eps) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, torch.float64, 1e-5
    return tl.float32, torch.float32, 4e-3


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, project: bool) -> torch.Tensor:
    """x ⊕_c y over the last dim; x and y broadcast; output contiguous in the broadcast shape."""
    _check(x, y, c)
    shape = _broadcast_shape(x, y)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    d = shape[-1]
    n_rows = out.numel() // d
    (xv, sx), (yv, sy) = _row_view(x, shape), _row_view(y, shape)
    c_ptr, c_val, c_on_device = _curvature_args(c, out)
    cdt, _, eps = _compute_types(x.dtype)
    cfg = _launch_config(n_rows, d, _TILE_FWD)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]),)
    with _device_of(x):
        _mobius_add_fwd_kernel[grid](
            xv, yv, out, c_ptr, c_val, n_rows, d, sx, sy,
            CDT=cdt, EPS=eps, PROJECT=bool(project), C_ON_DEVICE=c_on_device, **cfg,
        )
    return out


def mobius_add_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, project: bool,
    needs_grad_c: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x ⊕_c y: grad_x, grad_y in the broadcast shape, grad_c 0-dim like c."""
    _check(x, y, c)
    if grad.dtype != x.dtype or grad.device != x.device:
        raise RuntimeError(
            f"grad must be {x.dtype} on {x.device} (got {grad.dtype} on {grad.device})"
        )
    shape = _broadcast_shape(x, y)
    if grad.shape != shape:
        raise RuntimeError(
            f"grad must have the broadcast shape {tuple(shape)} (got {tuple(grad.shape)})"
        )
    gx = torch.empty(shape, dtype=x.dtype, device=x.device)
    gy = torch.empty(shape, dtype=x.dtype, device=x.device)
    if gx.numel() == 0:
        return gx, gy, torch.zeros((), dtype=c.dtype, device=c.device)
    d = shape[-1]
    n_rows = gx.numel() // d
    (gv, sg), (xv, sx), (yv, sy) = _row_view(grad, shape), _row_view(x, shape), _row_view(y, shape)
    c_ptr, c_val, c_on_device = _curvature_args(c, gx)
    cdt, gc_dtype, eps = _compute_types(x.dtype)
    # Per-row contributions summed by torch afterwards: deterministic, unlike atomics. Without
    # NEEDS_GC the kernel writes none, and gx stands in for the pointer.
    gc_rows = torch.empty(n_rows, dtype=gc_dtype, device=x.device) if needs_grad_c else gx
    cfg = _launch_config(n_rows, d, _TILE_BWD)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]),)
    with _device_of(x):
        _mobius_add_bwd_kernel[grid](
            gv, xv, yv, gx, gy, gc_rows, c_ptr, c_val, n_rows, d, sg, sx, sy,
            CDT=cdt, EPS=eps, PROJECT=bool(project), C_ON_DEVICE=c_on_device,
            NEEDS_GC=bool(needs_grad_c), **cfg,
        )
    if needs_grad_c:
        # Summed in double as the C++ kernels do, then rounded once to c's dtype.
        gc = gc_rows.sum(dtype=torch.float64).to(device=c.device, dtype=c.dtype)
    else:
        gc = torch.zeros((), dtype=c.dtype, device=c.device)
    return gx, gy, gc
