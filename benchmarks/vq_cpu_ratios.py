"""Interleaved, same-process timing of the cpp nearest-codebook search against torch.cdist + argmin
and FAISS IndexFlatL2 (k = 1) at N = 65,536, K = 4096, D = 64 on the CPU: the issue's acceptance
ratios. Rounds alternate the providers so that load on a shared machine hits them alike; the
medians and their ratios are printed (and appended to benchmarks/results/vq_cpu_ratios.txt with
--record).

    python benchmarks/vq_cpu_ratios.py [--rounds 7] [--record]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import lfi_fast
from lfi_fast import vq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=gen)
    cb = torch.randn(args.k, args.d, generator=gen)

    def ours():
        with lfi_fast.use_backend("cpp"):
            return vq.nearest(x, cb)[0]

    providers = {"lfi_fast:cpp": ours, "torch-eager:cdist-argmin": lambda: torch.cdist(x, cb).argmin(1)}
    try:
        import faiss

        index = faiss.IndexFlatL2(args.d)
        index.add(cb.numpy())
        xn = x.numpy()
        providers["faiss"] = lambda: index.search(xn, 1)
    except ImportError:
        print("faiss is not installed: skipped")
    try:
        from vector_quantize_pytorch import VectorQuantize

        layer = VectorQuantize(dim=args.d, codebook_size=args.k, commitment_weight=0.25).eval()
        with torch.no_grad():
            layer._codebook.embed.copy_(cb[None])
            layer._codebook.initted.fill_(True)

        def vqp():
            with torch.no_grad():
                return layer(x[None])[1]

        providers["vector-quantize-pytorch"] = vqp
    except ImportError:
        print("vector-quantize-pytorch is not installed: skipped")
    for f in providers.values():  # warm-up
        f()
    times = {p: [] for p in providers}
    for _ in range(args.rounds):
        for p, f in providers.items():
            t = time.perf_counter()
            f()
            times[p].append(time.perf_counter() - t)
    med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    load = os.getloadavg()[0]
    lines = [f"N={args.n} K={args.k} D={args.d} float32, {args.rounds} interleaved rounds, "
             f"{torch.get_num_threads()} threads, load average {load:.1f}, {platform.processor() or platform.machine()}"]
    for p, m in med.items():
        lines.append(f"  {p:26s} median {m:9.1f} ms  (min {min(times[p]) * 1e3:.1f})")
    for p in med:
        if p != "lfi_fast:cpp":
            lines.append(f"  {p} / lfi_fast:cpp = {med[p] / med['lfi_fast:cpp']:.2f}x")
    agree = (ours() == torch.cdist(x, cb).argmin(1)).float().mean().item()
    lines.append(f"  index agreement with cdist+argmin: {agree:.6f}")
    print("\n".join(lines))
    if args.record:
        out = Path(__file__).parent / "results" / "vq_cpu_ratios.txt"
        out.parent.mkdir(exist_ok=True)
        with out.open("a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M UTC ", time.gmtime()) + "\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
