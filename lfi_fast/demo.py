"""`lfi-fast demo` (what `make demo` runs): train each explanation method on a data set (the
embedded digits by default), explain its whole test split in batches through the same sharded,
verified path as `lfi-fast explain`, and write a report folder:

    OUT/index.html            metrics tables and figures, one section per method
    OUT/metrics.json          every method's metrics, timings and status
    OUT/<method>/             checkpoint/, explanations/ (shards, manifest, merged.safetensors),
                              metrics.json, the method's PNG figures, explanations.png
    OUT/kernels.json          Möbius addition: lfi_fast's backends against geoopt

A method whose module is not in this build is reported as missing (not an error); a method that
fails is reported with its error, the others still run, and the command exits with 1.
"""
from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import batch
from .cli import UsageError, _progress, explain_method, resolve_device, train_method


def kernel_timings(rows: int = 1 << 16, dim: int = 64, reps: int = 5, device="cpu", seed: int = 0) -> list[dict]:
    """Möbius addition on rows x dim points: forward and forward+backward median ms and the max
    row-relative error against a float64 reference, for geoopt (the anchor) and each backend."""
    import torch

    import lfi_fast
    from lfi_fast import hyperbolic as hyp
    from lfi_fast.reference import hyperbolic as ref

    from .cli import _time_ms

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=gen) * 0.6 / dim**0.5).to(device)  # inside the ball
    y = (torch.randn(rows, dim, generator=gen) * 0.6 / dim**0.5).to(device)
    g = torch.randn(rows, dim, generator=gen).to(device)
    exact = ref.mobius_add(x.double(), y.double(), 1.0)

    def row_err(out: torch.Tensor) -> float:
        e = (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)
        return e.max().item()

    def fwd_bwd(fn):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()

        def run() -> None:
            xr.grad = yr.grad = None
            fn(xr, yr).backward(g)

        return run

    providers = []
    try:
        import geoopt

        providers.append(("geoopt", geoopt.PoincareBall(c=1.0).mobius_add))
    except ImportError:
        pass
    for b in lfi_fast.available_backends():
        try:
            with lfi_fast.use_backend(b):
                lfi_fast._backend.resolve(device)
        except RuntimeError:
            continue  # a backend for another device
        if b == "triton" and device.type == "cpu":
            continue  # interpreted: correct, but no speed to show

        def op(a, bb, _b=b):
            with lfi_fast.use_backend(_b):
                return hyp.mobius_add(a, bb, 1.0)

        providers.append((f"lfi_fast:{b}", op))
    out, base = [], None
    for name, fn in providers:
        f_ms = _time_ms(lambda: fn(x, y), reps, sync)
        fb_ms = _time_ms(fwd_bwd(fn), reps, sync)
        base = base or fb_ms
        out.append({"provider": name, "forward_ms": f_ms, "fwd_bwd_ms": fb_ms,
                    "speedup": base / fb_ms, "max_rel_err": row_err(fn(x, y)),
                    "shape": f"{rows}x{dim}", "device": str(device)})
    return out


# ---- the report ----------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.missing{color:#8a6d00}.failed{color:#b00020}.ok{color:#1b7f3a}img{max-width:100%;border:1px solid
#eee;margin:.3em 0}figure{margin:0 0 1em}figcaption{font-size:.9em;color:#555}pre{background:#f8f8f8;
padding:.5em;overflow:auto;font-size:.85em}"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td class='{'n' if isinstance(r.get(c), (int, float)) else ''}'>"
                         f"{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out: Path, doc: dict) -> Path:
    """OUT/index.html from the demo's metrics document (what OUT/metrics.json holds)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lfi_fast demo: "
             f"{html.escape(doc['data'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>lfi_fast demo on {html.escape(doc['data'])}</h1>",
             f"<p>lfi_fast {html.escape(doc['version'])}, torch {html.escape(doc['torch'])}, device "
             f"{html.escape(doc['device'])}, seed {doc['seed']}; {doc['total_seconds']:.1f} s in all"
             f"{' (still running)' if not doc.get('finished') else ''}.</p>"]
    summary = []
    for r in doc["methods"]:
        summary.append({"method": r["method"], "status": r["status"],
                        "train s": r.get("metrics", {}).get("train_seconds", ""),
                        "explained": r.get("explained", ""), "explain s": r.get("explain_seconds", ""),
                        "examples/s": r.get("examples_per_second", ""), "note": r.get("error", "")})
    parts.append("<h2>Summary</h2>" + _table(summary, ["method", "status", "train s", "explained",
                                                       "explain s", "examples/s", "note"]))
    for r in doc["methods"]:
        m = html.escape(r["method"])
        parts.append(f"<h2 id='{m}'>{m} <span class='{r['status']}'>({r['status']})</span></h2>")
        if r["status"] == "missing":
            parts.append(f"<p class='missing'>Not available in this build: {html.escape(r['error'])}</p>")
            continue
        if r["status"] == "failed":
            parts.append(f"<p class='failed'>Failed: {html.escape(r['error'])}</p>")
            if r.get("traceback"):
                parts.append(f"<pre>{html.escape(r['traceback'])}</pre>")
        if r.get("metrics"):
            rows = [{"metric": k, "value": v} for k, v in r["metrics"].items()]
            parts.append("<h3>Metrics (test split)</h3>" + _table(rows, ["metric", "value"]))
        if r.get("explanations"):
            parts.append(f"<p>Explanations of {r['explained']} test examples: "
                         f"<code>{html.escape(r['explanations'])}</code> (merged.safetensors; "
                         "shards and manifest.jsonl beside it).</p>")
        for f in r.get("figures", []):
            parts.append(f"<figure><img src='{html.escape(f)}' alt='{html.escape(f)}'>"
                         f"<figcaption>{html.escape(f)}</figcaption></figure>")
    if doc.get("kernels"):
        parts.append("<h2>Kernels: Möbius addition</h2><p>forward and forward+backward median "
                     "times; speed-up against the first row (the anchor); error against float64.</p>")
        parts.append(_table(doc["kernels"], ["provider", "shape", "device", "forward_ms",
                                             "fwd_bwd_ms", "speedup", "max_rel_err"]))
    elif doc.get("kernels_error"):
        parts.append(f"<h2>Kernels</h2><p class='failed'>{html.escape(doc['kernels_error'])}</p>")
    parts.append("</body></html>\n")
    path = out / "index.html"
    path.write_text("".join(parts))
    return path


def _save(out: Path, doc: dict) -> None:
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    write_report(out, doc)


def _run_method(method: str, args: argparse.Namespace, out: Path, device, progress: bool) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    mdir = out / method
    for stale in ("checkpoint", "explanations"):
        shutil.rmtree(mdir / stale, ignore_errors=True)  # a new checkpoint: a new run
    mdir.mkdir(parents=True, exist_ok=True)
    r: dict = {"method": method, "status": "ok"}
    t0 = time.perf_counter()
    tr = train_method(method, args.data, mdir / "checkpoint", data_dir=args.data_dir,
                      epochs=args.epochs, limit=args.limit, device=device, seed=args.seed,
                      num_workers=args.num_workers, progress=progress,
                      method_modules=args.method_module)
    r["metrics"] = tr["metrics"]
    (mdir / "metrics.json").write_text(json.dumps(tr["metrics"], indent=2, sort_keys=True) + "\n")
    explainer, test_loader = tr["explainer"], tr["test_loader"]
    figures = [Path(p) for p in explainer.report(test_loader, mdir)]
    # a few explanations, drawn by the result's own plot()
    x, _ = next(iter(test_loader))
    k = min(8, len(x))
    fig = explainer.explain(x[:k].to(device), seed=args.seed, index=torch.arange(k)).plot()
    fig.savefig(mdir / "explanations.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    figures.append(mdir / "explanations.png")
    r["figures"] = [str(p.resolve().relative_to(out.resolve())) for p in figures]
    # the whole test split, through lfi-fast explain's path (the saved checkpoint, reloaded)
    ex = explain_method(method, mdir / "checkpoint", args.data, mdir / "explanations",
                        data_dir=args.data_dir, batch_size=args.batch_size, limit=args.limit,
                        device=device, seed=args.seed, num_workers=args.num_workers,
                        progress=progress, method_modules=args.method_module)
    s = ex["summary"]
    r["explained"] = ex["merged"]["count"]
    r["explain_seconds"] = s.seconds
    r["examples_per_second"] = s.explained / s.seconds if s.seconds > 0 else 0.0
    r["explanations"] = str((mdir / "explanations" / batch.MERGED).relative_to(out))
    r["seconds"] = time.perf_counter() - t0
    return r


def run_demo(args: argparse.Namespace) -> int:
    import torch

    import lfi_fast

    t_start = time.perf_counter()
    progress = _progress(args)
    device = resolve_device(args.device)
    known = batch.method_names(args.method_module)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(known)
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UsageError(f"--methods must name some of {', '.join(known)} (got {args.methods!r})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"data": args.data, "version": lfi_fast.__version__, "torch": torch.__version__,
           "device": str(device), "seed": args.seed, "epochs": args.epochs, "limit": args.limit,
           "methods": [], "total_seconds": 0.0, "finished": False}
    failed = []
    for method in methods:
        print(f"== {method}", flush=True)
        try:
            batch.method_module(method, args.method_module)
        except batch.MethodUnavailable as e:
            r = {"method": method, "status": "missing", "error": str(e)}
        except Exception as e:  # the module exists but does not import
            r = {"method": method, "status": "failed", "error": f"import failed: {e}",
                 "traceback": traceback.format_exc()}
        else:
            try:
                r = _run_method(method, args, out, device, progress)
            except Exception as e:
                r = {"method": method, "status": "failed", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}
        if r["status"] == "failed":
            failed.append(method)
        print(f"   {r['status']}" + (f": {r['error']}" if "error" in r else
                                     f" in {r['seconds']:.1f} s: " + ", ".join(
                                         f"{k} {v:.4g}" for k, v in r["metrics"].items())), flush=True)
        doc["methods"].append(r)
        doc["total_seconds"] = time.perf_counter() - t_start
        _save(out, doc)
    if not args.no_kernels:
        try:
            doc["kernels"] = kernel_timings(reps=3, device="cuda" if device.type == "cuda" else "cpu",
                                            seed=args.seed)
            (out / "kernels.json").write_text(json.dumps(doc["kernels"], indent=2) + "\n")
        except Exception as e:
            doc["kernels_error"] = f"{type(e).__name__}: {e}"
    doc["total_seconds"] = time.perf_counter() - t_start
    doc["finished"] = True
    _save(out, doc)
    print(f"report: {out / 'index.html'} ({doc['total_seconds']:.1f} s)")
    if failed:
        print(f"lfi-fast demo: error: {', '.join(failed)} failed (see {out / 'index.html'})",
              file=sys.stderr)
        return 1
    return 0
