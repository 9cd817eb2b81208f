"""The results CSV of record: its columns, the facts a row states about the machine, and appending.

benchmarks/results/results.csv is append-only: each timed benchmark session (pytest-benchmark
enabled, i.e. not --benchmark-disable) appends one row per case and never rewrites old rows.
report.py reads it back to write BENCHMARKS.md and the plots. A row says what ran (family, op,
provider, mode, shape, dtype), where (device, device name, cores, versions, git sha), when (date,
run id shared by the rows of one session), whether it was a --quick run (such rows are not quoted),
and what was measured:

    median_ms, p20_ms, p80_ms   per call, from the raw per-round times
    bytes_read, bytes_written   what the case must move at least (inputs read, outputs written)
    gbps                        (bytes_read + bytes_written) / median
    roofline_gbps               the bandwidth the case is measured against (see roofline_ref:
                                the copy case of the same run, a configured peak, or the GPU's
                                peak from PEAK_BANDWIDTH_GBPS); empty when unknown
    roofline_fraction           gbps / roofline_gbps
    peak_mem_mb, peak_mem_kind  memory of one call and what it is (PEAK_MEMORY_KINDS)

Plain functions with no pytest in them: conftest.py, report.py and the tests use them.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

COLUMNS = (
    "run_id", "date", "family", "op", "provider", "anchor", "mode", "shape", "dtype",
    "device", "device_name", "quick",
    "median_ms", "p20_ms", "p80_ms", "rounds", "timer",
    "bytes_read", "bytes_written", "gbps", "roofline_gbps", "roofline_fraction", "roofline_ref",
    "peak_mem_mb", "peak_mem_kind",
    "lfi_fast_version", "torch_version", "git_sha", "cpu_cores", "threads",
)
MODES = ("forward", "backward", "full")

# What peak_mem_mb means: the increase during one call of the case (CUDA allocator, or resident
# memory after resetting the kernel's high-water mark), or the process's peak RSS when the
# high-water mark cannot be reset (then it is an upper bound that includes everything before).
PEAK_MEMORY_KINDS = {
    "cuda-allocated-increase": "increase of torch.cuda.max_memory_allocated during one call",
    "rss-increase": "increase of resident memory (VmHWM over VmRSS before) during one call",
    "rss-process-peak": "peak resident memory of the whole process (VmHWM / ru_maxrss)",
}

# Peak memory bandwidth of known GPUs, GB/s, matched against torch.cuda.get_device_name() by
# substrings (all must appear; the first entry that matches wins, so the specific ones come first).
PEAK_BANDWIDTH_GBPS = (
    (("H100", "PCIe"), 2000.0),
    (("H100",), 3350.0),  # SXM (HBM3): "NVIDIA H100 80GB HBM3"
    (("H200",), 4800.0),
    (("A100", "80GB"), 2000.0),
)


def new_run_id() -> str:
    """The id shared by the rows of one session: UTC time and a random suffix."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    """What a row calls the hardware: the GPU's name on CUDA, the CPU model otherwise."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def peak_bandwidth_gbps(name: str) -> float | None:
    """The GPU's peak memory bandwidth from PEAK_BANDWIDTH_GBPS, or None when it is not listed."""
    for keys, gbps in PEAK_BANDWIDTH_GBPS:
        if all(k.lower() in name.lower() for k in keys):
            return gbps
    return None


def git_sha(where: str | os.PathLike) -> str:
    """`git rev-parse --short HEAD` of the checkout holding `where`, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(device, where: str | os.PathLike) -> dict[str, object]:
    """The columns every row of a session shares, except run_id and quick."""
    import torch

    import lfi_fast

    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "lfi_fast_version": lfi_fast.__version__,
        "torch_version": torch.__version__,
        "git_sha": git_sha(where),
        "cpu_cores": os.cpu_count() or "",
        "threads": torch.get_num_threads(),
    }


def fill_roofline(rows: list[dict], configured_gbps: float | None = None) -> None:
    """Set roofline_gbps, roofline_fraction and roofline_ref of each row, in place.

    The reference bandwidth, first found: a configured peak (--peak-gbs); on a GPU, its peak from
    PEAK_BANDWIDTH_GBPS; on the CPU, the copy case (op "copy") of the same rows on the same device.
    Rows for which none is known keep the three columns empty.
    """
    copy_gbps = {}
    for r in rows:
        if r["op"] == "copy" and r.get("gbps"):
            copy_gbps[(r["device"], r["device_name"])] = float(r["gbps"])
    for r in rows:
        ref, src = None, ""
        if configured_gbps:
            ref, src = configured_gbps, "configured peak"
        elif r["device"] == "cuda":
            ref, src = peak_bandwidth_gbps(r["device_name"]), "GPU peak (table)"
        else:
            ref, src = copy_gbps.get((r["device"], r["device_name"])), "copy case (same run)"
        if ref and r.get("gbps"):
            r.update(roofline_gbps=ref, roofline_fraction=float(r["gbps"]) / ref, roofline_ref=src)
        else:
            r.update(roofline_gbps="", roofline_fraction="", roofline_ref="")


def _cell(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # full precision: the report rounds, the CSV does not
    return "" if v is None else str(v)


def check_row(r: Mapping[str, object]) -> None:
    """A ValueError when a row (or a case's first columns) could not be appended to the CSV:
    the measuring fixture calls this before timing, so a bad case fails at once, untimed runs
    (CI's --benchmark-disable) included, instead of losing a whole session's rows at its end."""
    unknown = set(r) - set(COLUMNS)
    if unknown:
        raise ValueError(f"row has columns that results.csv does not: {sorted(unknown)}")
    if r.get("mode") not in MODES:
        raise ValueError(f"row mode must be one of {MODES} (got {r.get('mode')!r})")


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> int:
    """Append rows to the CSV at `path` (created with a header if missing); returns how many.

    Old rows are never rewritten. A file whose header is not COLUMNS is an error, not something
    to convert silently: move it aside (or convert it) and rerun.
    """
    rows = list(rows)
    path = Path(path)
    for r in rows:
        check_row(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, this version writes {list(COLUMNS)}: "
                             "move the file aside (or convert it) and rerun")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return len(rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results CSV as dicts of strings (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
