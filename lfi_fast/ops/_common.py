"""Shared plumbing of the op layer: loading the compiled library, Triton op registration."""
from __future__ import annotations

import importlib.util

import torch

try:  # importing _C runs TORCH_LIBRARY(lfi_fast): the schemas and the CPU/CUDA kernels
    from .. import _C  # noqa: F401

    HAS_C = True
except ImportError:  # a torch-only install still works through the reference
    HAS_C = False

HAS_TRITON = importlib.util.find_spec("triton") is not None


def sum_to(grad: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Reduce a gradient computed in the broadcast shape to an input's shape."""
    if grad is None or grad.shape == shape:
        return grad
    return grad.sum_to_size(shape)


def triton_kernels(family: str):
    """lfi_fast._kernels.<family>, imported on first use (importing triton takes a while)."""
    return importlib.import_module(f"lfi_fast._kernels.{family}")


def check_binary(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Size:
    """The checks of a row-wise (x, y, c) kernel, for its fake kernel: the same errors under
    torch.compile and meta tensors as on real ones. Returns the broadcast shape."""
    torch._check(x.dtype.is_floating_point, lambda: f"x must be a floating tensor (got {x.dtype})")
    torch._check(x.dtype == y.dtype, lambda: f"x and y must have the same dtype (got {x.dtype} and {y.dtype})")
    torch._check(x.device == y.device, lambda: f"y must be on {x.device} (got {y.device})")
    torch._check(c.dim() == 0 and c.dtype.is_floating_point, lambda: "c must be a 0-dim floating tensor")
    torch._check(
        c.device.type == "cpu" or c.device == x.device,
        lambda: f"c must be on the CPU or on {x.device} (got {c.device})",
    )
    shape = torch.broadcast_shapes(x.shape, y.shape)
    torch._check(len(shape) >= 1, lambda: "x and y must have at least 1 dim (the coordinates)")
    return shape
