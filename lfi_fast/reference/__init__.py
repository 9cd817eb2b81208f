"""Pure-PyTorch reference implementations: the specification, the `torch` backend, the test oracle.

Short and readable, float64-capable, differentiable by autograd. Every fast path is tested against
these on fresh random inputs.
"""
from . import hyperbolic

__all__ = ["hyperbolic"]
