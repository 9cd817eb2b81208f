"""lfi_fast: fused kernels for latent-space interpretability methods.

Four explanation methods (supervised-VAE invariances, latent interventions, FLINT, hyperbolic
symbolic rules) spend their time in a few hot paths; lfi_fast implements those as fused ops in
C++ (CPU), CUDA and Triton, registered with PyTorch (torch.compile and autograd work through them),
under a small functional API:

    import lfi_fast
    from lfi_fast import hyperbolic as hyp
    z = hyp.mobius_add(x, y, c=1.0)
    lfi_fast.info()                 # version, backends available (and why not), build details
    with lfi_fast.use_backend("torch"):
        ...                         # the pure-PyTorch reference, e.g. to compare

Backends: "auto" (default), "cpp", "cuda", "triton", "torch"; see set_backend().
"""
from ._backend import BACKENDS, available_backends, get_backend, info, set_backend, use_backend
from .version import __version__

from . import hyperbolic, nn  # noqa: E402  (public families import the op layer)

# The other families, the data loaders and the explainers load on first use (lfi_fast.vq, ...):
# `import lfi_fast` stays light, and a family's import error shows where it is used.
_LAZY = ("vq", "gumbel", "nuisance", "data", "models", "explain", "batch", "geoopt")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BACKENDS",
    "__version__",
    "available_backends",
    "get_backend",
    "hyperbolic",
    "info",
    "nn",
    "set_backend",
    "use_backend",
]
