"""Small default networks the methods explain (and train when the user brings none), and how a
user's own model is named on the command line (`module:callable`).

Every network is an nn.Sequential with named layers, so that a hidden layer is addressed by name
(`"pool2"`, `"tap"`, `"block3"`) both for splitting and for forward hooks.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

__all__ = ["SmallCNN", "FlintNet", "ConvBlocks3", "BUILTIN", "build_model", "train_classifier", "accuracy"]


def SmallCNN(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """A two-conv classifier for 28x28 images (99 % on MNIST): the default classifier of the
    invariance and intervention methods. Hidden layers: conv1 relu1 pool1 conv2 relu2 pool2
    flatten fc1 relu3 drop fc2."""
    side = image_size // 4
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 32, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * side * side, 128)), ("relu3", nn.ReLU()), ("drop", nn.Dropout(0.25)),
        ("fc2", nn.Linear(128, num_classes)),
    ]))


def FlintNet(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """FLINT's published MNIST predictor: 3x3 convolutions with 16 and 32 channels, max-pool
    (the 32x14x14 output, layer "tap", is what the interpreter reads), dropout, 6272 -> 128 -> 10."""
    side = image_size // 2
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
        ("tap", nn.MaxPool2d(2)), ("drop1", nn.Dropout(0.25)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * side * side, 128)), ("relu3", nn.ReLU()), ("drop2", nn.Dropout(0.5)),
        ("fc2", nn.Linear(128, num_classes)),
    ]))


def ConvBlocks3(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """Three conv blocks (conv 3x3, batch norm, ReLU, max-pool; 32, 64, 64 channels) giving 64x4x4
    features for 28x28 inputs (layer "block3"), then a linear classifier: the hyperbolic method's
    default classifier."""

    def block(cin, cout, ceil):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2, ceil_mode=ceil))

    side = image_size
    for _ in range(3):
        side = (side + 1) // 2
    return nn.Sequential(OrderedDict([
        ("block1", block(in_channels, 32, False)), ("block2", block(32, 64, False)),
        ("block3", block(64, 64, True)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64 * side * side, num_classes)),
    ]))


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "SmallCNN": SmallCNN,
    "FlintNet": FlintNet,
    "ConvBlocks3": ConvBlocks3,
}


def build_model(spec: str, **kwargs) -> nn.Module:
    """A network from its name: "builtin:<name>" (one of BUILTIN) or "package.module:callable", an
    importable function (or class) that returns the nn.Module. Weights are not loaded here: the
    explainer's checkpoint (safetensors) holds them."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"model must be 'builtin:<name>' or 'module:callable' (got {spec!r})")
    module_name, _, attr = spec.partition(":")
    if module_name == "builtin":
        if attr not in BUILTIN:
            raise ValueError(f"unknown built-in model {attr!r}: one of {', '.join(BUILTIN)}")
        return BUILTIN[attr](**kwargs)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    model = fn()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


@torch.no_grad()
def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu") -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def train_classifier(
    model: nn.Module,
    loader,
    epochs: int = 1,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[float]:
    """Plain Adam + cross-entropy training; returns the mean loss per epoch."""
    from .explain.base import progress_bar

    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in progress_bar(loader, desc=f"classifier epoch {epoch + 1}/{epochs}", disable=not progress):
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            n += len(y)
        history.append(total / max(n, 1))
    model.eval()
    return history
