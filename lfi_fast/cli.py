"""The `lfi-fast` command.

    lfi-fast info                        what is installed: version, backends (and why not), build
    lfi-fast train METHOD --data D --out DIR         train an explainer, write DIR/metrics.json
    lfi-fast explain METHOD --checkpoint C --data D --out DIR
                                         explain a data set in resumable, verified shards; under
                                         torchrun every rank explains its slice and rank 0 merges
    lfi-fast merge DIR                   verify every shard's hash, write DIR/merged.safetensors
    lfi-fast demo [--data digits]        train the four methods, explain the test split, write a
                                         report (metrics JSON, PNG figures, index.html)
    lfi-fast bench                       the benchmark suite (a source checkout's benchmarks/):
                                         appends to benchmarks/results/results.csv, writes the
                                         plots and BENCHMARKS.md

METHOD: invariance, intervention, flint, hyperbolic (lfi_fast.explain.<METHOD>), or a plug-in's
METHOD name with --method-module MODULE (a module with an Explainer subclass and
default_config(data, **overrides): how the tests plug in a toy method).

Exit codes: 0 success, 2 usage error, 1 failure (a one-line error on stderr; --debug for the
traceback).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


class UsageError(Exception):
    """A command line that cannot work (exit code 2), found after parsing."""


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


# ---- shared by train, explain and demo -----------------------------------------------------------

def resolve_device(spec: str, local_rank: int = 0):
    """--device: auto (cuda when available), cpu, cuda, cuda:N. Under torchrun a bare "cuda" is
    cuda:LOCAL_RANK."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {spec}: no CUDA device is available here (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})")
    return dev


def load_data(name: str, split: str, data_dir: str | None, limit: int | None, image_size: int | None):
    """A data set by name or path; digits is resized to 28 x 28 unless told otherwise, so that the
    MNIST networks apply unchanged."""
    from .data import load_dataset

    if image_size is None and name == "digits":
        image_size = 28
    return load_dataset(name, split, data_dir=data_dir, image_size=image_size, limit=limit)


def _data_id(name: str) -> str:
    from .data import DATASETS

    return name if name in DATASETS else str(Path(name).resolve())


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE (got {item!r})")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a bare string
    return out


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on, unless --no-progress or LFI_FAST_NO_PROGRESS=1."""
    from .explain.base import progress_enabled

    if args.no_progress:
        os.environ["LFI_FAST_NO_PROGRESS"] = "1"  # the methods' own loops too
    return progress_enabled()


def _method(args: argparse.Namespace):
    """(module, Explainer class) of args.method; an unknown name is a usage error."""
    from . import batch

    try:
        module = batch.method_module(args.method, args.method_module)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return module, batch.explainer_class(module)


def train_method(
    method: str, data: str, out: str | os.PathLike, *, data_dir: str | None = None,
    epochs: int | None = None, limit: int | None = None, model: str | None = None,
    weights: str | None = None, overrides: dict | None = None, image_size: int | None = None,
    device="cpu", seed: int = 0, num_workers: int = 0, progress: bool = True,
    method_modules: Sequence[str] = (), figures: bool = False,
) -> dict:
    """Train METHOD on a data set's train split, evaluate on its test split, save the explainer to
    `out` with out/metrics.json (the method's metric keys and train_seconds) and out/history.json;
    with figures=True also the method's report() PNGs in out/figures. Returns
    {"metrics", "history", "figures", "explainer", "test_loader"}."""
    import dataclasses

    import torch

    from . import batch
    from .data import DATASETS, num_classes
    from .models import build_model

    module = batch.method_module(method, method_modules)
    cls = batch.explainer_class(module)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    ov = dict(overrides or {})
    unknown = sorted(set(ov) - fields)
    if unknown:
        raise UsageError(f"--set: {cls.Config.__name__} has no field {', '.join(unknown)} "
                         f"(its fields: {', '.join(sorted(fields))})")
    if weights and not model:
        raise UsageError("--weights needs --model (the network they belong to)")
    torch.manual_seed(seed)
    train_ds = load_data(data, "train", data_dir, limit, image_size)
    test_ds = load_data(data, "test", data_dir, limit, image_size)
    x = train_ds.tensors[0]
    shape = {"image_size": x.shape[-1], "in_channels": x.shape[1], "channels": x.shape[1],
             "num_classes": num_classes(train_ds)}
    if data not in DATASETS:  # the user's images: the MNIST defaults, fitted to their shape
        for k, v in shape.items():
            if k in fields:
                ov.setdefault(k, int(v))
    elif image_size is not None and "image_size" in fields:
        ov.setdefault("image_size", int(image_size))
    classifier = None
    if model:
        if "classifier" in fields:
            ov["classifier"] = model
        classifier = build_model(model)
        if weights:
            batch.load_weights(classifier, weights)
    config = module.default_config(data if data in DATASETS else "mnist", **ov)
    explainer = cls(config, classifier) if classifier is not None else cls(config)
    explainer.to(device)
    bs = int(getattr(config, "batch_size", 128))
    g = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g,
                                               num_workers=num_workers)
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=bs, num_workers=num_workers)
    t0 = time.perf_counter()
    history = explainer.fit(train_loader, epochs, progress=progress)
    train_seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in explainer.evaluate(test_loader, progress=progress).items()}
    metrics["train_seconds"] = train_seconds
    out = Path(out)
    explainer.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    doc = {"method": method, "data": _data_id(data), "epochs": epochs, "limit": limit, "seed": seed,
           "config": dataclasses.asdict(config), "history": history}
    (out / "history.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")
    paths = list(explainer.report(test_loader, out / "figures")) if figures else []
    return {"metrics": metrics, "history": history, "figures": paths, "explainer": explainer,
            "test_loader": test_loader}


def cmd_train(args: argparse.Namespace) -> int:
    _method(args)
    progress = _progress(args)
    res = train_method(
        args.method, args.data, args.out, data_dir=args.data_dir, epochs=args.epochs,
        limit=args.limit, model=args.model, weights=args.weights,
        overrides=_parse_overrides(args.set), image_size=args.image_size,
        device=resolve_device(args.device), seed=args.seed, num_workers=args.num_workers,
        progress=progress, method_modules=args.method_module, figures=args.figures)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in res["metrics"].items())
    print(f"trained {args.method} on {args.data}: {shown}")
    print(f"saved to {args.out} (metrics.json, history.json, config.json, weights.safetensors)")
    return 0


def explain_method(
    method: str, checkpoint: str | os.PathLike, data: str, out: str | os.PathLike, *,
    split: str = "test", data_dir: str | None = None, batch_size: int = 256,
    limit: int | None = None, target: str = "predicted", shard_mode: str = "contiguous",
    merge: bool = True, model: str | None = None, image_size: int | None = None,
    device: str = "auto", seed: int = 0, num_workers: int = 0, progress: bool = True,
    method_modules: Sequence[str] = (), explainer=None,
) -> dict:
    """Explain a data set split with a checkpoint (or a given explainer) into `out`: this
    process's rank of torchrun's world (or rank 0 of 1); rank 0 merges when all are done."""
    from . import batch

    with batch.distributed() as dist:
        dev = resolve_device(device, dist.local_rank) if isinstance(device, str) else device
        if explainer is None:
            saved = batch.read_checkpoint_method(checkpoint)
            if saved != method:
                raise UsageError(f"--checkpoint {checkpoint} holds a {saved!r} explainer, not {method!r}")
            kwargs = {}
            if model:
                from .models import build_model

                kwargs["classifier"] = build_model(model)  # weights: the checkpoint's
            explainer = batch.load_checkpoint(checkpoint, map_location=dev,
                                              extra_modules=method_modules, **kwargs)
        if image_size is None:
            image_size = getattr(explainer.config, "image_size", None) if data == "digits" else None
        ds = load_data(data, split, data_dir, limit, image_size)
        run_info = {"method": method, "data": _data_id(data), "split": split, "limit": limit,
                    "image_size": image_size, "device": dev.type}
        if checkpoint is not None:
            run_info["checkpoint"] = str(Path(checkpoint).resolve())
            run_info["checkpoint_sha256"] = batch.weights_sha256(checkpoint)
        summary = batch.explain_dataset(
            explainer, ds, out, batch_size=batch_size, seed=seed, target=target, rank=dist.rank,
            world_size=dist.world_size, shard_mode=shard_mode, num_workers=num_workers,
            device=dev, progress=progress and dist.rank == 0, run_info=run_info)
        batch.barrier()  # every rank's shards are written
        merged = None
        if merge and dist.rank == 0:
            merged = batch.merge(out, progress=progress)
        return {"summary": summary, "merged": merged, "rank": dist.rank, "world_size": dist.world_size}


def cmd_explain(args: argparse.Namespace) -> int:
    from . import batch

    saved = batch.read_checkpoint_method(args.checkpoint)
    if saved != args.method:
        raise UsageError(f"--checkpoint {args.checkpoint} holds a {saved!r} explainer, not {args.method!r}")
    _method(args)
    res = explain_method(
        args.method, args.checkpoint, args.data, args.out, split=args.split,
        data_dir=args.data_dir, batch_size=args.batch_size, limit=args.limit, target=args.target,
        shard_mode=args.shard_mode, merge=not args.no_merge, model=args.model,
        image_size=args.image_size, device=args.device, seed=args.seed,
        num_workers=args.num_workers, progress=_progress(args), method_modules=args.method_module)
    s = res["summary"]
    where = f"rank {s.rank}/{s.world_size}: " if s.world_size > 1 else ""
    print(f"{where}{s.explained} examples explained in {s.seconds:.1f} s, {s.resumed} already done"
          + (f", {len(s.corrupted_redone)} corrupted shard(s) redone" if s.corrupted_redone else ""))
    if res["merged"]:
        m = res["merged"]
        print(f"merged {m['count']} examples from {m['shards']} shards into {m['path']}"
              + (f" ({m['duplicates_dropped']} duplicates dropped)" if m["duplicates_dropped"] else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from . import batch

    m = batch.merge(args.dir, allow_partial=args.allow_partial, progress=_progress(args))
    print(f"merged {m['count']} examples from {m['shards']} shards into {m['path']}"
          + (f" ({m['duplicates_dropped']} duplicates dropped)" if m["duplicates_dropped"] else "")
          + ("" if m["complete"] else " (partial)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run_demo(args)


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


# ---- the command line ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int (got {text!r})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not override `lfi-fast --debug CMD`
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    common.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda, cuda:N (default: auto)")
    common.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the training order and of every example's noise, which comes "
                             "from (seed, dataset index) (default: 0)")
    common.add_argument("--num-workers", type=_int_at_least(0), default=0, metavar="N",
                        help="DataLoader worker processes (default: 0)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--method-module", action="append", default=[], metavar="MODULE",
                        help="also import MODULE for a plug-in method (an Explainer subclass and "
                             "default_config(data, **overrides)); repeatable. For plug-ins and tests")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", required=True, metavar="D",
                      help="digits (scikit-learn's, run at 28 x 28), mnist, fashion-mnist, a folder "
                           "of images in ImageFolder layout, or a .safetensors file with images "
                           "and labels")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="the data set's own folder (default: $LFI_FAST_DATA/<name>, then "
                           "../shared/data/<name>)")
    data.add_argument("--limit", type=_int_at_least(0), default=None, metavar="N",
                      help="use only the first N examples of each split")
    data.add_argument("--image-size", type=_int_at_least(1), default=None, metavar="N",
                      help="resize the images to N x N (default: 28 for digits, else as stored)")
    data.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                      help="your own network to explain: an importable function returning the "
                           "nn.Module (default: the method's built-in classifier)")

    p = _Parser(prog="lfi-fast", description="lfi_fast: fast latent-space interpretability",
                parents=[debug])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="version, backends and build details (JSON)", parents=[debug],
                       description="Print the version, the backends (and why a backend is not "
                                   "available) and the build details as JSON.")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "train", help="train an explainer; write its checkpoint and metrics.json",
        parents=[common, data],
        description="Train METHOD on the train split, evaluate it on the test split, and write "
                    "the checkpoint (config.json, weights.safetensors), metrics.json (the method's "
                    "metrics and train_seconds) and history.json to --out. A method that explains "
                    "a frozen classifier trains its built-in one first unless --model is given.")
    s.add_argument("method", metavar="METHOD",
                   help="invariance, intervention, flint, hyperbolic (or a plug-in's name)")
    s.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder")
    s.add_argument("--epochs", type=_int_at_least(1), default=None, metavar="N",
                   help="training epochs (default: the method's tuned config)")
    s.add_argument("--weights", default=None, metavar="FILE",
                   help="weights of --model: a .safetensors file, or a state_dict read with "
                        "torch.load(weights_only=True)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (VALUE as JSON, else a string); repeatable")
    s.add_argument("--figures", action="store_true", help="also write the method's figures to DIR/figures")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "explain", help="explain a data set in resumable, verified shards (torchrun: many ranks)",
        parents=[common, data],
        description="Explain every example of a split with a checkpoint. Writes DIR/run.json, one "
                    "safetensors shard per batch (written atomically) and DIR/manifest.jsonl; "
                    "rerunning with the same --out resumes after the last complete shard, and a "
                    "corrupted shard is detected and redone. Under torchrun (RANK, WORLD_SIZE) "
                    "each rank explains its own slice and rank 0 merges into "
                    "DIR/merged.safetensors (and DIR/merged.jsonl for ragged results). Every "
                    "example's noise comes from (--seed, its dataset index): the batch size, the "
                    "number of ranks and resumptions do not change the results.")
    s.add_argument("method", metavar="METHOD", help="the checkpoint's method")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="what `lfi-fast train` wrote")
    s.add_argument("--split", choices=("train", "test"), default="test", help="default: test")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    s.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N",
                   help="examples per batch and shard (default: 256)")
    s.add_argument("--target", choices=("predicted", "label"), default="predicted",
                   help="explain the predicted class (default) or the label")
    s.add_argument("--shard-mode", choices=("contiguous", "sampler"), default="contiguous",
                   help="how ranks split the data: contiguous ranges (default) or "
                        "DistributedSampler(shuffle=False) order, padding removed")
    s.add_argument("--no-merge", action="store_true", help="leave merging to `lfi-fast merge DIR`")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser(
        "merge", help="verify every shard and write DIR/merged.safetensors", parents=[debug],
        description="Check every shard of DIR/manifest.jsonl against its sha256, concatenate the "
                    "tensors in dataset-index order with duplicate indices dropped, and write "
                    "DIR/merged.safetensors (and DIR/merged.jsonl for ragged results).")
    s.add_argument("dir", metavar="DIR", help="what `lfi-fast explain --out DIR` wrote")
    s.add_argument("--allow-partial", action="store_true",
                   help="merge even when some examples have no shard yet")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser(
        "demo", help="train the four methods, explain the test split, write a report",
        parents=[common],
        description="Train each method on the data set (the tuned config), explain its test "
                    "split in batches (lfi-fast explain's shards), and write --out/index.html with "
                    "the metrics tables and PNG figures, --out/metrics.json, and the kernels' "
                    "speed against their anchors. A method whose module is not in this build is "
                    "reported as missing.")
    s.add_argument("--data", default="digits", metavar="D",
                   help="digits (default, embedded), mnist, fashion-mnist (../shared/data/<name>)")
    s.add_argument("--data-dir", default=None, metavar="DIR", help="the data set's own folder")
    s.add_argument("--out", default="demo-out", metavar="DIR", help="report folder (default: demo-out)")
    s.add_argument("--methods", default=None, metavar="M1,M2",
                   help="comma-separated methods (default: the four, and plug-ins given)")
    s.add_argument("--epochs", type=_int_at_least(1), default=None, metavar="N",
                   help="override every method's epochs (default: the tuned configs)")
    s.add_argument("--limit", type=_int_at_least(1), default=None, metavar="N",
                   help="use only the first N examples of each split")
    s.add_argument("--batch-size", type=_int_at_least(1), default=128, metavar="N",
                   help="explanation batch size (default: 128)")
    s.add_argument("--no-kernels", action="store_true", help="skip the kernel timings")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "bench", help="run the benchmark suite; record, plot and tabulate the results",
        parents=[debug],
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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error, 0 on --help
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"lfi-fast {args.command}: interrupted", file=sys.stderr)
        return 1
    except UsageError as e:
        if debug:
            raise
        print(f"lfi-fast {args.command}: error: {_one_line(e)} (see lfi-fast {args.command} --help)",
              file=sys.stderr)
        return 2
    except Exception as e:  # one line on stderr; the traceback only with --debug
        if debug:
            raise
        print(f"lfi-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
