"""Supervised-VAE invariances: which transformations of an input does a classifier ignore?

A convolutional VAE encodes an image into a latent split into supervised dims z_s (the first
`supervised_dims`) and nuisance dims z_n. A small classifier reads z_s only; the loss is
reconstruction BCE + beta * KL + alpha * cross-entropy of that classifier (on mu_s), plus
cycle * alpha * the cross-entropy of the studied classifier on images decoded from (z_s, z_n
from the prior), a term that trains the decoder only (Config.cycle; 0 turns it off: on MNIST it
lifts the invariance rate from 0.949 to 0.993 for 11 nats of reconstruction). Keeping z_s of an
input and drawing z_n from the prior, then decoding, gives *invariant samples*: images that
differ from the input in ways the classifier does not use. Resampling z_s instead (z_n kept)
gives the *contrast*: the class should change. Integrated gradients of the classifier on the
input and across its invariant samples (mean and variance maps) show which pixels matter
consistently under the transformations the classifier ignores.

Two modes (Config.mode):

- "design" (default): the classifier studied is the VAE's own, f(x) = head(mu_s(encoder(x))),
  trained with the VAE. The predicted class of a decoded sample is f of that sample, i.e. the
  latent classifier applied to the re-encoded sample's z_s (its posterior mean).
- "posthoc": the classifier studied is a frozen, pretrained image classifier (the user's, or
  Config.classifier trained inside fit() when none is given). The VAE is trained so that its
  latent classifier reproduces the frozen classifier's predictions (distillation on its softened
  outputs), and the predicted class of a decoded sample is the frozen classifier on the image.

Metrics (evaluate): `accuracy` of the latent classifier on z_s = mu_s against the labels;
`invariance_rate`, the fraction of invariant samples (z_n from the prior) whose predicted class
equals the input's, averaged over inputs; `flip_rate`, the fraction of contrast samples (z_s from
the prior, z_n = mu_n) whose predicted class differs from the input's; `recon_bce`, the
reconstruction BCE of the posterior mean summed over pixels, mean over images (nats per image).

The hot path, M decoded samples per input, runs through lfi_fast.nuisance.sample_decode: the
decoder starts with nn.Linear, so sampling is fused with its first layer (sample_linear). The
contrast uses the same fused path on a latent whose halves are swapped (the nuisance dims first,
kept; the supervised dims last, drawn), with the first layer's columns swapped to match.

Randomness: the noise of example b comes from the Philox stream (derived seed, offset
index[b] * counters per input), one stream for invariant samples and one for the contrast, so
results depend on (seed, index[b]) only, not on the batch.

    python -m lfi_fast.explain.invariance --data mnist --out results/invariance
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from .base import (Explainer, Explanation, check_images, check_positive_int, contiguous_runs,
                   progress_bar)

__all__ = ["Config", "InvarianceExplainer", "InvarianceResult", "default_config",
           "integrated_gradients", "MODES", "IG_METHODS"]

MODES = ("design", "posthoc")
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
IG_BACKENDS = ("auto", "captum", "builtin")


@dataclasses.dataclass
class Config:
    """Every field JSON-able; defaults for MNIST (28x28, 1 channel, 10 classes)."""

    classifier: str = "builtin:SmallCNN"  # the frozen classifier of mode "posthoc"
    mode: str = "design"                  # "design" | "posthoc"
    in_channels: int = 1
    image_size: int = 28                  # a multiple of 4
    num_classes: int = 10
    supervised_dims: int = 8
    nuisance_dims: int = 8
    width: int = 16                       # conv widths: width, 2 * width channels
    hidden: int = 128                     # width of the encoder's and decoder's dense layers
    head_hidden: int = 64                 # width of the latent classifier's hidden layer
    beta: float = 1.0                     # KL weight of the supervised dims
    nuisance_beta: float = 1.0            # KL weight of the nuisance dims
    cycle: float = 0.3                    # weight of the cycle term (see fit), times alpha
    cycle_fraction: float = 0.25          # fraction of each batch the cycle term decodes
    alpha: float = 300.0                  # classifier (or distillation) weight
    temperature: float = 2.0              # distillation temperature (mode "posthoc")
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    classifier_epochs: int = 2            # training of the built-in frozen classifier (posthoc)
    n_samples: int = 32                   # explain(): samples per input
    eval_samples: int = 16                # evaluate(): samples per input
    ig_steps: int = 32                    # integrated-gradients steps (Captum's n_steps)
    ig_method: str = "gausslegendre"      # Captum's default quadrature
    ig_samples: int = 8                   # invariant samples per input that get attributions
    ig_backend: str = "auto"              # "auto" (Captum when installed) | "captum" | "builtin"
    seed: int = 0                         # initialisation, training order and evaluation noise

    def validate(self) -> "Config":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        for name in ("in_channels", "image_size", "num_classes", "supervised_dims", "nuisance_dims",
                     "width", "hidden", "head_hidden", "epochs", "batch_size", "n_samples",
                     "eval_samples", "ig_steps", "ig_samples"):
            check_positive_int(getattr(self, name), f"config.{name}",
                               minimum=0 if name == "epochs" else 1)
        check_positive_int(self.classifier_epochs, "config.classifier_epochs", minimum=0)
        if self.num_classes < 2:
            raise ValueError(f"config.num_classes must be >= 2 (got {self.num_classes})")
        if self.image_size % 4:
            raise ValueError(f"config.image_size must be a multiple of 4 (got {self.image_size})")
        if not 0 < self.cycle_fraction <= 1:
            raise ValueError(f"config.cycle_fraction must be in (0, 1] (got {self.cycle_fraction!r})")
        for name in ("beta", "nuisance_beta", "cycle", "alpha", "lr", "temperature"):
            v = getattr(self, name)
            strict = name in ("lr", "temperature")
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (strict and v == 0):
                raise ValueError(f"config.{name} must be a finite number {'> 0' if strict else '>= 0'} "
                                 f"(got {v!r})")
        if self.ig_method not in IG_METHODS:
            raise ValueError(f"config.ig_method must be one of {', '.join(IG_METHODS)} "
                             f"(got {self.ig_method!r})")
        if self.ig_backend not in IG_BACKENDS:
            raise ValueError(f"config.ig_backend must be one of {', '.join(IG_BACKENDS)} "
                             f"(got {self.ig_backend!r})")
        if self.ig_method != "gausslegendre" and self.ig_steps < 2:
            raise ValueError(f"config.ig_steps must be >= 2 for {self.ig_method} "
                             f"(got {self.ig_steps})")
        return self

    @property
    def latent_dims(self) -> int:
        return self.supervised_dims + self.nuisance_dims


def default_config(data: str, **overrides) -> Config:
    """The tuned config for "digits" (run at image_size 28), "mnist" and "fashion-mnist".
    Naming a classifier (overrides["classifier"]) without a mode means mode "posthoc": the
    classifier given is the one explained (what `lfi-fast train invariance --model ...` does)."""
    base = {
        "digits": dict(epochs=25, batch_size=64, lr=3e-3),
        "mnist": dict(epochs=13, batch_size=128, lr=2e-3),
        "fashion-mnist": dict(epochs=13, batch_size=128, lr=2e-3),
    }
    if data not in base:
        raise ValueError(f"data must be one of {', '.join(base)} (got {data!r})")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; Config has {sorted(fields)}")
    if "classifier" in overrides and "mode" not in overrides:
        overrides = {**overrides, "mode": "posthoc"}
    return Config(**{**base[data], **overrides}).validate()


# ---- integrated gradients ------------------------------------------------------------------------

def _ig_weights(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """(alphas, step sizes) of the path integral's quadrature, as Captum defines them."""
    if method == "gausslegendre":
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(n_steps)
        return list(0.5 * (x + 1)), list(0.5 * w)
    if method not in IG_METHODS:
        raise ValueError(f"method must be one of {', '.join(IG_METHODS)} (got {method!r})")
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2 for {method} (got {n_steps})")
    n = n_steps
    sizes = [1.0 / n] * n
    if method == "riemann_trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, n, dtype=torch.float64)
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64)
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    else:
        alphas = torch.linspace(1 / n, 1, n, dtype=torch.float64)
    return alphas.tolist(), sizes


def integrated_gradients(forward_func: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                         target: torch.Tensor | int, baselines: torch.Tensor | float | None = None,
                         n_steps: int = 50, method: str = "gausslegendre",
                         internal_batch_size: int | None = None) -> torch.Tensor:
    """Integrated gradients of forward_func(x)[:, target] along the straight path from baselines
    to inputs: (inputs - baselines) * sum_k step_k * grad(baselines + alpha_k (inputs - baselines)).
    The built-in equivalent of captum.attr.IntegratedGradients(forward_func).attribute(inputs,
    baselines, target, n_steps=n_steps, method=method, internal_batch_size=...) for one input
    tensor; internal_batch_size bounds the rows per forward pass. Returns inputs' shape."""
    check_positive_int(n_steps, "n_steps")
    alphas, sizes = _ig_weights(method, n_steps)
    x = inputs.detach()
    n = x.shape[0]
    if baselines is None:
        baselines = 0.0
    base = torch.as_tensor(baselines, dtype=x.dtype, device=x.device).expand_as(x)
    if isinstance(target, int):
        target = torch.full((n,), target, dtype=torch.int64, device=x.device)
    target = target.to(x.device, torch.int64).reshape(n)
    delta = x - base
    rows = n_steps * n
    chunk = internal_batch_size or rows
    check_positive_int(chunk, "internal_batch_size")
    a = torch.tensor(alphas, dtype=x.dtype, device=x.device)
    w = torch.tensor(sizes, dtype=x.dtype, device=x.device)
    total = torch.zeros_like(x)
    shape1 = (-1,) + (1,) * (x.dim() - 1)
    with torch.enable_grad():
        for r0 in range(0, rows, chunk):
            r = torch.arange(r0, min(rows, r0 + chunk), device=x.device)
            k, i = r // n, r % n  # step-major rows, as Captum lays them out
            scaled = (base[i] + a[k].reshape(shape1) * delta[i]).requires_grad_(True)
            out = forward_func(scaled)
            sel = out.gather(1, target[i].unsqueeze(1)).sum()
            (grad,) = torch.autograd.grad(sel, scaled)
            total.index_add_(0, i, grad * w[k].reshape(shape1))
    return total * delta


def _captum_available() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the result ----------------------------------------------------------------------------------

@dataclasses.dataclass
class InvarianceResult(Explanation):
    """Batch first. B inputs, M samples per input, images (C, H, W).

    prediction (B,): the studied classifier's class of each input; reconstruction (B, C, H, W);
    latent (B, D): posterior means [z_s, z_n]; samples (B, M, C, H, W): invariant samples (z_s
    kept, z_n from the prior); sample_classes (B, M); invariance (B,): fraction of samples that
    keep the prediction; contrast (B, M, C, H, W): z_s from the prior, z_n kept; contrast_classes
    (B, M); flip (B,): fraction of contrast samples whose class changed; attribution (B, C, H, W):
    integrated gradients of the prediction on the input; attribution_mean / attribution_var
    (B, C, H, W): their mean and variance over the first K invariant samples (empty tensors when
    attributions were not asked for)."""

    inputs: torch.Tensor
    prediction: torch.Tensor
    reconstruction: torch.Tensor
    latent: torch.Tensor
    samples: torch.Tensor
    sample_classes: torch.Tensor
    invariance: torch.Tensor
    contrast: torch.Tensor
    contrast_classes: torch.Tensor
    flip: torch.Tensor
    attribution: torch.Tensor
    attribution_mean: torch.Tensor
    attribution_var: torch.Tensor

    def plot(self, max_rows: int = 8, max_samples: int = 8):
        """Per input: the input, its reconstruction, invariant samples, contrast samples, and the
        attribution maps when present."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        b = min(max_rows, len(self.prediction))
        m = min(max_samples, self.samples.shape[1])
        mc = min(max_samples, self.contrast.shape[1]) if self.contrast.numel() else 0
        has_attr = self.attribution.numel() > 0
        cols = 2 + m + mc + (3 if has_attr else 0)
        fig, axes = plt.subplots(max(b, 1), cols, figsize=(0.9 * cols + 0.8, 0.95 * max(b, 1) + 0.4),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(b):
            row = axes[i]
            p = int(self.prediction[i])
            _show(row[0], self.inputs[i], f"input: {p}" if i == 0 else str(p))
            _show(row[1], self.reconstruction[i], "recon" if i == 0 else None)
            for j in range(m):
                _show(row[2 + j], self.samples[i, j], str(int(self.sample_classes[i, j])),
                      color="black" if int(self.sample_classes[i, j]) == p else "red")
            for j in range(mc):
                _show(row[2 + m + j], self.contrast[i, j], str(int(self.contrast_classes[i, j])),
                      color="blue")
            if has_attr:
                for k, (t, name) in enumerate(((self.attribution, "IG"), (self.attribution_mean, "mean"),
                                               (self.attribution_var, "var"))):
                    _show_attr(row[2 + m + mc + k], t[i], name if i == 0 else None, signed=name != "var")
            label = f"invariant {float(self.invariance[i]):.0%}"
            if mc:
                label += f"\nflip {float(self.flip[i]):.0%}"
            row[0].text(-0.15, 0.5, label, transform=row[0].transAxes, fontsize=6, ha="right", va="center")
        fig.tight_layout(pad=0.2)
        return fig


def _image(t: torch.Tensor):
    t = t.detach().float().cpu()
    return (t[0] if t.shape[0] == 1 else t.permute(1, 2, 0).clamp(0, 1)).numpy()


def _show(ax, t, title=None, color="black"):
    ax.imshow(_image(t), cmap="gray", vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title, fontsize=6, color=color)


def _show_attr(ax, t, title=None, signed=True):
    a = t.detach().float().cpu().sum(0).numpy()
    lim = float(abs(a).max()) or 1.0
    if signed:
        ax.imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
    else:
        ax.imshow(a, cmap="magma", vmin=0, vmax=lim)
    if title is not None:
        ax.set_title(title, fontsize=6)


# ---- the explainer -------------------------------------------------------------------------------

def _derive_seed(seed: int, stream: int) -> int:
    """A 63-bit seed per (seed, stream) (splitmix64), so the invariant samples and the contrast
    draw unrelated noise."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


class InvarianceExplainer(Explainer):
    """Supervised VAE (encoder, decoder whose first layer is nn.Linear, latent classifier on z_s)
    and, in mode "posthoc", the frozen classifier it distils. See the module docstring."""

    METHOD = "invariance"
    Config = Config

    def __init__(self, config: Config, classifier: nn.Module | None = None):
        super().__init__(config)
        cfg = config.validate()
        if classifier is not None and cfg.mode != "posthoc":
            raise ValueError("classifier= is the frozen model of mode 'posthoc'; "
                             f"set config.mode='posthoc' to explain it (got mode {cfg.mode!r})")
        c, ch, s = cfg.in_channels, cfg.width, cfg.image_size // 4
        d = cfg.latent_dims
        self.encoder = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(c, ch, 4, 2, 1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(ch, 2 * ch, 4, 2, 1)), ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(2 * ch * s * s, cfg.hidden)), ("relu3", nn.ReLU()),
            ("latent", nn.Linear(cfg.hidden, 2 * d)),
        ]))
        # Starts with nn.Linear + ReLU: nuisance.sample_decode fuses both with the sampling.
        self.decoder = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(d, cfg.hidden)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(cfg.hidden, 2 * ch * s * s)), ("relu2", nn.ReLU()),
            ("unflatten", nn.Unflatten(1, (2 * ch, s, s))),
            ("deconv1", nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1)), ("relu3", nn.ReLU()),
            ("deconv2", nn.ConvTranspose2d(ch, c, 4, 2, 1)),  # logits
        ]))
        self.head = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(cfg.supervised_dims, cfg.head_hidden)), ("relu", nn.ReLU()),
            ("fc2", nn.Linear(cfg.head_hidden, cfg.num_classes)),
        ]))
        if cfg.mode == "posthoc":
            given = classifier is not None
            if classifier is None:
                classifier = models.build_model(cfg.classifier)
            if not isinstance(classifier, nn.Module):
                raise TypeError(f"classifier must be an nn.Module (got {type(classifier).__name__})")
            self.classifier = classifier
            self.register_buffer("classifier_ready", torch.tensor(given))
        else:
            self.classifier = None
            self.register_buffer("classifier_ready", torch.tensor(False))  # the head, after fit
        self.register_buffer("fitted", torch.tensor(False))

    # ---- the model ----
    @property
    def supervised_dims(self) -> int:
        return self.config.supervised_dims

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (N, D)."""
        h = self.encoder(x)
        d = self.config.latent_dims
        return h[:, :d], h[:, d:].clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, C, H, W)."""
        return torch.sigmoid(self.decoder(z))

    def image_decoder(self) -> nn.Sequential:
        """The decoder ending in a sigmoid (images), sharing the decoder's layers."""
        return nn.Sequential(*self.decoder, nn.Sigmoid())

    def latent_logits(self, z_s: torch.Tensor) -> torch.Tensor:
        return self.head(z_s)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier whose invariances are studied: head(mu_s(x)) in mode
        "design", the frozen classifier in mode "posthoc"."""
        if self.config.mode == "posthoc":
            return self.classifier(x)
        return self.head(self.encode(x)[0][:, :self.supervised_dims])

    def _classify_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """classify(x) with gradients to x only (the parameters detached)."""
        from torch.func import functional_call

        if self.config.mode == "posthoc":
            return self.classifier(x)  # frozen already
        enc = {k: v.detach() for k, v in self.encoder.named_parameters()}
        head = {k: v.detach() for k, v in self.head.named_parameters()}
        mu = functional_call(self.encoder, enc, (x,))[:, :self.supervised_dims]
        return functional_call(self.head, head, (mu,))

    def _predict(self, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """Predicted classes of (N, C, H, W) images, without gradients."""
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        with torch.no_grad():
            for r0 in range(0, x.shape[0], batch):
                out[r0:r0 + batch] = self.classify(x[r0:r0 + batch]).argmax(1)
        return out

    # ---- checks ----
    def _check_inputs(self, x, name="inputs") -> torch.Tensor:
        cfg = self.config
        x = check_images(x, cfg.in_channels, (cfg.image_size, cfg.image_size), name)
        return x.to(self.device, torch.float32)

    def _check_ready(self):
        if not bool(self.fitted):
            raise RuntimeError("the explainer is not trained: call fit() or load() a checkpoint first")

    # ---- training ----
    def fit(self, train_loader, epochs: int | None = None, *, progress: bool = True) -> dict:
        """Train the VAE (and first the built-in frozen classifier in mode "posthoc" when it is
        not ready). Returns per-epoch lists: loss, recon_bce, kl, ce, accuracy (latent classifier
        on the training batches), seconds; and classifier_loss when a classifier was trained."""
        cfg = self.config
        epochs = cfg.epochs if epochs is None else check_positive_int(epochs, "epochs", minimum=0)
        device = self.device
        history: dict[str, list] = {k: [] for k in ("loss", "recon_bce", "kl", "ce", "accuracy", "seconds")}
        gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the reparameterisation noise
        if cfg.mode == "posthoc":
            if not bool(self.classifier_ready):
                history["classifier_loss"] = models.train_classifier(
                    self.classifier, train_loader, epochs=cfg.classifier_epochs, lr=1e-3,
                    device=device, progress=progress)
                self.classifier_ready.fill_(True)
            self.classifier.eval()
            for p in self.classifier.parameters():
                p.requires_grad_(False)
        params = [p for n, p in self.named_parameters() if not n.startswith("classifier.")]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        steps = max(1, epochs * len(train_loader))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                    pct_start=0.15)
        ds = cfg.supervised_dims
        for epoch in range(epochs):
            self.encoder.train(), self.decoder.train(), self.head.train()
            t0 = time.perf_counter()
            sums = dict(loss=0.0, recon_bce=0.0, kl=0.0, ce=0.0, accuracy=0.0)
            n = 0
            for x, y in progress_bar(train_loader, desc=f"invariance epoch {epoch + 1}/{epochs}",
                                     disable=None if progress else True):
                if n == 0:
                    self._check_inputs(x, "train_loader images")
                x, y = x.to(device, torch.float32), y.to(device)
                mu, logvar = self.encode(x)
                eps = torch.randn(mu.shape, generator=gen, device=device, dtype=mu.dtype)
                z = mu + eps * torch.exp(0.5 * logvar)
                logits_x = self.decoder(z)
                bce = F.binary_cross_entropy_with_logits(logits_x, x, reduction="sum") / len(x)
                kl_dims = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(0) / len(x)
                kl = kl_dims.sum()
                kl_weighted = cfg.beta * kl_dims[:ds].sum() + cfg.nuisance_beta * kl_dims[ds:].sum()
                logits = self.head(mu[:, :ds])
                if cfg.mode == "posthoc":
                    with torch.no_grad():
                        teacher = F.softmax(self.classifier(x) / cfg.temperature, dim=1)
                        y = teacher.argmax(1)
                    ce = -(teacher * F.log_softmax(logits / cfg.temperature, dim=1)).sum(1).mean() \
                        * cfg.temperature ** 2
                else:
                    ce = F.cross_entropy(logits, y)
                loss = bce + kl_weighted + cfg.alpha * ce
                if cfg.cycle > 0:
                    # The cycle term: part of the batch decoded with its z_s kept and z_n drawn
                    # from the prior; the studied classifier (re-encoding + head, or the frozen
                    # one) must give them the input's class (label, or the frozen classifier's):
                    # the invariance that evaluate() measures. Only the decoder learns from it:
                    # the classifier's parameters are detached, so that it does not learn to
                    # read early, poor decodes.
                    k = max(1, int(round(cfg.cycle_fraction * len(x))))
                    zc = torch.cat((z[:k, :ds], torch.randn(k, cfg.nuisance_dims, generator=gen,
                                                            device=device, dtype=z.dtype)), 1)
                    ce_c = F.cross_entropy(self._classify_frozen(torch.sigmoid(self.decoder(zc))), y[:k])
                    loss = loss + cfg.cycle * cfg.alpha * ce_c
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                k = len(x)
                n += k
                for key, v in (("loss", loss), ("recon_bce", bce), ("kl", kl), ("ce", ce)):
                    sums[key] += float(v.detach()) * k
                sums["accuracy"] += float((logits.argmax(1) == y).sum())
            for key in sums:
                history[key].append(sums[key] / max(n, 1))
            history["seconds"].append(time.perf_counter() - t0)
        self.fitted.fill_(True)
        if cfg.mode == "design":
            self.classifier_ready.fill_(True)
        self.eval()
        return history

    # ---- sampling ----
    def _sample(self, mu, logvar, n, seed, index, contrast: bool, chunk_size=None) -> torch.Tensor:
        """(B, n, C, H, W) decoded samples: z_n from the prior (contrast=False) or z_s from the
        prior (contrast=True), per-example noise from (seed, index[b])."""
        from .. import nuisance

        ds, dn = self.config.supervised_dims, self.config.nuisance_dims
        decoder = self.image_decoder()
        kept = ds
        if contrast:  # swap the halves: the nuisance dims are kept, the supervised ones drawn
            mu = torch.cat((mu[:, ds:], mu[:, :ds]), 1)
            logvar = torch.cat((logvar[:, ds:], logvar[:, :ds]), 1)
            first = self.decoder[0]
            swapped = nn.Linear(first.in_features, first.out_features).to(mu.device, mu.dtype)
            with torch.no_grad():
                swapped.weight.copy_(torch.cat((first.weight[:, ds:], first.weight[:, :ds]), 1))
                swapped.bias.copy_(first.bias)
            decoder = nn.Sequential(swapped, *list(decoder)[1:])
            kept = dn
        stream_seed = _derive_seed(seed, 1 if contrast else 0)
        per_input = nuisance.counters_per_input(n, mu.shape[1] - kept)
        c, h = self.config.in_channels, self.config.image_size
        out = mu.new_empty((mu.shape[0], n, c, h, h))
        for s, e in contiguous_runs(index):
            out[s:e] = nuisance.sample_decode(decoder, mu[s:e], logvar[s:e], kept, n, chunk_size,
                                              seed=stream_seed, offset=int(index[s]) * per_input)
        return out

    def _check_index(self, index, b) -> torch.Tensor:
        if index is None:
            return torch.arange(b)
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
            raise TypeError("index must be an int64 tensor of dataset indices (B,)")
        if tuple(index.shape) != (b,):
            raise ValueError(f"index must be (B,) = ({b},) (got {tuple(index.shape)})")
        index = index.detach().cpu().to(torch.int64)
        if b and int(index.min()) < 0:
            raise ValueError("index must be >= 0")
        return index

    # ---- explanation ----
    def explain(self, inputs: torch.Tensor, target: torch.Tensor | None = None, *, seed: int = 0,
                index: torch.Tensor | None = None, n_samples: int | None = None,
                contrast: bool = True, attribute: bool = True, ig_samples: int | None = None,
                n_steps: int | None = None, internal_batch_size: int | None = None,
                chunk_size: int | None = None) -> InvarianceResult:
        """Invariant samples of each input, their classes and invariance rate, the contrast, and
        integrated-gradients maps.

        Args:
            inputs: (B, C, H, W) images in [0, 1].
            target: (B,) classes to attribute (default: the predicted classes).
            seed, index: example b's noise depends on (seed, index[b]) only (index: dataset
                indices, default arange(B)).
            n_samples: invariant (and contrast) samples per input (default config.n_samples).
            contrast: also decode the samples with z_s resampled.
            attribute: compute the integrated-gradients maps; ig_samples of the invariant samples
                get attributions (default config.ig_samples), n_steps steps (config.ig_steps).
            internal_batch_size: rows per forward pass of integrated gradients.
            chunk_size: inputs per chunk of the sampling (nuisance.sample_decode).
        """
        cfg = self.config
        self._check_ready()
        x = self._check_inputs(inputs)
        b = x.shape[0]
        n = check_positive_int(cfg.n_samples if n_samples is None else n_samples, "n_samples")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63) (got {seed!r})")
        index = self._check_index(index, b)
        if target is not None:
            if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32) \
                    or tuple(target.shape) != (b,):
                raise ValueError(f"target must be an int64 tensor (B,) = ({b},)")
            if b and (int(target.min()) < 0 or int(target.max()) >= cfg.num_classes):
                raise ValueError(f"target out of range: classes are 0..{cfg.num_classes - 1}")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                mu, logvar = self.encode(x)
                recon = self.decode(mu)
                pred = self._predict(x)
                samples = self._sample(mu, logvar, n, seed, index, False, chunk_size)
                cls = self._predict(samples.flatten(0, 1)).reshape(b, n)
                inv = (cls == pred[:, None]).float().mean(1)
                if contrast:
                    con = self._sample(mu, logvar, n, seed, index, True, chunk_size)
                    con_cls = self._predict(con.flatten(0, 1)).reshape(b, n)
                    flip = (con_cls != pred[:, None]).float().mean(1)
                else:
                    con = x.new_empty((b, 0) + x.shape[1:])
                    con_cls = pred.new_empty((b, 0))
                    flip = x.new_empty((0,))
            empty = x.new_empty((0,))
            attr = mean = var = empty
            if attribute:
                k = check_positive_int(cfg.ig_samples if ig_samples is None else ig_samples, "ig_samples")
                k = min(k, n)
                tgt = pred if target is None else target.to(x.device, torch.int64)
                batch = torch.cat((x.unsqueeze(1), samples[:, :k]), 1)  # (B, 1 + k, C, H, W)
                a = self.attribute(batch.flatten(0, 1), tgt.repeat_interleave(k + 1),
                                   n_steps=n_steps, internal_batch_size=internal_batch_size)
                a = a.reshape(batch.shape)
                attr = a[:, 0]
                mean = a[:, 1:].mean(1)
                var = a[:, 1:].var(1, unbiased=False)
        finally:
            self.train(was_training)
        return InvarianceResult(inputs=x, prediction=pred, reconstruction=recon, latent=mu,
                                samples=samples, sample_classes=cls, invariance=inv, contrast=con,
                                contrast_classes=con_cls, flip=flip, attribution=attr,
                                attribution_mean=mean, attribution_var=var)

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor, *, n_steps: int | None = None,
                  method: str | None = None, internal_batch_size: int | None = None,
                  backend: str | None = None) -> torch.Tensor:
        """Integrated gradients of the studied classifier (zero baseline) on (N, C, H, W) images
        for target classes (N,): Captum's IntegratedGradients when installed (config.ig_backend
        "auto" or "captum"), the built-in `integrated_gradients` otherwise."""
        cfg = self.config
        n_steps = cfg.ig_steps if n_steps is None else check_positive_int(n_steps, "n_steps")
        method = cfg.ig_method if method is None else method
        backend = cfg.ig_backend if backend is None else backend
        if backend not in IG_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(IG_BACKENDS)} (got {backend!r})")
        ibs = internal_batch_size or max(inputs.shape[0], 1024)
        use_captum = backend == "captum" or (backend == "auto" and _captum_available())
        baselines = torch.zeros_like(inputs)
        if use_captum:
            if not _captum_available():
                raise RuntimeError("ig backend 'captum' asked for, but captum is not installed "
                                   "(pip install captum), use 'builtin'")
            from captum.attr import IntegratedGradients

            with torch.enable_grad():
                return IntegratedGradients(self.classify).attribute(
                    inputs.detach(), baselines=baselines, target=target, n_steps=n_steps,
                    method=method, internal_batch_size=ibs).detach()
        return integrated_gradients(self.classify, inputs, target, baselines, n_steps=n_steps,
                                    method=method, internal_batch_size=ibs).detach()

    _traversal_values = (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)

    def traversal(self, inputs: torch.Tensor, values: Sequence[float] | None = None) -> torch.Tensor:
        """(B, nuisance_dims, len(values), C, H, W): each nuisance dim of each input's posterior
        mean set to each value, the other dims kept, decoded."""
        self._check_ready()
        x = self._check_inputs(inputs)
        ds, dn = self.config.supervised_dims, self.config.nuisance_dims
        v = torch.tensor(list(self._traversal_values if values is None else values), dtype=x.dtype,
                         device=x.device)
        with torch.no_grad():
            mu, _ = self.encode(x)
            z = mu[:, None, None, :].repeat(1, dn, len(v), 1)
            for j in range(dn):
                z[:, j, :, ds + j] = v
            img = self.decode(z.flatten(0, 2))
        return img.reshape((x.shape[0], dn, len(v)) + img.shape[1:])

    # ---- evaluation ----
    def evaluate(self, test_loader, *, progress: bool = True, n_samples: int | None = None,
                 seed: int | None = None) -> dict[str, float]:
        """accuracy, invariance_rate, flip_rate, recon_bce over the loader (see the module
        docstring); example i of the loader (in order) draws its noise from (seed, i)."""
        cfg = self.config
        self._check_ready()
        n = check_positive_int(cfg.eval_samples if n_samples is None else n_samples, "n_samples")
        seed = cfg.seed if seed is None else seed
        was_training = self.training
        self.eval()
        correct = total = 0
        inv_sum = flip_sum = bce_sum = 0.0
        try:
            with torch.no_grad():
                for x, y in progress_bar(test_loader, desc="invariance evaluate",
                                         disable=None if progress else True):
                    x = self._check_inputs(x, "test_loader images")
                    y = y.to(x.device)
                    b = x.shape[0]
                    index = torch.arange(total, total + b)
                    mu, logvar = self.encode(x)
                    correct += int((self.head(mu[:, :cfg.supervised_dims]).argmax(1) == y).sum())
                    bce_sum += float(F.binary_cross_entropy_with_logits(self.decoder(mu), x,
                                                                        reduction="sum"))
                    pred = self._predict(x)[:, None]
                    s = self._sample(mu, logvar, n, seed, index, False).flatten(0, 1)
                    inv_sum += float((self._predict(s).reshape(b, n) == pred).float().mean(1).sum())
                    s = self._sample(mu, logvar, n, seed, index, True).flatten(0, 1)
                    flip_sum += float((self._predict(s).reshape(b, n) != pred).float().mean(1).sum())
                    total += b
        finally:
            self.train(was_training)
        t = max(total, 1)
        return {"accuracy": correct / t, "invariance_rate": inv_sum / t, "flip_rate": flip_sum / t,
                "recon_bce": bce_sum / t}

    # ---- figures ----
    def report(self, test_loader, out_dir, *, n_inputs: int = 8, n_samples: int = 10) -> list[Path]:
        """Writes invariant_samples.png (a grid of invariant and contrast samples per input),
        nuisance_traversals.png (each nuisance dim swept, for a few inputs) and
        attributions.png (integrated gradients on the input, mean and variance over its
        invariant samples) into out_dir; returns their paths."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        self._check_ready()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        xs, taken = [], 0
        for x, _ in test_loader:
            xs.append(x[: n_inputs - taken])
            taken += len(xs[-1])
            if taken >= n_inputs:
                break
        x = torch.cat(xs)
        res = self.explain(x, n_samples=n_samples, ig_samples=min(self.config.ig_samples, n_samples))
        paths = []

        fig = res.plot(max_rows=n_inputs, max_samples=n_samples)
        p = out_dir / "invariant_samples.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

        rows = min(3, len(x))
        trav = self.traversal(x[:rows])  # (rows, dn, V, C, H, W)
        dn, nv = trav.shape[1], trav.shape[2]
        cols = rows * (nv + 1) - 1  # one block of columns per input, an empty column between
        fig, axes = plt.subplots(dn, cols, figsize=(0.75 * cols + 0.5, 0.75 * dn + 0.5), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(rows):
            for j in range(dn):
                for k in range(nv):
                    _show(axes[j, i * (nv + 1) + k], trav[i, j, k])
                if i == 0:
                    axes[j, 0].text(-0.1, 0.5, f"z_n[{j}]", transform=axes[j, 0].transAxes,
                                    fontsize=6, ha="right", va="center")
        fig.suptitle(f"nuisance traversals: one dim from {self._traversal_values[0]:g} to "
                     f"{self._traversal_values[-1]:g}, z_s and the other dims fixed", fontsize=7)
        fig.tight_layout(pad=0.2, rect=(0.03, 0, 1, 0.96))
        p = out_dir / "nuisance_traversals.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

        fig, axes = plt.subplots(len(x), 4, figsize=(4 * 0.95, 0.95 * len(x) + 0.3), squeeze=False)
        for i in range(len(x)):
            for ax in axes[i]:
                ax.axis("off")
            _show(axes[i, 0], x[i], f"pred {int(res.prediction[i])}")
            top = i == 0
            _show_attr(axes[i, 1], res.attribution[i], "IG input" if top else None)
            _show_attr(axes[i, 2], res.attribution_mean[i], "IG mean (invariant)" if top else None)
            _show_attr(axes[i, 3], res.attribution_var[i], "IG variance" if top else None, signed=False)
        fig.tight_layout(pad=0.2)
        p = out_dir / "attributions.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
        return paths


# ---- the full run --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict:
    """python -m lfi_fast.explain.invariance --data mnist --out DIR: train, evaluate, save the
    explainer, write DIR/metrics.json and the figures."""
    from torch.utils.data import DataLoader

    from ..data import load_dataset

    ap = argparse.ArgumentParser(prog="python -m lfi_fast.explain.invariance", description=main.__doc__)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N training and test images")
    ap.add_argument("--mode", default="design", choices=MODES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="where to save the explainer (default OUT/checkpoint)")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Config field (VALUE as JSON, else a string); repeatable")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 28 if args.data == "digits" else None
    train = load_dataset(args.data, "train", data_dir=args.data_dir, image_size=size, limit=args.limit)
    test = load_dataset(args.data, "test", data_dir=args.data_dir, image_size=size, limit=args.limit)
    overrides = {"mode": args.mode}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set needs FIELD=VALUE (got {item!r})")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    cfg = default_config(args.data, **overrides)
    torch.manual_seed(cfg.seed)
    exp = InvarianceExplainer(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=500)
    t0 = time.perf_counter()
    history = exp.fit(train_loader)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = exp.evaluate(test_loader)
    eval_seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp.save(args.checkpoint or out / "checkpoint")
    figures = [] if args.no_figures else exp.report(test_loader, out)
    doc = {**metrics, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
           "epochs": cfg.epochs, "data": args.data, "train_size": len(train), "test_size": len(test),
           "threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg),
           "history": history, "figures": [p.name for p in figures]}
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("accuracy", "invariance_rate", "flip_rate", "recon_bce",
                                          "train_seconds", "epochs")}, indent=2))
    return doc


if __name__ == "__main__":
    main()
