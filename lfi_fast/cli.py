"""The `lfi-fast` command.

    lfi-fast info      what is installed: version, backends (and why not), build details
    lfi-fast demo      the demo: lfi_fast's backends against geoopt on Möbius addition
    lfi-fast bench     the benchmark suite (a source checkout's benchmarks/): appends to
                       benchmarks/results/results.csv, writes the plots and BENCHMARKS.md

Exit codes: 0 success, 2 usage error, 1 failure (a one-line error on stderr; --debug for the
traceback).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


def _time_ms(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator, lazy imports, Triton compile)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_info(args: argparse.Namespace) -> int:
    import lfi_fast

    print(json.dumps(lfi_fast.info(), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Möbius addition on N x D points: time and error of each backend and of geoopt."""
    import torch

    import lfi_fast
    from lfi_fast import hyperbolic as hyp
    from lfi_fast.reference import hyperbolic as ref

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(args.seed)
    n, d, c = args.rows, args.dim, 1.0
    x = (torch.randn(n, d, generator=gen) * 0.6 / d**0.5).to(device)  # norms ~0.6: inside the ball
    y = (torch.randn(n, d, generator=gen) * 0.6 / d**0.5).to(device)
    g = torch.randn(n, d, generator=gen).to(device)
    exact = ref.mobius_add(x.double(), y.double(), c)

    def row_err(out: torch.Tensor) -> float:
        e = (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)
        return e.max().item()

    def fwd_bwd(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()

        def run() -> None:
            xr.grad = yr.grad = None
            fn(xr, yr).backward(g)

        return run

    providers: list[tuple[str, Callable]] = []
    try:
        import geoopt

        ball = geoopt.PoincareBall(c=c)
        providers.append(("geoopt", ball.mobius_add))
    except ImportError:
        print("(geoopt is not installed: no anchor)")
    for b in lfi_fast.available_backends():
        try:
            with lfi_fast.use_backend(b):
                lfi_fast._backend.resolve(device)
        except RuntimeError:
            continue  # a backend for another device
        if b == "triton" and device.type == "cpu":
            continue  # interpreted: correct, but no speed to show

        def op(a: torch.Tensor, bb: torch.Tensor, _b: str = b) -> torch.Tensor:
            with lfi_fast.use_backend(_b):
                return hyp.mobius_add(a, bb, c)

        providers.append((f"lfi_fast:{b}", op))

    print(f"Möbius addition, {n} x {d} float32 points on the Poincaré ball (c = {c}), {device}")
    header = f"{'provider':<18}{'forward ms':>12}{'fwd+bwd ms':>12}{'speed-up':>10}{'max rel err':>14}"
    print(header)
    print("-" * len(header))
    base = None
    for name, fn in providers:
        f_ms = _time_ms(lambda: fn(x, y), args.reps, sync)
        fb_ms = _time_ms(fwd_bwd(fn), args.reps, sync)
        base = base or fb_ms
        print(f"{name:<18}{f_ms:>12.2f}{fb_ms:>12.2f}{base / fb_ms:>9.1f}x{row_err(fn(x, y)):>14.2e}")
    print("speed-up: forward+backward time of the first row (the anchor) over this row's")
    return 0


# bench_memory.py's copy case is the CPU's bandwidth roofline: it runs whatever the families chosen.
ROOFLINE_FAMILY = "memory"


def benchmarks_dir() -> Path:
    """The benchmarks/ folder of the source checkout lfi_fast runs from (the wheel has none)."""
    import lfi_fast

    tried = [Path(lfi_fast.__file__).resolve().parent.parent / "benchmarks",
             Path.cwd() / "benchmarks"]
    for d in tried:
        if (d / "conftest.py").is_file() and any(d.glob("bench_*.py")):
            return d
    raise RuntimeError("no benchmarks/ folder found (the benchmarks are not shipped in the wheel): "
                       "run from a source checkout (installed with pip install -e ., or cd into "
                       f"it); looked in {', '.join(map(str, dict.fromkeys(tried)))}")


def cmd_bench(args: argparse.Namespace) -> int:
    """pytest benchmarks/bench_<family>.py (timed), then benchmarks/report.py on the CSV."""
    bench = benchmarks_dir()
    for module in ("pytest", "pytest_benchmark"):
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(f"{module} is not installed: pip install pytest pytest-benchmark")
    families = sorted(p.stem.removeprefix("bench_") for p in bench.glob("bench_*.py"))
    chosen = list(dict.fromkeys(args.family or families))
    unknown = [f for f in chosen if f not in families]
    if unknown:
        raise ValueError(f"--family must be one of {', '.join(families)} "
                         f"(got {', '.join(unknown)})")
    if ROOFLINE_FAMILY in families and ROOFLINE_FAMILY not in chosen:
        chosen.append(ROOFLINE_FAMILY)
    default_out = bench / "results"
    out = Path(args.out).resolve() if args.out else default_out
    csv_path = out / "results.csv"
    # The page of record is the checkout's; a run written elsewhere gets its own page there.
    md_path = bench.parent / "BENCHMARKS.md" if out == default_out else out / "BENCHMARKS.md"

    cmd = [sys.executable, "-m", "pytest", *(str(bench / f"bench_{f}.py") for f in chosen),
           "-p", "no:cacheprovider", "-q", f"--results-csv={csv_path}",
           "--benchmark-columns=median,iqr,rounds"]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--device", args.device] if args.device else []
    if args.k:  # the copy case stays: it is the roofline of the others
        keep = f" or bench_{ROOFLINE_FAMILY}" if ROOFLINE_FAMILY in chosen else ""
        cmd += ["-k", f"({args.k}){keep}"]
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=bench.parent)
    if rc == 5:
        raise RuntimeError("pytest collected no benchmark case (check --family and -k)")
    # The rows of the cases that ran are in the CSV even when some failed: report them.
    report = subprocess.call([sys.executable, str(bench / "report.py"), "--csv", str(csv_path),
                              "--md", str(md_path), "--plots", str(out)], cwd=bench.parent)
    if rc:
        print(f"lfi-fast bench: pytest exited with {rc}", file=sys.stderr)
    return rc or report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfi-fast", description="lfi_fast: fast latent-space interpretability")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="version, backends and build details (JSON)")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("demo", help="the demo: lfi_fast against geoopt on Möbius addition")
    s.add_argument("--rows", type=int, default=1 << 16)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--data", default="digits", help="data set for the methods (digits, mnist, fashion-mnist)")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser(
        "bench", help="run the benchmark suite; record, plot and tabulate the results",
        description="Run benchmarks/bench_<family>.py with pytest-benchmark (timed; the copy-"
                    "bandwidth case always runs too), append a row per case to OUT/results.csv, "
                    "then write the plots (OUT/*.png) and BENCHMARKS.md (the checkout's, or OUT's "
                    "when --out is given) from the CSV. Needs a source checkout: the benchmarks "
                    "are not in the wheel.")
    s.add_argument("--family", action="append", metavar="F",
                   help="a benchmarks/bench_F.py (hyperbolic, vq, gumbel, nuisance, methods, ...); "
                        "repeat for several; default: every one")
    s.add_argument("--quick", action="store_true",
                   help="small sizes (rows marked quick: kept out of BENCHMARKS.md)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="folder for results.csv and the plots (default: benchmarks/results)")
    s.add_argument("-k", default=None, metavar="EXPR", help="only the cases pytest -k EXPR selects")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # one line on stderr; the traceback only with --debug
        if args.debug:
            raise
        print(f"lfi-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
