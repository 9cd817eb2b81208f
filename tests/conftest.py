"""Shared test plumbing: devices and backends, the tolerance table, seeds.

Tests run on every device here (the CPU, and CUDA when a GPU is visible) and, on each device, on
every backend that can run there. On a machine without a GPU the Triton backend runs interpreted
on CPU tensors: TRITON_INTERPRET=1 is set below, before anything imports triton or lfi_fast (the
Triton kernels read it when they are defined). Where a GPU is visible it is not set, so that the
real, compiled Triton kernels are tested on CUDA tensors; export TRITON_INTERPRET=1 yourself to test
the interpreter there too.

Seeds: every run draws fresh random inputs. The session seed is printed in pytest's header; rerun
with LFI_FAST_TEST_SEED=<seed> to get the same inputs (the hypothesis tests included: the seed is
also theirs unless --hypothesis-seed is given). Each test derives its own seed from the session seed
and its node id (the `seed` fixture), so one test's inputs do not depend on which others ran.

The helpers here are plain functions too (`from conftest import ...`), for tests/fuzz.py and the
test modules of later op families.
"""
from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # importing torch does not import triton

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import importlib
import zlib

import pytest
import torch

import lfi_fast

# ---- devices and backends ------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Which backends can take tensors of a device, in the order tests list them.
_DEVICE_BACKENDS = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends_for(device: str) -> list[str]:
    """The available backends that run on tensors of `device` ("cpu" or "cuda")."""
    available = lfi_fast.available_backends()
    out = [b for b in _DEVICE_BACKENDS[device] if b in available]
    if device == "cpu" and not triton_interpreted():
        out = [b for b in out if b != "triton"]
    return out


def device_backend_params(family: str, op: str, devices: list[str] | None = None) -> list:
    """pytest params (device, backend) for every device here and every backend that runs on it;
    the Triton ones are skipped while lfi_fast._kernels.<family> has no launcher `op`."""
    params = []
    for device in devices or DEVICES:
        for backend in backends_for(device):
            marks = []
            if backend == "triton":
                marks.append(pytest.mark.triton)
                try:
                    missing = triton_kernel(family, op) is None
                except Exception:  # a broken kernels module: run, so that the tests show the error
                    missing = False
                if missing:
                    marks.append(pytest.mark.skip(reason=f"lfi_fast._kernels.{family} has no {op} yet"))
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def triton_kernel(family: str, op: str):
    """lfi_fast._kernels.<family>.<op>, or None while that Triton launcher does not exist yet.

    Only a missing module or attribute counts as "not written yet"; any other error while importing
    the kernels (a syntax error, a triton API misuse) propagates and fails the test.
    """
    name = f"lfi_fast._kernels.{family}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in (name, "lfi_fast._kernels"):
            return None
        raise
    return getattr(mod, op, None)


def require_backend(backend: str, family: str, op: str) -> None:
    """Skip the calling test when `backend` is triton and the Triton kernel of `op` is missing."""
    if backend == "triton" and triton_kernel(family, op) is None:
        pytest.skip(f"lfi_fast._kernels.{family} has no {op} yet")


# ---- tolerances ----------------------------------------------------------------------------------

# Relative error per row against a float64 reference (the row: the op's reduced dim).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}

# The floor under a reference row's norm in the relative error: the dtype's smallest normal
# number, so that rows of zeros and rows that underflow are judged on an absolute scale that the
# dtype can represent at all.
FLOOR = {dt: torch.finfo(dt).tiny for dt in TOL}

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def row_norm(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Norm over `dim` (the row), or |t| elementwise when dim is None; 0-dim tensors are one row."""
    t = t.detach().double()
    if dim is None or t.dim() == 0:
        return t.abs()
    return torch.linalg.vector_norm(t, dim=dim)


def rel_row_error(out: torch.Tensor, ref: torch.Tensor, dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    """‖out - ref‖ / (‖ref‖ + floor) per row, in float64. NaN wherever either side is not finite
    and they differ (so a NaN never passes a `<=` check)."""
    out, ref = out.detach().double(), ref.detach().double()
    same = (out == ref) | (out.isnan() & ref.isnan())
    diff = torch.where(same, torch.zeros_like(out), out - ref)
    err = row_norm(diff, dim) / (row_norm(ref, dim) + FLOOR[dtype])
    return err


def assert_rows_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    dtype: torch.dtype,
    dim: int | None = -1,
    tol: float | None = None,
    slack: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """Every row of `out` within tol·(‖ref‖ + floor) of `ref` (+ `slack`, an absolute per-row
    allowance for ill-conditioned rows); tol defaults to TOL[dtype]."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    tol = TOL[dtype] if tol is None else tol
    err = rel_row_error(out, ref, dim, dtype)
    allowed = torch.full_like(err, tol)
    if slack is not None:
        allowed = allowed + slack / (row_norm(ref, dim) + FLOOR[dtype])
    bad = ~(err <= allowed)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} rows off (dtype {dtype}, tol {tol:g}); "
            f"worst relative error {float(err.nan_to_num(float('inf')).max()):.3g}; "
            f"first bad row {idx}: relative error {float(err[tuple(idx)]):.3g}, allowed "
            f"{float(allowed[tuple(idx)]):.3g}"
        )


# ---- seeds ---------------------------------------------------------------------------------------


def _session_seed() -> int:
    env = os.environ.get("LFI_FAST_TEST_SEED", "").strip()
    if env:
        return int(env)
    return int.from_bytes(os.urandom(4), "little")


SESSION_SEED = _session_seed()


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the session seed and `parts` (stable across processes and runs)."""
    return zlib.crc32(":".join([str(SESSION_SEED), *map(str, parts)]).encode()) & 0x7FFFFFFF


def pytest_report_header(config):
    return (
        f"lfi_fast {lfi_fast.__version__}; test seed {SESSION_SEED} "
        f"(LFI_FAST_TEST_SEED={SESSION_SEED} reproduces); devices {DEVICES}; backends "
        + ", ".join(f"{d}: {backends_for(d)}" for d in DEVICES)
        + f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
    )


def pytest_configure(config):
    # geoopt's jit-scripted functions warn on every import under torch >= 2.10: noise, not signal.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script.*is deprecated:DeprecationWarning")
    # The Triton interpreter evaluates both sides of every tl.where with numpy (a branch that a
    # GPU also computes and discards), and numpy warns about the discarded side's 0/0 or overflow.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    # One seed for the hypothesis tests too, unless one was given on the command line.
    try:
        from hypothesis import core

        if config.getoption("hypothesis_seed", None) is None:
            core.global_force_seed = SESSION_SEED
    except ImportError:
        pass


@pytest.fixture
def seed(request) -> int:
    """This test's seed (printed, so a failure's captured output shows it)."""
    s = derive_seed(request.node.nodeid)
    print(f"seed {s} (session seed {SESSION_SEED})")
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU generator seeded with this test's seed. Draw on the CPU and move, so that a test's
    inputs are the same whatever the device."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _reproducible_global_rng(request):
    torch.manual_seed(derive_seed(request.node.nodeid, "global"))
    yield


@pytest.fixture(autouse=True)
def _restore_backend():
    """Each test starts on "auto" (whatever LFI_FAST_BACKEND says) and leaves no choice behind."""
    previous = lfi_fast.get_backend()
    lfi_fast.set_backend("auto")
    yield
    try:
        lfi_fast.set_backend(previous)
    except (ValueError, RuntimeError):  # LFI_FAST_BACKEND named a bad backend: keep "auto"
        pass
