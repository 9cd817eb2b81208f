"""The benchmark infrastructure: the results CSV (benchmarks/record.py), the timed session that
writes it (benchmarks/conftest.py), BENCHMARKS.md and the plots (benchmarks/report.py), and
`lfi-fast bench`.

No assertion here is about speed: the synthetic CSV's numbers are made up, and the one real session
runs the smallest case once only to see which rows it leaves.
"""
from __future__ import annotations

import csv
import importlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lfi_fast
from lfi_fast import cli

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture
def record(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("record")


@pytest.fixture
def report(record):
    return importlib.import_module("report")


# ---- the CSV writer ------------------------------------------------------------------------------

def _row(record, rng: random.Random, **kw) -> dict:
    """A complete row with distinct made-up numbers; keyword arguments override columns."""
    median = rng.uniform(0.1, 900.0)
    row = dict(
        run_id="run-b", date="2026-01-02T00:00:00+00:00", family="hyperbolic", op="mobius_add",
        provider="geoopt", anchor="geoopt", mode="forward", shape="262144x64", dtype="float32",
        device="cpu", device_name="Test CPU 9000", quick=False,
        median_ms=median, p20_ms=median * rng.uniform(0.8, 0.99),
        p80_ms=median * rng.uniform(1.01, 1.2),
        rounds=20, timer="pytest-benchmark", bytes_read=134217728, bytes_written=67108864,
        gbps=rng.uniform(0.5, 40.0), roofline_gbps=23.25, roofline_fraction=rng.uniform(0.01, 1.0),
        roofline_ref="copy case (same run)", peak_mem_mb=rng.uniform(0.0, 500.0),
        peak_mem_kind="rss-increase", lfi_fast_version="0.1.0", torch_version="2.13.0+cpu",
        git_sha="bbbbbbb", cpu_cores=2, threads=2,
    )
    assert set(row) == set(record.COLUMNS)
    row.update(kw)
    return row


def test_csv_header_append_only_and_quick_flag(record, tmp_path):
    rng = random.Random(0)
    path = tmp_path / "results" / "results.csv"
    assert record.append_rows(path, [_row(record, rng), _row(record, rng, quick=True)]) == 2
    first = path.read_bytes()
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == record.COLUMNS
    record.append_rows(path, [_row(record, rng, run_id="run-c")])
    assert path.read_bytes().startswith(first)  # old rows untouched
    rows = record.read_rows(path)
    assert [r["quick"] for r in rows] == ["false", "true", "false"]
    assert [r["run_id"] for r in rows] == ["run-b", "run-b", "run-c"]
    assert float(rows[0]["median_ms"]) > 0 and rows[0]["mode"] == "forward"


def test_csv_refuses_what_it_would_corrupt(record, tmp_path):
    rng = random.Random(1)
    path = tmp_path / "results.csv"
    with pytest.raises(ValueError, match="columns that results.csv does not"):
        record.append_rows(path, [{**_row(record, rng), "speed": 1.0}])
    with pytest.raises(ValueError, match="mode must be one of"):
        record.append_rows(path, [_row(record, rng, mode="fwd")])
    path.write_text("run_id,op\nx,y\n")
    with pytest.raises(ValueError, match="move the file aside"):
        record.append_rows(path, [_row(record, rng)])
    assert path.read_text() == "run_id,op\nx,y\n"


def test_a_case_that_could_not_be_recorded_fails_at_once(tmp_path):
    """A case whose row the CSV would refuse (here mode "rules") fails when it runs, untimed runs
    (CI's --benchmark-disable) included, not at the end of a long timed session that then loses
    every row."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    for mode, rc in (("rules", 1), ("forward", 0)):
        case = tmp_path / f"bench_{mode}.py"
        case.write_text(
            "import torch\n\n"
            "def test_case(measure):\n"
            "    x = torch.zeros(4)\n"
            "    measure(lambda: x + 1, op='copy', provider='torch-eager:copy',\n"
            f"            anchor='torch-eager:copy', mode={mode!r}, shape=x.shape, dtype=x.dtype,\n"
            "            bytes_read=16, bytes_written=16)\n")
        # benchmarks/conftest.py as a plugin: its fixtures and options for a file outside benchmarks/
        res = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", str(case), "-q",
                              "-p", "no:cacheprovider", "--benchmark-disable", "--quick",
                              "--device=cpu"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == rc, res.stdout + res.stderr
        if rc:
            assert "row mode must be one of" in res.stdout


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H200", 4800.0),
    ("NVIDIA A100-SXM4-80GB", 2000.0), ("NVIDIA A100 80GB PCIe", 2000.0),
    ("NVIDIA A100-SXM4-40GB", None), ("Tesla T4", None),
])
def test_gpu_peak_bandwidth_table(record, name, gbps):
    assert record.peak_bandwidth_gbps(name) == gbps


def test_roofline_reference(record):
    def rows():
        return [dict(op="copy", device="cpu", device_name="c", gbps=20.0),
                dict(op="dist", device="cpu", device_name="c", gbps=5.0),
                dict(op="dist", device="cuda", device_name="NVIDIA H200", gbps=2400.0),
                dict(op="dist", device="cuda", device_name="Some GPU", gbps=100.0)]

    r = rows()
    record.fill_roofline(r)
    assert [x["roofline_fraction"] for x in r] == [1.0, 0.25, 0.5, ""]
    assert r[1]["roofline_ref"] == "copy case (same run)"
    assert r[2]["roofline_ref"] == "GPU peak (table)"
    r = rows()[1:2]  # no copy case in the run: unknown
    record.fill_roofline(r)
    assert r[0]["roofline_fraction"] == ""
    record.fill_roofline(r, configured_gbps=10.0)
    assert r[0]["roofline_fraction"] == 0.5 and r[0]["roofline_ref"] == "configured peak"


# ---- the timed session ---------------------------------------------------------------------------

def _pytest_copy_case(tmp_path, *options):
    csv_path = tmp_path / "out" / "results.csv"
    cmd = [sys.executable, "-m", "pytest", str(BENCH / "bench_memory.py"), "--quick", "-q",
           "-p", "no:cacheprovider", f"--results-csv={csv_path}", "--device=cpu", *options]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return csv_path, res.stdout


def test_session_records_only_when_timed(record, tmp_path):
    csv_path, _ = _pytest_copy_case(tmp_path, "--benchmark-disable")
    assert not csv_path.exists()
    csv_path, out = _pytest_copy_case(tmp_path)
    [row] = record.read_rows(csv_path)
    assert "appended to" in out
    assert row["family"] == "memory" and row["op"] == "copy" and row["quick"] == "true"
    assert row["device"] == "cpu" and row["device_name"] == record.cpu_model()
    assert row["bytes_read"] == row["bytes_written"] == str(4096 * 16 * 4)
    assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert float(row["roofline_fraction"]) == pytest.approx(1.0)  # the copy is its own reference
    assert row["peak_mem_kind"] in record.PEAK_MEMORY_KINDS
    assert row["lfi_fast_version"] == lfi_fast.__version__ and row["git_sha"]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", row["run_id"])


# ---- BENCHMARKS.md and the plots -----------------------------------------------------------------

PROVIDERS = ("geoopt", "torch-eager:add", "lfi_fast:cpp", "lfi_fast:torch")


def _run(record, rng, run_id, date, sha, quick=False, device="cpu", name="Test CPU 9000",
         shapes=("262144x64",), marker=None):
    rows = []
    for op in ("mobius_add", "dist"):
        for mode in ("forward", "full"):
            for shape in shapes:
                for p in PROVIDERS:
                    if p.startswith("torch-eager") and mode != "forward":
                        continue
                    r = _row(record, rng, run_id=run_id, date=date, git_sha=sha, quick=quick, op=op,
                             mode=mode, provider=p, shape=shape, device=device, device_name=name)
                    if marker is not None:  # numbers that must never reach the page
                        r.update(median_ms=marker, p20_ms=marker, p80_ms=marker, gbps=marker)
                    rows.append(r)
    rows.append(_row(record, rng, run_id=run_id, date=date, git_sha=sha, quick=quick,
                     family="memory", op="copy", provider="torch-eager:copy",
                     anchor="torch-eager:copy", device=device, device_name=name))
    return rows


@pytest.fixture
def synthetic_csv(record, tmp_path):
    """An older and a newer full run and a newest quick run on a CPU, and a full run on a GPU."""
    rng = random.Random(2)
    old = _run(record, rng, "run-a", "2026-01-01T00:00:00+00:00", "aaaaaaa", marker=6666.25)
    new = _run(record, rng, "run-b", "2026-01-02T00:00:00+00:00", "bbbbbbb")
    quick = _run(record, rng, "run-c", "2026-01-03T00:00:00+00:00", "ccccccc", quick=True,
                 marker=7777.75)
    gpu = _run(record, rng, "run-d", "2026-01-02T12:00:00+00:00", "ddddddd", device="cuda",
               name="NVIDIA H100 80GB HBM3", shapes=("65536x64", "1048576x64"))
    path = tmp_path / "results" / "results.csv"
    record.append_rows(path, old + new + quick + gpu)
    return path


def _close_as_printed(cell: str, value: float) -> bool:
    """`cell` is `value` rounded to the decimals it shows."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def test_report_numbers_come_from_the_csv(record, report, synthetic_csv, tmp_path):
    md_path = tmp_path / "BENCHMARKS.md"
    report.generate(synthetic_csv, md_path, plots=False)
    md = md_path.read_text()
    csv_rows = record.read_rows(synthetic_csv)
    expected = [r for r in csv_rows if r["run_id"] in ("run-b", "run-d")]
    for sha in ("bbbbbbb", "ddddddd", "Test CPU 9000", "NVIDIA H100 80GB HBM3", "2.13.0+cpu"):
        assert sha in md
    for left_out in ("aaaaaaa", "ccccccc", "run-a", "run-c", "6666", "7777"):
        assert left_out not in md
    assert "make bench" in md and "lfi-fast bench --family hyperbolic" in md

    table_rows = []  # (device name of the section, table line)
    for line in md.splitlines():
        if line.startswith("## ") and line.endswith(")"):
            section = line[3:].rsplit(" (", 1)[0]
        elif line.startswith("| ") and not line.startswith("| op |"):
            table_rows.append((section, line))
    assert len(table_rows) == len(expected)
    for section, line in table_rows:
        op, mode, shape, dtype, provider, med, p20_80, up, gbps, roof, peak = \
            [c.strip() for c in line.strip("|").split("|")]
        key = (section, op, mode, shape, dtype)
        [r] = [r for r in expected if r["provider"] == provider and
               (r["device_name"], r["op"], r["mode"], r["shape"], r["dtype"]) == key]
        p20, p80 = p20_80.split("–")
        for cell, col in ((med, "median_ms"), (p20, "p20_ms"), (p80, "p80_ms"), (gbps, "gbps"),
                          (roof, "roofline_fraction"), (peak, "peak_mem_mb")):
            assert _close_as_printed(cell, float(r[col])), (line, col)
        [anchor] = [a for a in expected
                    if (a["run_id"], a["provider"]) == (r["run_id"], r["anchor"])
                    and (a["device_name"], a["op"], a["mode"], a["shape"], a["dtype"]) == key]
        assert _close_as_printed(up.rstrip("×"), float(anchor["median_ms"]) / float(r["median_ms"]))


def test_report_without_a_full_run(record, report, tmp_path):
    path = tmp_path / "results.csv"
    record.append_rows(path, _run(record, random.Random(3), "run-q", "2026-01-01T00:00:00+00:00",
                                  "ccccccc", quick=True))
    md_path = tmp_path / "BENCHMARKS.md"
    report.generate(path, md_path, plots=False)
    md = md_path.read_text()
    assert "No full run recorded yet" in md and "| op |" not in md
    report.generate(path, md_path, plots=False, include_quick=True)  # a preview, marked as such
    assert "do not quote" in md_path.read_text()


def test_plots(report, synthetic_csv, tmp_path):
    pytest.importorskip("matplotlib")
    written = report.generate(synthetic_csv, tmp_path / "BENCHMARKS.md", tmp_path / "plots")
    names = sorted(p.name for p in written[1:])
    assert "speedup-hyperbolic-test-cpu-9000-cpu-forward.png" in names
    assert "speedup-hyperbolic-nvidia-h100-80gb-hbm3-cuda-full.png" in names
    assert "size-hyperbolic-nvidia-h100-80gb-hbm3-cuda-forward.png" in names  # two sizes there
    assert not any(n.startswith("size-") and "cpu-9000" in n for n in names)  # one size there
    assert all(p.stat().st_size > 0 for p in written)
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "(plots/speedup-hyperbolic-test-cpu-9000-cpu-forward.png)" in md


# ---- lfi-fast bench ------------------------------------------------------------------------------

def test_bench_help():
    res = subprocess.run([sys.executable, "-m", "lfi_fast.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for opt in ("--family", "--quick", "--device", "--out"):
        assert opt in res.stdout


def test_bench_finds_the_checkout_or_says_why_not(monkeypatch, tmp_path, capsys):
    assert cli.benchmarks_dir() == BENCH
    installed = tmp_path / "site-packages" / "lfi_fast" / "__init__.py"  # no benchmarks/ beside it
    monkeypatch.setattr(lfi_fast, "__file__", str(installed))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="not shipped in the wheel"):
        cli.benchmarks_dir()
    assert cli.main(["bench", "--quick"]) == 1
    assert "not shipped in the wheel" in capsys.readouterr().err


def test_bench_rejects_an_unknown_family(capsys):
    assert cli.main(["bench", "--family", "nope"]) == 1
    assert "--family must be one of" in capsys.readouterr().err
