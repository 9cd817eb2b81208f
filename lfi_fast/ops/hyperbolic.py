"""Op layer of the hyperbolic family: backend choice, fake kernels, autograd.

Each op has one schema (csrc/bindings.cpp): the C++ op lfi_fast::<op> (CPU and CUDA kernels) and
the Triton op lfi_fast::<op>_triton (registered here with torch.library.custom_op, from the same
schema) share it, so one fake kernel and one autograd formula serve both. The backward of each is
an op of its own: <op>_backward(grad, <tensor args>, c, <flags>, needs_grad_c) returns the
gradients of the tensor arguments (in the broadcast shape) and of c.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .. import _backend
from ..reference import hyperbolic as ref
from ._common import HAS_C, HAS_TRITON, check_binary, sum_to, triton_kernels

_lib = torch.ops.lfi_fast
Shape = tuple[int, ...]


class OpSpec(NamedTuple):
    tensors: tuple[str, ...]  # tensor arguments before c
    flags: tuple[str, ...]  # bool arguments after c
    out_shape: Callable[..., Shape]  # (*tensors) -> the output's shape
    grad_shapes: Callable[..., tuple[Shape, ...]]  # (*tensors) -> the backward's gradient shapes
    reference: Callable  # (*tensors, c, *flags) -> output, in pure PyTorch


def _bshape(a, b) -> Shape:
    return tuple(torch.broadcast_shapes(a.shape, b.shape))


def _rows_bshape(r, x) -> Shape:  # r broadcast against x's rows as (..., 1)
    rows = torch.broadcast_shapes(r.shape, tuple(x.shape[:-1]) + (1,))
    return tuple(rows[:-1]) + (x.shape[-1],)


SPECS: dict[str, OpSpec] = {
    "mobius_add": OpSpec(
        ("x", "y"), ("project",), _bshape, lambda x, y: (_bshape(x, y),) * 2,
        lambda x, y, c, p: ref.mobius_add(x, y, c, project=p),
    ),
    "mobius_scalar_mul": OpSpec(
        ("r", "x"), ("project",), lambda r, x: _rows_bshape(r, x),
        lambda r, x: (_rows_bshape(r, x)[:-1] + (1,), _rows_bshape(r, x)),
        lambda r, x, c, p: ref.mobius_scalar_mul(r, x, c, project=p),
    ),
    "mobius_matvec": OpSpec(
        ("m", "x"), ("project",), lambda m, x: tuple(x.shape[:-1]) + (m.shape[0],),
        lambda m, x: (tuple(m.shape), tuple(x.shape)),
        lambda m, x, c, p: ref.mobius_matvec(m, x, c, project=p),
    ),
    "expmap": OpSpec(
        ("x", "u"), ("project",), _bshape, lambda x, u: (_bshape(x, u),) * 2,
        lambda x, u, c, p: ref.expmap(x, u, c, project=p),
    ),
    "logmap": OpSpec(
        ("x", "y"), (), _bshape, lambda x, y: (_bshape(x, y),) * 2,
        lambda x, y, c: ref.logmap(x, y, c),
    ),
    "expmap0": OpSpec(
        ("u",), ("project",), lambda u: tuple(u.shape), lambda u: (tuple(u.shape),),
        lambda u, c, p: ref.expmap0(u, c, project=p),
    ),
    "logmap0": OpSpec(
        ("y",), (), lambda y: tuple(y.shape), lambda y: (tuple(y.shape),),
        lambda y, c: ref.logmap0(y, c),
    ),
    "project": OpSpec(
        ("x",), (), lambda x: tuple(x.shape), lambda x: (tuple(x.shape),),
        lambda x, c: ref.project(x, c),
    ),
    "dist": OpSpec(
        ("x", "y"), (), lambda x, y: _bshape(x, y)[:-1], lambda x, y: (_bshape(x, y),) * 2,
        lambda x, y, c: ref.dist(x, y, c),
    ),
    "dist0": OpSpec(
        ("x",), (), lambda x: tuple(x.shape[:-1]), lambda x: (tuple(x.shape),),
        lambda x, c: ref.dist0(x, c),
    ),
    "pairwise_dist": OpSpec(
        ("x", "y"), (), lambda x, y: (x.shape[0], y.shape[0]),
        lambda x, y: (tuple(x.shape), tuple(y.shape)),
        lambda x, y, c: ref.pairwise_dist(x, y, c),
    ),
}


def _check_fake(spec: OpSpec, tensors, c) -> None:
    """The kernels' argument checks, for fake tensors: the same errors under torch.compile and on
    meta tensors as on real ones."""
    first = tensors[0]
    for name, t in zip(spec.tensors, tensors):
        torch._check(t.dtype.is_floating_point, lambda: f"{name} must be a floating tensor (got {t.dtype})")
        torch._check(t.dtype == first.dtype, lambda: f"{spec.tensors[0]} and {name} must have the same dtype")
        torch._check(t.device == first.device, lambda: f"{name} must be on {first.device} (got {t.device})")
    check_binary(tensors[-1], tensors[-1], c)


def _register(name: str, spec: OpSpec) -> None:
    nt = len(spec.tensors)

    def fake(*args):
        tensors, c = args[:nt], args[nt]
        _check_fake(spec, tensors, c)
        return tensors[0].new_empty(spec.out_shape(*tensors))

    def backward_fake(grad, *args):
        tensors, c = args[:nt], args[nt]
        _check_fake(spec, tensors, c)
        grads = tuple(t.new_empty(s) for t, s in zip(tensors, spec.grad_shapes(*tensors)))
        return grads + (c.new_empty(()),)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[: nt + 1])
        ctx.flags = inputs[nt + 1 :]

    def autograd_with(backward_op):
        def backward(ctx, grad):
            saved = ctx.saved_tensors
            need = ctx.needs_input_grad
            grads = backward_op(grad, *saved, *ctx.flags, need[nt])
            out = [sum_to(g, t.shape) if need[i] else None for i, (g, t) in enumerate(zip(grads[:nt], saved[:nt]))]
            out.append(grads[nt] if need[nt] else None)
            return (*out, *([None] * len(spec.flags)))

        return backward

    if HAS_C:
        torch.library.register_fake(f"lfi_fast::{name}")(fake)
        torch.library.register_fake(f"lfi_fast::{name}_backward")(backward_fake)
        torch.library.register_autograd(
            f"lfi_fast::{name}", autograd_with(getattr(_lib, f"{name}_backward")),
            setup_context=setup_context,
        )
    if HAS_C and HAS_TRITON:
        # The Triton ops take the C++ ops' schemas: one definition, in csrc/bindings.cpp.
        def schema(op: str) -> str:
            s = str(getattr(_lib, op).default._schema)
            return s[s.index("(") :]

        def launcher(attr):
            return lambda *args: getattr(triton_kernels("hyperbolic"), attr)(*args)

        fwd = torch.library.custom_op(
            f"lfi_fast::{name}_triton", launcher(name), mutates_args=(), schema=schema(name)
        )
        bwd = torch.library.custom_op(
            f"lfi_fast::{name}_backward_triton", launcher(f"{name}_backward"), mutates_args=(),
            schema=schema(f"{name}_backward"),
        )
        fwd.register_fake(fake)
        bwd.register_fake(backward_fake)
        fwd.register_autograd(autograd_with(getattr(_lib, f"{name}_backward_triton")),
                              setup_context=setup_context)


for _name, _spec in SPECS.items():
    _register(_name, _spec)


def call(name: str, *args):
    """Run op `name` on the backend chosen for the first tensor's device. The arguments are those
    of the schema: the tensors (validated, coordinate dim last), c as a 0-dim tensor, the flags."""
    backend = _backend.resolve(args[0].device)
    if backend in ("cpp", "cuda"):
        return getattr(_lib, name)(*args)
    if backend == "triton":
        return getattr(_lib, f"{name}_triton")(*args)
    return SPECS[name].reference(*args)
