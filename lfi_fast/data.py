"""Data sets the methods train and explain on: scikit-learn's digits (embedded default), MNIST and
Fashion-MNIST (IDX files, images possibly split into parts), and the user's own images (a folder in
ImageFolder layout, or a safetensors file with `images` and `labels`).

Every loader returns a TensorDataset of (images float32 in [0, 1] shaped (N, C, H, W), labels int64).

    from lfi_fast.data import load_dataset
    test = load_dataset("mnist", split="test")            # ../shared/data/mnist, or $LFI_FAST_DATA/mnist
    train = load_dataset("digits", split="train", image_size=28)
"""
from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "load_dataset", "data_dirs", "read_idx", "num_classes"]

DATASETS = ("digits", "mnist", "fashion-mnist")
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def data_dirs(name: str) -> list[Path]:
    """Where a named data set is looked for, in order: $LFI_FAST_DATA/<name>, then
    ../shared/data/<name> beside the repository (the package's parent folder) and beside the
    current directory."""
    out = []
    if os.environ.get("LFI_FAST_DATA"):
        out.append(Path(os.environ["LFI_FAST_DATA"]) / name)
    repo = Path(__file__).resolve().parents[1]
    out.append(repo.parent / "shared" / "data" / name)
    cwd_candidate = Path.cwd().resolve().parent / "shared" / "data" / name
    if cwd_candidate not in out:
        out.append(cwd_candidate)
    return out


def read_idx(paths: list[Path]) -> torch.Tensor:
    """An IDX file (uint8 values, big-endian header), given as its parts in order: each part is a
    complete gzip'd (or plain) IDX file; the result is the concatenation along the first dim."""
    chunks, tail = [], None
    for p in paths:
        opener = gzip.open if str(p).endswith(".gz") else open
        with opener(p, "rb") as f:
            raw = f.read()
        if len(raw) < 4:
            raise ValueError(f"{p}: not an IDX file (too short)")
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{p}: not an IDX file of uint8 (magic {raw[:4].hex()})")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        body = raw[4 + 4 * ndim :]
        expected = 1
        for d in dims:
            expected *= d
        if len(body) != expected:
            raise ValueError(f"{p}: header says {dims} ({expected} bytes), body has {len(body)}")
        if tail is not None and tuple(dims[1:]) != tail:
            raise ValueError(f"{p}: item shape {dims[1:]} differs from the previous parts' {tail}")
        tail = tuple(dims[1:])
        chunks.append(torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def _idx_files(folder: Path, stem: str) -> list[Path] | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return [candidate]
    parts = sorted(folder.glob(f"{stem}.part*-of-*.gz")) or sorted(folder.glob(f"{stem}.part*-of-*"))
    if parts:
        total = int(parts[0].name.split("-of-")[1].split(".")[0])
        if len(parts) != total:
            raise FileNotFoundError(f"{folder}: {stem} has {len(parts)} of its {total} parts")
        return parts
    return None


@lru_cache(maxsize=8)
def _load_idx_dataset(name: str, split: str, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    folders = [Path(data_dir)] if data_dir else data_dirs(name)
    prefix = _IDX_PREFIX[split]
    tried = []
    for folder in folders:
        images = _idx_files(folder, f"{prefix}-images-idx3-ubyte")
        labels = _idx_files(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x, y = read_idx(images), read_idx(labels)
            if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{folder}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
            return x, y
        tried.append(str(folder))
    raise FileNotFoundError(
        f"{name} ({split}) not found: looked for {prefix}-images-idx3-ubyte[.gz|.partNN-of-MM.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz] in {', '.join(tried)} (set --data-dir or $LFI_FAST_DATA)"
    )


@lru_cache(maxsize=2)
def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency of the methods
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    idx = torch.arange(len(d.target)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    take = train_idx if split == "train" else test_idx
    images = torch.as_tensor(d.images[take], dtype=torch.float32) / 16.0
    return images, torch.as_tensor(d.target[take], dtype=torch.int64)


def _image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image
    import numpy as np

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: an image folder needs one sub-folder per class (ImageFolder layout)")
    images, labels, shape = [], [], None
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in ("L", "1", "P", "I", "I;16", "LA") else im.convert("RGB")
                a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
            a = a[None] if a.dim() == 2 else a.permute(2, 0, 1)
            if shape is not None and a.shape != shape:
                raise ValueError(f"{f}: shape {tuple(a.shape)} differs from the others' {tuple(shape)} "
                                 "(resize the images, or pass image_size)")
            shape = a.shape
            images.append(a)
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no image files ({', '.join(_IMAGE_SUFFIXES)}) in its class folders")
    return torch.stack(images).float() / 255.0, torch.tensor(labels, dtype=torch.int64), classes


def _safetensors_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    if "images" not in t or "labels" not in t:
        raise ValueError(f"{path}: a data file needs tensors 'images' and 'labels' (got {sorted(t)})")
    x, y = t["images"], t["labels"]
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: images must be (N, C, H, W) or (N, H, W) and labels (N,) "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{path}: floating images must lie in [0, 1]")
    else:
        raise ValueError(f"{path}: images must be uint8 or floating (got {x.dtype})")
    return x, y.long()


def _resize(x: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[0] == 0:
        return x.new_zeros(0, x.shape[1], *size)
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.clamp_(0.0, 1.0)


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    limit: int | None = None,
) -> TensorDataset:
    """A data set as a TensorDataset (images float32 in [0, 1], (N, C, H, W); labels int64).

    name: "digits" (scikit-learn's, fixed stratified 80/20 split, seed 0), "mnist",
      "fashion-mnist" (IDX files in data_dir, else $LFI_FAST_DATA/<name>, else ../shared/data/<name>),
      or a path: a folder of images in ImageFolder layout (one sub-folder per class; the split is
      ignored) or a .safetensors file with `images` and `labels`.
    image_size: resize (bilinear, antialiased) to this size; the demo runs digits at 28.
    limit: keep the first `limit` examples.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None (got {limit!r})")
    if name == "digits":
        x, y = _digits(split)
        x = x[:, None]
    elif name in ("mnist", "fashion-mnist"):
        x, y = _load_idx_dataset(name, split, str(data_dir) if data_dir else None)
        x = x[:, None].float() / 255.0
        y = y.long()
    else:
        path = Path(name)
        if path.is_dir():
            x, y, _ = _image_folder(path)
        elif path.is_file() and path.suffix == ".safetensors":
            x, y = _safetensors_file(path)
        else:
            raise ValueError(
                f"data set must be one of {DATASETS}, a folder of images (ImageFolder layout) or a "
                f".safetensors file (got {name!r})"
            )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if image_size is not None:
        x = _resize(x, image_size)
    return TensorDataset(x.contiguous(), y.contiguous())


def num_classes(dataset: TensorDataset) -> int:
    labels = dataset.tensors[1]
    return int(labels.max()) + 1 if labels.numel() else 0
