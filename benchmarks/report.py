"""BENCHMARKS.md and the plots, generated from the results CSV (record.py) and nothing else.

    python benchmarks/report.py [--csv PATH] [--md PATH] [--plots DIR] [--include-quick]

For each device in the CSV and each family run on it, the latest run that covered the family
gives a table (op, mode, shape, dtype, provider, median and p20-p80 ms, speed-up over the anchor,
GB/s, fraction of the bandwidth roofline, peak memory) with the hardware, date and git sha it came
from. Every number printed is a CSV value, rounded, or the ratio of two (speed-up: anchor median
over provider median, same run and group). Rows of --quick runs are left out (small sizes that
only check the cases run) unless --include-quick, which is for trying the pipeline, not for
publishing.

Plots (PNG, in --plots): per family, device and mode, a bar chart of each provider's speed-up over
the anchor per op (speedup-*.png); and where an op was run at several sizes, its time against size
(size-*.png).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # record.py, also when run as a script

import record  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "results.csv"
DEFAULT_MD = HERE.parent / "BENCHMARKS.md"
NONE = "—"

Row = dict  # a CSV row: column -> string


# ---- choosing rows -------------------------------------------------------------------------------

def _is_quick(row: Row) -> bool:
    return row["quick"].strip().lower() in ("true", "1", "yes")


def latest_runs(rows: list[Row],
                include_quick: bool = False) -> dict[tuple[str, str, str], list[Row]]:
    """(device, device_name, family) -> the rows of the latest run of that family on that device.

    Runs are ordered by their last row's date (UTC ISO: ordered as strings). Quick rows are ignored
    unless include_quick.
    """
    runs: dict[tuple[str, str, str], dict[str, list[Row]]] = {}
    for r in rows:
        if include_quick or not _is_quick(r):
            key = (r["device"], r["device_name"], r["family"])
            runs.setdefault(key, {}).setdefault(r["run_id"], []).append(r)
    return {key: max(by_run.values(), key=lambda rs: max(r["date"] for r in rs))
            for key, by_run in sorted(runs.items())}


def _groups(rows: list[Row]) -> dict[tuple[str, str, str, str], list[Row]]:
    """(op, mode, shape, dtype) -> rows, ops in the order they were run, providers anchor first."""
    def provider_rank(r: Row) -> tuple:
        p = r["provider"]
        return (p != r["anchor"], not p.startswith("torch-eager"), p)

    op_order = {op: i for i, op in reversed(list(enumerate(r["op"] for r in rows)))}
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in sorted(rows, key=lambda r: (op_order[r["op"]], record.MODES.index(r["mode"]),
                                         _numel(r["shape"]), r["dtype"], provider_rank(r))):
        groups.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), []).append(r)
    return groups


def speedup(row: Row, group: list[Row]) -> float | None:
    """The anchor's median over this row's, within the group (same run, op, mode, shape, dtype)."""
    anchor = next((r for r in group if r["provider"] == row["anchor"]), None)
    if anchor is None or not anchor["median_ms"] or not row["median_ms"]:
        return None
    return float(anchor["median_ms"]) / float(row["median_ms"])


def _numel(shape: str) -> int:
    dims = [int(d) for d in re.findall(r"\d+", shape.split(",")[0])]
    return math.prod(dims) if dims else 0


# ---- numbers as printed --------------------------------------------------------------------------

def fmt_sig(v: str | float | None, digits: int = 4) -> str:
    """`digits` significant digits, never in exponent notation; NONE for a missing value."""
    if v in (None, ""):
        return NONE
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def fmt_fixed(v: str | float | None, decimals: int) -> str:
    return NONE if v in (None, "") else f"{float(v):.{decimals}f}"


# ---- BENCHMARKS.md -------------------------------------------------------------------------------

TABLE_HEADER = ("| op | mode | shape | dtype | provider | median ms | p20–p80 ms | speed-up | GB/s "
                "| roofline | peak MB |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")


def table(rows: list[Row]) -> str:
    lines = [TABLE_HEADER]
    for (op, mode, shape, dtype), group in _groups(rows).items():
        for r in group:
            s = speedup(r, group)
            lines.append("| " + " | ".join([
                op, mode, shape, dtype, r["provider"], fmt_sig(r["median_ms"]),
                f"{fmt_sig(r['p20_ms'])}–{fmt_sig(r['p80_ms'])}",
                NONE if s is None else f"{s:.2f}×",
                fmt_fixed(r["gbps"], 1), fmt_fixed(r["roofline_fraction"], 2),
                fmt_fixed(r["peak_mem_mb"], 1),
            ]) + " |")
    return "\n".join(lines)


def _distinct(rows: list[Row], col: str) -> str:
    return ", ".join(dict.fromkeys(r[col] for r in rows if r[col])) or NONE


def run_line(rows: list[Row]) -> str:
    """Where and when a run's rows come from: run id, date, git sha, versions, hardware."""
    r = rows[0]
    dates = sorted(x["date"] for x in rows)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    roof = ", ".join(dict.fromkeys(f"{fmt_fixed(x['roofline_gbps'], 1)} GB/s, {x['roofline_ref']}"
                                   for x in rows if x["roofline_ref"])) or "unknown"
    mem = "; ".join(record.PEAK_MEMORY_KINDS.get(k, k)
                    for k in dict.fromkeys(x["peak_mem_kind"] for x in rows if x["peak_mem_kind"]))
    quick = any(_is_quick(x) for x in rows) * " **--quick run: small sizes, do not quote.**"
    return (f"Run `{r['run_id']}`, {when}, git `{r['git_sha']}`, "
            f"lfi_fast {r['lfi_fast_version']}, torch {r['torch_version']}; {r['device_name']} "
            f"({r['device']}), {r['cpu_cores']} CPU cores, {r['threads']} torch threads. "
            f"Timer: {_distinct(rows, 'timer')}. Anchor: {_distinct(rows, 'anchor')}. "
            f"Roofline: {roof}. Peak memory: {mem or NONE}.{quick}")


def markdown(rows: list[Row], csv_path: Path, md_path: Path, plots: dict[tuple, list[Path]],
             include_quick: bool = False) -> str:
    """BENCHMARKS.md's text. plots: (device, device_name, family) -> PNG files to show there."""
    csv_rel = os.path.relpath(csv_path, md_path.parent)
    runs = latest_runs(rows, include_quick)
    out = [
        "# Benchmarks",
        "",
        f"<!-- generated by benchmarks/report.py from {csv_rel}: do not edit by hand -->",
        "",
        f"Generated from [`{csv_rel}`]({csv_rel}), the append-only record of every timed run. "
        "Every number here is a value of that file, rounded, or the ratio of two of them. For each "
        "device and op family: the latest full-size run"
        + (" (quick runs included: a preview, not for quoting)" if include_quick else
           "; rows of `--quick` runs (small sizes that only check the cases run) are left out")
        + ".",
        "",
        "## How to reproduce",
        "",
        "```sh",
        "make bench                              # every family on this machine's default device",
        "lfi-fast bench --family hyperbolic      # one family (--device cuda on a GPU): appends",
        "                                        # to the CSV, rewrites the plots and this page",
        "python benchmarks/report.py             # this page and the plots from the CSV alone",
        "```",
        "",
        "Columns: *median ms*, *p20–p80 ms*: time per call (forward: the op; full: forward and "
        "backward). *speed-up*: the anchor's median over this median, same run and shape. "
        "*GB/s*: the bytes the op must move at least (inputs read, outputs written; full adds the "
        "backward's) over the median. *roofline*: GB/s over the reference bandwidth (the copy "
        "case of the same run on the CPU; the GPU's peak bandwidth on a GPU). *peak MB*: the "
        "memory one call needs (kind in each run's line). — : not measured or not known.",
    ]
    if not runs:
        out += ["", "**No full run recorded yet.** Run `make bench` (or `lfi-fast bench`) on a "
                "quiet machine: the results are appended to the CSV and this page is regenerated."]
    for device_key in dict.fromkeys(k[:2] for k in runs):
        out += ["", f"## {device_key[1]} ({device_key[0]})"]
        for key, run_rows in runs.items():
            if key[:2] != device_key:
                continue
            out += ["", f"### {key[2]}", "", run_line(run_rows), "", table(run_rows)]
            for png in plots.get(key, []):
                rel = os.path.relpath(png, md_path.parent)
                out += ["", f"![{png.stem}]({rel})"]
    return "\n".join(out) + "\n"


# ---- plots ---------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_plots(rows: list[Row], plots_dir: Path,
                include_quick: bool = False) -> dict[tuple, list[Path]]:
    """Write the PNGs of the latest runs; returns (device, device_name, family) -> files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written: dict[tuple, list[Path]] = {}
    for key, run_rows in latest_runs(rows, include_quick).items():
        device, name, family = key
        for mode in record.MODES:
            groups = {k: g for k, g in _groups(run_rows).items() if k[1] == mode}
            if not groups:
                continue
            stem = f"{family}-{_slug(name)}-{device}-{mode}"
            png = _speedup_chart(plt, groups, f"{family} {mode}, {name} ({device})",
                                 plots_dir / f"speedup-{stem}.png")
            if png:
                written.setdefault(key, []).append(png)
            png = _size_chart(plt, groups, f"{family} {mode}, {name} ({device})",
                              plots_dir / f"size-{stem}.png")
            if png:
                written.setdefault(key, []).append(png)
    return written


def _series(provider: str) -> str:
    """The bar series of a provider: the one-pass torch-eager ops (add, mul, ...) share one."""
    return "torch-eager:* (one-pass op)" if provider.startswith("torch-eager:") else provider


def _speedup_chart(plt, groups: dict[tuple, list[Row]], title: str, path: Path) -> Path | None:
    """Bars: each provider's speed-up over the anchor per op (and shape, when there are several)."""
    several_shapes = len({(op, shape) for op, _, shape, _ in groups}) > len({k[0] for k in groups})
    labels, bars = [], {}  # provider -> speed-up per label
    for (op, _, shape, dtype), group in groups.items():
        ups = {_series(r["provider"]): speedup(r, group)
               for r in group if r["provider"] != r["anchor"]}
        if not any(v is not None for v in ups.values()):
            continue
        labels.append(f"{op}\n{shape}" if several_shapes else op)
        for p, v in ups.items():
            bars.setdefault(p, {})[labels[-1]] = v
    if not labels:
        return None
    anchor = next(iter(groups.values()))[0]["anchor"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(bars)) / 2), 4.5))
    width = 0.8 / len(bars)
    for i, (p, vals) in enumerate(sorted(bars.items())):
        offset = (i - (len(bars) - 1) / 2) * width
        xs = [j + offset for j, lab in enumerate(labels) if vals.get(lab)]
        ax.bar(xs, [vals[lab] for lab in labels if vals.get(lab)], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"speed-up over {anchor} (median)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _size_chart(plt, groups: dict[tuple, list[Row]], title: str, path: Path) -> Path | None:
    """Median (p20-p80 bars) against elements, per op run at several sizes; None when none was."""
    by_op: dict[tuple[str, str], list[Row]] = {}
    for (op, _, _, dtype), group in groups.items():
        by_op.setdefault((op, dtype), []).extend(group)
    by_op = {k: v for k, v in by_op.items() if len({r["shape"] for r in v}) > 1}
    if not by_op:
        return None
    fig, axes = plt.subplots(1, len(by_op), figsize=(4.5 * len(by_op), 4), squeeze=False)
    for ax, ((op, dtype), op_rows) in zip(axes[0], by_op.items()):
        for p in dict.fromkeys(r["provider"] for r in op_rows):
            pts = sorted((_numel(r["shape"]), float(r["median_ms"]), float(r["p20_ms"]),
                          float(r["p80_ms"])) for r in op_rows if r["provider"] == p)
            xs, med, lo, hi = zip(*pts)
            err = [[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=2, label=p)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        shapes = {_numel(r["shape"]): r["shape"] for r in op_rows}
        ax.set_xticks(list(shapes), list(shapes.values()), rotation=30, fontsize=7)
        ax.set_xlabel("shape (log of elements)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line --------------------------------------------------------------------------------

def generate(csv_path: Path = DEFAULT_CSV, md_path: Path = DEFAULT_MD,
             plots_dir: Path | None = None, include_quick: bool = False,
             plots: bool = True) -> list[Path]:
    """Write the plots and the Markdown page from the CSV; returns the files written."""
    rows = record.read_rows(csv_path)
    pngs: dict[tuple, list[Path]] = {}
    if plots:
        try:
            pngs = write_plots(rows, plots_dir or csv_path.parent, include_quick)
        except ImportError:
            print("matplotlib is not installed: no plots written", file=sys.stderr)
    md_path.write_text(markdown(rows, csv_path, md_path, pngs, include_quick))
    return [md_path] + [p for ps in pngs.values() for p in ps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV,
                   help="results CSV (default %(default)s)")
    p.add_argument("--md", type=Path, default=DEFAULT_MD,
                   help="page to write (default %(default)s)")
    p.add_argument("--plots", type=Path, default=None,
                   help="folder for the PNGs (default: the CSV's)")
    p.add_argument("--no-plots", action="store_true", help="write the page only")
    p.add_argument("--include-quick", action="store_true",
                   help="include --quick runs (to try the pipeline; not for publishing)")
    args = p.parse_args(argv)
    for path in generate(args.csv, args.md, args.plots, args.include_quick, not args.no_plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
