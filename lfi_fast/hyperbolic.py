"""Poincaré ball of curvature -c (c > 0): fused Möbius, exp/log and distance ops.

Functions follow geoopt's numerics (see lfi_fast.reference.hyperbolic) and broadcast like geoopt.
`c` is a positive number or a 0-dim tensor; gradients flow to a tensor c. Ops with project=True
project their result onto the ball of radius (1 - eps)/sqrt(c), as geoopt's PoincareBall does.
float16/bfloat16 inputs are computed in float32 and never give NaN or inf for finite inputs.
"""
from __future__ import annotations

import torch

from . import _validate as V
from .ops import hyperbolic as _ops

__all__ = ["mobius_add"]


def mobius_add(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float | torch.Tensor = 1.0,
    *,
    dim: int = -1,
    project: bool = True,
) -> torch.Tensor:
    """Möbius addition x ⊕_c y on the Poincaré ball.

        x ⊕_c y = ((1 + 2c<x,y> + c|y|²) x + (1 - c|x|²) y) / (1 + 2c<x,y> + c²|x|²|y|²)

    Args:
        x, y: points of the ball, floating tensors of one dtype and device, broadcasting together;
            `dim` is the coordinate dimension (same size in both).
        c: the ball's curvature magnitude, > 0: a number or a scalar tensor (differentiable).
        dim: the coordinate dimension.
        project: project the result onto the ball (geoopt's default in PoincareBall).

    Returns:
        A tensor of the broadcast shape and the inputs' dtype.
    """
    V.check_tensor("x", x)
    V.check_tensor("y", y)
    V.check_same(x=x, y=y)
    xs, ys, d = V.broadcast_rows(x, y, dim)
    out = _ops.mobius_add(xs, ys, V.curvature(c, x), bool(project))
    return out if d == out.dim() - 1 else out.movedim(-1, d)
