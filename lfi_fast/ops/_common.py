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
