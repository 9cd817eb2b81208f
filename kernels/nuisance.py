"""Triton kernels of the nuisance family: launchers of lfi_fast::nuisance_sample_triton,
nuisance_sample_linear_triton and their backwards (the schemas of csrc/bindings.cpp, taken
positionally; results as csrc/cpu/nuisance.cpp returns them).

The noise is drawn inside the kernels with tl.randint4x on the stream convention of csrc/philox.h:
eps[r, j] is normal number r * Dn4 + j of (seed, offset), Dn4 = Dn rounded up to a multiple of 4,
by Box-Muller from the lane pair (2k, 2k + 1) of its counter (lfi_fast/reference/nuisance.py).

sample_linear is a fused GEMM: a program owns BLOCK_R rows (samples) x BLOCK_H outputs, draws its
rows' noise into registers (never stored), forms z_n (posterior: mu_n + sd * eps), multiplies it
by its W_n^T tile (tl.dot over the padded nuisance dims, IEEE fp32; a broadcast sum in float64)
and adds the shared part hs = mu_s · W_s^T + b (one torch GEMM over the B inputs), applying the
activation before the store. The backward runs the same kernel on the regenerated noise to write
grad * act'(pre) (pre never stored) and leaves the rest to GEMMs and sums. Half types compute in
float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Rows x outputs per program; the interpreter pays per program, so it gets wider tiles.
_BLOCK_R = 64
_BLOCK_H = 128 if _INTERPRETED else 64
_ACTS = {"none": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "silu": 4}
_TWO_PI = 6.283185307179586


def _act_code(activation: str) -> int:
    if activation not in _ACTS:
        raise RuntimeError(f"activation must be one of relu, leaky_relu, gelu, silu, none (got '{activation}')")
    return _ACTS[activation]


@triton.jit
def _normals(seed, offset, rows, cols, DN4: tl.constexpr):
    """eps[r, j] for the (R,) rows and (J,) columns given: the stream's normal r * DN4 + j (float32)."""
    ctr = offset + rows[:, None].to(tl.int64) * (DN4 // 4) + (cols[None, :] // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    lane = cols[None, :] % 4
    b1 = tl.where(lane < 2, r0, r2)  # the pair (2k, 2k + 1) of the counter: (x, y) or (z, w)
    b2 = tl.where(lane < 2, r1, r3)
    u1 = ((b1 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    u2 = ((b2 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    rad = tl.sqrt(-2.0 * tl.log(u1))
    t = 6.283185307179586 * u2
    return tl.where(lane % 2 == 0, rad * tl.cos(t), rad * tl.sin(t))


@triton.jit
def _latent_n(seed, offset, eps_ptr, mu_ptr, sd_ptr, rows, cols, n_rows, n, d, ds, dn,
              DN4: tl.constexpr, HAS_EPS: tl.constexpr, POSTERIOR: tl.constexpr, CDT: tl.constexpr):
    """z_n (R, J) in the compute dtype, 0 outside the rows and the Dn columns."""
    m = (rows[:, None] < n_rows) & (cols[None, :] < dn)
    if HAS_EPS:
        e = tl.load(eps_ptr + rows[:, None].to(tl.int64) * dn + cols[None, :], mask=m, other=0.0).to(CDT)
    else:
        e = _normals(seed, offset, rows, cols, DN4).to(CDT)
    if POSTERIOR:
        b = rows // n
        mu_n = tl.load(mu_ptr + b[:, None].to(tl.int64) * d + ds + cols[None, :], mask=m, other=0.0)
        sd = tl.load(sd_ptr + b[:, None].to(tl.int64) * dn + cols[None, :], mask=m, other=0.0)
        e = mu_n + sd * e
    return tl.where(m, e, 0.0)


@triton.jit
def _activate(x, slope, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.where(x > 0, x, 0.0)
    elif ACT == 2:
        y = tl.where(x > 0, x, (x * slope).to(x.dtype))  # slope in float64, as the C++ kernels
    elif ACT == 3:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 4:
        y = x / (1.0 + tl.exp(-x))
    else:
        y = x
    return y


@triton.jit
def _activate_grad(x, slope, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(x > 0, 1.0, (x * 0.0 + slope).to(x.dtype))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        g = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-x))
        g = s * (1.0 + x * (1.0 - s))
    else:
        g = x * 0.0 + 1.0
    return g


@triton.jit
def _linear_kernel(out_ptr, grad_ptr, gpre_ptr, hs_ptr, wnT_ptr, eps_ptr, mu_ptr, sd_ptr,
                   seed, offset, n_rows, n, d, ds, dn, h, slope: tl.float64,
                   DN4: tl.constexpr, DNP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                   ACT: tl.constexpr, HAS_EPS: tl.constexpr, POSTERIOR: tl.constexpr, BWD: tl.constexpr,
                   CDT: tl.constexpr, USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, DNP)
    z = _latent_n(seed, offset, eps_ptr, mu_ptr, sd_ptr, rows, j, n_rows, n, d, ds, dn,
                  DN4, HAS_EPS, POSTERIOR, CDT)
    wm = (j[:, None] < dn) & (cols_h[None, :] < h)
    w = tl.load(wnT_ptr + j[:, None] * h + cols_h[None, :], mask=wm, other=0.0)
    if USE_DOT:
        acc = tl.dot(z, w, input_precision="ieee")
    else:
        acc = tl.sum(z[:, :, None] * w[None, :, :], axis=1)
    om = (rows[:, None] < n_rows) & (cols_h[None, :] < h)
    b = rows // n
    acc += tl.load(hs_ptr + b[:, None].to(tl.int64) * h + cols_h[None, :], mask=om, other=0.0)
    idx = rows[:, None].to(tl.int64) * h + cols_h[None, :]
    if BWD:
        g = tl.load(grad_ptr + idx, mask=om, other=0.0)
        tl.store(gpre_ptr + idx, g * _activate_grad(acc, slope, ACT), mask=om)
    else:
        y = _activate(acc, slope, ACT)
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _sample_kernel(out_ptr, eps_ptr, mu_ptr, sd_ptr, seed, offset, n_rows, n, d, ds, dn, out_d, out_ds,
                   DN4: tl.constexpr, DNP: tl.constexpr, DSP: tl.constexpr, BLOCK_R: tl.constexpr,
                   HAS_EPS: tl.constexpr, POSTERIOR: tl.constexpr, CDT: tl.constexpr):
    """out[r] = [mu_s[b], z_n[r]] (out_ds = ds), or eps alone (out_ds = 0, no posterior)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, DNP)
    z = _latent_n(seed, offset, eps_ptr, mu_ptr, sd_ptr, rows, j, n_rows, n, d, ds, dn,
                  DN4, HAS_EPS, POSTERIOR, CDT)
    rm = rows[:, None] < n_rows
    base = rows[:, None].to(tl.int64) * out_d
    tl.store(out_ptr + base + out_ds + j[None, :], z.to(out_ptr.dtype.element_ty), mask=rm & (j[None, :] < dn))
    if DSP > 0:  # the supervised part, mu_s of the row's input
        b = rows // n
        c = tl.arange(0, DSP)
        cm = rm & (c[None, :] < out_ds)
        v = tl.load(mu_ptr + b[:, None].to(tl.int64) * d + c[None, :], mask=cm, other=0.0)
        tl.store(out_ptr + base + c[None, :], v.to(out_ptr.dtype.element_ty), mask=cm)


# ---- host side -------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(mu, logvar, ds, n, seed, offset, noise):
    if mu.dim() != 2:
        raise RuntimeError(f"mu must be (B, D) (got shape {tuple(mu.shape)})")
    if logvar.shape != mu.shape or logvar.dtype != mu.dtype or logvar.device != mu.device:
        raise RuntimeError("logvar must have mu's shape, dtype and device")
    if not 0 < ds < mu.shape[1]:
        raise RuntimeError(f"supervised_dims must be in (0, D = {mu.shape[1]}) (got {ds})")
    if n < 1:
        raise RuntimeError(f"n_samples must be >= 1 (got {n})")
    if seed < 0 or offset < 0:
        raise RuntimeError(f"seed and offset must be >= 0 (got {seed}, {offset})")
    if noise is not None and tuple(noise.shape) != (mu.shape[0] * n, mu.shape[1] - ds):
        raise RuntimeError(f"noise must be (B * n_samples, D - supervised_dims) (got {tuple(noise.shape)})")


def _check_layer(mu, weight, bias):
    if weight.dim() != 2 or weight.shape[1] != mu.shape[1] or weight.dtype != mu.dtype:
        raise RuntimeError(f"weight must be (H, D = {mu.shape[1]}) of mu's dtype (got {tuple(weight.shape)})")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != mu.dtype):
        raise RuntimeError(f"bias must be (H = {weight.shape[0]},) of mu's dtype (got {tuple(bias.shape)})")


class _Prepared:
    def __init__(self, mu, logvar, ds, posterior, noise):
        acc = _compute_dtype(mu.dtype)
        self.acc = acc
        self.mu = mu.to(acc).contiguous()
        self.sd = (0.5 * logvar[:, ds:].to(acc)).exp().contiguous() if posterior else self.mu
        self.noise = noise.to(acc).contiguous() if noise is not None else None


def _dims(d, ds):
    dn = d - ds
    dn4 = (dn + 3) // 4 * 4
    return dn, dn4, max(16, triton.next_power_of_2(dn4))


def _sample_launch(out, p, eps, ds, n, posterior, seed, offset, out_d, out_ds):
    rows, d = p.mu.shape[0] * n, p.mu.shape[1]
    if rows == 0:
        return out
    dn, dn4, dnp = _dims(d, ds)
    dsp = triton.next_power_of_2(out_ds) if out_ds > 0 else 0
    block_r = max(1, min(_BLOCK_R, 4096 // max(dnp, dsp)))
    _sample_kernel[(triton.cdiv(rows, block_r),)](
        out, eps if eps is not None else p.mu, p.mu, p.sd, seed, offset, rows, n, d, ds, dn, out_d, out_ds,
        DN4=dn4, DNP=dnp, DSP=dsp, BLOCK_R=block_r, HAS_EPS=eps is not None, POSTERIOR=posterior,
        CDT=_tl_dtype(p.acc),
    )
    return out


def _eps(p, ds, n, seed, offset):
    """The noise the forward drew (rows, Dn) in the compute dtype."""
    if p.noise is not None:
        return p.noise
    rows, d = p.mu.shape[0] * n, p.mu.shape[1]
    eps = torch.empty(rows, d - ds, dtype=p.acc, device=p.mu.device)
    return _sample_launch(eps, p, None, ds, n, False, seed, offset, d - ds, 0)


def _per_input(t, b, n):
    return t.reshape(b, n, t.shape[1]).sum(1)


def nuisance_sample(mu, logvar, supervised_dims, n_samples, posterior, seed, offset, noise):
    _check(mu, logvar, supervised_dims, n_samples, seed, offset, noise)
    b, d = mu.shape
    out = torch.empty(b * n_samples, d, dtype=mu.dtype, device=mu.device)
    p = _Prepared(mu, logvar, supervised_dims, posterior, noise)
    return _sample_launch(out, p, p.noise, supervised_dims, n_samples, posterior, seed, offset, d, supervised_dims)


def nuisance_sample_backward(grad, mu, logvar, supervised_dims, n_samples, posterior, seed, offset, noise):
    _check(mu, logvar, supervised_dims, n_samples, seed, offset, noise)
    b, d = mu.shape
    ds, n = supervised_dims, n_samples
    p = _Prepared(mu, logvar, ds, posterior, noise)
    g = grad.to(p.acc)
    g_mu = torch.zeros(b, d, dtype=p.acc, device=mu.device)
    g_lv = torch.zeros_like(g_mu)
    if b > 0:
        g_mu[:, :ds] = _per_input(g[:, :ds], b, n)
        if posterior:
            eps = _eps(p, ds, n, seed, offset)
            g_mu[:, ds:] = _per_input(g[:, ds:], b, n)
            g_lv[:, ds:] = _per_input(g[:, ds:] * eps, b, n) * p.sd * 0.5
    return g_mu.to(mu.dtype), g_lv.to(mu.dtype)


def _shared(p, weight, bias, ds):
    w = weight.to(p.acc)
    mu_s = p.mu[:, :ds]
    hs = torch.addmm(bias.to(p.acc), mu_s, w[:, :ds].t()) if bias is not None else mu_s @ w[:, :ds].t()
    return hs.contiguous(), w[:, ds:].t().contiguous(), w


def _linear_launch(p, eps, ds, n, hs, wnT, act, slope, posterior, seed, offset, out=None, grad=None, gpre=None):
    rows, d = p.mu.shape[0] * n, p.mu.shape[1]
    h = hs.shape[1]
    if rows == 0 or h == 0:
        return
    dn, dn4, dnp = _dims(d, ds)
    use_dot = p.acc == torch.float32
    block_r = _BLOCK_R if use_dot else max(1, min(_BLOCK_R, 8192 // (dnp * _BLOCK_H)))
    block_r = max(16, triton.next_power_of_2(block_r)) if use_dot else triton.next_power_of_2(block_r)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(h, _BLOCK_H))
    bwd = grad is not None
    dummy = hs
    _linear_kernel[grid](
        out if out is not None else dummy, grad if bwd else dummy, gpre if bwd else dummy, hs, wnT,
        eps if eps is not None else dummy, p.mu, p.sd, seed, offset, rows, n, d, ds, dn, h, float(slope),
        DN4=dn4, DNP=dnp, BLOCK_R=block_r, BLOCK_H=_BLOCK_H, ACT=act, HAS_EPS=eps is not None,
        POSTERIOR=posterior, BWD=bwd, CDT=_tl_dtype(p.acc), USE_DOT=use_dot,
    )


def nuisance_sample_linear(mu, logvar, supervised_dims, n_samples, weight, bias, activation, negative_slope,
                           posterior, seed, offset, noise):
    _check(mu, logvar, supervised_dims, n_samples, seed, offset, noise)
    _check_layer(mu, weight, bias)
    act = _act_code(activation)
    b = mu.shape[0]
    out = torch.empty(b * n_samples, weight.shape[0], dtype=mu.dtype, device=mu.device)
    p = _Prepared(mu, logvar, supervised_dims, posterior, noise)
    hs, wnT, _ = _shared(p, weight, bias, supervised_dims)
    _linear_launch(p, p.noise, supervised_dims, n_samples, hs, wnT, act, negative_slope, posterior, seed,
                   offset, out=out)
    return out


def nuisance_sample_linear_backward(grad, mu, logvar, supervised_dims, n_samples, weight, bias, activation,
                                    negative_slope, posterior, seed, offset, noise):
    _check(mu, logvar, supervised_dims, n_samples, seed, offset, noise)
    _check_layer(mu, weight, bias)
    act = _act_code(activation)
    b, d = mu.shape
    ds, n, dn = supervised_dims, n_samples, d - supervised_dims
    p = _Prepared(mu, logvar, ds, posterior, noise)
    eps = _eps(p, ds, n, seed, offset)
    zn = (eps.reshape(b, n, dn) * p.sd[:, None] + p.mu[:, None, ds:]).reshape(b * n, dn) if posterior else eps
    hs, wnT, w = _shared(p, weight, bias, ds)
    g = grad.to(p.acc).contiguous()
    if act == 0:
        gpre = g
    else:
        gpre = torch.empty_like(g)
        _linear_launch(p, eps, ds, n, hs, wnT, act, negative_slope, posterior, seed, offset, grad=g, gpre=gpre)
    gb = _per_input(gpre, b, n)
    g_w = torch.cat((gb.t() @ p.mu[:, :ds], gpre.t() @ zn), dim=1)
    g_b = gb.sum(0)
    g_mu = torch.zeros(b, d, dtype=p.acc, device=mu.device)
    g_lv = torch.zeros_like(g_mu)
    g_mu[:, :ds] = gb @ w[:, :ds]
    if posterior and b > 0:
        gz = gpre @ w[:, ds:]
        g_mu[:, ds:] = _per_input(gz, b, n)
        g_lv[:, ds:] = _per_input(gz * eps, b, n) * p.sd * 0.5
    dt = mu.dtype
    return g_mu.to(dt), g_lv.to(dt), g_w.to(dt), g_b.to(dt)
