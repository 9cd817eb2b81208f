"""lfi_fast.batch: shards and manifest, resumption (after SIGKILL too), corrupted shards, merge
(duplicates dropped), results independent of the batch size and of the ranks (2 gloo processes).

The explainer is tests/toy_explainer.py: per-example Philox noise from (seed, dataset index), so
that every equality below can fail if the machinery mixes examples, seeds or offsets."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfi_fast import batch, cli
from lfi_fast.data import load_dataset

import toy_explainer
from toy_explainer import ToyConfig, ToyExplainer

N = 240
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LFI_FAST_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def digits():
    """240 images of scikit-learn's digits test split at their own 8 x 8."""
    return load_dataset("digits", "test", limit=N)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyExplainer(ToyConfig(image_size=8)).eval()


def _run(toy, ds, out, **kw):
    return batch.explain_dataset(toy, ds, out, progress=False, **kw)


def _assert_same(a: Path, b: Path):
    """Two merged outputs hold the same tensors (bit for bit) and the same records."""
    ta, tb = load_file(str(a / batch.MERGED)), load_file(str(b / batch.MERGED))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ra, rb = a / batch.MERGED_RECORDS, b / batch.MERGED_RECORDS
    assert ra.read_text() == rb.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy, digits):
    """The whole split explained in one process, one batch size: what every other run must equal."""
    out = tmp_path_factory.mktemp("reference")
    _run(toy, digits, out, batch_size=64, seed=3)
    m = batch.merge(out, progress=False)
    assert m["count"] == len(digits) and m["duplicates_dropped"] == 0
    return out


# ---- the format ----------------------------------------------------------------------------------

def test_shard_file_manifest_line_and_round_trip(tmp_path, toy, digits):
    x = digits.tensors[0][10:15]
    idx = torch.arange(10, 15)
    res = toy.explain(x, seed=1, index=idx)
    entry = batch.write_shard(tmp_path, 2, 7, res.tensors(), idx, res.records())
    name = "shard-00002-000007.safetensors"
    assert entry == {"shard": name, "rank": 2, "count": 5, "first": 10, "last": 14,
                     "sha256": batch.file_sha256(tmp_path / name)}
    assert batch.read_manifest(tmp_path) == [entry]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    tensors, records = batch.read_shard(tmp_path / name, entry["sha256"])
    assert torch.equal(tensors["index"], idx)
    for k, v in res.tensors().items():
        assert torch.equal(tensors[k], v), k
    assert records == res.records()
    with pytest.raises(ValueError, match="batch first with 5 rows"):
        batch.write_shard(tmp_path, 0, 0, {"bad": torch.zeros(4)}, idx)


def test_torn_manifest_line_is_ignored_and_cut_before_the_next_append(tmp_path, toy, digits):
    x, idx = digits.tensors[0][:4], torch.arange(4)
    first = batch.write_shard(tmp_path, 0, 0, toy.explain(x, index=idx).tensors(), idx)
    with open(tmp_path / batch.MANIFEST, "a") as f:
        f.write('{"shard": "shard-00000-000001.safetensors", "ra')  # killed mid-append
    assert batch.read_manifest(tmp_path) == [first]
    second = batch.write_shard(tmp_path, 0, 2, toy.explain(x, index=idx).tensors(), idx)
    assert batch.read_manifest(tmp_path) == [first, second]
    assert (tmp_path / batch.MANIFEST).read_text().count("\n") == 2


def test_rank_slices_cover_the_data_set_once():
    from torch.utils.data import DistributedSampler

    n, w = 23, 4
    contiguous = [batch.rank_indices(n, r, w) for r in range(w)]
    assert sum(contiguous, []) == list(range(n))
    assert max(map(len, contiguous)) - min(map(len, contiguous)) <= 1
    sampled = [batch.rank_indices(n, r, w, "sampler") for r in range(w)]
    assert sorted(sum(sampled, [])) == list(range(n))
    padded = [batch.rank_indices(n, r, w, "sampler", drop_padding=False) for r in range(w)]
    for r in range(w):  # what torch's sampler gives, the padding then removed
        assert padded[r] == list(DistributedSampler(range(n), w, r, shuffle=False))
        assert sampled[r] == list(range(r, n, w)) == padded[r][: len(sampled[r])]
    assert len(sum(padded, [])) == 24  # one wrap-around duplicate
    assert batch.rank_indices(2, 2, 4) == [] and batch.rank_indices(0, 0, 1) == []
    with pytest.raises(ValueError, match="rank must be in"):
        batch.rank_indices(10, 4, 4)
    with pytest.raises(ValueError, match="mode must be"):
        batch.rank_indices(10, 0, 1, "random")


# ---- independence of batch size, ranks, resumption -----------------------------------------------

def test_batch_size_and_ranks_do_not_change_results(tmp_path, toy, digits, reference):
    _run(toy, digits, tmp_path / "bs7", batch_size=7, seed=3)
    batch.merge(tmp_path / "bs7", progress=False)
    _assert_same(reference, tmp_path / "bs7")
    for mode in ("contiguous", "sampler"):
        out = tmp_path / mode
        for r in range(3):  # three ranks, one after the other, into one folder
            s = _run(toy, digits, out, batch_size=50, seed=3, rank=r, world_size=3, shard_mode=mode)
            assert s.explained == s.assigned == len(batch.rank_indices(len(digits), r, 3, mode))
        assert {e["rank"] for e in batch.read_manifest(out)} == {0, 1, 2}
        batch.merge(out, progress=False)
        _assert_same(reference, out)
    # and the noise really is the example's own: another seed changes it
    _run(toy, digits, tmp_path / "seed4", batch_size=64, seed=4)
    batch.merge(tmp_path / "seed4", progress=False)
    a = load_file(str(reference / batch.MERGED))["noise_sum"]
    b = load_file(str(tmp_path / "seed4" / batch.MERGED))["noise_sum"]
    assert not torch.equal(a, b)


def test_merge_drops_sampler_padding_duplicates(tmp_path, toy, digits, reference):
    """What ranks running at once write when they keep DistributedSampler's wrap-around padding
    (a rerun would skip indices other shards hold): merge keeps one copy of each index."""
    w = 7  # 240 = 7 * 34 + 2: five padded entries
    (tmp_path / batch.RUN_FILE).write_text(json.dumps({"num_examples": N}))
    x = digits.tensors[0]
    for r in range(w):
        todo = batch.rank_indices(N, r, w, "sampler", drop_padding=False)
        for seq, start in enumerate(range(0, len(todo), 16)):
            idx = torch.tensor(todo[start : start + 16])
            res = toy.explain(x[idx], seed=3, index=idx)
            batch.write_shard(tmp_path, r, seq, res.tensors(), idx, res.records())
    total = sum(e["count"] for e in batch.read_manifest(tmp_path))
    m = batch.merge(tmp_path, progress=False)
    assert total == N + 5 and m["duplicates_dropped"] == 5 and m["count"] == N
    _assert_same(reference, tmp_path)
    lines = (tmp_path / batch.MERGED_RECORDS).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(N))


def test_resume_redoes_only_what_is_missing(tmp_path, toy, digits, reference):
    _run(toy, digits, tmp_path, batch_size=40, seed=3)
    manifest = tmp_path / batch.MANIFEST
    lines = manifest.read_text().splitlines(keepends=True)
    # as if killed: the last shard renamed but its line not appended, the one before half-written
    manifest.write_text("".join(lines[:-2]))
    orphan = tmp_path / json.loads(lines[-1])["shard"]
    (tmp_path / ".shard-00000-000099.safetensors.4242.tmp").write_bytes(b"partial")
    s = _run(toy, digits, tmp_path, batch_size=25, seed=3)  # another batch size: same results
    assert s.resumed == len(digits) - 80 and s.explained == 80 and s.shards_written == 4
    assert not orphan.exists() and not list(tmp_path.glob(".*.tmp"))
    names = [e["shard"] for e in batch.read_manifest(tmp_path)]
    assert len(names) == len(set(names)) == len(lines) - 2 + 4  # names never reused
    batch.merge(tmp_path, progress=False)
    _assert_same(reference, tmp_path)
    again = _run(toy, digits, tmp_path, batch_size=25, seed=3)  # nothing left to do
    assert again.explained == 0 and again.shards_written == 0


def test_corrupted_shard_is_detected_and_redone(tmp_path, toy, digits, reference):
    _run(toy, digits, tmp_path, batch_size=64, seed=3)
    entry = batch.read_manifest(tmp_path)[2]
    path = tmp_path / entry["shard"]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(batch.BatchError, match=f"sha256.*{entry['shard']}"):
        batch.merge(tmp_path, progress=False)
    s = _run(toy, digits, tmp_path, batch_size=64, seed=3)
    assert s.corrupted_redone == [entry["shard"]] and s.explained == entry["count"]
    assert (tmp_path / (entry["shard"] + ".corrupt")).exists() and not path.exists()
    assert entry["shard"] not in {e["shard"] for e in batch.read_manifest(tmp_path)}
    batch.merge(tmp_path, progress=False)
    _assert_same(reference, tmp_path)


def test_a_folder_of_another_run_or_a_busy_rank_is_refused(tmp_path, toy, digits):
    _run(toy, digits, tmp_path, batch_size=200, seed=3, run_info={"checkpoint_sha256": "aa"})
    with pytest.raises(batch.BatchError, match="seed: 3 there, 4 now"):
        _run(toy, digits, tmp_path, batch_size=200, seed=4, run_info={"checkpoint_sha256": "aa"})
    with pytest.raises(batch.BatchError, match="checkpoint_sha256"):
        _run(toy, digits, tmp_path, batch_size=200, seed=3, run_info={"checkpoint_sha256": "bb"})
    from lfi_fast.batch import _flock

    with _flock(tmp_path / ".rank-00001.lock"):  # rank 1 of this folder is running elsewhere
        with pytest.raises(batch.BatchError, match="another process"):
            _run(toy, digits, tmp_path, batch_size=200, seed=3, rank=1, world_size=2,
                 run_info={"checkpoint_sha256": "aa"})
    (tmp_path / batch.RUN_FILE).unlink()
    with pytest.raises(batch.BatchError, match="no run.json"):
        _run(toy, digits, tmp_path, batch_size=200, seed=3)


def test_merge_refuses_an_incomplete_run_unless_asked(tmp_path, toy, digits):
    _run(toy, digits, tmp_path, batch_size=50, seed=3, rank=0, world_size=2)
    with pytest.raises(batch.BatchError, match="120 of 240 examples have no shard"):
        batch.merge(tmp_path, progress=False)
    m = batch.merge(tmp_path, allow_partial=True, progress=False)
    assert m["count"] == 120 and not m["complete"]
    assert torch.equal(load_file(str(tmp_path / batch.MERGED))["index"], torch.arange(120))
    with pytest.raises(FileNotFoundError, match="not a batch output folder"):
        batch.merge(tmp_path / "nothing", progress=False)


# ---- processes: SIGKILL half-way, two gloo ranks -------------------------------------------------

@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, toy, digits):
    """The toy's checkpoint and the digits test split as a safetensors data file."""
    d = tmp_path_factory.mktemp("inputs")
    toy.save(d / "ck")
    x, y = digits.tensors
    save_file({"images": x.contiguous(), "labels": y.contiguous()}, str(d / "digits8.safetensors"))
    return d


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TOY_SLEEP", "RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
            "LFI_FAST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **extra}


def _explain_argv(on_disk, out, *extra) -> list[str]:
    return ["explain", "toy", "--method-module", "toy_explainer", "--checkpoint", str(on_disk / "ck"),
            "--data", str(on_disk / "digits8.safetensors"), "--out", str(out), "--seed", "3",
            "--device", "cpu", *extra]


def test_sigkill_half_way_then_resume_gives_the_same_merge(tmp_path, on_disk, reference, monkeypatch):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lfi_fast.cli",
                             *_explain_argv(on_disk, out, "--batch-size", "20")],
                            env=_env(TOY_SLEEP="0.25"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / batch.MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = batch.read_manifest(out)
    assert 4 <= len(done) < 12 and not (out / batch.MERGED).exists()
    # resume in this process, with another batch size
    monkeypatch.syspath_prepend(str(TESTS))
    assert cli.main(_explain_argv(on_disk, out, "--batch-size", "33", "--no-progress")) == 0
    after = batch.read_manifest(out)
    assert after[: len(done)] == done  # the shards written before the kill were kept
    assert sum(e["count"] for e in after) == N  # nothing lost, nothing twice
    _assert_same(reference, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path, on_disk, reference):
    """The environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): each rank explains its slice, rank 0 merges after the barrier."""
    out = tmp_path / "two"
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lfi_fast.cli", *_explain_argv(on_disk, out, "--batch-size", "32",
                                                             "--shard-mode", "sampler")],
        env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e
    assert "rank 1/2: 120 examples explained" in results[1][0]
    assert "merged 240 examples" in results[0][0] and "merged" not in results[1][0]
    assert {e["rank"] for e in batch.read_manifest(out)} == {0, 1}
    assert json.loads((out / batch.RUN_FILE).read_text())["world_size"] == 2
    _assert_same(reference, out)


# ---- checkpoints and weights load without unpickling ---------------------------------------------

def test_weights_load_only_safely(tmp_path):
    model = toy_explainer.linear_classifier()
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("w.safetensors", "w.pt", "wrapped.pt"):
        m = batch.load_weights(toy_explainer.linear_classifier(), tmp_path / name)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    torch.save({"state_dict": state, "extra": toy_explainer.Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        batch.load_weights(toy_explainer.linear_classifier(), tmp_path / "evil.pt")
    assert not toy_explainer.Payload.unpickled
    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit the model"):
        batch.load_weights(toy_explainer.linear_classifier(), tmp_path / "bad.safetensors")


def test_checkpoint_of_a_method_missing_from_this_build(tmp_path, toy):
    toy.save(tmp_path / "ck")
    with pytest.raises(ValueError, match="unknown method 'toy'"):
        batch.load_checkpoint(tmp_path / "ck")
    loaded = batch.load_checkpoint(tmp_path / "ck", extra_modules=["toy_explainer"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), toy.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="not an lfi_fast checkpoint"):
        batch.load_checkpoint(tmp_path)
