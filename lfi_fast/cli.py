"""The `lfi-fast` command.

    lfi-fast info      what is installed: version, backends (and why not), build details
    lfi-fast demo      the demo: lfi_fast's backends against geoopt on Möbius addition

Exit codes: 0 success, 2 usage error, 1 failure (a one-line error on stderr; --debug for the
traceback).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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
