"""VQ family: nearest-codebook search (k = 1) and the straight-through quantiser.

nearest-bfloat16 / nearest-tf32 (GPU only): the tensor-core search against the bfloat16 mm-argmin.
nearest (forward): lfi_fast's backends against
  - `torch-eager:cdist-argmin`  torch.cdist(x, c).argmin(1): the N x K matrix, then its argmin;
  - `torch-eager:mm-argmin`     (|c|^2 - 2 x c^T).argmin(1), in bfloat16 on a GPU (float32 on the CPU);
  - `faiss`                     faiss-cpu IndexFlatL2.search(x, 1) (CPU only);
  - `vector-quantize-pytorch`   its VectorQuantize layer's forward (search + quantise + loss).
quantize (full: forward + backward): lfi_fast's vq.quantize against vector-quantize-pytorch's layer.

Sizes: N = 65,536, K in {512, 4096}, D = 64 on the CPU; N = 2^20, K = 4096, D = 64 on a GPU;
--quick: N = 2,048, K = 256, D = 16. Anchors that are not installed skip.
"""
from __future__ import annotations

import pytest
import torch

from conftest import lfi_backends, nbytes

PROVIDERS = ("torch-eager:cdist-argmin", "torch-eager:mm-argmin", "faiss", "vector-quantize-pytorch",
             "lfi_fast:cpp", "lfi_fast:cuda", "lfi_fast:triton", "lfi_fast:torch")


def _sizes(device, quick):
    if quick:
        return [(2048, 256, 16)]
    if device.type == "cuda":
        return [(1 << 20, 4096, 64)]
    return [(65536, 512, 64), (65536, 4096, 64)]


def _inputs(n, kk, d, device):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen).to(device), torch.randn(kk, d, generator=gen).to(device)


def _vqp_layer(kk, d, cb, device):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    layer = vqp.VectorQuantize(dim=d, codebook_size=kk, decay=0.99, commitment_weight=0.25).to(device)
    with torch.no_grad():
        layer._codebook.embed.copy_(cb[None])
        layer._codebook.initted.fill_(True)
    return layer


def _nearest_fn(provider, x, cb, device):
    if provider == "torch-eager:cdist-argmin":
        return lambda: torch.cdist(x, cb).argmin(1)
    if provider == "torch-eager:mm-argmin":
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        xl, cl = x.to(dt), cb.to(dt)
        c2 = cl.float().pow(2).sum(1).to(dt)
        return lambda: (c2 - 2 * (xl @ cl.t())).argmin(1)
    if provider == "faiss":
        faiss = pytest.importorskip("faiss")
        if device.type != "cpu":
            pytest.skip("faiss-cpu runs on the CPU")
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(cb.numpy())
        xn = x.numpy()
        return lambda: index.search(xn, 1)
    if provider == "vector-quantize-pytorch":
        layer = _vqp_layer(cb.shape[0], cb.shape[1], cb, device).eval()

        def run():
            with torch.no_grad():
                return layer(x[None])

        return run
    backend = provider.split(":")[1]
    if backend not in lfi_backends(device):
        pytest.skip(f"{provider} is not available on {device}")
    import lfi_fast
    from lfi_fast import vq

    def run():
        with lfi_fast.use_backend(backend):
            return vq.nearest(x, cb)

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", [0, 1])
def test_nearest(measure, provider, size, device, quick):
    sizes = _sizes(device, quick)
    if size >= len(sizes):
        pytest.skip("one size here")
    n, kk, d = sizes[size]
    x, cb = _inputs(n, kk, d, device)
    if provider == "lfi_fast:torch" and not quick and device.type == "cpu" and kk > 512:
        pytest.skip("the reference backend is not timed at this size")
    fn = _nearest_fn(provider, x, cb, device)
    fn()
    measure(fn, op="nearest", provider=provider, anchor="torch-eager:cdist-argmin", mode="forward",
            shape=(n, kk, d), dtype=x.dtype, bytes_read=nbytes(x, cb), bytes_written=n * 8 + n * 4)


@pytest.mark.parametrize("precision", ("bfloat16", "tf32"))
@pytest.mark.parametrize("provider", ("torch-eager:mm-argmin", "lfi_fast:cuda", "lfi_fast:triton"))
def test_nearest_tensor_cores(measure, provider, precision, device, quick):
    """GPU only: the tensor-core search (bfloat16 inputs; float32 with TF32 allowed) against the
    bfloat16 (|c|^2 - 2 x c^T).argmin(1) of the issue, at N = 2^20, K = 4096, D = 64."""
    if device.type != "cuda":
        pytest.skip("tensor cores: GPU only")
    n, kk, d = _sizes(device, quick)[0]
    x, cb = _inputs(n, kk, d, device)
    if provider == "torch-eager:mm-argmin":
        if precision != "bfloat16":
            pytest.skip("the anchor runs in bfloat16")
        fn = _nearest_fn(provider, x, cb, device)
        dt = torch.bfloat16
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")
        import lfi_fast
        from lfi_fast import vq

        dt = torch.bfloat16 if precision == "bfloat16" else torch.float32
        xl, cl = x.to(dt), cb.to(dt)

        def fn():
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            try:
                with lfi_fast.use_backend(backend):
                    return vq.nearest(xl, cl)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev

    fn()
    measure(fn, op=f"nearest-{precision}", provider=provider, anchor="torch-eager:mm-argmin",
            mode="forward", shape=(n, kk, d), dtype=dt,
            bytes_read=(n + kk) * d * torch.empty((), dtype=dt).element_size(),
            bytes_written=n * 8 + n * 4)


@pytest.mark.parametrize("provider", ("vector-quantize-pytorch", "lfi_fast:cpp", "lfi_fast:cuda",
                                      "lfi_fast:triton", "lfi_fast:torch"))
def test_quantize(measure, provider, device, quick):
    n, kk, d = _sizes(device, quick)[0]
    x, cb = _inputs(n, kk, d, device)
    if provider == "vector-quantize-pytorch":
        layer = _vqp_layer(kk, d, cb, device).train()

        def step(xl):
            q, _, loss = layer(xl[None])
            (q.sum() + loss.sum()).backward()
    else:
        backend = provider.split(":")[1]
        if backend not in lfi_backends(device):
            pytest.skip(f"{provider} is not available on {device}")
        import lfi_fast
        from lfi_fast import vq

        cbl = cb.clone().requires_grad_()

        def step(xl):
            with lfi_fast.use_backend(backend):
                q, _, loss = vq.quantize(xl, cbl, 0.25)
            (q.sum() + loss).backward()

    xl = x.clone().requires_grad_()
    step(xl)
    measure(lambda: step(xl), op="quantize", provider=provider, anchor="vector-quantize-pytorch",
            mode="full", shape=(n, kk, d), dtype=x.dtype, bytes_read=2 * nbytes(x, cb),
            bytes_written=2 * nbytes(x) + nbytes(cb))
