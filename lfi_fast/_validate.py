"""Argument checks of the public API: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, t: object, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s) (got shape {tuple(t.shape)})")
    return t


def check_same(**tensors: torch.Tensor) -> None:
    """Same dtype and device for all the named tensors."""
    items = list(tensors.items())
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(
                f"{n0} and {n} must be on the same device (got {n0}: {t0.device}, {n}: {t.device})"
            )
        if t.dtype != t0.dtype:
            raise TypeError(
                f"{n0} and {n} must have the same dtype (got {n0}: {t0.dtype}, {n}: {t.dtype})"
            )


def check_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int (got {type(dim).__name__})")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{name}={dim} is out of range for a tensor with {ndim} dim(s)")
    return dim % ndim


def curvature(c: object, like: torch.Tensor, name: str = "c") -> torch.Tensor:
    """c as a 0-dim tensor for the ops: a positive finite number, or a 1-element floating tensor.

    Python numbers and CPU tensors are checked (c > 0, finite); a CUDA tensor is trusted, since
    reading it back would synchronise the device.
    """
    if isinstance(c, torch.Tensor):
        if c.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor or a number (got {c.dtype})")
        if c.numel() != 1:
            raise ValueError(f"{name} must be a scalar (got a tensor of shape {tuple(c.shape)})")
        if c.device.type != "cpu" and c.device != like.device:
            raise ValueError(
                f"{name} must be on the CPU or on the inputs' device {like.device} (got {c.device})"
            )
        if c.device.type == "cpu" and not _compiling():
            v = float(c.detach().reshape(()))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be positive and finite (got {v})")
        return c.reshape(())
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{name} must be a positive number or a scalar tensor (got {type(c).__name__})")
    if not 0 < c < math.inf:  # also false for NaN; comparisons trace under torch.compile
        raise ValueError(f"{name} must be positive and finite (got {c})")
    return torch.tensor(c, dtype=torch.float64)


def broadcast_rows(x: torch.Tensor, y: torch.Tensor, dim: int, names=("x", "y")):
    """Check that x and y broadcast and agree along `dim`; move `dim` last.

    Returns (x, y, dim) with dim normalised against the broadcast shape, and x and y viewed with
    that dim last (no copy).
    """
    try:
        shape = torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        raise ValueError(
            f"{names[0]} and {names[1]} must broadcast (got {names[0]}: {tuple(x.shape)}, "
            f"{names[1]}: {tuple(y.shape)})"
        ) from None
    nd = len(shape)
    d = check_dim(dim, nd)
    xs = x.reshape((1,) * (nd - x.dim()) + tuple(x.shape)) if x.dim() < nd else x
    ys = y.reshape((1,) * (nd - y.dim()) + tuple(y.shape)) if y.dim() < nd else y
    if xs.shape[d] != ys.shape[d]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same size along dim {dim} "
            f"(got {names[0]}: {tuple(x.shape)}, {names[1]}: {tuple(y.shape)})"
        )
    if d != nd - 1:
        xs, ys = xs.movedim(d, -1), ys.movedim(d, -1)
    return xs, ys, d
