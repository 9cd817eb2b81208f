"""A small explainer for the batch and CLI tests, following METHODS.md's interface: a linear
classifier, and an explanation whose noise is Philox drawn from (seed, dataset index) exactly as
the real methods must draw it (one stream per run of consecutive indices, at offset
index[start] * counters per example). Loaded by the CLI with `--method-module toy_explainer`
(tests/ on PYTHONPATH).

TOY_SLEEP=<seconds> makes explain() sleep per call, so that a test can kill a run half-way."""
from __future__ import annotations

import dataclasses
import os
import time

import matplotlib

matplotlib.use("Agg")
import torch
from torch import nn

from lfi_fast.explain.base import Explainer, Explanation, check_images, contiguous_runs, progress_bar
from lfi_fast.reference import random as philox


@dataclasses.dataclass
class ToyConfig:
    classifier: str = "toy:linear"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    n_samples: int = 3
    noise: float = 0.3


def default_config(data: str, **overrides) -> ToyConfig:
    return ToyConfig(**overrides)


@dataclasses.dataclass
class ToyResult(Explanation):
    logits: torch.Tensor        # (B, K) float32
    pred: torch.Tensor          # (B,) int64
    saliency: torch.Tensor      # (B, C, H, W): input x weight of the target class
    noisy_pred: torch.Tensor    # (B, n_samples) int64: prediction under per-example noise
    noise_sum: torch.Tensor     # (B,) float64: sum of the example's noise (depends only on (seed, index))

    def records(self) -> list[dict]:
        return [{"pred": int(p), "flips": int((q != p).sum())} for p, q in zip(self.pred, self.noisy_pred)]

    def plot(self, max_rows: int = 8):
        import matplotlib.pyplot as plt

        k = min(max_rows, len(self))
        fig, axes = plt.subplots(1, max(k, 1), figsize=(1.5 * max(k, 1), 1.6), squeeze=False)
        for i in range(k):
            axes[0, i].imshow(self.saliency[i, 0].numpy(), cmap="RdBu")
            axes[0, i].set_title(f"pred {int(self.pred[i])}", fontsize=8)
            axes[0, i].axis("off")
        return fig


class ToyExplainer(Explainer):
    METHOD = "toy"
    Config = ToyConfig

    def __init__(self, config: ToyConfig, classifier: nn.Module | None = None):
        super().__init__(config)
        c = config
        self.classifier = classifier or nn.Sequential(
            nn.Flatten(), nn.Linear(c.in_channels * c.image_size ** 2, c.num_classes))
        self.register_buffer("classifier_ready", torch.tensor(classifier is not None))

    def fit(self, train_loader, epochs=None, *, progress=True) -> dict:
        history = {"loss": []}
        if bool(self.classifier_ready):  # a classifier given (frozen): nothing to train
            return history
        opt = torch.optim.Adam(self.classifier.parameters(), lr=self.config.lr)
        for epoch in range(epochs or self.config.epochs):
            total = n = 0
            for x, y in progress_bar(train_loader, desc="toy", disable=not progress):
                loss = nn.functional.cross_entropy(self.classifier(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                n += len(y)
            history["loss"].append(total / max(n, 1))
        self.classifier_ready.fill_(True)
        return history

    @torch.no_grad()
    def evaluate(self, test_loader, *, progress=True) -> dict[str, float]:
        correct = flips = n = 0
        for i, (x, y) in enumerate(test_loader):
            res = self.explain(x, index=torch.arange(n, n + len(y)))
            correct += int((res.pred == y).sum())
            flips += int((res.noisy_pred != res.pred[:, None]).any(1).sum())
            n += len(y)
        return {"accuracy": correct / max(n, 1), "flip_rate": flips / max(n, 1)}

    @torch.no_grad()
    def explain(self, inputs, target=None, *, seed: int = 0, index=None) -> ToyResult:
        c = self.config
        x = check_images(inputs, c.in_channels, (c.image_size, c.image_size))
        b = x.shape[0]
        index = torch.arange(b) if index is None else torch.as_tensor(index).cpu()
        if index.shape != (b,):
            raise ValueError(f"index must be ({b},) (got {tuple(index.shape)})")
        if os.environ.get("TOY_SLEEP"):
            time.sleep(float(os.environ["TOY_SLEEP"]))
        per = c.n_samples * x[0].numel()  # normals per example
        counters = (per + 3) // 4  # Philox counters per example (4 lanes each)
        noise = torch.empty(b, per)
        for s, e in contiguous_runs(index):
            draw = philox.normal(seed, int(index[s]) * counters, (e - s) * counters * 4)
            noise[s:e] = draw.reshape(e - s, counters * 4)[:, :per]
        noise = noise.reshape(b, c.n_samples, *x.shape[1:])
        logits = self.classifier(x)
        pred = logits.argmax(-1)
        tgt = pred if target is None else torch.as_tensor(target).long()
        w = self.classifier[1].weight[tgt].reshape(x.shape)
        noisy = (x[:, None] + c.noise * noise).flatten(0, 1)
        noisy_pred = self.classifier(noisy).argmax(-1).reshape(b, c.n_samples)
        return ToyResult(logits=logits, pred=pred, saliency=x * w, noisy_pred=noisy_pred,
                         noise_sum=noise.double().flatten(1).sum(1))

    def report(self, test_loader, out_dir):
        from pathlib import Path

        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        x, _ = next(iter(test_loader))
        fig = self.explain(x[:6]).plot()
        path = out / "toy_saliency.png"
        fig.savefig(path, dpi=60)
        plt.close(fig)
        return [path]


def linear_classifier() -> nn.Module:
    """A user's own network for 8 x 8 images, as `--model toy_explainer:linear_classifier` names it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class Payload:
    """An object a weights file must not be able to smuggle in: unpickling it would flip the flag."""

    unpickled = False

    def __setstate__(self, state):
        Payload.unpickled = True
