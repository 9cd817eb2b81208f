"""What the four explainers share: the Explainer base class (config dataclass, fit / evaluate /
explain, save / load through safetensors + JSON), the Explanation result base class, forward hooks
on named layers, input checks and the progress bar.

A checkpoint directory holds `config.json` ({"method", "lfi_fast_version", "config"}) and
`weights.safetensors` (the explainer's state_dict, frozen classifier included). Loading never
unpickles anything; a checkpoint of another method is refused with an error naming both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


# ---- progress, seeds, checks ---------------------------------------------------------------------

def progress_enabled() -> bool:
    return os.environ.get("LFI_FAST_NO_PROGRESS", "") in ("", "0")


def progress_bar(iterable: Iterable, desc: str = "", total: int | None = None, disable: bool | None = None):
    """tqdm when it is installed and progress is on (LFI_FAST_NO_PROGRESS=1 turns it off)."""
    if disable is None:
        disable = not progress_enabled()
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
    # tqdm gets an iterator, not the iterable: handed a shuffling DataLoader itself, tqdm changed
    # the order of its batches (the results then depended on whether a progress bar was shown).
    return tqdm(iter(iterable), desc=desc, total=total, leave=False, dynamic_ncols=True)


def check_images(x: Any, channels: int, size: tuple[int, int], name: str = "inputs") -> torch.Tensor:
    """x must be a floating (N, C, H, W) tensor of the explainer's channels and size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != tuple(size):
        raise ValueError(f"{name} must be (N, {channels}, {size[0]}, {size[1]}) images "
                         f"(got {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (got {x.dtype})")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (got {value!r})")
    return value


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# ---- named layers --------------------------------------------------------------------------------

def get_layer(model: nn.Module, name: str, argument: str = "layer") -> nn.Module:
    """model's sub-module `name` (dotted path), or an error listing the names that exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise ValueError(f"{argument} {name!r} does not exist in the model; its layers: {shown}") from None


@contextlib.contextmanager
def capture(model: nn.Module, name: str, argument: str = "layer") -> Iterator[dict]:
    """Within the block, out["value"] holds the output of layer `name` of the last forward."""
    out: dict = {}
    handle = get_layer(model, name, argument).register_forward_hook(
        lambda _m, _i, o: out.__setitem__("value", o)
    )
    try:
        yield out
    finally:
        handle.remove()


def split_sequential(model: nn.Module, name: str, argument: str = "layer") -> tuple[nn.Module, nn.Module]:
    """(head, tail) of an nn.Sequential split after its child `name`: model(x) == tail(head(x))."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{argument}: splitting needs an nn.Sequential (got {type(model).__name__}); "
                         "use forward hooks (capture) for other models")
    names = [n for n, _ in model.named_children()]
    if name not in names:
        raise ValueError(f"{argument} {name!r} is not a child of the model; its children: {', '.join(names)}")
    i = names.index(name) + 1
    children = list(model.named_children())
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(children[:i])), nn.Sequential(OrderedDict(children[i:]))


# ---- results -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Explanation:
    """Base of the explainers' results: tensors batch first. Subclasses add fields and plot()."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch-first tensors of the result (what a batch shard stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def records(self) -> list[dict] | None:
        """Ragged results, one JSON-able dict per row (rules, intervention paths), or None."""
        return None

    def __len__(self) -> int:
        for t in self.tensors().values():
            return t.shape[0]
        return 0

    def plot(self, max_rows: int = 8):  # pragma: no cover - overridden
        raise NotImplementedError(f"{type(self).__name__} has no plot()")


# ---- the explainer -------------------------------------------------------------------------------

class Explainer(nn.Module):
    """Base class of the four explainers.

    A subclass sets METHOD (its module name: "invariance", "intervention", "flint", "hyperbolic")
    and Config (a dataclass of JSON-able fields), and builds every sub-module from
    (config, classifier) in __init__, so that load() can rebuild it before loading the weights.
    """

    METHOD: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self, config):
        super().__init__()
        if not dataclasses.is_dataclass(config) or not isinstance(config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__} (got {type(config).__name__})")
        self.config = config

    # Subclasses implement these four.
    def fit(self, train_loader, epochs: int | None = None, *, progress: bool = True) -> dict:
        raise NotImplementedError

    def evaluate(self, test_loader, *, progress: bool = True) -> dict[str, float]:
        raise NotImplementedError

    def explain(self, inputs: torch.Tensor, target: torch.Tensor | None = None, **kwargs) -> Explanation:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return module_device(self)

    # ---- checkpoints ----
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # safetensors refuses tensors that share storage: each is stored as its own copy
        tensors = {k: v.detach().to("cpu").contiguous().clone()
                   for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}
        meta = {"method": self.METHOD, "lfi_fast_version": __version__}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path / WEIGHTS_FILE)
        doc = {**meta, "config": dataclasses.asdict(self.config)}
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / CONFIG_FILE)
        return path

    @classmethod
    def read_config(cls, path: str | os.PathLike):
        """The Config stored in a checkpoint directory, after checking it is this method's."""
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an lfi_fast checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        doc = json.loads(cfg_file.read_text())
        method = doc.get("method")
        if method != cls.METHOD:
            raise ValueError(f"checkpoint {path} was saved by method {method!r}, not {cls.METHOD!r}: "
                             f"load it with lfi_fast.explain.load_explainer or that method's class")
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = set(doc["config"]) - fields
        if unknown:
            raise ValueError(f"checkpoint {path}: unknown config fields {sorted(unknown)} for {cls.Config.__name__}")
        return cls.Config(**doc["config"])

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", **kwargs):
        """Rebuild the explainer from config.json and load weights.safetensors (no unpickling).
        kwargs go to the constructor (e.g. classifier=, a model instance when the config names a
        user model that cannot be imported here)."""
        from safetensors.torch import load_file

        path = Path(path)
        config = cls.read_config(path)
        obj = cls(config, **kwargs)
        state = load_file(str(path / WEIGHTS_FILE), device=str(map_location))
        missing, unexpected = obj.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit {cls.__name__}: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        obj.to(map_location)
        obj.eval()
        return obj


def load_explainer(path: str | os.PathLike, map_location: str | torch.device = "cpu", **kwargs) -> Explainer:
    """Load a checkpoint of any method (the method is read from its config.json)."""
    import importlib

    from . import METHODS, _CLASSES

    path = Path(path)
    try:
        method = json.loads((path / CONFIG_FILE).read_text())["method"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{path} is not an lfi_fast checkpoint ({e})") from e
    if method not in METHODS:
        raise ValueError(f"checkpoint {path}: unknown method {method!r}")
    cls_name = next(k for k, v in _CLASSES.items() if v == method)
    cls = getattr(importlib.import_module(f"lfi_fast.explain.{method}"), cls_name)
    return cls.load(path, map_location=map_location, **kwargs)


def contiguous_runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) positions of the runs of consecutive dataset indices in `index`, so that a
    method can draw one random stream per run at offset index[start] * (counters per example):
    every example's noise then depends on (seed, its dataset index) only, whatever the batch."""
    if index.dim() != 1:
        raise ValueError(f"index must be 1-dim (got shape {tuple(index.shape)})")
    if index.numel() == 0:
        return []
    idx = index.detach().cpu()
    breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1).tolist()
    starts = [0] + breaks
    ends = breaks + [idx.numel()]
    return list(zip(starts, ends))
