"""The `lfi-fast` command: --help everywhere, exit codes (0 success, 2 usage error, 1 failure) with a
one-line error, train -> explain -> merge, the user's own model, weights and data, and the demo
report (with a method missing from the build). The method is tests/toy_explainer.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lfi_fast
from lfi_fast import batch, cli, demo
from lfi_fast.data import load_dataset

import toy_explainer

TESTS = Path(__file__).resolve().parent
TOY = ["--method-module", "toy_explainer"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LFI_FAST_NO_PROGRESS", "1")


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lfi-fast ARGV`, run in this process."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lfi-fast {command}".strip()) and "error:" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    """120 images of the digits test split (8 x 8) as a safetensors data file."""
    d = tmp_path_factory.mktemp("data")
    x, y = load_dataset("digits", "test", limit=120).tensors
    save_file({"images": x.contiguous(), "labels": y.contiguous()}, str(d / "digits8.safetensors"))
    return d / "digits8.safetensors"


# ---- help and exit codes -------------------------------------------------------------------------

@pytest.mark.parametrize("command, options", [
    ("", ["info", "train", "explain", "merge", "demo", "bench", "--debug"]),
    ("info", ["--debug"]),
    ("train", ["METHOD", "--data", "--data-dir", "--epochs", "--limit", "--out", "--model", "--weights",
               "--set", "--device", "--seed", "--num-workers", "--no-progress", "--method-module"]),
    ("explain", ["METHOD", "--checkpoint", "--data", "--split", "--out", "--batch-size", "--limit",
                 "--target", "--shard-mode", "--no-merge", "--model", "--device", "--seed",
                 "--num-workers", "--no-progress"]),
    ("merge", ["DIR", "--allow-partial"]),
    ("demo", ["--data", "--out", "--methods", "--epochs", "--limit", "--device", "--seed"]),
    ("bench", ["--family", "--quick", "--out"]),
])
def test_help_for_every_command(command, options, capsys):
    rc, out, err = call([command, "--help"] if command else ["--help"], capsys)
    assert rc == 0 and err == ""
    assert out.startswith(f"usage: lfi-fast {command}".rstrip())
    for opt in options:
        assert opt in out, opt


@pytest.mark.parametrize("argv, command, message", [
    ([], "", "required: COMMAND"),
    (["frobnicate"], "", "invalid choice: 'frobnicate'"),
    (["explain", "toy"], "explain", "required: --data, --checkpoint, --out"),
    (["train", "nope", "--data", "digits", "--out", "x"], "train", "unknown method 'nope'"),
    (["train", "toy", *TOY, "--data", "digits", "--out", "x", "--epochs", "0"], "train", "--epochs: must be >= 1"),
    (["explain", "toy", *TOY, "--checkpoint", "c", "--data", "digits", "--out", "x",
      "--batch-size", "many"], "explain", "--batch-size: must be an int"),
    (["explain", "toy", *TOY, "--checkpoint", "c", "--data", "digits", "--out", "x",
      "--split", "val"], "explain", "--split: invalid choice"),
    (["train", "toy", *TOY, "--data", "digits", "--out", "x", "--set", "nope=1"], "train",
     "--set: ToyConfig has no field nope"),
    (["train", "toy", *TOY, "--data", "digits", "--out", "x", "--set", "epochs"], "train", "KEY=VALUE"),
    (["train", "toy", *TOY, "--data", "digits", "--out", "x", "--device", "tpu:0"], "train", "--device must be"),
    (["demo", *TOY, "--methods", "toy,nope"], "demo", "--methods must name some of"),
])
def test_usage_errors_exit_2_with_one_line(argv, command, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = call(argv, capsys)
    assert rc == 2
    assert message in one_line_error(err, command)


def test_failures_exit_1_with_one_line_and_debug_shows_the_traceback(capsys, tmp_path, digits8):
    ck = tmp_path / "ck"
    toy_explainer.ToyExplainer(toy_explainer.ToyConfig(image_size=8)).save(ck)
    cases = [
        (["explain", "toy", *TOY, "--checkpoint", tmp_path / "none", "--data", digits8, "--out", tmp_path / "o"],
         "not an lfi_fast checkpoint"),
        (["train", "toy", *TOY, "--data", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "o"],
         "mnist (train) not found"),
        (["merge", tmp_path], "not a batch output folder"),
        (["explain", "toy", *TOY, "--checkpoint", ck, "--data", "digits", "--image-size", "9",
          "--out", tmp_path / "o"], "inputs must be (N, 1, 8, 8) images"),
    ]
    for argv, message in cases:
        rc, out, err = call(argv, capsys)
        assert rc == 1 and message in one_line_error(err, argv[0]), (argv, err)
    # a checkpoint of another method: a usage error
    rc, out, err = call(["explain", "flint", "--checkpoint", ck, "--data", digits8, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "holds a 'toy' explainer, not 'flint'" in one_line_error(err, "explain")
    with pytest.raises(FileNotFoundError, match="not a batch output folder"):
        cli.main(["merge", str(tmp_path), "--debug"])
    with pytest.raises(FileNotFoundError, match="not a batch output folder"):
        cli.main(["--debug", "merge", str(tmp_path)])


def test_the_installed_command_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "lfi-fast"
    if not exe.is_file():
        pytest.skip("the lfi-fast console script is not installed beside this python")
    res = subprocess.run([str(exe), "merge", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("lfi-fast merge: error: ")


# ---- train, explain, merge -----------------------------------------------------------------------

def test_train_explain_merge(tmp_path, capsys):
    ck, ex = tmp_path / "ck", tmp_path / "ex"
    rc, out, err = call(["train", "toy", *TOY, "--data", "digits", "--image-size", "8", "--limit", "200",
                         "--epochs", "2", "--set", "n_samples=2", "--out", ck, "--figures",
                         "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("trained toy on digits: accuracy")
    metrics = json.loads((ck / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "flip_rate", "train_seconds"}
    assert metrics["accuracy"] > 0.3  # ten classes: chance is 0.1
    history = json.loads((ck / "history.json").read_text())
    assert len(history["history"]["loss"]) == 2 and history["config"]["n_samples"] == 2
    assert (ck / "figures" / "toy_saliency.png").stat().st_size > 0
    rc, out, err = call(["explain", "toy", *TOY, "--checkpoint", ck, "--data", "digits", "--limit", "90",
                         "--batch-size", "40", "--target", "label", "--out", ex, "--seed", "5"], capsys)
    assert rc == 0, err
    assert "90 examples explained" in out and "merged 90 examples from 3 shards" in out
    merged = load_file(str(ex / batch.MERGED))
    assert torch.equal(merged["index"], torch.arange(90)) and merged["noisy_pred"].shape == (90, 2)
    run = json.loads((ex / batch.RUN_FILE).read_text())
    assert run["method"] == "toy" and run["seed"] == 5 and run["target"] == "label" and run["image_size"] == 8
    assert run["checkpoint_sha256"] == batch.file_sha256(ck / "weights.safetensors")
    # the explanations are the loaded checkpoint's, with the labels as targets
    explainer = batch.load_checkpoint(ck, extra_modules=["toy_explainer"])
    x, y = load_dataset("digits", "test", image_size=8, limit=90).tensors
    direct = explainer.explain(x, y, seed=5, index=torch.arange(90))
    for k, v in direct.tensors().items():
        assert torch.allclose(merged[k], v, rtol=1e-6, atol=1e-6), k
    rc, out, err = call(["merge", ex], capsys)
    assert rc == 0 and "merged 90 examples from 3 shards" in out
    rc, out, err = call(["explain", "toy", *TOY, "--checkpoint", ck, "--data", "digits", "--limit", "90",
                         "--batch-size", "40", "--target", "label", "--out", ex, "--seed", "5"], capsys)
    assert rc == 0 and "0 examples explained" in out and "90 already done" in out


def test_own_model_weights_and_data(tmp_path, capsys, digits8):
    from PIL import Image

    state = {k: torch.randn_like(v) for k, v in toy_explainer.linear_classifier().state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    ck = tmp_path / "ck"
    rc, out, err = call(["train", "toy", *TOY, "--model", "toy_explainer:linear_classifier",
                         "--weights", tmp_path / "w.pt", "--data", digits8, "--out", ck], capsys)
    assert rc == 0, err
    saved = load_file(str(ck / "weights.safetensors"))
    assert torch.equal(saved["classifier.1.weight"], state["1.weight"])  # given, so not retrained
    config = json.loads((ck / "config.json").read_text())["config"]
    assert config["classifier"] == "toy_explainer:linear_classifier" and config["image_size"] == 8
    # a folder of images in ImageFolder layout
    x, y = load_file(str(digits8))["images"], load_file(str(digits8))["labels"]
    for i in range(12):
        (tmp_path / "imgs" / f"c{int(y[i])}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy()).save(
            tmp_path / "imgs" / f"c{int(y[i])}" / f"{i:02d}.png")
    rc, out, err = call(["explain", "toy", *TOY, "--checkpoint", ck, "--data", tmp_path / "imgs",
                         "--out", tmp_path / "ex", "--batch-size", "5"], capsys)
    assert rc == 0, err
    assert load_file(str(tmp_path / "ex" / batch.MERGED))["index"].tolist() == list(range(12))
    rc, out, err = call(["train", "toy", *TOY, "--weights", tmp_path / "w.pt", "--data", digits8,
                         "--out", tmp_path / "ck2"], capsys)
    assert rc == 2 and "--weights needs --model" in one_line_error(err, "train")


# ---- the demo ------------------------------------------------------------------------------------

@pytest.fixture
def absent_method(monkeypatch):
    """A fifth built-in method name whose module this build lacks (as each of the four was
    before its branch landed)."""
    import lfi_fast.explain

    monkeypatch.setattr(lfi_fast.explain, "METHODS", lfi_fast.explain.METHODS + ("absent",))


def _demo_argv(out, methods="toy,absent") -> list:
    return ["demo", *TOY, "--methods", methods, "--data", "digits", "--limit", "80", "--epochs", "1",
            "--batch-size", "32", "--out", out, "--no-kernels", "--device", "cpu"]


def test_demo_writes_the_report_and_names_a_missing_method(tmp_path, capsys, absent_method):
    out = tmp_path / "demo"
    rc, stdout, err = call(_demo_argv(out), capsys)
    assert rc == 0, err
    doc = json.loads((out / "metrics.json").read_text())
    status = {r["method"]: r for r in doc["methods"]}
    assert status["toy"]["status"] == "ok" and status["toy"]["explained"] == 80
    assert set(status["toy"]["metrics"]) == {"accuracy", "flip_rate", "train_seconds"}
    assert status["absent"]["status"] == "missing" and "lfi_fast.explain.absent" in status["absent"]["error"]
    assert doc["finished"] and doc["data"] == "digits"
    page = (out / "index.html").read_text()
    assert "Not available in this build" in page and "<h2 id='toy'>" in page
    images = re.findall(r"<img src='([^']+)'", page)
    assert "toy/toy_saliency.png" in images and "toy/explanations.png" in images
    for src in images:
        assert (out / src).stat().st_size > 0
    assert load_file(str(out / "toy" / "explanations" / batch.MERGED))["index"].tolist() == list(range(80))
    assert "missing" in stdout and f"report: {out / 'index.html'}" in stdout


def test_demo_reports_a_failing_method_and_exits_1(tmp_path, capsys, monkeypatch):
    def broken(self, loader, *, progress=True):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(toy_explainer.ToyExplainer, "evaluate", broken)
    rc, stdout, err = call(_demo_argv(tmp_path, "toy"), capsys)
    assert rc == 1 and "toy failed" in one_line_error(err, "demo")
    page = (tmp_path / "index.html").read_text()
    assert "evaluation exploded" in page and "class='failed'" in page


def test_kernel_timings_table():
    rows = demo.kernel_timings(rows=128, dim=64, reps=1)
    names = [r["provider"] for r in rows]
    assert "geoopt" in names and names[0] == "geoopt"
    if "cpp" in lfi_fast.available_backends():
        assert "lfi_fast:cpp" in names
    for r in rows:
        assert r["max_rel_err"] < 1e-4 and r["fwd_bwd_ms"] > 0
