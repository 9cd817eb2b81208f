"""lfi_fast.data (digits, MNIST/Fashion-MNIST IDX, image folders, safetensors files), the default
networks, and the explainer base class's checkpoints."""
from __future__ import annotations

import dataclasses
import gzip
import json
import struct

import pytest
import torch
from torch import nn

from lfi_fast import data, models
from lfi_fast.explain import base


def _write_idx(path, array: torch.Tensor, gz=True):
    header = struct.pack(">HBB", 0, 8, array.dim()) + struct.pack(">" + "I" * array.dim(), *array.shape)
    raw = header + array.to(torch.uint8).numpy().tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def test_digits_split_is_fixed_stratified_and_resizable():
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape[1:] == (1, 8, 8) and len(xtr) + len(xte) == 1797
    assert abs(len(xte) / 1797 - 0.2) < 0.01
    assert xtr.dtype == torch.float32 and 0 <= xtr.min() and xtr.max() <= 1 and ytr.dtype == torch.int64
    assert (yte.bincount(minlength=10) > 30).all()  # stratified: every class in the test split
    again = data.load_dataset("digits", "test")
    assert torch.equal(again.tensors[1], yte)
    big = data.load_dataset("digits", "test", image_size=28, limit=5)
    assert big.tensors[0].shape == (5, 1, 28, 28) and big.tensors[0].max() <= 1


def test_idx_parts_join_and_errors(tmp_path):
    imgs = torch.randint(0, 256, (7, 4, 3))
    labels = torch.randint(0, 10, (7,))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.part00-of-02.gz", imgs[:4])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.part01-of-02.gz", imgs[4:])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = data.load_dataset("mnist", "test", data_dir=tmp_path)
    x, y = ds.tensors
    assert torch.equal((x[:, 0] * 255).round().to(torch.int64), imgs) and torch.equal(y, labels)
    with pytest.raises(FileNotFoundError, match="train-images"):
        data.load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.part01-of-02.gz").unlink()
    data._load_idx_dataset.cache_clear()
    with pytest.raises(FileNotFoundError, match="1 of its 2 parts"):
        data.load_dataset("mnist", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("mnist", "val")
    with pytest.raises(ValueError, match="data set must be one of"):
        data.load_dataset("cifar")


@pytest.mark.skipif(not any(p.is_dir() for p in data.data_dirs("mnist")), reason="no ../shared/data")
def test_mnist_from_shared_data():
    x, y = data.load_dataset("mnist", "test").tensors
    assert x.shape == (10000, 1, 28, 28) and y.bincount().tolist()[0] == 980


def test_safetensors_and_image_folder(tmp_path):
    from safetensors.torch import save_file
    from PIL import Image

    save_file({"images": torch.randint(0, 256, (5, 6, 6), dtype=torch.uint8),
               "labels": torch.arange(5)}, str(tmp_path / "d.safetensors"))
    x, y = data.load_dataset(str(tmp_path / "d.safetensors")).tensors
    assert x.shape == (5, 1, 6, 6) and x.max() <= 1 and y.tolist() == [0, 1, 2, 3, 4]
    save_file({"images": torch.zeros(3, 1, 2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="labels"):
        data.load_dataset(str(tmp_path / "bad.safetensors"))
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((torch.rand(5, 5) * 255).to(torch.uint8).numpy()).save(tmp_path / "imgs" / cls / f"{i}.png")
    x, y = data.load_dataset(str(tmp_path / "imgs"), image_size=8).tensors
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name,tap,tap_shape", [("SmallCNN", "pool2", (64, 7, 7)),
                                                 ("FlintNet", "tap", (32, 14, 14)),
                                                 ("ConvBlocks3", "block3", (64, 4, 4))])
def test_builtin_models_and_layers(name, tap, tap_shape):
    m = models.build_model(f"builtin:{name}").eval()
    x = torch.rand(2, 1, 28, 28)
    with base.capture(m, tap) as out:
        logits = m(x)
    assert logits.shape == (2, 10) and out["value"].shape[1:] == tap_shape
    head, tail = base.split_sequential(m, tap)
    assert torch.allclose(tail(head(x)), logits)
    with pytest.raises(ValueError, match="does not exist"):
        base.get_layer(m, "nope")


def test_build_model_errors():
    with pytest.raises(ValueError, match="module:callable"):
        models.build_model("SmallCNN")
    with pytest.raises(ValueError, match="unknown built-in"):
        models.build_model("builtin:Nope")
    with pytest.raises(ValueError, match="cannot import"):
        models.build_model("no_such_module_xyz:f")
    assert isinstance(models.build_model("torch.nn:Identity"), nn.Identity)


@dataclasses.dataclass
class _Cfg:
    width: int = 3


class _Toy(base.Explainer):
    METHOD = "flint"
    Config = _Cfg

    def __init__(self, config):
        super().__init__(config)
        self.lin = nn.Linear(config.width, 2)
        self.tied = self.lin  # shared parameters must still save


class _Other(_Toy):
    METHOD = "invariance"


def test_checkpoint_round_trip_and_wrong_method(tmp_path):
    toy = _Toy(_Cfg(width=4))
    toy.save(tmp_path / "ck")
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["method"] == "flint" and doc["config"] == {"width": 4}
    back = _Toy.load(tmp_path / "ck")
    x = torch.randn(3, 4)
    assert torch.equal(back.lin(x), toy.lin(x))
    with pytest.raises(ValueError, match="saved by method 'flint', not 'invariance'"):
        _Other.load(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not an lfi_fast checkpoint"):
        _Toy.load(tmp_path / "missing")
    with pytest.raises(TypeError, match="config must be"):
        _Toy({"width": 3})


def test_check_images():
    base.check_images(torch.rand(2, 1, 28, 28), 1, (28, 28))
    with pytest.raises(ValueError, match=r"inputs must be \(N, 1, 28, 28\)"):
        base.check_images(torch.rand(2, 3, 28, 28), 1, (28, 28))
    with pytest.raises(ValueError, match="finite"):
        base.check_images(torch.full((1, 1, 28, 28), float("nan")), 1, (28, 28))


def test_progress_bar_does_not_change_the_batches(monkeypatch):
    """A shuffling DataLoader gives the same batches, epoch after epoch, with the progress bar on
    and off (handed the loader itself, tqdm changed their order, and so every trained model)."""
    pytest.importorskip("tqdm")
    monkeypatch.delenv("LFI_FAST_NO_PROGRESS", raising=False)
    ds = torch.utils.data.TensorDataset(torch.arange(100.0))

    def epochs(show: bool) -> list[list[float]]:
        loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        out = []
        for _ in range(3):
            bar = base.progress_bar(loader, desc="test", disable=not show)
            out.append([v for (b,) in bar for v in b.tolist()])
        return out

    shown, hidden = epochs(True), epochs(False)
    assert shown == hidden
    assert shown[0] != shown[1]  # the loader does shuffle: the comparison means something
    assert sorted(shown[0]) == [float(i) for i in range(100)]
    bar = base.progress_bar(range(5), desc="test", disable=False)
    assert list(bar) == list(range(5)) and bar.total == 5
