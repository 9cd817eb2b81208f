"""Backend choice: which implementation of an op runs.

| name   | runs on                                          | from                       |
|--------|--------------------------------------------------|----------------------------|
| cuda   | CUDA tensors                                     | csrc/cuda via torch.ops    |
| triton | CUDA tensors; CPU tensors under TRITON_INTERPRET=1 | kernels/ (lfi_fast._kernels) |
| cpp    | CPU tensors                                      | csrc/cpu via torch.ops     |
| torch  | anything                                         | lfi_fast.reference         |

"auto" (the default) picks, for a CUDA tensor, cuda if compiled, else triton if importable, else
torch; for a CPU tensor, cpp if compiled, else torch. A named backend that is not available, or
cannot run on the tensor's device, is an error that lists the available ones: never a silent
fallback. The choice is global (set_backend, the LFI_FAST_BACKEND environment variable) or scoped
(use_backend, a context manager).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
from typing import Iterator

import torch

BACKENDS = ("auto", "cpp", "cuda", "triton", "torch")

_current = os.environ.get("LFI_FAST_BACKEND", "auto").strip().lower() or "auto"


def _probe() -> dict[str, str | None]:
    """Find out once which backends can run here, and why the others cannot."""
    status: dict[str, str | None] = {"torch": None}
    try:
        from . import _C  # noqa: F401

        status["cpp"] = None
        if _C.build_info()["cuda"]:
            status["cuda"] = None if torch.cuda.is_available() else "no CUDA device is visible"
        else:
            status["cuda"] = "lfi_fast was built without CUDA"
    except ImportError as e:  # a torch-only install (or a broken build): say so
        status["cpp"] = f"the compiled extension lfi_fast._C did not import ({e})"
        status["cuda"] = status["cpp"]
    if importlib.util.find_spec("triton") is None:  # found, not imported: that takes a while
        status["triton"] = "triton is not installed"
    elif torch.cuda.is_available() or _triton_interpreted():
        status["triton"] = None
    else:
        status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    return status


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Probed once, at import: resolve() then only reads plain Python state, which torch.compile
# traces (and guards on) without a graph break.
_status: dict[str, str | None] = _probe()  # backend -> None if available, else why not


def _backend_status() -> dict[str, str | None]:
    return _status


def available_backends() -> list[str]:
    """Names of the backends that can run here (besides "auto")."""
    return [b for b in BACKENDS[1:] if _backend_status().get(b) is None]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {name!r})")
    name = name.strip().lower()
    if name != "auto":
        why = _backend_status().get(name)
        if why is not None:
            raise RuntimeError(
                f"backend {name!r} is not available: {why}; "
                f"available: {', '.join(available_backends())}"
            )
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every following call: "auto", "cpp", "cuda", "triton" or "torch"."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    """The backend chosen now (possibly "auto")."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend `name`, then restore the previous one."""
    global _current
    previous = _current
    _current = _check_name(name)
    try:
        yield
    finally:
        _current = previous


_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",), "torch": None}


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`, under the current choice."""
    name = _current
    if name == "auto":
        st = _backend_status()
        if device.type == "cuda":
            for b in ("cuda", "triton"):
                if st.get(b) is None:
                    return b
            return "torch"
        if device.type == "cpu" and st.get("cpp") is None:
            return "cpp"
        return "torch"
    name = _check_name(name)  # LFI_FAST_BACKEND is only checked here, at first use
    devices = _DEVICES[name]
    if name == "triton" and device.type == "cpu" and _triton_interpreted():
        return name
    if devices is not None and device.type not in devices:
        ok = [b for b in available_backends() if _DEVICES[b] is None or device.type in _DEVICES[b]]
        raise RuntimeError(
            f"backend {name!r} cannot run on {device.type} tensors; "
            f"backends for {device.type}: {', '.join(ok)}"
        )
    return name


def info() -> dict:
    """Version, torch version, which backends are available (and why not), and build details."""
    from .version import __version__

    st = _backend_status()
    build: dict = {}
    try:
        from . import _C

        build = dict(_C.build_info())
    except ImportError:
        pass
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backend": _current,
        "backends": {b: {"available": st.get(b) is None, "reason": st.get(b)} for b in BACKENDS[1:]},
        "cuda_available": torch.cuda.is_available(),
        "cuda_archs": build.get("cuda_archs", ""),
        "openmp_threads": build.get("openmp_threads", 0),
        "torch_threads": torch.get_num_threads(),
        "build": build,
    }
