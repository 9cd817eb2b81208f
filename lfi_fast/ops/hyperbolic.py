"""Op layer of the hyperbolic family: backend choice, fake kernels, autograd.

The C++ ops (lfi_fast::<op>, CPU and CUDA kernels registered from csrc/) and the Triton ops
(lfi_fast::<op>_triton, registered here with torch.library.custom_op) share one schema per op, so
one fake kernel and one autograd formula serve both; the backward of each is an op of its own.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import hyperbolic as ref
from ._common import HAS_C, HAS_TRITON, sum_to, triton_kernels

_lib = torch.ops.lfi_fast

# ---- mobius_add ----------------------------------------------------------------------------------


def _mobius_add_fake(x, y, c, project):
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape))


def _mobius_add_backward_fake(grad, x, y, c, project, needs_grad_c):
    shape = torch.broadcast_shapes(x.shape, y.shape)
    return x.new_empty(shape), x.new_empty(shape), c.new_empty(())


def _mobius_add_setup(ctx, inputs, output):
    x, y, c, project = inputs
    ctx.save_for_backward(x, y, c)
    ctx.project = project


def _mobius_add_autograd(backward_op):
    def backward(ctx, grad):
        x, y, c = ctx.saved_tensors
        need_x, need_y, need_c = ctx.needs_input_grad[:3]
        gx, gy, gc = backward_op(grad, x, y, c, ctx.project, need_c)
        return (
            sum_to(gx, x.shape) if need_x else None,
            sum_to(gy, y.shape) if need_y else None,
            gc if need_c else None,
            None,
        )

    return backward


if HAS_C:
    torch.library.register_fake("lfi_fast::mobius_add")(_mobius_add_fake)
    torch.library.register_fake("lfi_fast::mobius_add_backward")(_mobius_add_backward_fake)
    torch.library.register_autograd(
        "lfi_fast::mobius_add",
        _mobius_add_autograd(_lib.mobius_add_backward),
        setup_context=_mobius_add_setup,
    )

if HAS_TRITON:

    @torch.library.custom_op("lfi_fast::mobius_add_triton", mutates_args=())
    def mobius_add_triton(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, project: bool) -> torch.Tensor:
        return triton_kernels("hyperbolic").mobius_add(x, y, c, project)

    @torch.library.custom_op("lfi_fast::mobius_add_backward_triton", mutates_args=())
    def mobius_add_backward_triton(
        grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, project: bool,
        needs_grad_c: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_kernels("hyperbolic").mobius_add_backward(grad, x, y, c, project, needs_grad_c)

    mobius_add_triton.register_fake(_mobius_add_fake)
    mobius_add_backward_triton.register_fake(_mobius_add_backward_fake)
    mobius_add_triton.register_autograd(
        _mobius_add_autograd(_lib.mobius_add_backward_triton), setup_context=_mobius_add_setup
    )


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, project: bool) -> torch.Tensor:
    """x ⊕_c y over the last dim; x, y broadcast; c a 0-dim tensor (validated by the caller)."""
    backend = _backend.resolve(x.device)
    if backend in ("cpp", "cuda"):
        return _lib.mobius_add(x, y, c, project)
    if backend == "triton":
        return _lib.mobius_add_triton(x, y, c, project)
    return ref.mobius_add(x, y, c, project=project)
