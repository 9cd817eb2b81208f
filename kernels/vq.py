"""Triton kernels of the vq family: nearest-codebook search, quantize (forward, backward), EMA update.

Launchers of the custom ops lfi_fast::<op>_triton: each public function takes the arguments of the
op's schema (csrc/bindings.cpp) positionally and returns what csrc/cpu/vq.cpp returns.

nearest: a program owns BLOCK_M rows and walks the codebook in tiles of BLOCK_N codes; each tile's
scores come from tl.dot over the coordinates (IEEE fp32, or fp64) plus the per-code bias (and
|x|^2 scale for Poincaré) as in reference/vq.py, and the row's running minimum (k = 1: tl.min and
tl.argmin, ties to the lower index) or running top-k (k rounds of min-extraction from the union of
the running list and the tile) is updated from it. No N x K buffer exists. The distances of the
chosen codes are then computed directly (float64) and the k re-sorted by them.

The codebook gradient and the EMA sums reduce the rows of each code in sorted order (one program
per code): deterministic. Half types compute in float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lfi_fast.reference import vq as _ref

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (BLOCK_M rows, BLOCK_N codes, BLOCK_D coordinates). The interpreter pays per program and per op,
# so it gets fewer, larger tiles.
_NEAREST_TILE = (64, 64, 32) if _INTERPRETED else (64, 64, 32)
_NEAREST_TILE_F64 = (32, 32, 16)
_MAX_K = 16  # the fused top-k; larger k takes the chunked path
_ROWS_TILE = 1 << 14 if _INTERPRETED else 2048  # elements per program of the row kernels


@triton.jit
def _nearest_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, idx_ptr, n, kk, d,
                    HAS_SCALE: tl.constexpr, NORMALIZE: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    dt = w_ptr.dtype.element_ty
    # |x|^2 (Poincaré's scale term) and the cosine normalisation, one pass over the row tile.
    # Runtime-bounded loops are while loops: the interpreter cannot range() over a scalar argument.
    xn = tl.zeros((BLOCK_M,), dtype=dt)
    d0 = 0
    while d0 < d:
        cols = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_ptr + rows[:, None].to(tl.int64) * d + cols[None, :],
                     mask=rmask[:, None] & (cols[None, :] < d), other=0.0).to(dt)
        xn += tl.sum(xv * xv, axis=1)
        d0 += BLOCK_D
    if NORMALIZE:
        xinv = 1.0 / tl.maximum(tl.sqrt(xn), 1e-12)
    else:
        xinv = tl.full((BLOCK_M,), 1.0, dtype=dt)
    inf = float("inf")
    kcols = tl.arange(0, KP)
    best = tl.full((BLOCK_M,), inf, dtype=dt)
    besti = tl.zeros((BLOCK_M,), dtype=tl.int64)
    topv = tl.full((BLOCK_M, KP), inf, dtype=dt)
    topi = tl.zeros((BLOCK_M, KP), dtype=tl.int64)
    j0 = 0
    while j0 < kk:
        codes = j0 + tl.arange(0, BLOCK_N)
        cmask = codes < kk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dt)
        d0 = 0
        while d0 < d:
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < d
            xv = tl.load(x_ptr + rows[:, None].to(tl.int64) * d + cols[None, :],
                         mask=rmask[:, None] & dmask[None, :], other=0.0).to(dt)
            xv = xv * xinv[:, None]
            wv = tl.load(w_ptr + codes[None, :].to(tl.int64) * d + cols[:, None],
                         mask=cmask[None, :] & dmask[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(xv, wv, input_precision="ieee")
            else:
                acc += tl.dot(xv, wv)
            d0 += BLOCK_D
        s = acc + tl.load(bias_ptr + codes, mask=cmask, other=0.0)[None, :]
        if HAS_SCALE:
            s += xn[:, None] * tl.load(scale_ptr + codes, mask=cmask, other=0.0)[None, :]
        s = tl.where(cmask[None, :], s, inf)
        if K == 1:
            tmin = tl.min(s, axis=1)
            targ = tl.argmin(s, axis=1).to(tl.int64)
            better = tmin < best
            best = tl.where(better, tmin, best)
            besti = tl.where(better, targ + j0, besti)
        else:
            # The k best of (running list, tile), by k rounds of extraction. On equal scores the
            # running list wins (its codes come from earlier tiles: lower indices).
            newv = tl.full((BLOCK_M, KP), inf, dtype=dt)
            newi = tl.zeros((BLOCK_M, KP), dtype=tl.int64)
            ncols = tl.arange(0, BLOCK_N)
            for t in tl.static_range(K):
                ms = tl.min(s, axis=1)
                as_ = tl.argmin(s, axis=1)
                mr = tl.min(topv, axis=1)
                ar = tl.argmin(topv, axis=1)
                take_r = mr <= ms
                ri = tl.sum(tl.where(kcols[None, :] == ar[:, None], topi, 0), axis=1)
                v = tl.where(take_r, mr, ms)
                vi = tl.where(take_r, ri, as_.to(tl.int64) + j0)
                topv = tl.where(take_r[:, None] & (kcols[None, :] == ar[:, None]), inf, topv)
                s = tl.where((~take_r)[:, None] & (ncols[None, :] == as_[:, None]), inf, s)
                newv = tl.where(kcols[None, :] == t, v[:, None], newv)
                newi = tl.where(kcols[None, :] == t, vi[:, None], newi)
            topv = newv
            topi = newi
        j0 += BLOCK_N
    if K == 1:
        tl.store(idx_ptr + rows.to(tl.int64), besti, mask=rmask)
    else:
        tl.store(idx_ptr + rows[:, None].to(tl.int64) * K + kcols[None, :], topi,
                 mask=rmask[:, None] & (kcols[None, :] < K))


def _code_side(cb: torch.Tensor, metric: str, c: torch.Tensor, dt: torch.dtype):
    """w (K, D), bias (K,), scale (K,) or None: the codebook side of the score (reference/vq.py)."""
    cbt = cb.to(dt)
    n2 = cbt.pow(2).sum(-1)
    if metric == "l2":
        return (-2 * cbt).contiguous(), n2.contiguous(), None
    if metric == "cosine":
        return (-(cbt / n2.sqrt().clamp_min(_ref.NORM_EPS)[:, None])).contiguous(), torch.zeros_like(n2), None
    s = (1 - c.to(device=cb.device, dtype=dt) * n2).clamp_min(_ref.MIN_DEN).reciprocal()
    return (-2 * cbt * s[:, None]).contiguous(), (n2 * s).contiguous(), s.contiguous()


def _check_search(x, codebook, metric, c, k):
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise RuntimeError(f"x must be (N, D) with D == codebook.shape[1] (got x: {tuple(x.shape)}, "
                           f"codebook: {tuple(codebook.shape)})")
    if x.dtype != codebook.dtype or not x.dtype.is_floating_point:
        raise RuntimeError("x and codebook must be floating tensors of the same dtype")
    if metric not in _ref.METRICS:
        raise RuntimeError(f"metric must be one of l2, cosine, poincare (got '{metric}')")
    if codebook.shape[0] < 1:
        raise RuntimeError("codebook must hold at least one code (got K = 0)")
    if not 1 <= k <= codebook.shape[0]:
        raise RuntimeError(f"k must be in [1, K] with K = {codebook.shape[0]} (got k = {k})")
    if c.dim() != 0:
        raise RuntimeError("c must be a 0-dim tensor")


def _exact(x, codebook, idx, metric, c):
    """Distances of the chosen codes by the direct formula (float64), re-sorted (stable)."""
    d = _ref.distance(x.double()[:, None, :], codebook.double()[idx], metric, c.double())
    d, perm = torch.sort(d, dim=1, stable=True)
    return idx.gather(1, perm), d.to(x.dtype)


def vq_nearest(x, codebook, metric, c, k):
    _check_search(x, codebook, metric, c, k)
    n, d = x.shape
    idx = torch.empty((n, k), dtype=torch.int64, device=x.device)
    if n == 0:
        return idx, torch.empty((n, k), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w, bias, scale = _code_side(codebook, metric, c, dt)
    if k > _MAX_K:  # the chunked path: scores for a bounded number of rows, then topk
        rows = max(1, (1 << 22) // codebook.shape[0])
        for s0 in range(0, n, rows):
            xs = x[s0 : s0 + rows].to(dt)
            xn = xs.pow(2).sum(-1, keepdim=True)
            if metric == "cosine":
                xs = xs / xn.sqrt().clamp_min(_ref.NORM_EPS)
            sc = torch.addmm(bias[None, :], xs, w.t())
            if scale is not None:
                sc = sc + xn * scale[None, :]
            idx[s0 : s0 + rows] = torch.sort(sc, dim=1, stable=True).indices[:, :k]
        return _exact(x, codebook, idx, metric, c)
    bm, bn, bd = _NEAREST_TILE_F64 if dt == torch.float64 else _NEAREST_TILE
    bd = max(16, min(bd, triton.next_power_of_2(max(d, 1))))
    kp = max(2, triton.next_power_of_2(k))
    xk = x if x.dtype in (torch.float32, torch.float64) else x.float()
    _nearest_kernel[(triton.cdiv(n, bm),)](
        xk, w, bias, scale if scale is not None else bias, idx, n, codebook.shape[0], d,
        HAS_SCALE=scale is not None, NORMALIZE=metric == "cosine", K=k, KP=kp,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=dt == torch.float32,
    )
    return _exact(x, codebook, idx, metric, c)


# ---- quantize ----------------------------------------------------------------------------------


@triton.jit
def _gather_kernel(x_ptr, cb_ptr, idx_ptr, q_ptr, partial_ptr, total, d, kk,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    i = e // d
    j = e % d
    code = tl.load(idx_ptr + i, mask=m, other=0)
    code = tl.minimum(tl.maximum(code, 0), kk - 1)
    v = tl.load(cb_ptr + code * d + j, mask=m, other=0.0)
    tl.store(q_ptr + e, v, mask=m)
    xv = tl.load(x_ptr + e, mask=m, other=0.0).to(tl.float64)
    diff = xv - v.to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0))


@triton.jit
def _grad_x_kernel(gq_ptr, x_ptr, cb_ptr, idx_ptr, gx_ptr, gl_ptr, f, total, d, kk,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    fx = tl.load(gl_ptr) * f  # grad_loss read on the device: no host sync
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    i = e // d
    j = e % d
    code = tl.load(idx_ptr + i, mask=m, other=0)
    code = tl.minimum(tl.maximum(code, 0), kk - 1)
    v = tl.load(cb_ptr + code * d + j, mask=m, other=0.0).to(tl.float64)
    xv = tl.load(x_ptr + e, mask=m, other=0.0).to(tl.float64)
    g = tl.load(gq_ptr + e, mask=m, other=0.0).to(tl.float64)
    out = g + fx * (xv - v)
    tl.store(gx_ptr + e, out.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _segment_sum_kernel(x_ptr, perm_ptr, start_ptr, acc_ptr, d, BLOCK_D: tl.constexpr):
    """acc[q] = sum of rows perm[start[q] .. start[q + 1]) of x, in that order (float64)."""
    q = tl.program_id(0)
    dblk = tl.program_id(1)
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < d
    s = tl.load(start_ptr + q)
    t = tl.load(start_ptr + q + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    r = s
    while r < t:
        row = tl.load(perm_ptr + r)
        acc += tl.load(x_ptr + row * d + cols, mask=cm, other=0.0).to(tl.float64)
        r += 1
    tl.store(acc_ptr + q.to(tl.int64) * d + cols, acc, mask=cm)


def _sum_rows_per_code(x, idx, kk):
    """(per-code sums (K, D) float64, counts (K,) float64), deterministic."""
    n, d = x.shape
    acc = torch.zeros((kk, d), dtype=torch.float64, device=x.device)
    idx = idx.clamp(0, kk - 1)
    counts = torch.bincount(idx, minlength=kk)
    if n == 0 or d == 0:
        return acc, counts.double()
    perm = torch.sort(idx, stable=True).indices
    start = torch.zeros(kk + 1, dtype=torch.int64, device=x.device)
    start[1:] = counts.cumsum(0)
    bd = min(triton.next_power_of_2(d), 256)
    _segment_sum_kernel[(kk, triton.cdiv(d, bd))](x, perm, start, acc, d, BLOCK_D=bd)
    return acc, counts.double()


def _check_indices(indices, n, kk, x):
    if indices.dtype != torch.int64 or indices.shape != (n,) or indices.device != x.device:
        raise RuntimeError(f"indices must be int64 (N,) with N = {n} on x's device")


def vq_quantize(x, codebook, indices, beta):
    _check_search(x, codebook, "l2", torch.tensor(1.0), 1)
    n, d = x.shape
    _check_indices(indices, n, codebook.shape[0], x)
    q = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = n * d
    if total == 0:
        return q, torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    grid = triton.cdiv(total, _ROWS_TILE)
    partial = torch.empty(grid, dtype=torch.float64, device=x.device)
    _gather_kernel[(grid,)](x.contiguous(), codebook.contiguous(), indices.contiguous(), q, partial,
                            total, d, codebook.shape[0], BLOCK=_ROWS_TILE)
    return q, (partial.sum() * ((1 + beta) / total)).to(x.dtype)


def vq_quantize_backward(grad_q, grad_loss, x, codebook, indices, beta):
    _check_search(x, codebook, "l2", torch.tensor(1.0), 1)
    n, d = x.shape
    kk = codebook.shape[0]
    _check_indices(indices, n, kk, x)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n * d == 0:
        return gx, torch.zeros_like(codebook, memory_format=torch.contiguous_format)
    inv_m = 1.0 / (n * d)
    gl = grad_loss.reshape(()).to(device=x.device, dtype=torch.float64)
    grid = triton.cdiv(n * d, _ROWS_TILE)
    xc = x.contiguous()
    _grad_x_kernel[(grid,)](grad_q.to(x.dtype).contiguous(), xc, codebook.contiguous(),
                            indices.contiguous(), gx, gl, 2 * beta * inv_m, n * d, d, kk,
                            BLOCK=_ROWS_TILE)
    acc, cnt = _sum_rows_per_code(xc, indices.contiguous(), kk)
    gc = (cnt[:, None] * codebook.double() - acc) * (gl * (2 * inv_m))
    return gx, gc.to(x.dtype)


def vq_ema_update(x, indices, counts, sums, decay, eps):
    n, d = x.shape
    kk = counts.shape[0]
    if sums.shape != (kk, d) or counts.dtype != sums.dtype:
        raise RuntimeError("counts must be (K,) and sums (K, D), of one dtype")
    _check_indices(indices, n, kk, x)
    acc, cnt = _sum_rows_per_code(x.contiguous(), indices.contiguous(), kk)
    nc = counts.double() * decay + cnt * (1 - decay)
    ns = sums.double() * decay + acc * (1 - decay)
    total = nc.sum()
    smoothed = (nc + eps) / (total + kk * eps) * total
    cb = ns / smoothed.clamp_min(_ref.MIN_DEN)[:, None]
    return nc.to(sums.dtype), ns.to(sums.dtype), cb.to(sums.dtype)
