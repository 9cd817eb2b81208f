"""Triton kernels of the Gumbel family: launchers of lfi_fast::<op>_triton (schemas in
csrc/bindings.cpp), returning what csrc/cpu/gumbel.cpp returns.

The noise is tl.randint4x(seed, offset + row * C + c) for the row's counter c (C = ceil(K / 4)):
element (row, 4c + l) takes lane l, the stream of lfi_fast/reference/random.py, so that the same
(seed, offset) gives the same sample as the C++ and CUDA kernels. A program owns BLOCK_R rows and
walks their counters in tiles of BLOCK_C; each tile is handled as four lane tiles (elements 4c + l),
so every counter's four numbers are used without reshuffling. Rows that fit one tile are sampled in
one pass from registers; longer rows take three (max, sum, write), regenerating the noise. Half
types compute in float32, float64 in float64 (the noise is float32, then widened).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Elements per program: enough in flight on a GPU; the interpreter pays per program and per op,
# so it gets larger tiles.
_TILE = 1 << 14 if _INTERPRETED else 4096
_MAX_BLOCK_C = 1024 if _INTERPRETED else 512  # counters per tile (4 elements each)
_BIG = tl.constexpr(2**31 - 1)


@triton.jit
def _lane_tile(lp, np, rows_i, r_ok, c, lane: tl.constexpr, K, cpr, seed, offset, ACC: tl.constexpr,
               HAS_NOISE: tl.constexpr):
    """z = logits + noise of elements 4c + lane of rows rows_i ([R, 1] x [1, C]); -inf outside."""
    i = 4 * c + lane
    ok = r_ok & (i < K)
    ptr = rows_i * K + i
    lv = tl.load(lp + ptr, mask=ok, other=0.0).to(ACC)
    if HAS_NOISE:
        g = tl.load(np + ptr, mask=ok, other=0.0).to(ACC)
    else:
        ctr = offset + rows_i * cpr + c  # int64: the counter's high word is used
        r0, r1, r2, r3 = tl.randint4x(seed, ctr)
        if lane == 0:
            bits = r0
        elif lane == 1:
            bits = r1
        elif lane == 2:
            bits = r2
        else:
            bits = r3
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        g = (-tl.log(-tl.log(u))).to(ACC)
    return tl.where(ok, lv + g, float("-inf")), i, ok


@triton.jit
def _fwd_kernel(lp, np, op, mp, tp, rows, K, cpr, seed, offset, inv_tau, ACC: tl.constexpr,
                HARD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_TILES: tl.constexpr, SINGLE: tl.constexpr):
    pid = tl.program_id(0)
    rows_i = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    r_ok = rows_i < rows
    cc = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
    if HAS_MASK:
        forced = tl.load(mp + rows_i, mask=r_ok, other=0) != 0
        target = tl.load(tp + rows_i, mask=r_ok, other=0)
    # pass 1: max and first argmax of z over the row
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    am = tl.full((BLOCK_R,), _BIG, tl.int64)
    for t in range(N_TILES):
        c = t * BLOCK_C + cc
        z0, i0, _ = _lane_tile(lp, np, rows_i, r_ok, c, 0, K, cpr, seed, offset, ACC, HAS_NOISE)
        z1, i1, _ = _lane_tile(lp, np, rows_i, r_ok, c, 1, K, cpr, seed, offset, ACC, HAS_NOISE)
        z2, i2, _ = _lane_tile(lp, np, rows_i, r_ok, c, 2, K, cpr, seed, offset, ACC, HAS_NOISE)
        z3, i3, _ = _lane_tile(lp, np, rows_i, r_ok, c, 3, K, cpr, seed, offset, ACC, HAS_NOISE)
        tm = tl.maximum(tl.maximum(tl.max(z0, axis=1), tl.max(z1, axis=1)),
                        tl.maximum(tl.max(z2, axis=1), tl.max(z3, axis=1)))
        ti0 = tl.min(tl.where((z0 == tm[:, None]) & (i0 < K), i0, _BIG), axis=1)
        ti1 = tl.min(tl.where((z1 == tm[:, None]) & (i1 < K), i1, _BIG), axis=1)
        ti2 = tl.min(tl.where((z2 == tm[:, None]) & (i2 < K), i2, _BIG), axis=1)
        ti3 = tl.min(tl.where((z3 == tm[:, None]) & (i3 < K), i3, _BIG), axis=1)
        ti = tl.minimum(tl.minimum(ti0, ti1), tl.minimum(ti2, ti3))
        am = tl.where(tm > m, ti, am)  # a later tile wins only with a larger value
        m = tl.maximum(m, tm)
    if HARD:
        for t in range(N_TILES):
            c = t * BLOCK_C + cc
            for lane in tl.static_range(4):
                i = 4 * c + lane
                ok = r_ok & (i < K)
                hot = i == am[:, None]
                if HAS_MASK:
                    hot = tl.where(forced, i == target, hot)
                tl.store(op + rows_i * K + i, hot.to(tl.float32).to(op.dtype.element_ty), mask=ok)
    else:
        if SINGLE:  # the row in registers: recompute nothing
            z0, i0, ok0 = _lane_tile(lp, np, rows_i, r_ok, cc, 0, K, cpr, seed, offset, ACC, HAS_NOISE)
            z1, i1, ok1 = _lane_tile(lp, np, rows_i, r_ok, cc, 1, K, cpr, seed, offset, ACC, HAS_NOISE)
            z2, i2, ok2 = _lane_tile(lp, np, rows_i, r_ok, cc, 2, K, cpr, seed, offset, ACC, HAS_NOISE)
            z3, i3, ok3 = _lane_tile(lp, np, rows_i, r_ok, cc, 3, K, cpr, seed, offset, ACC, HAS_NOISE)
            e0 = tl.where(ok0, tl.exp((z0 - m[:, None]) * inv_tau), 0.0)
            e1 = tl.where(ok1, tl.exp((z1 - m[:, None]) * inv_tau), 0.0)
            e2 = tl.where(ok2, tl.exp((z2 - m[:, None]) * inv_tau), 0.0)
            e3 = tl.where(ok3, tl.exp((z3 - m[:, None]) * inv_tau), 0.0)
            s = tl.sum(e0, axis=1) + tl.sum(e1, axis=1) + tl.sum(e2, axis=1) + tl.sum(e3, axis=1)
            inv = (1.0 / s)[:, None]
            y0, y1, y2, y3 = e0 * inv, e1 * inv, e2 * inv, e3 * inv
            if HAS_MASK:
                y0 = tl.where(forced, (i0 == target).to(ACC), y0)
                y1 = tl.where(forced, (i1 == target).to(ACC), y1)
                y2 = tl.where(forced, (i2 == target).to(ACC), y2)
                y3 = tl.where(forced, (i3 == target).to(ACC), y3)
            out_ty = op.dtype.element_ty
            tl.store(op + rows_i * K + i0, y0.to(out_ty), mask=ok0)
            tl.store(op + rows_i * K + i1, y1.to(out_ty), mask=ok1)
            tl.store(op + rows_i * K + i2, y2.to(out_ty), mask=ok2)
            tl.store(op + rows_i * K + i3, y3.to(out_ty), mask=ok3)
        else:
            s = tl.zeros((BLOCK_R,), ACC)
            for t in range(N_TILES):
                c = t * BLOCK_C + cc
                for lane in tl.static_range(4):
                    z, i, ok = _lane_tile(lp, np, rows_i, r_ok, c, lane, K, cpr, seed, offset, ACC, HAS_NOISE)
                    s += tl.sum(tl.where(ok, tl.exp((z - m[:, None]) * inv_tau), 0.0), axis=1)
            inv = (1.0 / s)[:, None]
            for t in range(N_TILES):
                c = t * BLOCK_C + cc
                for lane in tl.static_range(4):
                    z, i, ok = _lane_tile(lp, np, rows_i, r_ok, c, lane, K, cpr, seed, offset, ACC, HAS_NOISE)
                    y = tl.exp((z - m[:, None]) * inv_tau) * inv
                    if HAS_MASK:
                        y = tl.where(forced, (i == target).to(ACC), y)
                    tl.store(op + rows_i * K + i, y.to(op.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(gp, lp, yp, np, op, mp, rows, K, cpr, seed, offset, inv_tau, ACC: tl.constexpr,
                HARD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_TILES: tl.constexpr):
    pid = tl.program_id(0)
    rows_i = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    r_ok = rows_i < rows
    cc = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
    if HARD:  # straight-through: the soft sample recomputed from the logits and the noise
        m = tl.full((BLOCK_R,), float("-inf"), ACC)
        for t in range(N_TILES):
            for lane in tl.static_range(4):
                z, i, ok = _lane_tile(lp, np, rows_i, r_ok, t * BLOCK_C + cc, lane, K, cpr, seed, offset, ACC, HAS_NOISE)
                m = tl.maximum(m, tl.max(z, axis=1))
        se = tl.zeros((BLOCK_R,), ACC)
        sg = tl.zeros((BLOCK_R,), ACC)
        for t in range(N_TILES):
            for lane in tl.static_range(4):
                z, i, ok = _lane_tile(lp, np, rows_i, r_ok, t * BLOCK_C + cc, lane, K, cpr, seed, offset, ACC, HAS_NOISE)
                e = tl.where(ok, tl.exp((z - m[:, None]) * inv_tau), 0.0)
                g = tl.load(gp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
                se += tl.sum(e, axis=1)
                sg += tl.sum(e * g, axis=1)
        inv = 1.0 / se
        s = (sg * inv)[:, None]
        for t in range(N_TILES):
            for lane in tl.static_range(4):
                z, i, ok = _lane_tile(lp, np, rows_i, r_ok, t * BLOCK_C + cc, lane, K, cpr, seed, offset, ACC, HAS_NOISE)
                y = tl.exp((z - m[:, None]) * inv_tau) * inv[:, None]
                g = tl.load(gp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
                gi = y * (g - s) * inv_tau
                if HAS_MASK:
                    gi = tl.where(tl.load(mp + rows_i, mask=r_ok, other=0) != 0, 0.0, gi)
                tl.store(op + rows_i * K + i, gi.to(op.dtype.element_ty), mask=ok)
    else:  # from the saved sample y: y * (g - <g, y>) / tau
        kk = tl.arange(0, 4 * BLOCK_C).to(tl.int64)[None, :]
        s = tl.zeros((BLOCK_R,), ACC)
        for t in range(N_TILES):
            i = t * (4 * BLOCK_C) + kk
            ok = r_ok & (i < K)
            y = tl.load(yp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
            g = tl.load(gp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
            s += tl.sum(y * g, axis=1)
        for t in range(N_TILES):
            i = t * (4 * BLOCK_C) + kk
            ok = r_ok & (i < K)
            y = tl.load(yp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
            g = tl.load(gp + rows_i * K + i, mask=ok, other=0.0).to(ACC)
            gi = y * (g - s[:, None]) * inv_tau
            if HAS_MASK:
                gi = tl.where(tl.load(mp + rows_i, mask=r_ok, other=0) != 0, 0.0, gi)
            tl.store(op + rows_i * K + i, gi.to(op.dtype.element_ty), mask=ok)


@triton.jit
def _changed_code(cp, idx, V, K1):
    """Variable u of change j of code b, for idx = (b * V * K1 + j) * V + u."""
    u = idx % V
    t = idx // V
    j = t % (V * K1)
    b = t // (V * K1)
    var = j // K1
    r = j % K1
    code = tl.load(cp + b * V + u)
    return tl.where(u == var, r + (r >= code).to(tl.int64), code)


@triton.jit
def _interventions_kernel(cp, op, total, V, K1, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    idx = tl.where(ok, idx, 0)
    tl.store(op + idx, _changed_code(cp, idx, V, K1), mask=ok)


@triton.jit
def _one_hot_kernel(cp, op, total, V, K, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    idx = tl.where(ok, idx, 0)
    cat = idx % K
    code = _changed_code(cp, idx // K, V, K - 1)
    tl.store(op + idx, (code == cat).to(tl.float32).to(op.dtype.element_ty), mask=ok)


# ---- launchers -----------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(logits, mask, targets, noise, tau, seed, offset):
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise RuntimeError(f"logits must be a floating (rows, K) tensor (got {logits.dtype}, {tuple(logits.shape)})")
    if not (tau > 0 and tau < float("inf")):
        raise ValueError(f"tau must be positive and finite (got {tau})")
    if seed < 0 or offset < 0:
        raise ValueError(f"seed and offset must be >= 0 (got {seed}, {offset})")
    if (mask is None) != (targets is None):
        raise RuntimeError("mask and targets go together")
    rows = logits.shape[0]
    if mask is not None:
        if mask.dtype != torch.bool or targets.dtype != torch.int64:
            raise RuntimeError(f"mask must be bool and targets int64 (got {mask.dtype}, {targets.dtype})")
        if tuple(mask.shape) != (rows,) or tuple(targets.shape) != (rows,):
            raise RuntimeError(f"mask and targets must be (rows,) = ({rows},)")
        if mask.device != logits.device or targets.device != logits.device:
            raise RuntimeError(f"mask and targets must be on {logits.device}")
    if noise is not None:
        if noise.shape != logits.shape or noise.device != logits.device or not noise.dtype.is_floating_point:
            raise RuntimeError("noise must be a floating tensor of the logits' shape and device")
        noise = noise.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).contiguous()
    return noise


def _blocks(rows: int, k: int):
    cpr = (k + 3) // 4
    block_c = min(triton.next_power_of_2(max(cpr, 1)), _MAX_BLOCK_C)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE // (4 * block_c)))
    return cpr, block_r, block_c


def gumbel_softmax(logits, mask, targets, noise, tau, hard, seed, offset):
    noise = _check(logits, mask, targets, noise, tau, seed, offset)
    lg = logits.contiguous()
    out = torch.empty_like(lg)
    rows, k = lg.shape
    if lg.numel() == 0:
        return out
    cpr, block_r, block_c = _blocks(rows, k)
    has_mask = mask is not None
    _fwd_kernel[(triton.cdiv(rows, block_r),)](
        lg, noise if noise is not None else lg, out,
        mask.contiguous().view(torch.uint8) if has_mask else lg, targets.contiguous() if has_mask else lg,
        rows, k, cpr, int(seed), int(offset), 1.0 / float(tau), ACC=_acc(lg.dtype), HARD=bool(hard),
        HAS_NOISE=noise is not None, HAS_MASK=has_mask, BLOCK_R=block_r, BLOCK_C=block_c,
        N_TILES=triton.cdiv(cpr, block_c), SINGLE=cpr <= block_c,
    )
    return out


def gumbel_softmax_backward(grad, logits, out, mask, noise, tau, hard, seed, offset):
    targets = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device) if mask is not None else None
    noise = _check(logits, mask, targets, noise, tau, seed, offset)
    if grad.shape != logits.shape or out.shape != logits.shape:
        raise RuntimeError(f"grad and out must have the logits' shape {tuple(logits.shape)}")
    lg, g, y = logits.contiguous(), grad.contiguous().to(logits.dtype), out.contiguous()
    gi = torch.empty_like(lg)
    rows, k = lg.shape
    if lg.numel() == 0:
        return gi
    cpr, block_r, block_c = _blocks(rows, k)
    has_mask = mask is not None
    _bwd_kernel[(triton.cdiv(rows, block_r),)](
        g, lg, y, noise if noise is not None else lg, gi,
        mask.contiguous().view(torch.uint8) if has_mask else lg,
        rows, k, cpr, int(seed), int(offset), 1.0 / float(tau), ACC=_acc(lg.dtype), HARD=bool(hard),
        HAS_NOISE=noise is not None, HAS_MASK=has_mask, BLOCK_R=block_r, BLOCK_C=block_c,
        N_TILES=triton.cdiv(cpr, block_c),
    )
    return gi


def _check_codes(codes, k):
    if codes.dim() != 2 or codes.dtype != torch.int64:
        raise RuntimeError(f"codes must be an int64 (B, V) tensor (got {codes.dtype}, {tuple(codes.shape)})")
    if k < 2:
        raise ValueError(f"num_categories must be >= 2 (got {k})")
    return codes.contiguous()


_EW_BLOCK = 1 << 14 if _INTERPRETED else 1024


def single_interventions(codes, num_categories):
    c = _check_codes(codes, num_categories)
    b, v = c.shape
    out = torch.empty((b, v * (num_categories - 1), v), dtype=torch.int64, device=c.device)
    if out.numel():
        _interventions_kernel[(triton.cdiv(out.numel(), _EW_BLOCK),)](
            c, out, out.numel(), v, num_categories - 1, BLOCK=_EW_BLOCK
        )
    return out


def single_intervention_one_hot(codes, num_categories, dtype):
    c = _check_codes(codes, num_categories)
    b, v = c.shape
    out = torch.empty((b, v * (num_categories - 1), v, num_categories), dtype=dtype, device=c.device)
    if out.numel():
        _one_hot_kernel[(triton.cdiv(out.numel(), _EW_BLOCK),)](
            c, out, out.numel(), v, num_categories, BLOCK=_EW_BLOCK
        )
    return out
