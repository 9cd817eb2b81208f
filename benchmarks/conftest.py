"""pytest-benchmark suite of lfi_fast: every case times lfi_fast's backends next to an anchor.

    pytest benchmarks                          # full sizes (the issue targets)
    pytest benchmarks --quick --benchmark-disable   # each case once, small: CI keeps it from rotting
    pytest benchmarks --device cuda

Cases are grouped "<op> <mode> <shape> <dtype>"; providers say whose code runs: anchors by
library (geoopt, torch-eager, ...) and ours as lfi_fast:<backend>. At the end a table gives each
provider's median and its speed-up over the group's anchor.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes: check the cases run")
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    groups: dict[str, dict[str, tuple[float, float]]] = {}
    anchors: dict[str, str] = {}
    for b in bs.benchmarks:
        if b.stats is None:
            continue
        prov = b.extra_info.get("provider", b.name)
        groups.setdefault(b.group, {})[prov] = (b.stats.median, b.extra_info.get("bytes", 0))
        if b.extra_info.get("anchor"):
            anchors[b.group] = b.extra_info["anchor"]
    tr = terminalreporter
    tr.section("lfi_fast: median, speed-up over the anchor, ratio to the one-pass torch op")
    for group, rows in groups.items():
        anchor = anchors.get(group)
        base = rows.get(anchor, (None,))[0]
        eager = next((t for p, (t, _) in rows.items() if p.startswith("torch-eager:")), None)
        tr.write_line(f"{group}   (anchor: {anchor})")
        for prov, (med, nbytes) in sorted(rows.items(), key=lambda kv: kv[1][0]):
            speed = f"{base / med:8.2f}x" if base else " " * 9
            vs_eager = f"{med / eager:6.2f}x torch-eager" if eager and not prov.startswith("torch-eager") else ""
            gbs = f"{nbytes / med / 1e9:7.1f} GB/s in" if nbytes else ""
            tr.write_line(f"    {prov:<24}{med * 1e3:10.2f} ms {speed}  {gbs}  {vs_eager}")
