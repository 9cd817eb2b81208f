"""Backend choice and build information: lfi_fast.info(), set_backend / use_backend / get_backend,
LFI_FAST_BACKEND, "auto", and lfi_fast._C.build_info()."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import backends_for, triton_interpreted
from torch.utils._python_dispatch import TorchDispatchMode

import lfi_fast
from lfi_fast import _backend
from lfi_fast import hyperbolic as hyp

NAMES = ("cpp", "cuda", "triton", "torch")
HAS_CUDA_BUILD = lfi_fast.info()["build"].get("cuda", False)


class RecordOps(TorchDispatchMode):
    """Records the ops dispatched inside it: which registered op a call really reached."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_run_by(backend: str, x: torch.Tensor) -> list[str]:
    with lfi_fast.use_backend(backend), RecordOps() as rec:
        hyp.mobius_add(x, x * 0.5, 1.0)
    return [op for op in rec.ops if op.startswith("lfi_fast.")]


# ---- info ----------------------------------------------------------------------------------------


def test_info_keys_and_values():
    info = lfi_fast.info()
    for key in ("version", "torch", "backend", "backends", "cuda_archs", "openmp_threads", "build"):
        assert key in info, f"info() lacks {key!r}: {sorted(info)}"
    assert info["version"] == lfi_fast.__version__ and re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert info["torch"] == torch.__version__
    assert info["backend"] == lfi_fast.get_backend() == "auto"
    assert set(info["backends"]) == set(NAMES)
    for name, st in info["backends"].items():
        assert set(st) >= {"available", "reason"}, f"{name}: {st}"
        assert isinstance(st["available"], bool)
        if st["available"]:
            assert st["reason"] is None, f"{name} available but with a reason: {st['reason']}"
        else:
            assert isinstance(st["reason"], str) and st["reason"], f"{name} unavailable without a reason"
    assert info["backends"]["cpp"]["available"], info["backends"]["cpp"]["reason"]
    assert info["backends"]["torch"]["available"]
    assert isinstance(info["cuda_archs"], str)
    assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] >= 1
    assert isinstance(info["build"].get("compiler"), str) and info["build"]["compiler"]
    assert info["build"] == dict(lfi_fast._C.build_info())
    avail = [n for n in NAMES if info["backends"][n]["available"]]
    assert lfi_fast.available_backends() == avail


def test_info_says_why_cuda_is_missing():
    st = lfi_fast.info()["backends"]["cuda"]
    if not HAS_CUDA_BUILD:
        assert not st["available"] and "built without CUDA" in st["reason"]
    elif not torch.cuda.is_available():
        assert not st["available"] and "CUDA" in st["reason"]
    else:
        assert st["available"]


def test_info_triton_follows_the_interpreter_setting():
    st = lfi_fast.info()["backends"]["triton"]
    try:
        import triton  # noqa: F401
    except ImportError:
        assert not st["available"] and "triton" in st["reason"]
        return
    assert st["available"] == (torch.cuda.is_available() or triton_interpreted())


def test_build_info_fields():
    b = lfi_fast._C.build_info()
    assert isinstance(b["cuda"], bool)
    assert isinstance(b["cuda_archs"], str)
    if b["cuda"]:
        assert re.fullmatch(r"\d+\.\d+", b["cuda_version"]), b["cuda_version"]
    else:
        assert b["cuda_version"] is None and b["cuda_archs"] == ""
    assert isinstance(b["openmp"], bool)
    assert isinstance(b["openmp_threads"], int) and b["openmp_threads"] >= 1
    if not b["openmp"]:
        assert b["openmp_threads"] == 1
    assert re.match(r"(gcc|clang|msvc|icx|nvc)", b["compiler"], re.I), b["compiler"]
    assert b["cplusplus"] >= 202002, "the extension must be built as C++20"
    # built against the torch it runs with
    assert torch.__version__.split("+")[0] == b["torch_version"], (torch.__version__, b["torch_version"])


# ---- choosing ------------------------------------------------------------------------------------


def test_set_and_get_backend():
    assert lfi_fast.get_backend() == "auto"
    lfi_fast.set_backend("torch")
    assert lfi_fast.get_backend() == "torch"
    assert lfi_fast.info()["backend"] == "torch"
    lfi_fast.set_backend(" CPP ")  # names are trimmed and case-insensitive
    assert lfi_fast.get_backend() == "cpp"
    lfi_fast.set_backend("auto")
    assert lfi_fast.get_backend() == "auto"


def test_use_backend_restores_even_on_exception():
    lfi_fast.set_backend("cpp")
    with lfi_fast.use_backend("torch"):
        assert lfi_fast.get_backend() == "torch"
        with lfi_fast.use_backend("auto"):
            assert lfi_fast.get_backend() == "auto"
        assert lfi_fast.get_backend() == "torch"
    assert lfi_fast.get_backend() == "cpp"
    with pytest.raises(KeyError):
        with lfi_fast.use_backend("torch"):
            raise KeyError("boom")
    assert lfi_fast.get_backend() == "cpp"
    # an error inside an op call, too
    with pytest.raises(ValueError):
        with lfi_fast.use_backend("torch"):
            hyp.mobius_add(torch.zeros(2, 3), torch.zeros(2, 4))
    assert lfi_fast.get_backend() == "cpp"


@pytest.mark.parametrize("bad", ["bogus", "", "gpu", "CUDA2", None, 3])
def test_unknown_name_is_a_value_error_listing_the_names(bad):
    lfi_fast.set_backend("torch")
    for choose in (lfi_fast.set_backend, lambda n: lfi_fast.use_backend(n).__enter__()):
        with pytest.raises(ValueError) as info:
            choose(bad)
        msg = str(info.value)
        for name in ("auto", *NAMES):
            assert name in msg, f"{name!r} missing from: {msg}"
        assert lfi_fast.get_backend() == "torch", "a failed choice changed the backend"


@pytest.mark.skipif(HAS_CUDA_BUILD and torch.cuda.is_available(), reason="cuda is available here")
def test_unavailable_backend_is_a_runtime_error_listing_the_available():
    lfi_fast.set_backend("torch")
    for choose in (lfi_fast.set_backend, lambda n: lfi_fast.use_backend(n).__enter__()):
        with pytest.raises(RuntimeError) as info:
            choose("cuda")
        msg = str(info.value)
        assert "cuda" in msg and lfi_fast.info()["backends"]["cuda"]["reason"] in msg, msg
        listed = msg.rsplit("available", 1)[-1]
        for name in lfi_fast.available_backends():
            assert name in listed, f"{name!r} not listed as available: {msg}"
        assert lfi_fast.get_backend() == "torch"


def test_auto_resolves_to_cpp_for_cpu_tensors():
    assert _backend.resolve(torch.device("cpu")) == "cpp"
    x = torch.rand(4, 3) * 0.1
    assert ops_run_by("auto", x) == ["lfi_fast.mobius_add"]
    assert ops_run_by("cpp", x) == ["lfi_fast.mobius_add"]
    assert ops_run_by("torch", x) == []  # plain PyTorch: no lfi_fast op


@pytest.mark.triton
def test_triton_backend_runs_the_triton_op():
    if "triton" not in backends_for("cpu"):
        pytest.skip("triton cannot run on CPU tensors here (TRITON_INTERPRET unset)")
    from conftest import triton_kernel

    if triton_kernel("hyperbolic", "mobius_add") is None:
        pytest.skip("lfi_fast._kernels.hyperbolic has no mobius_add yet")
    assert ops_run_by("triton", torch.rand(4, 3) * 0.1) == ["lfi_fast.mobius_add_triton"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_for_cuda_tensors():
    x = torch.rand(4, 3, device="cuda") * 0.1
    want = "cuda" if "cuda" in lfi_fast.available_backends() else "triton"
    assert _backend.resolve(x.device) == want
    op = {"cuda": "lfi_fast.mobius_add", "triton": "lfi_fast.mobius_add_triton"}[want]
    assert ops_run_by("auto", x) == [op]


# ---- LFI_FAST_BACKEND ----------------------------------------------------------------------------

_PROBE = """
import torch, lfi_fast
from lfi_fast import _backend
from lfi_fast import hyperbolic as hyp
print("chosen", lfi_fast.get_backend())
try:
    print("resolved", _backend.resolve(torch.device("cpu")))
    hyp.mobius_add(torch.zeros(2, 3), torch.zeros(2, 3))
    print("call ok")
except Exception as e:
    print("error", type(e).__name__, e)
"""


_ENV_VALUES = (None, "torch", " CPP ", "bogus", "cuda")


@pytest.fixture(scope="module")
def probes() -> dict:
    """What a fresh interpreter does under each LFI_FAST_BACKEND value (run side by side: each
    pays for importing torch)."""
    procs = {}
    for value in _ENV_VALUES:
        env = {k: v for k, v in os.environ.items() if k != "LFI_FAST_BACKEND"}
        if value is not None:
            env["LFI_FAST_BACKEND"] = value
        procs[value] = subprocess.Popen(
            [sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for value, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out = {}
        for line in stdout.splitlines():
            key, _, rest = line.partition(" ")
            out[key] = rest
        results[value] = out
    return results


@pytest.mark.parametrize(
    ("value", "chosen", "resolved"),
    [(None, "auto", "cpp"), ("torch", "torch", "torch"), (" CPP ", "cpp", "cpp")],
)
def test_env_var_is_honoured(probes, value, chosen, resolved):
    out = probes[value]
    assert out.get("chosen") == chosen, out
    assert out.get("resolved") == resolved, out
    assert "call" in out, out


def test_env_var_with_a_bad_name_fails_at_first_use(probes):
    out = probes["bogus"]  # importing still works: the name is checked at the first op call
    assert out.get("chosen") == "bogus"
    assert out.get("error", "").startswith("ValueError") and "cpp" in out["error"] and "torch" in out["error"], out


@pytest.mark.skipif(HAS_CUDA_BUILD and torch.cuda.is_available(), reason="cuda is available here")
def test_env_var_naming_an_unavailable_backend_fails_at_first_use(probes):
    out = probes["cuda"]
    assert out.get("error", "").startswith("RuntimeError"), out
    assert "cpp" in out["error"] and "torch" in out["error"], out
