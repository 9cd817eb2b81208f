"""Op layer of the nuisance family: backend choice, fake kernels, autograd.

Two ops, each with one schema in csrc/bindings.cpp, shared by the C++ op lfi_fast::<op> (CPU and
CUDA kernels) and the Triton op lfi_fast::<op>_triton (registered here from the same schema):

    nuisance_sample(mu, logvar, supervised_dims, n_samples, posterior, seed, offset, noise?)
        -> z (B * n, D)
    nuisance_sample_linear(mu, logvar, supervised_dims, n_samples, weight, bias?, activation,
                           negative_slope, posterior, seed, offset, noise?) -> h (B * n, H)

The noise comes from the Philox stream (seed, offset) as lfi_fast.reference.nuisance lays it
out, or from `noise` (B * n, Dn) when given (the explicit-noise path of the tests). The backward
ops (<op>_backward(grad, <the forward's arguments>)) regenerate the noise from (seed, offset)
instead of keeping it, and return the gradients of mu, logvar (and weight, bias).
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import nuisance as ref
from ._common import HAS_C, HAS_TRITON, triton_kernels

_lib = torch.ops.lfi_fast
OPS = ("nuisance_sample", "nuisance_sample_linear")
# The compiled ops exist once csrc/ declares them; until then the cpp and cuda backends run the
# reference (the op layer's contract is the same).
HAS_OPS = HAS_C and all(hasattr(_lib, op) for op in OPS)

# Positions of the arguments in the schemas.
_SAMPLE_TENSORS = 2  # mu, logvar
_LINEAR_TENSORS = (0, 1, 4, 5)  # mu, logvar, weight, bias


def _check_common(mu, logvar, ds, n, noise):
    torch._check(mu.dim() == 2, lambda: f"mu must be (B, D) (got shape {tuple(mu.shape)})")
    torch._check(mu.dtype.is_floating_point, lambda: f"mu must be a floating tensor (got {mu.dtype})")
    torch._check(logvar.shape == mu.shape,
                 lambda: f"logvar must have mu's shape {tuple(mu.shape)} (got {tuple(logvar.shape)})")
    torch._check(logvar.dtype == mu.dtype, lambda: "mu and logvar must have the same dtype")
    torch._check(logvar.device == mu.device, lambda: f"logvar must be on {mu.device}")
    torch._check(0 < ds < mu.shape[1], lambda: f"supervised_dims must be in (0, D = {mu.shape[1]}) (got {ds})")
    torch._check(n >= 1, lambda: f"n_samples must be >= 1 (got {n})")
    if noise is not None:
        torch._check(
            noise.dim() == 2 and noise.shape[0] == mu.shape[0] * n and noise.shape[1] == mu.shape[1] - ds,
            lambda: f"noise must be (B * n_samples, D - supervised_dims) (got {tuple(noise.shape)})",
        )
        torch._check(noise.device == mu.device, lambda: f"noise must be on {mu.device}")


def _check_linear(mu, weight, bias):
    torch._check(weight.dim() == 2 and weight.shape[1] == mu.shape[1],
                 lambda: f"weight must be (H, D = {mu.shape[1]}) (got {tuple(weight.shape)})")
    torch._check(weight.dtype == mu.dtype, lambda: "mu and weight must have the same dtype")
    torch._check(weight.device == mu.device, lambda: f"weight must be on {mu.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"bias must be (H = {weight.shape[0]},) (got {tuple(bias.shape)})")
        torch._check(bias.dtype == mu.dtype, lambda: "mu and bias must have the same dtype")
        torch._check(bias.device == mu.device, lambda: f"bias must be on {mu.device}")


# ---- fake kernels --------------------------------------------------------------------------------


def _sample_fake(mu, logvar, ds, n, posterior, seed, offset, noise):
    _check_common(mu, logvar, ds, n, noise)
    return mu.new_empty((mu.shape[0] * n, mu.shape[1]))


def _sample_backward_fake(grad, mu, logvar, ds, n, posterior, seed, offset, noise):
    _check_common(mu, logvar, ds, n, noise)
    return torch.empty_like(mu), torch.empty_like(logvar)


def _linear_fake(mu, logvar, ds, n, weight, bias, activation, slope, posterior, seed, offset, noise):
    _check_common(mu, logvar, ds, n, noise)
    _check_linear(mu, weight, bias)
    return mu.new_empty((mu.shape[0] * n, weight.shape[0]))


def _linear_backward_fake(grad, mu, logvar, ds, n, weight, bias, activation, slope, posterior, seed,
                          offset, noise):
    _check_common(mu, logvar, ds, n, noise)
    _check_linear(mu, weight, bias)
    return (torch.empty_like(mu), torch.empty_like(logvar), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


# ---- autograd --------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    # The backward op takes every forward argument: tensors through save_for_backward, the rest
    # (ints, bools, strings, None) kept as they are, with a marker where a tensor goes.
    ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
    ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
    ctx.save_for_backward(*[a for a in inputs if isinstance(a, torch.Tensor)])


def _saved_inputs(ctx):
    saved = iter(ctx.saved_tensors)
    return [next(saved) if t else a for a, t in zip(ctx.others, ctx.is_tensor)]


def _sample_autograd(backward_op):
    def backward(ctx, grad):
        g_mu, g_logvar = backward_op(grad.contiguous(), *_saved_inputs(ctx))
        need = ctx.needs_input_grad
        return (g_mu if need[0] else None, g_logvar if need[1] else None) + (None,) * 6

    return backward


def _linear_autograd(backward_op):
    def backward(ctx, grad):
        g = backward_op(grad.contiguous(), *_saved_inputs(ctx))
        need = ctx.needs_input_grad
        g_mu, g_logvar, g_w, g_b = (gi if need[i] else None for gi, i in zip(g, _LINEAR_TENSORS))
        return (g_mu, g_logvar, None, None, g_w, g_b) + (None,) * 6

    return backward


if HAS_OPS:
    torch.library.register_fake("lfi_fast::nuisance_sample")(_sample_fake)
    torch.library.register_fake("lfi_fast::nuisance_sample_backward")(_sample_backward_fake)
    torch.library.register_fake("lfi_fast::nuisance_sample_linear")(_linear_fake)
    torch.library.register_fake("lfi_fast::nuisance_sample_linear_backward")(_linear_backward_fake)
    torch.library.register_autograd(
        "lfi_fast::nuisance_sample", _sample_autograd(_lib.nuisance_sample_backward),
        setup_context=_setup_context)
    torch.library.register_autograd(
        "lfi_fast::nuisance_sample_linear", _linear_autograd(_lib.nuisance_sample_linear_backward),
        setup_context=_setup_context)

HAS_TRITON_OPS = False
if HAS_OPS and HAS_TRITON:

    def _schema(op: str) -> str:
        s = str(getattr(_lib, op).default._schema)
        return s[s.index("("):]

    def _launcher(attr):
        return lambda *args: getattr(triton_kernels("nuisance"), attr)(*args)

    def _triton_op(name, fake, backward_fake, autograd):
        fwd = torch.library.custom_op(f"lfi_fast::{name}_triton", _launcher(name), mutates_args=(),
                                      schema=_schema(name))
        bwd = torch.library.custom_op(f"lfi_fast::{name}_backward_triton", _launcher(f"{name}_backward"),
                                      mutates_args=(), schema=_schema(f"{name}_backward"))
        fwd.register_fake(fake)
        bwd.register_fake(backward_fake)
        fwd.register_autograd(autograd(getattr(_lib, f"{name}_backward_triton")),
                              setup_context=_setup_context)

    _triton_op("nuisance_sample", _sample_fake, _sample_backward_fake, _sample_autograd)
    _triton_op("nuisance_sample_linear", _linear_fake, _linear_backward_fake, _linear_autograd)
    HAS_TRITON_OPS = True


def _op(name: str, device: torch.device):
    """The registered op that runs `name` on `device` under the current backend, or None for the
    reference."""
    backend = _backend.resolve(device)
    if backend in ("cpp", "cuda") and HAS_OPS:
        return getattr(_lib, name)
    if backend == "triton" and HAS_TRITON_OPS:
        return getattr(_lib, f"{name}_triton")
    return None


def sample(mu, logvar, supervised_dims: int, n_samples: int, posterior: bool, seed: int, offset: int,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """z (B * n, D) on the backend chosen for mu's device (arguments validated by the caller)."""
    op = _op("nuisance_sample", mu.device)
    if op is None:
        return ref.sample(mu, logvar, supervised_dims, n_samples, posterior, seed, offset, noise)
    return op(mu, logvar, supervised_dims, n_samples, posterior, seed, offset, noise)


def sample_linear(mu, logvar, supervised_dims: int, n_samples: int, weight, bias, activation: str,
                  negative_slope: float, posterior: bool, seed: int, offset: int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """act(z @ weight.T + bias) (B * n, H) on the backend chosen for mu's device."""
    op = _op("nuisance_sample_linear", mu.device)
    if op is None:
        return ref.sample_linear(mu, logvar, supervised_dims, n_samples, weight, bias, activation,
                                 negative_slope, posterior, seed, offset, noise)
    return op(mu, logvar, supervised_dims, n_samples, weight, bias, activation, float(negative_slope),
              posterior, seed, offset, noise)
