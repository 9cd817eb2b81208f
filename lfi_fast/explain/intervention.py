"""Latent intervention explainer: a discrete VAE on a hidden layer of a frozen classifier, a
generator back to the image, and a batched search for the fewest code changes that change the class.

The classifier f is split at a hidden layer K: f = f_K ∘ φ_K (ClassifierSplit: an nn.Sequential is
cut after its child `layer`; any other model is cut with forward hooks). On φ_K(x) we train

- an encoder q(c | φ) over V categorical variables of K categories (binary by default), sampled with
  Gumbel-softmax (lfi_fast.gumbel) at a temperature annealed from tau_start to tau_end,
- a decoder from the code to φ'(x), with a reconstruction loss, a KL term to the uniform prior and a
  fidelity term KL(f(x) || f_K(φ'(x))) so that the reconstruction keeps the classifier's prediction,
- a generator g from φ'(x) to the image.

An intervention changes some variables of the code c(x) = argmax q(c | φ(x)); its decoded
representation ψ is classified by f_K. The search (explain) tries every single change of every input
at once (gumbel.single_intervention_one_hot: one pass of the decoder and f_K over all of them), then
keeps a beam of the best partial interventions and extends each by every single change again, until
f_K(ψ) predicts the target (a class, or any class other than the starting one). The result holds the
changed variables in order, the class probabilities along the way, g(φ'(x)), g(ψ) and their
difference, and how robust the intervention is when the unchanged variables are Gumbel samples
instead of the argmax code (gumbel op with forced variables, noise seeded per dataset index).

The global view (concepts): for each variable, how often changing it changes the class, from which
class to which; the bias report lists variables whose change moves one class's predictions much more
than the others'.

Full run (writes metrics.json, the figures and the checkpoint):

    python -m lfi_fast.explain.intervention --data mnist --out results/intervention
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import gumbel
from ..models import build_model, train_classifier
from .base import (Explainer, Explanation, capture, check_images, check_positive_int, contiguous_runs,
                   get_layer, progress_bar, split_sequential)

__all__ = ["InterventionExplainer", "InterventionConfig", "InterventionResult", "ConceptReport",
           "ClassifierSplit", "default_config", "search_loop"]


# ---- the classifier, split at a hidden layer -----------------------------------------------------

class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the captured layer has run."""


class ClassifierSplit:
    """f = tail ∘ head, cut after the layer `layer` of `model`.

    An nn.Sequential whose child is `layer` is split into two Sequentials sharing its modules (no
    wasted work). Any other model is cut with forward hooks: head(x) runs the model until the layer
    and stops; tail(h) runs the model on a zero image batch with the layer's output replaced by h.
    The hooks are correct only when nothing computed before the layer reaches the output other than
    through it: check(x) verifies tail(head(x)) == f(x) on a batch and raises otherwise.

    Not an nn.Module on purpose: the model's parameters are registered once, by the explainer.
    """

    def __init__(self, model: nn.Module, layer: str, input_shape: tuple[int, ...]):
        self.model, self.layer, self.input_shape = model, layer, tuple(input_shape)
        self.module = get_layer(model, layer, "layer")  # a clear error for a layer that does not exist
        self.sequential = isinstance(model, nn.Sequential) and layer in dict(model.named_children())
        if self.sequential:
            self._head, self._tail = split_sequential(model, layer, "layer")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequential:
            return self._head(x)
        out: dict = {}

        def hook(_m, _i, o):
            out["value"] = o
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not isinstance(out.get("value"), torch.Tensor):
            raise ValueError(f"layer {self.layer!r} did not produce a tensor in the model's forward")
        return out["value"]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        if self.sequential:
            return self._tail(h)
        x0 = h.new_zeros((h.shape[0], *self.input_shape))
        handle = self.module.register_forward_hook(lambda _m, _i, _o: h)
        try:
            return self.model(x0)
        finally:
            handle.remove()

    @torch.no_grad()
    def check(self, x: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4) -> None:
        """Raise ValueError unless tail(head(x)) equals model(x) on this batch (eval mode)."""
        ref = self.model(x)
        got = self.tail(self.head(x))
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=rtol, atol=atol):
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
            raise ValueError(
                f"classifier: the split at layer {self.layer!r} does not compose back to the classifier "
                f"(f_K(phi_K(x)) differs from f(x) on a batch: shapes {tuple(got.shape)} vs "
                f"{tuple(ref.shape)}, max abs difference {diff:.3g}); split at a layer through which "
                f"everything flows (no skip connection around it)")


# ---- config --------------------------------------------------------------------------------------

@dataclasses.dataclass
class InterventionConfig:
    classifier: str = "builtin:SmallCNN"
    layer: str = "relu3"              # φ_K is the output of this layer (SmallCNN: 128 features)
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    num_variables: int = 16           # V (MNIST: 32 needs 4-5 changes for a third of the inputs)
    num_categories: int = 2           # K (2: binary variables)
    hidden: int = 256                 # encoder/decoder MLP width
    generator_channels: int = 32
    tau_start: float = 1.0            # Gumbel-softmax temperature, annealed geometrically
    tau_end: float = 0.3
    hard: bool = False                # straight-through hard samples in training
    recon_weight: float = 1.0
    kl_weight: float = 0.01
    fidelity_weight: float = 4.0
    epochs: int = 30                  # discrete VAE epochs (on cached features: cheap)
    generator_epochs: int = 3
    classifier_epochs: int = 2        # when the built-in classifier is trained first
    batch_size: int = 128
    lr: float = 1e-3
    classifier_lr: float = 1e-3
    generator_lr: float = 2e-3
    beam_width: int = 8
    max_changes: int = 5              # search depth
    n_samples: int = 16               # Gumbel samples per input to score an intervention's robustness
    seed: int = 0


def default_config(data: str, **overrides) -> InterventionConfig:
    """The tuned config for "digits" (at image_size 28), "mnist" and "fashion-mnist"."""
    presets = {
        "digits": dict(classifier_epochs=10, epochs=60, generator_epochs=20, batch_size=64),
        "mnist": dict(classifier_epochs=1, epochs=8, generator_epochs=3),
        "fashion-mnist": dict(classifier_epochs=2, epochs=8, generator_epochs=3),
    }
    if data not in presets:
        raise ValueError(f"data must be one of {', '.join(presets)} (got {data!r})")
    fields = {f.name for f in dataclasses.fields(InterventionConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown InterventionConfig fields: {sorted(unknown)}")
    return InterventionConfig(**{**presets[data], **overrides})


def _check_config(cfg: InterventionConfig) -> None:
    for name in ("in_channels", "image_size", "num_variables", "hidden", "generator_channels",
                 "batch_size", "beam_width", "max_changes", "n_samples"):
        check_positive_int(getattr(cfg, name), f"config.{name}")
    for name in ("epochs", "generator_epochs", "classifier_epochs"):
        check_positive_int(getattr(cfg, name), f"config.{name}", minimum=0)
    check_positive_int(cfg.num_classes, "config.num_classes", minimum=2)
    check_positive_int(cfg.num_categories, "config.num_categories", minimum=2)
    for name in ("tau_start", "tau_end", "lr", "classifier_lr", "generator_lr"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"config.{name} must be positive and finite (got {v!r})")
    for name in ("recon_weight", "kl_weight", "fidelity_weight"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"config.{name} must be >= 0 and finite (got {v!r})")


# ---- sub-modules ---------------------------------------------------------------------------------

def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class ImageGenerator(nn.Module):
    """g: a hidden representation (D features) to an image (C, S, S) in [0, 1]: a linear map to a
    (2c, S/4, S/4) map, two transposed convolutions (x2 each), a resize when S is not a multiple of 4."""

    def __init__(self, d_in: int, channels: int, image_size: int, width: int = 32):
        super().__init__()
        self.side = max(1, image_size // 4)
        self.image_size, self.width = image_size, width
        self.fc = nn.Linear(d_in, 2 * width * self.side * self.side)
        self.up = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # logits of the pixels
        y = self.up(self.fc(h).view(-1, 2 * self.width, self.side, self.side))
        if y.shape[-1] != self.image_size:
            y = F.interpolate(y, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return y


# ---- results -------------------------------------------------------------------------------------

@dataclasses.dataclass
class InterventionResult(Explanation):
    """explain()'s result, batch first (B inputs, V variables, S = max_changes steps, C classes).

    code, intervened_code (B, V) int64: the argmax code of φ(x) and the code after the intervention;
    changes, values (B, S) int64: the changed variables in the order the search added them and their
    new categories, -1 past num_changes; num_changes (B,); success (B,) bool;
    start_class (B,): f_K(φ'(x))'s class (where the search starts), classifier_class (B,): f(x)'s;
    target (B,): the target class, -1 for "any other class"; final_class (B,): f_K(ψ)'s class;
    probs (B, S + 1, C): the class probabilities of φ' and after each change (the last repeated past
    num_changes); success_rate (B,): the fraction of Gumbel samples of the unchanged variables (the
    changed ones forced) for which the intervention still reaches the target;
    inputs, reconstruction = g(φ'(x)), intervened = g(ψ), difference (B, C, H, W); index (B,).
    """

    index: torch.Tensor
    inputs: torch.Tensor
    code: torch.Tensor
    intervened_code: torch.Tensor
    changes: torch.Tensor
    values: torch.Tensor
    num_changes: torch.Tensor
    success: torch.Tensor
    classifier_class: torch.Tensor
    start_class: torch.Tensor
    target: torch.Tensor
    final_class: torch.Tensor
    probs: torch.Tensor
    success_rate: torch.Tensor
    reconstruction: torch.Tensor
    intervened: torch.Tensor
    difference: torch.Tensor

    def records(self) -> list[dict]:
        out = []
        for b in range(len(self.index)):
            n = int(self.num_changes[b])
            path = [{"variable": int(self.changes[b, s]), "value": int(self.values[b, s]),
                     "probs": [round(float(p), 6) for p in self.probs[b, s + 1]]} for s in range(n)]
            out.append({
                "index": int(self.index[b]), "classifier_class": int(self.classifier_class[b]),
                "start_class": int(self.start_class[b]), "target": int(self.target[b]),
                "success": bool(self.success[b]), "final_class": int(self.final_class[b]),
                "num_changes": n, "success_rate": round(float(self.success_rate[b]), 6),
                "start_probs": [round(float(p), 6) for p in self.probs[b, 0]], "path": path,
            })
        return out

    def plot(self, max_rows: int = 8):
        """Rows of original / reconstruction g(φ') / intervened g(ψ) / difference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(max_rows, len(self.index))
        fig, axes = plt.subplots(max(n, 1), 4, figsize=(7.2, 1.9 * max(n, 1)), squeeze=False)
        titles = ("original", "reconstruction", "intervened", "difference")
        for b in range(n):
            imgs = (self.inputs[b], self.reconstruction[b], self.intervened[b], self.difference[b])
            for j, img in enumerate(imgs):
                ax = axes[b, j]
                img = img.detach().float().cpu()
                if j == 3:
                    lim = max(float(img.abs().max()), 1e-6)
                    ax.imshow(img.mean(0), cmap="bwr", vmin=-lim, vmax=lim)
                else:
                    ax.imshow(img.permute(1, 2, 0).squeeze(-1).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if b == 0:
                    ax.set_title(titles[j], fontsize=9)
            k = int(self.num_changes[b])
            var = ", ".join(f"v{int(v)}={int(c)}" for v, c in zip(self.changes[b, :k], self.values[b, :k]))
            ok = "" if bool(self.success[b]) else " (failed)"
            axes[b, 0].set_ylabel(f"{int(self.start_class[b])}→{int(self.final_class[b])}{ok}", fontsize=9)
            axes[b, 2].set_xlabel(var if len(var) < 40 else var[:37] + "...", fontsize=7)
        fig.tight_layout()
        return fig


@dataclasses.dataclass
class ConceptReport(Explanation):
    """The global view over a data set (N inputs, V variables, C classes, K categories).

    transitions (V, C, C): how many single changes of variable v moved f_K's prediction from class
    i to class j (j != i); class_counts (C,): inputs per starting class; change_rate (V,): the fraction
    of single changes of v that change the class; class_change_rate (V, C): that fraction among the
    inputs of each starting class; destination (V, C): where the changes of v send inputs (fraction
    of the changes of v that end in class j); bias (V,): max over classes of class_change_rate minus
    the mean over the other classes; bias_class (V,): that class.
    """

    transitions: torch.Tensor
    class_counts: torch.Tensor
    change_rate: torch.Tensor
    class_change_rate: torch.Tensor
    destination: torch.Tensor
    bias: torch.Tensor
    bias_class: torch.Tensor
    num_categories: int = 2
    bias_threshold: float = 0.05

    def __len__(self) -> int:
        return self.change_rate.shape[0]

    def records(self) -> list[dict]:
        """One dict per variable: its change rate, where its changes lead, its bias."""
        out = []
        for v in range(len(self)):
            dest = self.destination[v]
            top = [int(c) for c in dest.argsort(descending=True)[:3] if dest[c] > 0]
            out.append({"variable": v, "change_rate": round(float(self.change_rate[v]), 6),
                        "to_classes": {str(c): round(float(dest[c]), 4) for c in top},
                        "bias": round(float(self.bias[v]), 6), "bias_class": int(self.bias_class[v])})
        return out

    def biased(self, threshold: float | None = None, ratio: float = 2.0) -> list[dict]:
        """The bias report: variables whose change moves one class's predictions more than the
        others': the change rate of that class exceeds the mean rate of the other classes by at
        least `threshold` and is at least `ratio` times it. Most biased first."""
        thr = self.bias_threshold if threshold is None else threshold
        order = self.bias.argsort(descending=True).tolist()
        out = []
        for v in order:
            top = float(self.class_change_rate[v, self.bias_class[v]])
            others = top - float(self.bias[v])
            if float(self.bias[v]) >= thr and top >= ratio * others:
                out.append({"variable": v, "class": int(self.bias_class[v]), "bias": round(float(self.bias[v]), 6),
                            "class_change_rate": round(top, 6), "other_classes_rate": round(others, 6)})
        return out

    def plot(self, max_rows: int = 64):
        """Variable x class heatmaps: how often changing v changes the class of inputs of each class
        (left), and where those changes lead (right)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        v = min(max_rows, len(self))
        c = self.class_change_rate.shape[1]
        fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.45 * c * 2, 1.5 + 0.22 * v), squeeze=False)
        for ax, mat, title in ((axes[0, 0], self.class_change_rate, "class changes when v changes\n(by starting class)"),
                               (axes[0, 1], self.destination, "where the changes of v lead\n(by new class)")):
            mat = mat[:v].float().cpu()
            im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(mat.max()), 1e-6))
            ax.set_xticks(range(c)), ax.set_xlabel("class")
            ax.set_yticks(range(v)), ax.set_yticklabels([f"v{i}" for i in range(v)], fontsize=6)
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        return fig


# ---- the explainer -------------------------------------------------------------------------------

class InterventionExplainer(Explainer):
    """Latent interventions on a hidden layer of a frozen classifier (see the module's docstring)."""

    METHOD = "intervention"
    Config = InterventionConfig

    def __init__(self, config: InterventionConfig, classifier: nn.Module | None = None):
        super().__init__(config)
        _check_config(config)
        cfg = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if classifier is None:
                kw = {}
                if cfg.classifier.startswith("builtin:"):
                    kw = dict(in_channels=cfg.in_channels, num_classes=cfg.num_classes, image_size=cfg.image_size)
                classifier = build_model(cfg.classifier, **kw)
                ready = False
            else:
                if not isinstance(classifier, nn.Module):
                    raise TypeError(f"classifier must be an nn.Module (got {type(classifier).__name__})")
                ready = True
            self.classifier = classifier
            for p in self.classifier.parameters():
                p.requires_grad_(False)
            self.classifier.eval()
            self.split = ClassifierSplit(classifier, cfg.layer, (cfg.in_channels, cfg.image_size, cfg.image_size))
            dev = next(iter(classifier.parameters()), torch.empty(0)).device
            with torch.no_grad():
                probe = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
                try:
                    feat = self.split.head(probe)
                    out = self.split.tail(feat)
                except (RuntimeError, ValueError) as e:
                    raise ValueError(f"classifier {cfg.classifier!r} does not run on "
                                     f"({cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) images "
                                     f"split at layer {cfg.layer!r}: {e}") from e
            if out.dim() != 2 or out.shape[1] != cfg.num_classes:
                raise ValueError(f"classifier outputs {tuple(out.shape[1:])} scores, config.num_classes is "
                                 f"{cfg.num_classes}")
            self.feature_shape = tuple(feat.shape[1:])
            d = int(torch.tensor(self.feature_shape).prod())
            self.feature_dim = d
            v, k = cfg.num_variables, cfg.num_categories
            self.encoder = _mlp(d, cfg.hidden, v * k)
            self.decoder = _mlp(v * k, cfg.hidden, d)
            self.generator = ImageGenerator(d, cfg.in_channels, cfg.image_size, cfg.generator_channels)
        self.register_buffer("classifier_ready", torch.tensor(ready))
        self.register_buffer("trained", torch.tensor(False))
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.register_buffer("tau", torch.tensor(float(cfg.tau_start)))

    # the classifier stays in eval mode (frozen: dropout and batch norm as at inference)
    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    # ---- the pieces ----
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ_K(x), flattened: (B, D)."""
        return self.split.head(x).reshape(x.shape[0], self.feature_dim)

    def classify_features(self, h: torch.Tensor) -> torch.Tensor:
        """f_K(h) for flattened features h (..., D): class scores (..., C)."""
        lead = h.shape[:-1]
        out = self.split.tail(h.reshape(-1, *self.feature_shape))
        return out.reshape(*lead, out.shape[-1])

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """q(c | φ) logits: (B, V, K)."""
        z = (h - self.feature_mean) / self.feature_std
        return self.encoder(z).view(h.shape[0], self.config.num_variables, self.config.num_categories)

    def decode(self, code_one_hot: torch.Tensor) -> torch.Tensor:
        """φ' from a (soft or one-hot) code (..., V, K): (..., D)."""
        lead = code_one_hot.shape[:-2]
        z = self.decoder(code_one_hot.reshape(-1, self.config.num_variables * self.config.num_categories))
        return (z * self.feature_std + self.feature_mean).reshape(*lead, self.feature_dim)

    def one_hot(self, codes: torch.Tensor) -> torch.Tensor:
        return F.one_hot(codes, self.config.num_categories).to(self.feature_mean.dtype)

    def generate(self, h: torch.Tensor) -> torch.Tensor:
        """g(h): images in [0, 1]."""
        return torch.sigmoid(self.generator(h))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(φ(x), code logits, argmax code) for images x."""
        h = self.features(x)
        logits = self.code_logits(h)
        return h, logits, logits.argmax(-1)

    def check_split(self, x: torch.Tensor) -> None:
        """Raise ValueError unless f_K(φ_K(x)) == f(x) on the batch x."""
        check_images(x, self.config.in_channels, (self.config.image_size,) * 2)
        self.split.check(x.to(self.device))

    # ---- training ----
    def fit(self, train_loader, epochs: int | None = None, *, progress: bool = True) -> dict:
        cfg = self.config
        epochs = cfg.epochs if epochs is None else check_positive_int(epochs, "epochs", minimum=0)
        device = self.device
        history: dict[str, list] = {}
        if not bool(self.classifier_ready):
            for p in self.classifier.parameters():
                p.requires_grad_(True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                history["classifier_loss"] = train_classifier(
                    self.classifier, train_loader, epochs=cfg.classifier_epochs, lr=cfg.classifier_lr,
                    device=device, progress=progress)
            for p in self.classifier.parameters():
                p.requires_grad_(False)
            self.classifier.eval()
            self.classifier_ready.fill_(True)
        self.classifier.eval()

        # φ_K(x), f(x) and x of the whole training set, once: the classifier is frozen, and the
        # VAE and the generator then train without running its convolutions again
        feats, scores, images = [], [], []
        first = True
        with torch.no_grad():
            for x, _y in progress_bar(train_loader, desc="features", disable=not progress):
                x = x.to(device)
                if first:
                    check_images(x, cfg.in_channels, (cfg.image_size,) * 2, "training images")
                    self.split.check(x[:64])
                    first = False
                h = self.features(x)
                feats.append(h)
                scores.append(self.classify_features(h))
                images.append(x)
        if first:
            raise ValueError("train_loader is empty")
        feats, scores, images = torch.cat(feats), torch.cat(scores), torch.cat(images)
        n = feats.shape[0]
        if not bool(self.trained):
            self.feature_mean.copy_(feats.mean(0))
            self.feature_std.copy_(feats.std(0, unbiased=False).clamp_min(1e-3 * float(feats.std()) + 1e-6))
        target_logp = F.log_softmax(scores, -1)

        # the discrete VAE on the cached features, temperature annealed over all its steps
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total = max(1, epochs * steps_per_epoch - 1)
        self.encoder.train(), self.decoder.train()
        step = 0
        for name in ("loss", "recon", "kl", "fidelity", "tau"):
            history.setdefault(name, [])
        for epoch in progress_bar(range(epochs), desc="discrete VAE", total=epochs, disable=not progress):
            perm = torch.randperm(n, generator=gen).to(device)
            sums = torch.zeros(4, device=device)
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / total)
                loss, parts = self._vae_loss(feats[idx], target_logp[idx], tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.stack([loss.detach(), *parts]) * len(idx)
                step += 1
            self.tau.fill_(tau)
            for name, value in zip(("loss", "recon", "kl", "fidelity"), (sums / n).tolist()):
                history[name].append(value)
            history["tau"].append(tau)
        self.encoder.eval(), self.decoder.eval()
        del scores, target_logp

        # the generator g: φ'(x) (the decoded argmax code) -> x
        with torch.no_grad():
            recon = torch.cat([self.decode(self.one_hot(self.code_logits(feats[i:i + 4096]).argmax(-1)))
                               for i in range(0, n, 4096)])
        del feats
        opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr)
        history.setdefault("generator_bce", [])
        self.generator.train()
        for epoch in progress_bar(range(cfg.generator_epochs), desc="generator", total=cfg.generator_epochs,
                                  disable=not progress):
            perm = torch.randperm(n, generator=gen).to(device)
            total_bce = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                loss = F.binary_cross_entropy_with_logits(self.generator(recon[idx]), images[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_bce += loss.detach() * len(idx)
            history["generator_bce"].append(float(total_bce) / n)
        self.generator.eval()
        self.trained.fill_(True)
        self.eval()
        return history

    def _vae_loss(self, h, target_logp, tau):
        cfg = self.config
        logits = self.code_logits(h)
        y = gumbel.gumbel_softmax(logits, tau=tau, hard=cfg.hard)
        z = (h - self.feature_mean) / self.feature_std
        z_rec = self.decoder(y.reshape(h.shape[0], -1))
        recon = F.mse_loss(z_rec, z)
        hp = z_rec * self.feature_std + self.feature_mean
        logq = F.log_softmax(self.classify_features(hp), -1)
        fidelity = F.kl_div(logq, target_logp, log_target=True, reduction="batchmean")
        logp = F.log_softmax(logits, -1)
        kl = (logp.exp() * (logp + math.log(cfg.num_categories))).sum((-1, -2)).mean()
        loss = cfg.recon_weight * recon + cfg.kl_weight * kl / cfg.num_variables + cfg.fidelity_weight * fidelity
        return loss, (recon.detach(), kl.detach(), fidelity.detach())

    # ---- the intervention search ----
    def _check_target(self, target, b: int, device) -> torch.Tensor:
        c = self.config.num_classes
        if target is None:
            return torch.full((b,), -1, dtype=torch.int64, device=device)
        if isinstance(target, bool):
            raise TypeError("target must be an int, a tensor of class indices, or None")
        if isinstance(target, int):
            t = torch.full((b,), target, dtype=torch.int64)
        elif isinstance(target, torch.Tensor):
            if target.dtype.is_floating_point or target.dtype == torch.bool or target.dtype.is_complex:
                raise TypeError(f"target must hold integer class indices (got {target.dtype})")
            t = target.reshape(-1).to(torch.int64)
            if t.numel() == 1 and b != 1:
                t = t.expand(b)
            if t.shape != (b,):
                raise ValueError(f"target must be an int or a (B,) tensor with B = {b} (got shape {tuple(target.shape)})")
        else:
            raise TypeError(f"target must be an int, a tensor of class indices, or None (got {type(target).__name__})")
        bad = (t < -1) | (t >= c)
        if bool(bad.any()):
            raise ValueError(f"target must be a class in [0, {c}) or -1 for any other class "
                             f"(got {int(t[bad][0])})")
        return t.to(device)

    @torch.no_grad()
    def _score(self, logp, start_cls, target):
        """Search scores and success of candidates' class log-probabilities logp (B, ..., C): the
        log-probability of the target, or of "any class but the start" (a logsumexp, which does not
        saturate where 1 - p(start) underflows)."""
        shape = logp.shape[:-1]
        sc = start_cls.view(-1, *([1] * (len(shape) - 1))).expand(shape)
        tg = target.view(-1, *([1] * (len(shape) - 1))).expand(shape)
        any_other = tg < 0
        lp_t = logp.gather(-1, tg.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        lp_o = logp.scatter(-1, sc.unsqueeze(-1), -math.inf).logsumexp(-1)
        score = torch.where(any_other, lp_o, lp_t)
        pred = logp.argmax(-1)
        success = torch.where(any_other, pred != sc, pred == tg)
        return score, success

    def _log_probs(self, code_one_hot: torch.Tensor) -> torch.Tensor:
        """log f_K(decode(code)) class probabilities: (..., V, K) -> (..., C)."""
        return torch.log_softmax(self.classify_features(self.decode(code_one_hot)), -1)

    def _candidate_log_probs(self, codes: torch.Tensor, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """Class log-probabilities of every single change of each code: (N, V) -> (N, V*(K-1), C),
        all of a chunk's candidates in one pass through the decoder and f_K."""
        n, v = codes.shape
        k = self.config.num_categories
        m = v * (k - 1)
        out = []
        step = max(1, chunk_rows // max(m, 1))
        for s in range(0, n, step):
            oh = gumbel.single_intervention_one_hot(codes[s:s + step], k, dtype=self.feature_mean.dtype)
            out.append(self._log_probs(oh))
        if not out:
            return codes.new_zeros((0, m, self.config.num_classes), dtype=self.feature_mean.dtype)
        return torch.cat(out)

    @torch.no_grad()
    def search(self, codes: torch.Tensor, target: torch.Tensor, *, max_changes: int | None = None,
               beam_width: int | None = None) -> dict[str, torch.Tensor]:
        """The batched beam search from argmax codes (B, V) to a target (B,) (-1: any other class).

        Step 1 evaluates every single change of every input in one pass; each later step extends
        each of the beam_width best partial interventions (no variable changed twice, duplicates
        removed) by every single change. An input stops at the first step where a candidate reaches
        its target; the best-scoring such candidate is kept. Returns a dict of tensors (see
        InterventionResult)."""
        cfg = self.config
        s_max = cfg.max_changes if max_changes is None else check_positive_int(max_changes, "max_changes")
        w = cfg.beam_width if beam_width is None else check_positive_int(beam_width, "beam_width")
        b, v = codes.shape
        s_max = min(s_max, v)  # no variable changes twice: every step then has a valid candidate
        k, c = cfg.num_categories, cfg.num_classes
        m = v * (k - 1)
        dev = codes.device
        logp0 = self._log_probs(self.one_hot(codes))  # (B, C)
        probs0 = logp0.exp()
        start = logp0.argmax(-1)
        _, ok0 = self._score(logp0, start, target)
        ok0 = ok0 & (target >= 0)  # the target is already the class: zero changes
        # final outputs
        changes = torch.full((b, s_max), -1, dtype=torch.int64, device=dev)
        values = torch.full((b, s_max), -1, dtype=torch.int64, device=dev)
        probs = probs0.unsqueeze(1).repeat(1, s_max + 1, 1)
        final_code = codes.clone()
        num = torch.zeros(b, dtype=torch.int64, device=dev)
        success = ok0.clone()
        # the beam of the inputs still searching: (A, W, ...)
        active = torch.nonzero(~ok0).flatten()
        beam_codes = codes[active].unsqueeze(1).repeat(1, w, 1)
        beam_changed = torch.zeros(len(active), w, v, dtype=torch.bool, device=dev)
        beam_valid = torch.zeros(len(active), w, dtype=torch.bool, device=dev)
        beam_valid[:, 0] = True
        beam_vars = torch.full((len(active), w, s_max), -1, dtype=torch.int64, device=dev)
        beam_vals = torch.full_like(beam_vars, -1)
        beam_probs = probs0[active].unsqueeze(1).unsqueeze(2).repeat(1, w, s_max + 1, 1)
        beam_score = torch.zeros(len(active), w, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(12345)
        key_w = torch.randint(0, 1 << 40, (v,), generator=gen).to(dev)
        j = torch.arange(m, device=dev)
        cand_var = j // (k - 1)
        cand_r = j % (k - 1)
        for step in range(1, s_max + 1):
            a = len(active)
            if a == 0:
                break
            live = beam_valid.reshape(a * w)
            p = torch.zeros(a * w, m, c, dtype=self.feature_mean.dtype, device=dev)
            p[live] = self._candidate_log_probs(beam_codes.reshape(a * w, v)[live])
            p = p.view(a, w, m, c)
            score, ok = self._score(p, start[active], target[active])
            cur = beam_codes.gather(2, cand_var.view(1, 1, m).expand(a, w, m))  # (A, W, M)
            new_val = cand_r + (cand_r >= cur).to(torch.int64)
            valid = beam_valid.unsqueeze(-1) & ~beam_changed[:, :, cand_var]
            score = torch.where(valid, score, torch.full_like(score, -math.inf))
            ok = ok & valid
            # duplicates (the same set of changes reached in another order) are dropped
            parent_key = (beam_codes * key_w).sum(-1)  # (A, W)
            key = parent_key.unsqueeze(-1) + key_w[cand_var] * (new_val - cur)
            score = score.reshape(a, w * m)
            ok = ok.reshape(a, w * m)
            key = key.reshape(a, w * m)
            skey, order = key.sort(dim=-1, stable=True)
            dup_sorted = torch.zeros_like(skey, dtype=torch.bool)
            dup_sorted[:, 1:] = skey[:, 1:] == skey[:, :-1]
            dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
            score = score.masked_fill(dup, -math.inf)
            ok = ok & ~dup
            done = ok.any(-1)
            # the chosen candidate: the best successful one where there is one, else the beam
            best_ok = score.masked_fill(~ok, -math.inf).argmax(-1)  # (A,)
            top_score, top = score.topk(min(w, w * m), dim=-1)  # (A, W')
            if top.shape[1] < w:
                pad = w - top.shape[1]
                top = torch.cat([top, top[:, :1].expand(a, pad)], 1)
                top_score = torch.cat([top_score, torch.full((a, pad), -math.inf, device=dev)], 1)
            sel = torch.where(done.unsqueeze(-1), best_ok.unsqueeze(-1).expand(a, w), top)
            parent, cj = sel // m, sel % m
            ar = torch.arange(a, device=dev).unsqueeze(-1)
            nv = new_val.reshape(a, w * m).gather(1, sel)
            var = cand_var[cj]
            new_codes = beam_codes[ar, parent].clone()
            new_codes.scatter_(2, var.unsqueeze(-1), nv.unsqueeze(-1))
            new_changed = beam_changed[ar, parent].clone()
            new_changed.scatter_(2, var.unsqueeze(-1), True)
            new_vars = beam_vars[ar, parent].clone()
            new_vars[:, :, step - 1] = var
            new_vals = beam_vals[ar, parent].clone()
            new_vals[:, :, step - 1] = nv
            new_probs = beam_probs[ar, parent].clone()
            p_sel = p.reshape(a, w * m, c).gather(1, sel.unsqueeze(-1).expand(a, w, c)).exp()
            new_probs[:, :, step:] = p_sel.unsqueeze(2)
            beam_codes, beam_changed, beam_vars, beam_vals, beam_probs = \
                new_codes, new_changed, new_vars, new_vals, new_probs
            beam_score = torch.where(done.unsqueeze(-1), score.gather(1, sel), top_score)
            beam_valid = torch.isfinite(beam_score)
            # inputs that reached their target, and those at the last step: write out beam 0
            finish = done | (step == s_max)
            if bool(finish.any()):
                f_idx = active[finish]
                changes[f_idx] = beam_vars[finish, 0]
                values[f_idx] = beam_vals[finish, 0]
                probs[f_idx] = beam_probs[finish, 0]
                final_code[f_idx] = beam_codes[finish, 0]
                num[f_idx] = step
                success[f_idx] = done[finish]
                keep = ~finish
                active = active[keep]
                beam_codes, beam_changed, beam_valid = beam_codes[keep], beam_changed[keep], beam_valid[keep]
                beam_vars, beam_vals, beam_probs = beam_vars[keep], beam_vals[keep], beam_probs[keep]
                beam_score = beam_score[keep]
        return dict(start_class=start, changes=changes, values=values, probs=probs,
                    intervened_code=final_code, num_changes=num, success=success)

    @torch.no_grad()
    def _success_rate(self, logits, result, target, n_samples: int, seed: int, index: torch.Tensor):
        """The fraction of n_samples codes, the changed variables forced and the others Gumbel
        samples of q(c | φ(x)), whose decoding f_K classifies as the target. Example b's noise is
        the Philox stream (seed, index[b] * counters per example), whatever the batch."""
        from ..ops import gumbel as gumbel_ops
        from ..reference.gumbel import counters

        b, v, k = logits.shape
        tgt = result["intervened_code"]
        mask = tgt != logits.argmax(-1)  # the changed variables: (B, V)
        per_example = counters(n_samples * v, k)
        out = torch.empty(b, n_samples, v, k, dtype=logits.dtype, device=logits.device)
        for s, e in contiguous_runs(index):
            lg = logits[s:e].unsqueeze(1).expand(e - s, n_samples, v, k).reshape(-1, k).contiguous()
            mk = mask[s:e].unsqueeze(1).expand(e - s, n_samples, v).reshape(-1).contiguous()
            tg = tgt[s:e].unsqueeze(1).expand(e - s, n_samples, v).reshape(-1).contiguous()
            y = gumbel_ops.gumbel_softmax(lg, mk, tg, None, float(self.tau), True, seed, int(index[s]) * per_example)
            out[s:e] = y.view(e - s, n_samples, v, k)
        _, ok = self._score(self._log_probs(out), result["start_class"], target)  # (B, S)
        return ok.to(logits.dtype).mean(1)

    @torch.no_grad()
    def explain(self, inputs: torch.Tensor, target=None, *, seed: int = 0, index: torch.Tensor | None = None,
                max_changes: int | None = None, beam_width: int | None = None,
                n_samples: int | None = None) -> InterventionResult:
        """Interventions for a batch of images.

        Args:
            inputs: (B, C, H, W) images.
            target: None (any class other than the starting one), an int class, or a (B,) tensor of
                classes (-1: any other class).
            seed, index: the noise of example b (the robustness samples) depends on (seed, index[b]);
                index defaults to arange(B) (dataset indices in batch explanation).
            max_changes, beam_width, n_samples: override the config's.
        """
        cfg = self.config
        check_images(inputs, cfg.in_channels, (cfg.image_size,) * 2)
        n_samples = cfg.n_samples if n_samples is None else check_positive_int(n_samples, "n_samples")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (got {seed!r})")
        dev = self.device
        x = inputs.to(dev, torch.float32)
        b = x.shape[0]
        if index is None:
            index = torch.arange(b)
        if not isinstance(index, torch.Tensor) or index.shape != (b,) or index.dtype.is_floating_point:
            raise ValueError(f"index must be an integer (B,) tensor with B = {b}")
        index = index.to(torch.int64)
        if b and int(index.min()) < 0:
            raise ValueError("index must be >= 0")
        t = self._check_target(target, b, dev)
        h, logits, code = self.encode(x)
        f_cls = self.classify_features(h).argmax(-1)
        res = self.search(code, t, max_changes=max_changes, beam_width=beam_width)
        rate = self._success_rate(logits, res, t, n_samples, seed, index.cpu())
        rec = self.generate(self.decode(self.one_hot(code)))
        itv = self.generate(self.decode(self.one_hot(res["intervened_code"])))
        final = res["probs"][:, -1].argmax(-1) if b else f_cls
        return InterventionResult(
            index=index, inputs=x, code=code, intervened_code=res["intervened_code"],
            changes=res["changes"], values=res["values"], num_changes=res["num_changes"],
            success=res["success"], classifier_class=f_cls, start_class=res["start_class"], target=t,
            final_class=final, probs=res["probs"], success_rate=rate, reconstruction=rec,
            intervened=itv, difference=itv - rec)

    # ---- evaluation and the global view ----
    @torch.no_grad()
    def evaluate(self, test_loader, *, progress: bool = True) -> dict[str, float]:
        """fidelity: f_K(φ'(x)) agrees with f(x); flip_within_3: the fraction of inputs that an
        intervention of at most 3 variables moves to another class; mean_changes: variables changed,
        mean over successful searches (depth config.max_changes); recon_mse: g(φ'(x)) vs x."""
        self.eval()
        dev = self.device
        n = agree = within3 = succ = 0
        changes_sum = 0
        sq = 0.0
        pixels = 0
        for x, _y in progress_bar(test_loader, desc="evaluate", disable=not progress):
            x = x.to(dev)
            h, _logits, code = self.encode(x)
            hp = self.decode(self.one_hot(code))
            agree += int((self.classify_features(hp).argmax(-1) == self.classify_features(h).argmax(-1)).sum())
            sq += float(((self.generate(hp) - x) ** 2).sum())
            pixels += x.numel()
            r = self.search(code, torch.full((len(x),), -1, dtype=torch.int64, device=dev))
            ok = r["success"]
            within3 += int((ok & (r["num_changes"] <= 3)).sum())
            succ += int(ok.sum())
            changes_sum += int(r["num_changes"][ok].sum())
            n += len(x)
        if n == 0:
            raise ValueError("test_loader is empty")
        return {"fidelity": agree / n, "flip_within_3": within3 / n,
                "mean_changes": changes_sum / succ if succ else float("nan"), "recon_mse": sq / pixels}

    @torch.no_grad()
    def concepts(self, data, *, limit: int | None = None, bias_threshold: float = 0.05,
                 progress: bool = False) -> ConceptReport:
        """The global view over a loader (or a tensor of images): for every variable, how often a
        single change of it changes f_K's class, from which class to which."""
        cfg = self.config
        v, k, c = cfg.num_variables, cfg.num_categories, cfg.num_classes
        m = v * (k - 1)
        dev = self.device
        trans = torch.zeros(v, c, c, dtype=torch.int64, device=dev)
        counts = torch.zeros(c, dtype=torch.int64, device=dev)
        batches = [(data, None)] if isinstance(data, torch.Tensor) else data
        seen = 0
        cand_var = torch.arange(m, device=dev) // (k - 1)
        for x, *_ in progress_bar(batches, desc="concepts", disable=not progress):
            if limit is not None and seen >= limit:
                break
            if limit is not None:
                x = x[: limit - seen]
            check_images(x, cfg.in_channels, (cfg.image_size,) * 2)
            x = x.to(dev, torch.float32)
            _h, _l, code = self.encode(x)
            start = self._log_probs(self.one_hot(code)).argmax(-1)
            pred = self._candidate_log_probs(code).argmax(-1)  # (N, M)
            counts += torch.bincount(start, minlength=c)
            flat = (cand_var.unsqueeze(0) * c + start.unsqueeze(1)) * c + pred  # (N, M)
            trans += torch.bincount(flat.flatten(), minlength=v * c * c).view(v, c, c)
            seen += len(x)
        idx = torch.arange(c, device=dev)
        trans[:, idx, idx] = 0
        moved = trans.sum(-1).double()  # (V, C): changes that moved inputs of class i
        total = max(seen, 1) * (k - 1)
        change_rate = moved.sum(-1) / total
        class_change_rate = moved / (counts.double() * (k - 1)).clamp_min(1)
        present = counts > 0
        dest_counts = trans.sum(1).double()
        destination = dest_counts / dest_counts.sum(-1, keepdim=True).clamp_min(1)
        ccr = class_change_rate.masked_fill(~present, -math.inf)
        top, top_c = ccr.max(-1)
        npres = int(present.sum())
        others = (class_change_rate * present).sum(-1) - top.clamp_min(0)
        bias = top.clamp_min(0) - others / max(npres - 1, 1)
        return ConceptReport(transitions=trans.cpu(), class_counts=counts.cpu(), change_rate=change_rate.float().cpu(),
                             class_change_rate=class_change_rate.float().cpu(), destination=destination.float().cpu(),
                             bias=bias.float().cpu(), bias_class=top_c.cpu(), num_categories=k,
                             bias_threshold=bias_threshold)

    def report(self, test_loader, out_dir, *, rows: int = 8, limit: int = 2000) -> list[Path]:
        """Write interventions.png (original / reconstruction / intervened / difference rows),
        concepts.png (variable x class heatmaps) and concepts.json (per-variable view and the bias
        report) into out_dir; returns their paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        xs = []
        for x, *_ in test_loader:
            xs.append(x)
            if sum(len(t) for t in xs) >= rows:
                break
        if not xs:
            raise ValueError("test_loader is empty")
        x = torch.cat(xs)[:rows]
        paths = []
        fig = self.explain(x).plot(max_rows=rows)
        paths.append(out / "interventions.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
        rep = self.concepts(test_loader, limit=limit)
        fig = rep.plot()
        paths.append(out / "concepts.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
        paths.append(out / "concepts.json")
        paths[-1].write_text(json.dumps({"inputs": int(rep.class_counts.sum()),
                                         "variables": rep.records(), "bias": rep.biased()}, indent=1) + "\n")
        return paths


# ---- the plain loop the search is checked and benchmarked against --------------------------------

@torch.no_grad()
def search_loop(explainer: InterventionExplainer, codes: torch.Tensor, target: torch.Tensor, *,
                max_changes: int, beam_width: int) -> dict[str, torch.Tensor]:
    """The same beam search written as loops over inputs, beam entries and candidate interventions,
    one decode and one f_K call per candidate: the specification of InterventionExplainer.search
    (ties aside) and the anchor of its benchmark."""
    cfg = explainer.config
    k = cfg.num_categories
    b, v = codes.shape
    max_changes = min(max_changes, v)

    def logp_of(code):
        return explainer._log_probs(explainer.one_hot(code.unsqueeze(0)))[0]

    out = {"num_changes": [], "success": [], "changes": [], "intervened_code": []}
    for i in range(b):
        start = int(logp_of(codes[i]).argmax())
        t = int(target[i])

        def judge(lp):
            if t < 0:
                others = torch.cat([lp[:start], lp[start + 1:]])
                return float(others.logsumexp(0)), int(lp.argmax()) != start
            return float(lp[t]), int(lp.argmax()) == t

        if t >= 0 and start == t:
            out["num_changes"].append(0), out["success"].append(True), out["changes"].append([])
            out["intervened_code"].append(codes[i].clone())
            continue
        beam = [(0.0, codes[i].clone(), [])]
        result = None
        for step in range(1, max_changes + 1):
            cands, seen = [], set()
            for _s, code, path in beam:
                for var in range(v):
                    if var in path:
                        continue
                    for val in range(k):
                        if val == int(code[var]):
                            continue
                        new = code.clone()
                        new[var] = val
                        key = tuple(new.tolist())
                        if key in seen:
                            continue
                        seen.add(key)
                        score, ok = judge(logp_of(new))
                        cands.append((score, ok, new, path + [var]))
            if not cands:
                break
            wins = [cd for cd in cands if cd[1]]
            if wins:
                best = max(wins, key=lambda cd: cd[0])
                result = (True, best[2], best[3])
                break
            cands.sort(key=lambda cd: -cd[0])
            beam = [(cd[0], cd[2], cd[3]) for cd in cands[:beam_width]]
            result = (False, beam[0][1], beam[0][2])
        ok, code, path = result if result else (False, codes[i].clone(), [])
        out["num_changes"].append(len(path)), out["success"].append(ok), out["changes"].append(path)
        out["intervened_code"].append(code)
    return {"num_changes": torch.tensor(out["num_changes"], dtype=torch.int64),
            "success": torch.tensor(out["success"], dtype=torch.bool),
            "changes": out["changes"], "intervened_code": torch.stack(out["intervened_code"]) if b else codes}


# ---- the documented full run ---------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    from torch.utils.data import DataLoader

    from ..data import load_dataset

    p = argparse.ArgumentParser(prog="python -m lfi_fast.explain.intervention",
                                description="Train the latent intervention explainer, evaluate it, save it "
                                            "and its figures; writes OUT/metrics.json.")
    p.add_argument("--data", default="mnist", choices=("digits", "mnist", "fashion-mnist"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use the first N training and test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    size = 28 if args.data == "digits" else None
    train = load_dataset(args.data, "train", data_dir=args.data_dir, image_size=size, limit=args.limit)
    test = load_dataset(args.data, "test", data_dir=args.data_dir, image_size=size, limit=args.limit)
    cfg = default_config(args.data, seed=args.seed, **({"epochs": args.epochs} if args.epochs is not None else {}))
    exp = InterventionExplainer(cfg)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test, batch_size=500)
    t0 = time.time()
    history = exp.fit(loader, progress=not args.no_progress)
    train_s = time.time() - t0
    t0 = time.time()
    metrics = exp.evaluate(test_loader, progress=not args.no_progress)
    eval_s = time.time() - t0
    out = Path(args.out)
    exp.save(out / "checkpoint")
    figures = exp.report(test_loader, out)
    from ..models import accuracy

    doc = {**metrics, "train_seconds": train_s, "evaluate_seconds": eval_s,
           "total_seconds": time.time() - t_start, "classifier_accuracy": accuracy(exp.classifier, test_loader, exp.device),
           "data": args.data, "train_size": len(train), "test_size": len(test), "threads": args.threads,
           "config": dataclasses.asdict(cfg), "history": history}
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in (*metrics, "train_seconds", "classifier_accuracy")}, indent=2))
    print("wrote", out / "metrics.json", *figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
