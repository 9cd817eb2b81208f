"""Op layer of the vq family: backend choice, fake kernels, autograd.

Ops (schemas in csrc/bindings.cpp; x is (N, D), codebook (K, D), both validated by lfi_fast.vq):

    vq_nearest(x, codebook, metric, c, k) -> (indices int64 (N, k), distances (N, k))
        no gradient (the public API recomputes differentiable distances for the chosen codes)
    vq_quantize(x, codebook, indices, beta) -> (q (N, D), loss 0-dim)
        q = codebook[indices] with x's gradient (straight-through);
        loss = beta mean|x - sg(q)|^2 + mean|sg(x) - q|^2
    vq_quantize_backward(grad_q, grad_loss, x, codebook, indices, beta) -> (grad_x, grad_codebook)
        grad_codebook is a scatter-add over the indices, never an N x K one-hot
    vq_ema_update(x, indices, counts, sums, decay, eps) -> (counts, sums, codebook)

The Triton ops lfi_fast::<op>_triton take the same schemas. Where a backend has no kernel for an op
yet, that op runs on the reference (the `torch` backend).
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import vq as ref
from ._common import HAS_C, HAS_TRITON, triton_kernels

_lib = torch.ops.lfi_fast
OPS = ("vq_nearest", "vq_quantize", "vq_quantize_backward", "vq_ema_update")
HAS_VQ_C = HAS_C and all(hasattr(_lib, op) for op in OPS)


def _triton_has(op: str) -> bool:
    try:
        return hasattr(triton_kernels("vq"), op)
    except ModuleNotFoundError:
        return False


# ---- fake kernels: the kernels' checks and output shapes, for torch.compile and meta tensors ----

def _check_x_cb(x, codebook):
    torch._check(x.dim() == 2 and codebook.dim() == 2, lambda: "x and codebook must be 2-dim")
    torch._check(x.shape[1] == codebook.shape[1],
                 lambda: f"x must be (N, D) with D == codebook.shape[1] (got {tuple(x.shape)}, "
                         f"{tuple(codebook.shape)})")
    torch._check(x.dtype == codebook.dtype, lambda: "x and codebook must have the same dtype")


def nearest_fake(x, codebook, metric, c, k):
    _check_x_cb(x, codebook)
    n = x.shape[0]
    return x.new_empty((n, k), dtype=torch.int64), x.new_empty((n, k))


def quantize_fake(x, codebook, indices, beta):
    _check_x_cb(x, codebook)
    return x.new_empty(x.shape), x.new_empty(())


def quantize_backward_fake(grad_q, grad_loss, x, codebook, indices, beta):
    _check_x_cb(x, codebook)
    return x.new_empty(x.shape), codebook.new_empty(codebook.shape)


def ema_update_fake(x, indices, counts, sums, decay, eps):
    return counts.new_empty(counts.shape), sums.new_empty(sums.shape), sums.new_empty(sums.shape)


def _nearest_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _nearest_backward(ctx, grad_idx, grad_d):
    return None, None, None, None, None


def _quantize_setup(ctx, inputs, output):
    x, codebook, indices, beta = inputs
    ctx.save_for_backward(x, codebook, indices)
    ctx.beta = beta


def _quantize_autograd(backward_op):
    def backward(ctx, grad_q, grad_loss):
        x, codebook, indices = ctx.saved_tensors
        if grad_q is None:
            grad_q = torch.zeros_like(x)
        if grad_loss is None:
            grad_loss = x.new_zeros(())
        gx, gc = backward_op(grad_q, grad_loss, x, codebook, indices, ctx.beta)
        need = ctx.needs_input_grad
        return (gx if need[0] else None), (gc if need[1] else None), None, None

    return backward


def _register_fakes(prefix: str, suffix: str) -> None:
    torch.library.register_fake(f"{prefix}vq_nearest{suffix}")(nearest_fake)
    torch.library.register_fake(f"{prefix}vq_quantize{suffix}")(quantize_fake)
    torch.library.register_fake(f"{prefix}vq_quantize_backward{suffix}")(quantize_backward_fake)
    torch.library.register_fake(f"{prefix}vq_ema_update{suffix}")(ema_update_fake)
    torch.library.register_autograd(f"{prefix}vq_nearest{suffix}", _nearest_backward,
                                    setup_context=_nearest_setup)
    torch.library.register_autograd(
        f"{prefix}vq_quantize{suffix}",
        _quantize_autograd(getattr(_lib, f"vq_quantize_backward{suffix}")),
        setup_context=_quantize_setup)


if HAS_VQ_C:
    _register_fakes("lfi_fast::", "")

HAS_VQ_TRITON = False
if HAS_VQ_C and HAS_TRITON:
    def _schema(op: str) -> str:
        s = str(getattr(_lib, op).default._schema)
        return s[s.index("("):]

    def _launcher(attr):
        return lambda *args: getattr(triton_kernels("vq"), attr)(*args)

    for _op in OPS:
        torch.library.custom_op(f"lfi_fast::{_op}_triton", _launcher(_op), mutates_args=(),
                                schema=_schema(_op))
    _register_fakes("lfi_fast::", "_triton")
    HAS_VQ_TRITON = True


# ---- the torch backend ------------------------------------------------------------------------

def _ref_nearest(x, codebook, metric, c, k):
    with torch.no_grad():
        return ref.nearest(x, codebook, metric, c, k)


def _ref_quantize(x, codebook, indices, beta):
    return ref.quantize(x, codebook, indices, beta)


def _ref_ema_update(x, indices, counts, sums, decay, eps):
    with torch.no_grad():
        return ref.ema_update(x, indices, counts, sums, decay, eps)


_REFERENCE = {
    "vq_nearest": _ref_nearest,
    "vq_quantize": _ref_quantize,
    "vq_ema_update": _ref_ema_update,
}


def backend_for(device: torch.device, op: str) -> str:
    """The backend that runs `op` on `device`: the chosen one, or torch where it has no kernel."""
    backend = _backend.resolve(device)
    if backend in ("cpp", "cuda") and not HAS_VQ_C:
        return "torch"
    if backend == "triton" and not (HAS_VQ_TRITON and _triton_has(op)):
        return "torch"
    return backend


def call(op: str, *args):
    """Run `op` (validated arguments, as in its schema) on the backend chosen for args[0]'s device."""
    backend = backend_for(args[0].device, op)
    if backend in ("cpp", "cuda"):
        return getattr(_lib, op)(*args)
    if backend == "triton":
        return getattr(_lib, f"{op}_triton")(*args)
    return _REFERENCE[op](*args)
