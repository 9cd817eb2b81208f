"""Tests of the vq family: nearest-codebook search (l2, cosine, Poincaré; k >= 1), the
straight-through quantiser, the EMA update and lfi_fast.nn.VectorQuantizer, on every backend.

Ties may differ between backends, so the search is judged by distances, not indices: against a
float64 brute force P (N x K), the j-th returned code must satisfy P[i, idx_ij] <= sorted(P[i])[j]
+ tol, the k indices of a row must be distinct, and the returned distances must match P at the
returned indices.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params, require_backend

import lfi_fast
from lfi_fast import vq
from lfi_fast.ops import vq as vq_ops
from lfi_fast.reference import vq as ref

F64 = torch.float64
METRICS = ("l2", "cosine", "poincare")
# Relative tolerance of the search (on the distance scale below) and of returned distances.
SEARCH_TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}
DIST_TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(n, kk, d, metric, gen, dtype=torch.float32, device="cpu", scale=1.0):
    """Random rows and codebook; for "poincare" inside the ball of radius 1/sqrt(c) (c = 1)."""
    x = torch.randn(n, d, generator=gen, dtype=F64) * scale
    cb = torch.randn(kk, d, generator=gen, dtype=F64) * scale
    if metric == "poincare":
        x = x / (1 + x.norm(dim=-1, keepdim=True)) * 0.9
        cb = cb / (1 + cb.norm(dim=-1, keepdim=True)) * 0.9
    return x.to(dtype).to(device), cb.to(dtype).to(device)


def check_nearest(idx, d, x, cb, metric, k, c=1.0, dtype=None):
    """The search rule of the module docstring, against the float64 brute force."""
    dtype = dtype or x.dtype
    x2, cb2 = x.reshape(-1, x.shape[-1]).double().cpu(), cb.double().cpu()
    idx2 = idx.reshape(-1, k).cpu()
    d2 = d.reshape(-1, k).double().cpu()
    assert idx.dtype == torch.int64
    assert d.dtype == x.dtype
    if x2.shape[0] == 0:
        return
    assert int(idx2.min()) >= 0 and int(idx2.max()) < cb.shape[0]
    rows = max(1, (1 << 22) // (cb2.shape[0] * max(cb2.shape[1], 1)))  # bounded (rows, K, D) blocks
    P = torch.cat([ref.pairwise(x2[s : s + rows], cb2, metric, c) for s in range(0, x2.shape[0], rows)])
    best = P.sort(dim=1).values[:, :k]
    chosen = P.gather(1, idx2)
    if metric == "l2":  # the score |c|^2 - 2<x, c> loses eps (|x|^2 + |c|^2)
        scale = 1 + x2.pow(2).sum(-1, keepdim=True) + cb2.pow(2).sum(-1).max()
    elif metric == "poincare":  # the score's error is amplified by 1/(1 - |x|^2) near the boundary
        scale = (1 + best[:, :1]) / (1 - x2.pow(2).sum(-1, keepdim=True)).clamp_min(1e-3) ** 2 * 4
    else:
        scale = torch.ones(x2.shape[0], 1, dtype=F64)
    tol = SEARCH_TOL[dtype] * scale
    bad = ~(chosen <= best + tol)
    assert not bool(bad.any()), (
        f"{int(bad.any(1).sum())} rows chose a code farther than the {k} best; worst excess "
        f"{float((chosen - best - tol).max()):.3g}")
    if k > 1:
        srt = idx2.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "a row returned the same code twice"
    dtol = DIST_TOL[dtype] * (chosen.abs() + 1) + (tol if dtype in (torch.float32,) else 0)
    assert bool(((d2 - chosen).abs() <= dtol).all()), (
        f"returned distances off: worst {float((d2 - chosen).abs().max()):.3g}")
    if k > 1:
        assert bool((d2[:, 1:] >= d2[:, :-1] - dtol[:, :1]).all()), "distances not sorted"


def _use(backend, op="vq_nearest"):
    require_backend(backend, "vq", op)
    return lfi_fast.use_backend(backend)


# ---- nearest --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_nearest"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 5])
def test_nearest_parity(device, backend, metric, dtype, k, gen):
    n, kk, d = (37, 70, 9) if backend != "triton" else (19, 40, 5)
    x, cb = make(n, kk, d, metric, gen, dtype, device)
    with _use(backend):
        idx, dist = vq.nearest(x, cb, metric, k=k)
    assert idx.shape == ((n,) if k == 1 else (n, k))
    check_nearest(idx, dist, x, cb, metric, k)


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_nearest"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_half(device, backend, metric, dtype, gen):
    x, cb = make(23, 31, 8, metric, gen, dtype, device)
    with _use(backend):
        idx, dist = vq.nearest(x, cb, metric, k=3)
    check_nearest(idx, dist, x, cb, metric, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path needs a GPU")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 4, 13, 29])
def test_nearest_tensor_cores(metric, dtype, k, gen):
    """The CUDA tensor-core search (float16/bfloat16; float32 with TF32 allowed) on inputs full of
    near ties (clustered codes 1e-3 apart, exact duplicates), with D and K not multiples of the
    tiles: the float32 re-check of unsure rows must leave no row with a farther code. Exact
    duplicates go to the lower index."""
    require_backend("cuda", "vq", "vq_nearest")
    n, kk, d = 300, 1000, 70
    centres = torch.randn(20, d, generator=gen, dtype=F64)
    cb = centres[torch.randint(0, 20, (kk,), generator=gen)] + 1e-3 * torch.randn(kk, d, generator=gen, dtype=F64)
    cb[500:510] = cb[:10]
    x = centres[torch.randint(0, 20, (n,), generator=gen)] + 1e-3 * torch.randn(n, d, generator=gen, dtype=F64)
    x[:10] = cb[:10]
    if metric == "poincare":
        x = x / (1 + x.norm(dim=-1, keepdim=True)) * 0.9
        cb = cb / (1 + cb.norm(dim=-1, keepdim=True)) * 0.9
    x, cb = x.to(dtype), cb.to(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with lfi_fast.use_backend("cuda"):
            idx, dist = vq.nearest(x.cuda(), cb.cuda(), metric, k=k)
            idx1, _ = vq.nearest(x[:10].cuda(), cb.cuda(), metric)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    check_nearest(idx, dist, x, cb, metric, k)
    assert idx1.cpu().tolist() == list(range(10))  # x[j] == cb[j] == cb[500 + j]: the lower index


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_nearest"))
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_edges(device, backend, metric, gen):
    """Leading dims, a non-contiguous x, duplicate codes (ties), zeros, huge and tiny scales,
    k == K, K == 1, an empty batch."""
    x, cb = make(24, 12, 6, metric, gen, torch.float64, device)
    with _use(backend):
        xs = x.reshape(4, 6, 6).transpose(0, 1)  # non-contiguous, leading shape (6, 4)
        idx, dist = vq.nearest(xs, cb, metric)
        assert idx.shape == (6, 4)
        check_nearest(idx, dist, xs, cb, metric, 1)
        dup = torch.cat([cb, cb[:5]])  # ties
        check_nearest(*vq.nearest(x, dup, metric, k=4), x, dup, metric, 4)
        z = torch.zeros_like(x)
        z[1:] = x[1:]
        check_nearest(*vq.nearest(z, cb, metric), z, cb, metric, 1)
        check_nearest(*vq.nearest(x, cb, metric, k=12), x, cb, metric, 12)
        check_nearest(*vq.nearest(x, cb[:1], metric), x, cb[:1], metric, 1)
        cbt = cb.t().contiguous().t()  # a non-contiguous codebook
        check_nearest(*vq.nearest(x, cbt, metric, k=2), x, cbt, metric, 2)
        if metric != "poincare":
            for s in (1e-8, 1e6):
                check_nearest(*vq.nearest(x * s, cb * s, metric, k=2), x * s, cb * s, metric, 2)
        e_idx, e_d = vq.nearest(x[:0], cb, metric, k=3)
        assert e_idx.shape == (0, 3) and e_d.shape == (0, 3)


def test_nearest_grad_distances(gen):
    """The distances are differentiable (recomputed for the chosen codes)."""
    for metric in METRICS:
        x, cb = make(6, 5, 3, metric, gen, F64)
        x.requires_grad_()
        cb.requires_grad_()
        torch.autograd.gradcheck(lambda a, b: vq.nearest(a, b, metric, k=2)[1], (x, cb))


def test_nearest_bad_input():
    x, cb = torch.randn(5, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="codebook.shape"):
        vq.nearest(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="codebook must hold"):
        vq.nearest(x, torch.randn(0, 4))
    with pytest.raises(ValueError, match="codebook must be"):
        vq.nearest(x, torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="x must be finite"):
        vq.nearest(torch.full((5, 4), float("nan")), cb)
    with pytest.raises(ValueError, match="codebook must be finite"):
        vq.nearest(x, torch.full((8, 4), float("inf")))
    with pytest.raises(ValueError, match="k must be"):
        vq.nearest(x, cb, k=9)
    with pytest.raises(ValueError, match="k must be"):
        vq.nearest(x, cb, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        vq.nearest(x, cb, k=1.5)
    with pytest.raises(ValueError, match="c must be positive"):
        vq.nearest(x, cb, "poincare", c=0.0)
    with pytest.raises(ValueError, match="c must be positive"):
        vq.nearest(x, cb, "poincare", c=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="metric must be"):
        vq.nearest(x, cb, "manhattan")
    with pytest.raises(TypeError, match="same dtype"):
        vq.nearest(x, cb.double())
    with pytest.raises(TypeError, match="x must be a floating"):
        vq.nearest(x.long(), cb)


# ---- quantize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_quantize"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantize_parity(device, backend, dtype, gen):
    x, cb = make(29, 13, 7, "l2", gen, dtype, device)
    x = x.reshape(29, 7)
    xr, cbr = x.clone().requires_grad_(), cb.clone().requires_grad_()
    x.requires_grad_()
    cb.requires_grad_()
    with _use(backend, "vq_quantize"):
        q, idx, loss = vq.quantize(x, cb, beta=0.3)
    check_nearest(idx, (q.detach() - x.detach()).pow(2).sum(-1), x.detach(), cb.detach(), "l2", 1)
    qr, lr = ref.quantize(xr, cbr, idx, 0.3)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(q, cb.detach()[idx], rtol=tol, atol=tol)
    torch.testing.assert_close(loss, lr, rtol=tol, atol=tol)
    gq = torch.randn(q.shape, generator=gen, dtype=F64).to(dtype).to(device)
    (q * gq).sum().add(loss * 1.7).backward()
    (qr * gq).sum().add(lr * 1.7).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(cb.grad, cbr.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_quantize"))
def test_quantize_backward_formula(device, backend, gen):
    """The stop-gradients make gradcheck inapplicable (the loss's derivative in x is 2(1 + beta)
    (x - q)/M, its gradient 2 beta (x - q)/M), so the backward is checked against its formula in
    float64: grad_x = grad_q + grad_loss 2 beta (x - q)/M, grad_codebook[k] = sum over the rows
    of code k of grad_loss 2 (q - x)/M."""
    x, cb = make(31, 6, 3, "l2", gen, F64, device)
    beta, gl = 0.37, torch.tensor(1.3, dtype=F64, device=device)
    gq = torch.randn(x.shape, generator=gen, dtype=F64).to(device)
    idx = torch.randint(0, 5, (31,), generator=gen).to(device)
    with _use(backend, "vq_quantize"):
        xr, cbr = x.clone().requires_grad_(), cb.clone().requires_grad_()
        q, loss = vq_ops.call("vq_quantize", xr, cbr, idx, beta)
        gx, gc = torch.autograd.grad((q, loss), (xr, cbr), (gq, gl))
    m = x.numel()
    qv = cb[idx]
    exp_gx = gq + gl * 2 * beta * (x - qv) / m
    exp_gc = torch.zeros_like(cb).index_add_(0, idx, gl * 2 * (qv - x) / m)
    torch.testing.assert_close(gx, exp_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, exp_gc, rtol=1e-12, atol=1e-12)
    assert float(gc[5].abs().sum()) == 0  # an unused code gets no gradient


def test_quantize_bad_input():
    x, cb = torch.randn(5, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="beta"):
        vq.quantize(x, cb, beta=-1.0)
    with pytest.raises(ValueError, match="codebook.shape"):
        vq.quantize(x, torch.randn(8, 5))


# ---- EMA update ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_ema_update"))
@pytest.mark.parametrize("acc", [torch.float64, torch.float32])
def test_ema_update_parity(device, backend, acc, gen):
    n, kk, d = 53, 9, 5
    x = torch.randn(n, d, generator=gen, dtype=F64).to(acc).to(device)
    idx = torch.randint(0, kk - 2, (n,), generator=gen).to(device)  # two codes unused
    counts = torch.rand(kk, generator=gen, dtype=F64).to(acc).to(device)
    sums = torch.randn(kk, d, generator=gen, dtype=F64).to(acc).to(device)
    with _use(backend, "vq_ema_update"):
        out = vq.ema_update(x, idx, counts, sums, 0.9, 1e-5)
    exp = ref.ema_update(x.double(), idx, counts.double(), sums.double(), 0.9, 1e-5)
    tol = 1e-12 if acc == F64 else 2e-5
    for o, e in zip(out, exp):
        assert o.dtype == acc
        torch.testing.assert_close(o.double(), e, rtol=tol, atol=tol)
    if torch.device(device).type == "cpu":  # deterministic: a second call is bitwise equal
        with _use(backend, "vq_ema_update"):
            again = vq.ema_update(x, idx, counts, sums, 0.9, 1e-5)
        for o, a in zip(out, again):
            assert torch.equal(o, a)


def test_ema_update_bad_input():
    x, idx = torch.randn(5, 4), torch.zeros(5, dtype=torch.int64)
    counts, sums = torch.ones(3), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="indices must be in"):
        vq.ema_update(x, idx + 3, counts, sums)
    with pytest.raises(ValueError, match="decay"):
        vq.ema_update(x, idx, counts, sums, decay=1.0)
    with pytest.raises(ValueError, match="sums"):
        vq.ema_update(x, idx, counts, torch.zeros(3, 5))
    with pytest.raises(TypeError, match="indices must be an int64"):
        vq.ema_update(x, idx.int(), counts, sums)


# ---- nn.VectorQuantizer --------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [None, 0.9])
@pytest.mark.parametrize("metric", METRICS)
def test_vector_quantizer(ema, metric, gen):
    torch.manual_seed(0)
    layer = lfi_fast.nn.VectorQuantizer(16, 4, beta=0.25, metric=metric, ema_decay=ema,
                                        dead_code_threshold=0.5 if ema else 0.0)
    x = torch.randn(3, 5, 4, generator=gen) * 0.3  # channels last
    x.requires_grad_()
    q, idx, loss = layer(x)
    assert q.shape == x.shape and idx.shape == (3, 5) and loss.dim() == 0
    if ema is None:
        torch.testing.assert_close(q.detach(), layer.codebook.detach()[idx])
    loss.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if ema is None:
        assert layer.codebook.grad is not None
    assert 1 <= int(layer.codes_in_use) <= 15
    assert 1 <= float(layer.perplexity) <= int(layer.codes_in_use) + 1e-6
    assert float(layer.usage.sum()) == 15


def test_vector_quantizer_ema_moves_codes(gen):
    layer = lfi_fast.nn.VectorQuantizer(4, 2, ema_decay=0.5)
    x = torch.randn(64, 2, generator=gen)
    before = layer.codebook.clone()
    layer.train()
    _, idx, _ = layer(x)
    used = idx.unique()
    assert not torch.allclose(layer.codebook[used], before[used])
    layer.eval()
    frozen = layer.codebook.clone()
    layer(x)
    assert torch.equal(layer.codebook, frozen)


# ---- opcheck -------------------------------------------------------------------------------------


def _opcheck_devices():
    return [d for d in DEVICES if ("cuda" if d == "cuda" else "cpp") in backends_for(d)]


@pytest.mark.skipif(not vq_ops.HAS_VQ_C, reason="the compiled vq ops are not built")
@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("device", _opcheck_devices())
def test_opcheck(device, suffix, gen):
    if suffix:
        for op in vq_ops.OPS:
            require_backend("triton", "vq", op)
        if device == "cpu" and "triton" not in backends_for("cpu"):
            pytest.skip("triton does not run on the CPU here")
    ops = torch.ops.lfi_fast
    c = torch.tensor(1.0, dtype=F64)
    for metric in METRICS:
        x, cb = make(9, 7, 4, metric, gen, F64, device)
        for k in (1, 3):
            torch.library.opcheck(getattr(ops, "vq_nearest" + suffix).default,
                                  (x, cb, metric, c, k))
    x, cb = make(9, 7, 4, "l2", gen, F64, device)
    idx = torch.randint(0, 7, (9,), generator=gen).to(device)
    torch.library.opcheck(getattr(ops, "vq_quantize" + suffix).default,
                          (x.clone().requires_grad_(), cb.clone().requires_grad_(), idx, 0.25))
    torch.library.opcheck(getattr(ops, "vq_quantize_backward" + suffix).default,
                          (torch.randn_like(x), torch.tensor(0.5, dtype=F64, device=device), x, cb,
                           idx, 0.25))
    for acc in (F64, torch.float32):
        torch.library.opcheck(getattr(ops, "vq_ema_update" + suffix).default,
                              (x.to(acc), idx, torch.rand(7, dtype=acc, device=device),
                               torch.randn(7, 4, dtype=acc, device=device), 0.9, 1e-5))


# ---- torch.compile -------------------------------------------------------------------------------


def _compile_params():
    # the compiled backends (the torch backend traces the reference: slow, and not what ships)
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)
            if b in ("cpp", "cuda") or (b == "triton" and d == "cuda")]


@pytest.mark.parametrize("device,backend", _compile_params())
def test_compile(device, backend, gen):
    torch._dynamo.reset()
    x, cb = make(20, 9, 4, "l2", gen, torch.float32, device)
    x.requires_grad_()
    cbp = cb.clone().requires_grad_()

    def f(x, cb):
        q, qi, loss = vq.quantize(x, cb, 0.25)
        return q, qi, loss

    with lfi_fast.use_backend(backend):
        eager = f(x, cbp)
        compiled = torch.compile(f, fullgraph=True)(x, cbp)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    with lfi_fast.use_backend(backend):  # nearest with k > 1, no gradient
        g = torch.compile(lambda a, b: vq.nearest(a, b, "cosine", k=2), fullgraph=True)
        for e, c in zip(vq.nearest(x.detach(), cb, "cosine", k=2), g(x.detach(), cb)):
            torch.testing.assert_close(c, e)
    compiled[-1].backward()
    assert cbp.grad is not None and x.grad is not None


# ---- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params("vq", "vq_quantize_backward"))
def test_codebook_grad_deterministic(device, backend, gen):
    """Under torch.use_deterministic_algorithms(True) the codebook gradient and the EMA update are
    bitwise reproducible (sort-based on the GPU, counting sort on the CPU)."""
    n = 600 if backend == "triton" and device == "cpu" else 3000  # the interpreter loops per row
    x, cb = make(n, 7, 5, "l2", gen, torch.float32, device)
    idx = torch.randint(0, 7, (n,), generator=gen).to(device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        with _use(backend, "vq_quantize_backward"):
            for _ in range(2):
                cbr = cb.clone().requires_grad_()
                _, loss = vq_ops.call("vq_quantize", x, cbr, idx, 0.25)
                loss.backward()
                ema = vq.ema_update(x, idx, torch.ones(7, device=device), cb.clone(), 0.9)
                outs.append((cbr.grad, *ema))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---- memory: no N x K matrix ---------------------------------------------------------------------


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif("cpp" not in backends_for("cpu"), reason="the cpp backend is not built")
def test_memory_large_codebook(gen):
    """N = 200,000 rows against K = 32,768 codes of D = 16 on the cpp backend: an N x K float32
    matrix would take 26 GB; the peak extra resident memory of the search must stay tiny."""
    if not _peak_rss_reset():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    n, kk, d = 200_000, 32_768, 16
    x = torch.randn(n, d, generator=gen)
    cb = torch.randn(kk, d, generator=gen)
    torch.ones(1)  # warm the allocator before measuring
    _peak_rss_reset()
    before = _status_kb("VmRSS")
    with lfi_fast.use_backend("cpp"):
        idx, dist = vq.nearest(x, cb)
    extra_mb = (_status_kb("VmHWM") - before) / 1024
    nk_mb = n * kk * 4 / 2**20
    print(f"peak extra memory {extra_mb:.1f} MB; an N x K float32 matrix: {nk_mb:.0f} MB")
    assert extra_mb < 256, f"the search used {extra_mb:.0f} MB extra (N x K would be {nk_mb:.0f} MB)"
    rows = torch.randint(0, n, (256,), generator=gen)  # checked against the float64 brute force
    check_nearest(idx[rows], dist[rows], x[rows], cb, "l2", 1)


# ---- fuzz ----------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from fuzz import LAYOUTS, fuzz_settings, with_layout  # noqa: E402


@settings(**fuzz_settings(40))
@given(
    n=st.integers(0, 40), kk=st.integers(1, 40), d=st.integers(1, 20), k=st.integers(1, 6),
    metric=st.sampled_from(METRICS), dtype=st.sampled_from([torch.float64, torch.float32,
                                                           torch.bfloat16]),
    layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([1e-6, 1.0, 1e3]),
    lead=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_nearest(n, kk, d, k, metric, dtype, layout, scale, lead, seed):
    """Random shapes, dtypes, scales and layouts on every CPU backend but the interpreted Triton
    (too slow here; it has its own parity tests): the search rule holds, or k > K is an error
    naming k."""
    gen = torch.Generator().manual_seed(seed)
    s = scale if metric != "poincare" else 1.0
    x, cb = make(n * math.prod(lead), kk, d, metric, gen, dtype, "cpu", s)
    x = with_layout(x.reshape(*lead, n, d) if lead else x.reshape(-1, d), layout, -1)
    for backend in [b for b in backends_for("cpu") if b != "triton"]:
        with lfi_fast.use_backend(backend):
            if k > kk:
                with pytest.raises(ValueError, match="k must be"):
                    vq.nearest(x, cb, metric, k=k)
                continue
            idx, dist = vq.nearest(x, cb, metric, k=k)
        assert idx.shape == x.shape[:-1] + ((k,) if k > 1 else ())
        check_nearest(idx, dist, x, cb, metric, k)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_vector_quantizer_backward_after_updates(ema):
    """The EMA update and the dead-code restart must not modify the codebook that this step's
    autograd graph holds (an in-place update made backward fail)."""
    torch.manual_seed(0)
    layer = lfi_fast.nn.VectorQuantizer(16, 4, ema_decay=ema, dead_code_threshold=0.5)
    x = torch.randn(64, 4, requires_grad=True)
    before = layer.codebook.detach().clone()
    for _ in range(3):
        q, idx, loss = layer(x)
        (q.square().sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if ema is not None:
        assert not torch.equal(layer.codebook, before)  # the EMA did update it
