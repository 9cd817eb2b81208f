"""Explaining whole data sets: sharded, resumable, verified outputs, one or many processes.

The output folder (DESIGN.md, "Batch outputs"):

    DIR/run.json                             what was explained: method, checkpoint (and its weights'
                                             sha256), data set, split, limit, seed, target, version,
                                             world size, number of examples
    DIR/shard-RRRRR-SSSSSS.safetensors       rank R's S-th batch: the explanation tensors (batch
                                             first) and `index` (int64 dataset indices); ragged
                                             results (Explanation.records()) as JSON lines in the
                                             file's metadata ("records")
    DIR/manifest.jsonl                       one line per complete shard, appended after its rename:
                                             {"shard", "rank", "count", "first", "last", "sha256"}
                                             (first/last: smallest and largest index in the shard)
    DIR/merged.safetensors, DIR/merged.jsonl what merge() writes: every tensor in dataset-index
                                             order, duplicates dropped; the records, one line per index

How it stays correct when killed, resumed, or run on many processes:

- A shard is serialised in memory, hashed, written to `.shard-….PID.tmp`, fsync'd and renamed; only then
  is its manifest line appended (under an flock, one write). A kill leaves at worst a temporary file
  or a renamed shard without its line: both are deleted on the next run, which redoes that batch.
- A rerun reads the manifest, re-hashes every listed shard that can hold indices of its slice, and
  explains only the indices no valid shard holds. A shard whose hash does not match is renamed
  `*.corrupt`, its line dropped from the manifest, and its indices explained again. Shard names are
  never reused, so a line always describes one file.
- Every example's noise comes from (seed, dataset index) (the methods' contract), so neither the
  batch size, nor the number of ranks, nor a resumption changes a result.
- Under torchrun (RANK, WORLD_SIZE) each rank explains its own slice: contiguous ranges, or the
  indices torch's DistributedSampler(shuffle=False) gives it, its wrap-around padding removed.
  Each rank writes its own shards; rank 0 merges after a barrier (gloo: synchronisation only).
- One process per (DIR, rank) at a time: a per-rank lock file refuses a second one.
- On several nodes, DIR must be on a file system every node sees (rank 0 reads all shards to
  merge); ranks append to the manifest under an flock (NFSv4 and the usual cluster file systems
  support it).

The machinery is method-agnostic: it calls `explainer.explain(inputs, target, seed=, index=)` on
any lfi_fast.explain.base.Explainer and stores `Explanation.tensors()` and `records()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import importlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .explain.base import progress_bar
from .version import __version__

__all__ = [
    "BatchError", "MethodUnavailable", "FORMAT", "MANIFEST", "RUN_FILE", "MERGED", "MERGED_RECORDS",
    "shard_name", "rank_indices", "read_manifest", "write_shard", "read_shard", "verify_shard",
    "explain_dataset", "merge", "distributed", "barrier", "method_names", "method_module",
    "explainer_class", "load_checkpoint", "load_weights", "file_sha256",
]

FORMAT = "lfi_fast.batch/1"
MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
MERGED = "merged.safetensors"
MERGED_RECORDS = "merged.jsonl"
_LOCK = ".manifest.lock"
_SHARD_RE = re.compile(r"^shard-(\d{5,})-(\d{6,})\.safetensors(\.corrupt)?$")
_ENTRY_KEYS = ("shard", "rank", "count", "first", "last", "sha256")
# run.json fields a resumption must agree on (world size, batch size, device may change).
_RUN_IDENTITY = ("method", "checkpoint_sha256", "data", "split", "limit", "seed", "target",
                 "image_size", "num_examples")


class BatchError(RuntimeError):
    """A batch output folder is inconsistent (corrupted shard, another run's folder, missing indices)."""


class MethodUnavailable(ImportError):
    """The module of a method is not part of this build (or does not implement the interface)."""


# ---- files ---------------------------------------------------------------------------------------

def shard_name(rank: int, seq: int) -> str:
    return f"shard-{rank:05d}-{seq:06d}.safetensors"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsync'd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path` (.NAME.PID.tmp), fsync, rename: readers see all of
    it or nothing, and a process killed half-way leaves only the temporary file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise BatchError(f"{path.name}: another process holds this lock (one run per output "
                                 "folder and rank at a time)") from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---- the manifest --------------------------------------------------------------------------------

def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """The complete lines of DIR/manifest.jsonl, in order. A last line without its newline (a kill
    during the append) is not complete and is ignored; a later line for the same shard replaces an
    earlier one."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return []
    entries: dict[str, dict] = {}
    text = path.read_text()
    lines = text.split("\n")
    for n, line in enumerate(lines[:-1], 1):  # lines[-1] is "" or a torn last line
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if not all(k in e for k in _ENTRY_KEYS):
                raise ValueError(f"missing keys {[k for k in _ENTRY_KEYS if k not in e]}")
        except ValueError as err:
            warnings.warn(f"{path}:{n}: ignoring a malformed manifest line ({err})")
            continue
        entries.pop(e["shard"], None)
        entries[e["shard"]] = e
    return list(entries.values())


def _append_manifest(out_dir: Path, entry: dict) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    with _flock(out_dir / _LOCK):
        fd = os.open(out_dir / MANIFEST, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a torn last line (a kill during an append): cut it, or this line would join it
                tail = 0
                while tail < size:  # find the last newline, reading backwards
                    step = min(1 << 16, size - tail)
                    block = os.pread(fd, step, size - tail - step)
                    k = block.rfind(b"\n")
                    if k >= 0:
                        tail += step - k - 1
                        break
                    tail += step
                os.ftruncate(fd, size - tail)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _drop_manifest_entries(out_dir: Path, bad: set[tuple[str, str]]) -> None:
    """Rewrite the manifest without the lines whose (shard, sha256) is in `bad`."""
    if not bad:
        return
    with _flock(out_dir / _LOCK):
        path = out_dir / MANIFEST
        lines = path.read_text().split("\n") if path.is_file() else [""]
        kept = []
        for line in lines[:-1]:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                e = json.loads(line)
                if (e["shard"], e["sha256"]) in bad:
                    continue
            kept.append(line + "\n")
        _atomic_write(path, "".join(kept).encode())


# ---- shards --------------------------------------------------------------------------------------

def _header_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def write_shard(out_dir: str | os.PathLike, rank: int, seq: int, tensors: dict[str, torch.Tensor],
                index: torch.Tensor, records: list[dict] | None = None) -> dict:
    """Write one shard atomically and append its manifest line; returns that line."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    index = torch.as_tensor(index).detach().to("cpu", torch.int64).reshape(-1)
    n = index.numel()
    payload = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"explanation field {k!r} must be a tensor (got {type(v).__name__})")
        if v.dim() == 0 or v.shape[0] != n:
            raise ValueError(f"explanation field {k!r} must be batch first with {n} rows "
                             f"(got shape {tuple(v.shape)})")
        # safetensors refuses shared storage and non-contiguous views: store each as its own copy
        payload[k] = v.detach().to("cpu").contiguous().clone()
    if "index" in payload and not torch.equal(payload["index"].to(torch.int64), index):
        raise ValueError("the explanation has a field 'index' that is not the dataset indices")
    payload["index"] = index.clone()
    meta = {"format": FORMAT, "rank": str(rank), "seq": str(seq)}
    if records is not None:
        if len(records) != n:
            raise ValueError(f"records() returned {len(records)} rows for a batch of {n}")
        try:
            meta["records"] = "\n".join(json.dumps(r, sort_keys=True) for r in records)
        except TypeError as e:
            raise TypeError(f"records() must return JSON-able dicts ({e})") from None
    data = save(payload, metadata=meta)
    name = shard_name(rank, seq)
    _atomic_write(out_dir / name, data)
    entry = {"shard": name, "rank": rank, "count": n,
             "first": int(index.min()) if n else -1, "last": int(index.max()) if n else -1,
             "sha256": hashlib.sha256(data).hexdigest()}
    _append_manifest(out_dir, entry)
    return entry


def verify_shard(out_dir: str | os.PathLike, entry: dict) -> bool:
    path = Path(out_dir) / entry["shard"]
    try:
        return file_sha256(path) == entry["sha256"]
    except OSError:
        return False


def read_shard(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], list[dict] | None]:
    """(tensors, records) of a shard file, after checking its hash when one is given."""
    from safetensors.torch import load

    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BatchError(f"{Path(path).name}: sha256 mismatch (corrupted)")
    tensors = load(data)
    meta = _header_metadata(data)
    records = None
    if "records" in meta:
        records = [json.loads(line) for line in meta["records"].split("\n")] if meta["records"] else []
    return tensors, records


def _shard_index(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("index")


# ---- which indices a rank explains ---------------------------------------------------------------

def rank_indices(n: int, rank: int = 0, world_size: int = 1, mode: str = "contiguous",
                 drop_padding: bool = True) -> list[int]:
    """The dataset indices rank `rank` of `world_size` explains.

    mode "contiguous": rank r gets [n*r // W, n*(r+1) // W). mode "sampler": what
    torch.utils.data.DistributedSampler(shuffle=False) yields for the rank (r, r+W, r+2W, ...),
    with its wrap-around padding removed unless drop_padding=False (merge() drops duplicates
    either way)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got rank {rank}, world_size {world_size})")
    if mode == "contiguous":
        return list(range(n * rank // world_size, n * (rank + 1) // world_size))
    if mode == "sampler":
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False)
        positions = range(rank, sampler.total_size, world_size)  # where the sampler read each index
        return [int(i) for i, p in zip(sampler, positions) if p < n or not drop_padding]
    raise ValueError(f"mode must be 'contiguous' or 'sampler' (got {mode!r})")


# ---- run.json ------------------------------------------------------------------------------------

def _prepare_run(out_dir: Path, run_info: dict, rank: int) -> None:
    """Write DIR/run.json, or check that the one there describes the same run (resumption)."""
    path = out_dir / RUN_FILE
    info = {**run_info, "format": FORMAT, "lfi_fast_version": __version__}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise BatchError(f"{path}: unreadable ({e}); remove it or use another --out") from None
        diff = [k for k in _RUN_IDENTITY if k in info and old.get(k) != info.get(k)]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} there, {info.get(k)!r} now" for k in diff)
            raise BatchError(f"{out_dir} holds another run ({what}): use another output folder, "
                             "or delete it to start over")
        if rank == 0 and old.get("world_size") != info.get("world_size"):
            _atomic_write(path, (json.dumps({**old, "world_size": info.get("world_size")},
                                            indent=2, sort_keys=True) + "\n").encode())
        return
    if any(out_dir.glob("shard-*.safetensors")) or (out_dir / MANIFEST).is_file():
        raise BatchError(f"{out_dir} has shards but no {RUN_FILE}: not a batch output folder this "
                         "run can resume; use another output folder")
    _atomic_write(path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


# ---- resumption ----------------------------------------------------------------------------------

def _scan(out_dir: Path, rank: int, wanted: Sequence[int]) -> tuple[set[int], int, list[str]]:
    """What is already done for the indices `wanted`: (covered indices, next sequence number of
    this rank, names of the corrupted shards found). Deletes this rank's leftovers (temporary files,
    shards without a manifest line) and sets corrupted shards aside."""
    entries = read_manifest(out_dir)
    listed = {e["shard"] for e in entries}
    seqs = [-1]
    for tmp in out_dir.glob(f".shard-{rank:05d}-*.tmp"):
        tmp.unlink(missing_ok=True)
    for p in out_dir.glob(f"shard-{rank:05d}-*"):
        m = _SHARD_RE.match(p.name)
        if not m or int(m.group(1)) != rank:
            continue
        seqs.append(int(m.group(2)))
        if not m.group(3) and p.name not in listed:
            p.unlink(missing_ok=True)  # renamed but killed before its manifest line: redone
    lo, hi = (min(wanted), max(wanted)) if wanted else (0, -1)
    covered: set[int] = set()
    bad: set[tuple[str, str]] = set()
    for e in entries:
        m = _SHARD_RE.match(e["shard"])
        if m and int(m.group(1)) == rank:
            seqs.append(int(m.group(2)))
        if e["count"] == 0 or e["last"] < lo or e["first"] > hi:
            continue  # cannot hold an index of this slice
        path = out_dir / e["shard"]
        if verify_shard(out_dir, e):
            covered.update(_shard_index(path).tolist())
        else:
            bad.add((e["shard"], e["sha256"]))
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, path.with_name(path.name + ".corrupt"))
    _drop_manifest_entries(out_dir, bad)
    return covered, max(seqs) + 1, sorted(n for n, _ in bad)


# ---- explaining a data set -----------------------------------------------------------------------

class _Indexed(torch.utils.data.Dataset):
    """(index, *item) for each item of a map-style data set."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, (tuple, list)) else (i, item)


@dataclasses.dataclass
class BatchSummary:
    rank: int
    world_size: int
    assigned: int          # indices of this rank's slice
    resumed: int           # of which valid shards already held
    explained: int         # explained now
    shards_written: int
    corrupted_redone: list[str]
    seconds: float


def explain_dataset(
    explainer,
    dataset,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 256,
    seed: int = 0,
    target: str = "predicted",
    rank: int = 0,
    world_size: int = 1,
    shard_mode: str = "contiguous",
    drop_padding: bool = True,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    run_info: dict | None = None,
    explain_kwargs: dict | None = None,
) -> BatchSummary:
    """Explain rank `rank`'s slice of `dataset` (map-style: item i is (image, label)) into
    `out_dir` in shards of `batch_size` examples, resuming from what a previous run left there.

    target: "predicted" (target=None: the explainer's choice, usually the predicted class) or
    "label" (the data set's labels). run_info: what identifies the run in run.json (method,
    checkpoint, data, ...); a resumption must agree with it. Call merge(out_dir) when every rank
    has finished."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (got {batch_size!r})")
    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label' (got {target!r})")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else explainer.device
    n = len(dataset)
    info = {"method": getattr(explainer, "METHOD", type(explainer).__name__), "seed": seed,
            "target": target, "num_examples": n, "world_size": world_size,
            "shard_mode": shard_mode, "batch_size": batch_size, **(run_info or {})}
    wanted = rank_indices(n, rank, world_size, shard_mode, drop_padding)
    with _flock(out_dir / f".rank-{rank:05d}.lock", blocking=False):
        with _flock(out_dir / _LOCK):  # ranks starting together: one checks and writes at a time
            _prepare_run(out_dir, info, rank)
        covered, seq, corrupted = _scan(out_dir, rank, wanted)
        todo = [i for i in wanted if i not in covered]
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_sampler=batches,
                                             num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        explainer.eval()
        shards = 0
        bar = progress_bar(loader, desc=f"explain (rank {rank})" if world_size > 1 else "explain",
                           total=len(batches), disable=not progress)
        for idx, x, *rest in bar:
            x = x.to(device, non_blocking=True)
            tgt = rest[0].to(device) if target == "label" and rest else None
            if target == "label" and not rest:
                raise ValueError("target='label' needs a data set of (image, label) items")
            res = explainer.explain(x, tgt, seed=seed, index=idx, **(explain_kwargs or {}))
            write_shard(out_dir, rank, seq, res.tensors(), idx, res.records())
            seq += 1
            shards += 1
    return BatchSummary(rank, world_size, len(wanted), len(wanted) - len(todo), len(todo), shards,
                        corrupted, time.perf_counter() - t0)


# ---- merging -------------------------------------------------------------------------------------

def merge(out_dir: str | os.PathLike, *, allow_partial: bool = False, progress: bool = True) -> dict:
    """Verify every shard's hash, concatenate the tensors in dataset-index order with duplicate
    indices (DistributedSampler padding) dropped, and write DIR/merged.safetensors (and
    DIR/merged.jsonl when the method has ragged results). Refuses a corrupted shard, and an
    incomplete run unless allow_partial."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    run_path = out_dir / RUN_FILE
    if not run_path.is_file():
        raise FileNotFoundError(f"{out_dir} is not a batch output folder (no {RUN_FILE})")
    run = json.loads(run_path.read_text())
    entries = read_manifest(out_dir)
    bad = [e["shard"] for e in progress_bar(entries, desc="verify", disable=not progress)
           if not verify_shard(out_dir, e)]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise BatchError(f"{len(bad)} shard(s) fail their sha256 check or are missing ({shown}): "
                         "run `lfi-fast explain` again with the same --out to redo them")
    parts: dict[str, list[torch.Tensor]] = {}
    records: list[dict] | None = None
    keys = None
    for e in progress_bar(entries, desc="merge", disable=not progress):
        tensors, recs = read_shard(out_dir / e["shard"])
        if keys is None:
            keys = sorted(tensors)
            records = [] if recs is not None else None
        if sorted(tensors) != keys:
            raise BatchError(f"{e['shard']}: tensors {sorted(tensors)} differ from the other "
                             f"shards' {keys}")
        if (recs is None) != (records is None):
            raise BatchError(f"{e['shard']}: has records where the other shards have none, or the reverse")
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
        if records is not None:
            records.extend(recs)
    if keys is None:
        index = torch.zeros(0, dtype=torch.int64)
        merged: dict[str, torch.Tensor] = {"index": index}
        dropped = 0
    else:
        for k, vs in parts.items():
            tails = {(tuple(v.shape[1:]), v.dtype) for v in vs}
            if len(tails) > 1:
                raise BatchError(f"tensor {k!r}: shards disagree on its shape or dtype ({sorted(map(str, tails))})")
        index = torch.cat(parts["index"])
        order = torch.sort(index, stable=True).indices
        sorted_index = index[order]
        keep = torch.ones_like(sorted_index, dtype=torch.bool)
        keep[1:] = sorted_index[1:] != sorted_index[:-1]  # the first copy of each index stays
        order = order[keep]
        dropped = int((~keep).sum())
        merged = {k: torch.cat(vs)[order].contiguous() for k, vs in parts.items()}
        index = merged["index"]
        if records is not None:
            records = [records[i] for i in order.tolist()]
    n = run.get("num_examples")
    if n is not None:
        outside = index[(index < 0) | (index >= n)]
        if outside.numel():
            raise BatchError(f"shards hold indices outside [0, {n}): {outside[:5].tolist()}")
        missing = n - index.numel()
        if missing and not allow_partial:
            raise BatchError(f"{missing} of {n} examples have no shard yet: run `lfi-fast explain` "
                             "again with the same --out to finish (or merge with --allow-partial)")
    meta = {"format": FORMAT, "run": json.dumps(run, sort_keys=True)}
    _atomic_write(out_dir / MERGED, save(merged, metadata=meta))
    if records is not None:
        lines = "".join(json.dumps({"index": int(i), **r}, sort_keys=True) + "\n"
                        for i, r in zip(index.tolist(), records))
        _atomic_write(out_dir / MERGED_RECORDS, lines.encode())
    return {"path": str(out_dir / MERGED), "count": int(index.numel()), "shards": len(entries),
            "duplicates_dropped": dropped, "records": records is not None,
            "complete": n is None or index.numel() == n}


# ---- many processes ------------------------------------------------------------------------------

@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    group: bool  # a process group exists (barrier() synchronises)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int (got {value!r})") from None


@contextlib.contextmanager
def distributed(timeout_minutes: float | None = None) -> Iterator[DistInfo]:
    """The rank and world size torchrun set (RANK, WORLD_SIZE, LOCAL_RANK), with a gloo process
    group for the barriers when WORLD_SIZE > 1 (destroyed on exit if it was created here).
    Without torchrun: rank 0 of 1. The barrier timeout (LFI_FAST_DIST_TIMEOUT_MIN, default 24 h)
    must cover the slowest rank's whole slice."""
    import torch.distributed as dist

    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE) (got RANK={rank}, WORLD_SIZE={world})")
    created = False
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        minutes = timeout_minutes or float(os.environ.get("LFI_FAST_DIST_TIMEOUT_MIN", 24 * 60))
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=minutes))
        created = True
    try:
        yield DistInfo(rank, world, local, world > 1 and dist.is_initialized())
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- methods and checkpoints ---------------------------------------------------------------------

def method_names(extra_modules: Iterable[str] = ()) -> dict[str, str]:
    """{method name: module} for the four built-in methods and the plug-in modules given (each an
    importable module with an Explainer subclass and default_config(data, **overrides))."""
    from .explain import METHODS

    names = {m: f"lfi_fast.explain.{m}" for m in METHODS}
    for mod_name in extra_modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise MethodUnavailable(f"method module {mod_name!r} cannot be imported ({e})") from e
        cls = explainer_class(mod)
        names[cls.METHOD] = mod_name
    return names


def explainer_class(module) -> type:
    """The Explainer subclass a method module defines (the one whose METHOD is set)."""
    from .explain.base import Explainer

    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Explainer) and v is not Explainer
             and getattr(v, "METHOD", "") and v.__module__ == module.__name__]
    if len(found) != 1:
        raise MethodUnavailable(f"module {module.__name__} must define exactly one Explainer "
                                f"subclass with METHOD set (found {len(found)})")
    if not callable(getattr(module, "default_config", None)):
        raise MethodUnavailable(f"module {module.__name__} has no default_config(data, **overrides)")
    return found[0]


def method_module(method: str, extra_modules: Iterable[str] = ()):
    """The module of `method`; MethodUnavailable when it is not part of this build."""
    names = method_names(extra_modules)
    if method not in names:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(names)}")
    mod_name = names[method]
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise MethodUnavailable(f"method {method!r} is not in this build ({mod_name} is "
                                    "missing)") from e
        raise
    explainer_class(module)
    return module


def read_checkpoint_method(path: str | os.PathLike) -> str:
    from .explain.base import CONFIG_FILE, WEIGHTS_FILE

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an lfi_fast checkpoint (needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}, as `lfi-fast train` writes)")
    try:
        return json.loads((path / CONFIG_FILE).read_text())["method"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: no method in it ({e})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    extra_modules: Iterable[str] = (), **kwargs):
    """Load a checkpoint of any method, plug-ins included (safetensors only: nothing is unpickled)."""
    method = read_checkpoint_method(path)
    cls = explainer_class(method_module(method, extra_modules))
    return cls.load(path, map_location=map_location, **kwargs)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a state_dict into `model` safely: a .safetensors file, or a torch file read with
    torch.load(weights_only=True) (a plain state_dict, or {"state_dict": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusing a non-tensor object, a truncated file, ...
            raise ValueError(f"weights file {path}: not loadable with torch.load(weights_only=True) "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state_dict (got {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights file {path} does not fit the model: {str(e).splitlines()[0]}") from None
    return model


def weights_sha256(checkpoint: str | os.PathLike) -> str:
    from .explain.base import WEIGHTS_FILE

    return file_sha256(Path(checkpoint) / WEIGHTS_FILE)
