"""Op layer of the Gumbel family: backend choice, fake kernels, autograd.

Schemas (csrc/bindings.cpp); logits are (rows, K), contiguous, categories last:

    gumbel_softmax(logits, mask?, targets?, noise?, tau, hard, seed, offset) -> out (rows, K)
        mask (rows,) bool and targets (rows,) int64 force rows to one-hot (both or neither);
        noise (rows, K) replaces the Philox noise of (seed, offset) when given (tests);
    gumbel_softmax_backward(grad, logits, out, mask?, noise?, tau, hard, seed, offset) -> grad_logits
        soft: the softmax backward over tau from the saved output; hard: straight-through of the
        soft sample, recomputed from the logits and the regenerated noise (nothing else is stored);
        masked rows get no gradient.
    single_interventions(codes, num_categories) -> (B, V*(K-1), V) int64
    single_intervention_one_hot(codes, num_categories, dtype) -> (B, V*(K-1), V, K)

The C++ ops lfi_fast::<op> (CPU and CUDA kernels) and the Triton ops lfi_fast::<op>_triton share
the schemas, one fake kernel and one autograd formula. The `torch` backend is the reference.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import gumbel as ref
from ._common import HAS_C, HAS_TRITON, triton_kernels

_lib = torch.ops.lfi_fast
HAS_OPS = HAS_C and hasattr(_lib, "gumbel_softmax")

OPS = ("gumbel_softmax", "gumbel_softmax_backward", "single_interventions", "single_intervention_one_hot")


# ---- fake kernels: the kernels' checks, then the output's shape -----------------------------------


def _check_sample_args(logits, mask, targets, noise):
    torch._check(logits.dim() == 2, lambda: f"logits must be (rows, K) (got shape {tuple(logits.shape)})")
    torch._check(logits.dtype.is_floating_point, lambda: f"logits must be a floating tensor (got {logits.dtype})")
    torch._check((mask is None) == (targets is None), lambda: "mask and targets go together")
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor (got {mask.dtype})")
        torch._check(targets.dtype == torch.int64, lambda: f"targets must be int64 (got {targets.dtype})")
        torch._check(
            tuple(mask.shape) == tuple(logits.shape[:1]) and tuple(targets.shape) == tuple(logits.shape[:1]),
            lambda: "mask and targets must be (rows,)",
        )
        torch._check(mask.device == logits.device and targets.device == logits.device,
                     lambda: f"mask and targets must be on {logits.device}")
    if noise is not None:
        torch._check(tuple(noise.shape) == tuple(logits.shape), lambda: "noise must have the logits' shape")
        torch._check(noise.dtype.is_floating_point and noise.device == logits.device,
                     lambda: "noise must be a floating tensor on the logits' device")


def _fake(logits, mask, targets, noise, tau, hard, seed, offset):
    _check_sample_args(logits, mask, targets, noise)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward_fake(grad, logits, out, mask, noise, tau, hard, seed, offset):
    _check_sample_args(logits, mask, torch.empty_like(mask, dtype=torch.int64) if mask is not None else None, noise)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _interventions_fake(codes, num_categories):
    torch._check(codes.dim() == 2, lambda: "codes must be (B, V)")
    b, v = codes.shape
    return codes.new_empty((b, v * (num_categories - 1), v), dtype=torch.int64)


def _one_hot_fake(codes, num_categories, dtype):
    torch._check(codes.dim() == 2, lambda: "codes must be (B, V)")
    b, v = codes.shape
    return codes.new_empty((b, v * (num_categories - 1), v, num_categories), dtype=dtype)


def _setup_context(ctx, inputs, output):
    logits, mask, targets, noise, tau, hard, seed, offset = inputs
    ctx.save_for_backward(logits, output, mask, noise)
    ctx.args = (tau, hard, seed, offset)


def _autograd_with(backward_op):
    def backward(ctx, grad):
        logits, out, mask, noise = ctx.saved_tensors
        g = backward_op(grad.contiguous(), logits, out, mask, noise, *ctx.args)
        need = ctx.needs_input_grad
        g_noise = g.to(noise.dtype) if noise is not None and need[3] else None
        return (g if need[0] else None), None, None, g_noise, None, None, None, None

    return backward


if HAS_OPS:
    torch.library.register_fake("lfi_fast::gumbel_softmax")(_fake)
    torch.library.register_fake("lfi_fast::gumbel_softmax_backward")(_backward_fake)
    torch.library.register_fake("lfi_fast::single_interventions")(_interventions_fake)
    torch.library.register_fake("lfi_fast::single_intervention_one_hot")(_one_hot_fake)
    torch.library.register_autograd(
        "lfi_fast::gumbel_softmax", _autograd_with(_lib.gumbel_softmax_backward), setup_context=_setup_context
    )

HAS_TRITON_OPS = HAS_OPS and HAS_TRITON
if HAS_TRITON_OPS:

    def _schema(op: str) -> str:
        s = str(getattr(_lib, op).default._schema)
        return s[s.index("(") :]

    def _launcher(attr):
        return lambda *args: getattr(triton_kernels("gumbel"), attr)(*args)

    _fakes = dict(zip(OPS, (_fake, _backward_fake, _interventions_fake, _one_hot_fake)))
    _triton_ops = {}
    for _op in OPS:
        _triton_ops[_op] = torch.library.custom_op(
            f"lfi_fast::{_op}_triton", _launcher(_op), mutates_args=(), schema=_schema(_op)
        )
        _triton_ops[_op].register_fake(_fakes[_op])
    _triton_ops["gumbel_softmax"].register_autograd(
        _autograd_with(_lib.gumbel_softmax_backward_triton), setup_context=_setup_context
    )


# ---- value checks (the C++ CPU kernels make them in their own pass) -------------------------------


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_values(logits: torch.Tensor, mask, targets, noise) -> None:
    """NaN or +inf logits, rows of all -inf, masked targets out of range: clear errors. One
    reduction over the logits (and a host sync); skipped under torch.compile."""
    if _compiling() or logits.numel() == 0:
        return
    k = logits.shape[-1]
    top = logits.amax(dim=-1)  # NaN if the row has one, +inf if it has one, -inf if all are -inf
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        if bool(torch.isneginf(top[row])):
            raise ValueError(f"logits: every logit of row {row} is -inf (no category can be sampled)")
        raise ValueError(f"logits must not contain NaN or +inf (row {row})")
    if mask is not None:
        out = mask & ((targets < 0) | (targets >= k))
        if bool(out.any()):
            row = int(out.nonzero()[0, 0])
            raise ValueError(
                f"targets must be in [0, {k}) where mask is set (got {int(targets[row])} at row {row})"
            )
    if noise is not None and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite")


def check_codes(codes: torch.Tensor, k: int) -> None:
    if _compiling() or codes.numel() == 0:
        return
    bad = (codes < 0) | (codes >= k)
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"codes must be in [0, {k}) (got {int(codes[idx])} at {idx})")


# ---- entry points --------------------------------------------------------------------------------


def _backend_for(device: torch.device, op: str) -> str:
    backend = _backend.resolve(device)
    if backend in ("cpp", "cuda") and not HAS_OPS:
        return "torch"
    if backend == "triton" and not HAS_TRITON_OPS:
        return "torch"
    return backend


def gumbel_softmax(logits, mask, targets, noise, tau: float, hard: bool, seed: int, offset: int):
    """Sample on the backend chosen for logits' device. logits (rows, K) contiguous."""
    backend = _backend_for(logits.device, "gumbel_softmax")
    if backend != "cpp":
        check_values(logits, mask, targets, noise)
    args = (logits, mask, targets, noise, float(tau), bool(hard), int(seed), int(offset))
    if backend in ("cpp", "cuda"):
        return _lib.gumbel_softmax(*args)
    if backend == "triton":
        return _lib.gumbel_softmax_triton(*args)
    if noise is not None:
        return ref.gumbel_softmax(logits, noise, tau, hard, mask, targets)
    return ref.gumbel_softmax_seeded(logits, mask, targets, tau, hard, seed, offset)


def single_interventions(codes: torch.Tensor, k: int) -> torch.Tensor:
    backend = _backend_for(codes.device, "single_interventions")
    if backend != "cpp":
        check_codes(codes, k)
    if backend in ("cpp", "cuda"):
        return _lib.single_interventions(codes, k)
    if backend == "triton":
        return _lib.single_interventions_triton(codes, k)
    return ref.single_interventions(codes, k)


def single_intervention_one_hot(codes: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    backend = _backend_for(codes.device, "single_intervention_one_hot")
    if backend != "cpp":
        check_codes(codes, k)
    if backend in ("cpp", "cuda"):
        return _lib.single_intervention_one_hot(codes, k, dtype)
    if backend == "triton":
        return _lib.single_intervention_one_hot_triton(codes, k, dtype)
    return ref.single_intervention_one_hot(codes, k, dtype)
