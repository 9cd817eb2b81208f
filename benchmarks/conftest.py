"""pytest-benchmark suite of lfi_fast: every case times lfi_fast's backends next to an anchor.

    pytest benchmarks                               # full sizes (the issue targets); appends to
                                                    # benchmarks/results/results.csv
    pytest benchmarks --quick --benchmark-disable   # each case once, small (CI)
    pytest benchmarks --device cuda
    lfi-fast bench [--family F] [--quick]           # the same, then the plots and BENCHMARKS.md

Files: bench_<family>.py, one per op family (collected here although they are not test_*.py).
A case builds a zero-argument `run` and hands it to the `measure` fixture with what it is (op,
provider, mode, shape, dtype) and the bytes it must move; `measure` times it, measures its peak
memory and records a row. Providers say whose code runs: anchors by library (geoopt, torch-eager,
...) and ours as lfi_fast:<backend>. The family of a row is its file's name.

Timing: on the CPU, pytest-benchmark (the `benchmark` fixture, host clock); on CUDA, `timeit`
(triton.testing.do_bench, or CUDA events; the L2 cache is flushed between calls) and `rotating`
inputs when they would fit in L2. Under --benchmark-disable every case runs once, untimed, and
nothing is recorded. When timing is enabled, each case appends a row to the results CSV at the end
of the session (record.py: the columns; the CPU roofline is bench_memory.py's copy case of the same
session), and a table gives each provider's median, its speed-up over the group's anchor, GB/s, the
fraction of the bandwidth roofline and the ratio to the one-pass torch-eager op.
"""
from __future__ import annotations

import itertools
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest
import torch

import record

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "results.csv"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes: check the cases run")
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption("--results-csv", default=str(DEFAULT_CSV),
                     help="CSV the timed cases append to ('' records nothing); default %(default)s")
    parser.addoption("--peak-gbs", type=float, default=None,
                     help="memory bandwidth (GB/s) to compute the roofline fraction against, "
                          "instead of the copy case (CPU) or the GPU table")


def pytest_collect_file(file_path: Path, parent):
    """Collect bench_*.py of this folder (pytest's default pattern is test_*.py). Files named on
    the command line are collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == HERE and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


def lfi_backends(device: torch.device) -> list[str]:
    """lfi_fast backends that run natively on `device` (the Triton interpreter is not timed)."""
    import lfi_fast

    names = []
    for b in lfi_fast.available_backends():
        if b == "triton" and device.type != "cuda":
            continue
        try:
            with lfi_fast.use_backend(b):
                lfi_fast._backend.resolve(device)
        except RuntimeError:
            continue
        names.append(b)
    return names


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors occupy: what reading (or writing) each of them once moves."""
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- timing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int | None  # None when the timer does not say (do_bench)
    timer: str


def quantile(data: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's and torch.quantile's default)."""
    s = sorted(data)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(times_ms: Sequence[float], timer: str) -> Timing:
    return Timing(statistics.median(times_ms), quantile(times_ms, 0.2), quantile(times_ms, 0.8),
                  len(times_ms), timer)


def _rounds_for(call_s: float, target_s: float = 3.0, lo: int = 5, hi: int = 50) -> int:
    """Rounds for a stable median within about target_s."""
    return int(max(lo, min(hi, target_s / max(call_s, 1e-6))))


def _cuda_event_times(fn: Callable[[], object], device: torch.device) -> list[float]:
    """Per-call times (ms) from CUDA events, the L2 cache flushed before each call (as do_bench)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    n = _rounds_for(time.perf_counter() - t0, target_s=0.1, hi=1000)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def timeit(fn: Callable[[], object], device: torch.device | str | None = None) -> Timing:
    """Median, p20 and p80 of `fn`'s time per call, in ms.

    On CUDA: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]) when Triton is importable,
    else CUDA events; both flush the L2 cache between calls and never read a host clock without
    a synchronize. On the CPU: the host clock (prefer the `benchmark` fixture there).
    """
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                from triton.testing import do_bench
            except ImportError:
                return _summary(_cuda_event_times(fn, device), "cuda-events")
            med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return Timing(med, p20, p80, None, "triton.testing.do_bench")
    fn()
    t0 = time.perf_counter()
    fn()
    times = []
    for _ in range(_rounds_for(time.perf_counter() - t0)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, "perf_counter")


def input_copies(device: torch.device, working_set_bytes: int) -> int:
    """How many copies of a case's inputs to rotate among so that a call does not find them in the
    L2 cache where the previous call left them: enough to cover 4x the L2 on a GPU (at most 16);
    one on the CPU, where inputs at full size are far beyond the caches."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(4 * l2 / max(working_set_bytes, 1))))


def rotating(build: Callable[[], Callable[[], object]], device: torch.device,
             working_set_bytes: int) -> Callable[[], None]:
    """A run cycling among input_copies(...) runs, each made by `build()` with its own inputs."""
    runs = [build() for _ in range(input_copies(device, working_set_bytes))]
    if len(runs) == 1:
        return runs[0]
    cycle = itertools.cycle(runs)
    return lambda: next(cycle)()


# ---- peak memory ---------------------------------------------------------------------------------

def _proc_status_kb(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in keys}


def peak_memory(run: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Run once; return (MB, kind): the memory the call needed (record.PEAK_MEMORY_KINDS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6, "cuda-allocated-increase"
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kb("VmRSS")["VmRSS"]
    except (OSError, KeyError):
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 * (1 if sys.platform == "darwin" else 1024), "rss-process-peak"
    run()
    return (_proc_status_kb("VmHWM")["VmHWM"] - before) * 1024 / 1e6, "rss-increase"


# ---- measuring and recording a case --------------------------------------------------------------

_ROWS = pytest.StashKey[list]()  # the rows of this session, before the session's columns


def _shape_str(shape) -> str:
    return shape if isinstance(shape, str) else "x".join(str(s) for s in shape)


@pytest.fixture
def measure(benchmark, request, device, quick):
    """measure(run, *, op, provider, anchor, mode, shape, dtype, bytes_read, bytes_written):
    time `run` (a zero-argument callable doing one call of the case), and record it.

    bytes_read/bytes_written: what the op must move at least (inputs read, outputs written; for
    "full", the forward's plus the backward's), computed from the shapes and not from what a
    provider happens to do, so that GB/s and the roofline compare providers on the same work.
    """
    def measure_(run: Callable[[], object], *, op: str, provider: str, anchor: str, mode: str,
                 shape, dtype, bytes_read: int, bytes_written: int) -> None:
        shape, dtype = _shape_str(shape), str(dtype).removeprefix("torch.")
        case = dict(family=request.path.stem.removeprefix("bench_"), op=op, provider=provider,
                    anchor=anchor, mode=mode, shape=shape, dtype=dtype,
                    bytes_read=int(bytes_read), bytes_written=int(bytes_written))
        record.check_row(case)
        benchmark.group = f"{op} {mode} {shape} {dtype} {device.type}"
        benchmark.extra_info.update(case)
        if benchmark.disabled:  # run once, untimed, unrecorded
            benchmark.pedantic(run, rounds=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous error fails this case
            return
        t0 = time.perf_counter()
        mem_mb, mem_kind = peak_memory(run, device)  # one call: also the warm-up
        if device.type == "cuda":
            timing = timeit(run, device)
            benchmark._mode = "lfi_fast timeit"  # timed by CUDA events: the fixture is used (its
            # own stats would be the host clock's, so it gets none and pytest-benchmark lists none)
        else:
            rounds = 1 if quick else _rounds_for(time.perf_counter() - t0)
            benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
            timing = _summary([t * 1e3 for t in benchmark.stats.stats.data], "pytest-benchmark")
        moved = case["bytes_read"] + case["bytes_written"]
        request.config.stash.setdefault(_ROWS, []).append({
            **case, "date": record.utc_now(), "quick": quick,
            "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
            "rounds": timing.rounds, "timer": timing.timer,
            "gbps": moved / (timing.median_ms * 1e-3) / 1e9 if timing.median_ms > 0 else "",
            "peak_mem_mb": mem_mb, "peak_mem_kind": mem_kind,
        })

    return measure_


_SESSION_ROWS = pytest.StashKey[list]()  # the rows with every column, once computed
_WRITTEN = pytest.StashKey[str]()


def _session_rows(config) -> list[dict]:
    """This session's rows with the session's columns and the roofline filled in (computed once)."""
    if _SESSION_ROWS not in config.stash:
        rows = config.stash.get(_ROWS, [])
        if rows:
            env = record.environment(config.getoption("--device"), HERE)
            run_id = record.new_run_id()
            rows = [{**env, "run_id": run_id, **r} for r in rows]
            record.fill_roofline(rows, config.getoption("--peak-gbs"))
        config.stash[_SESSION_ROWS] = rows
    return config.stash[_SESSION_ROWS]


def pytest_sessionfinish(session, exitstatus):
    rows = _session_rows(session.config)
    path = session.config.getoption("--results-csv")
    if rows and path:
        try:
            record.append_rows(path, rows)
        except (OSError, ValueError) as e:  # timings that cannot be recorded fail the session
            session.config.stash[_WRITTEN] = f"results NOT recorded: {e}"
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        session.config.stash[_WRITTEN] = \
            f"{len(rows)} rows (run {rows[0]['run_id']}) appended to {path}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _session_rows(config)
    if not rows:
        return
    tr = terminalreporter
    tr.section("lfi_fast: median, speed-up over the anchor, GB/s, roofline, one-pass torch op")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["op"], r["mode"], r["shape"], r["dtype"]), []).append(r)
    for (family, *key), group in groups.items():
        by_prov = {r["provider"]: r for r in group}
        anchor = group[0]["anchor"]
        base = by_prov[anchor]["median_ms"] if anchor in by_prov else None
        eager = next((r["median_ms"] for p, r in by_prov.items()
                      if p.startswith("torch-eager:")), None)
        tr.write_line(f"{family}: {' '.join(key)}   (anchor: {anchor})")
        for r in sorted(group, key=lambda r: r["median_ms"]):
            med = r["median_ms"]
            speed = f"{base / med:8.2f}x" if base else " " * 9
            gbs = f"{r['gbps']:7.1f} GB/s" if r["gbps"] != "" else " " * 12
            roof = f"{r['roofline_fraction']:5.0%} roofline" if r["roofline_fraction"] != "" else ""
            vs = (f"{med / eager:6.2f}x torch-eager"
                  if eager and not r["provider"].startswith("torch-eager") else "")
            tr.write_line(f"    {r['provider']:<24}{med:10.3f} ms {speed} {gbs} {roof:>14}  {vs}")
    tr.write_line(config.stash.get(_WRITTEN, "results not recorded (--results-csv '')"))
