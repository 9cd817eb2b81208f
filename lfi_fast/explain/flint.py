"""FLINT: Framework to Learn with INTerpretation (Parekh et al., NeurIPS 2021).

A predictor f (any nn.Module) and an interpreter g = h o Phi: the attribute functions Phi read one
or more named hidden layers of f (forward hooks, so any module works, not only the built-in
networks), a linear layer h maps the J attributes to class scores, a decoder d maps them back to
the input. Training minimises

    CE(f(x), y)                          (learning with interpretation; absent in post-hoc mode)
    + beta  * CE(softmax(f(x)), h(Phi(x)))            output fidelity (f's soft predictions)
    + gamma * MSE(d(Phi(x)), x)                       input fidelity
    + delta * (mean_x H(softmax|Phi(x)|) - H(softmax(mean_x |Phi(x)|)))   conciseness/diversity
    + eta   * mean |Phi(x)|                           L1

each weight switched on from its start epoch (the published schedule is the default: Adam 1e-4,
batch 16, 12 epochs, gamma = 0.8 from epoch 1, beta = 0.5 and eta = 0.1 from epoch 3, delta = 0.2
from epoch 5). The entropies are those of the softmax of |Phi| (as the public code computes them).
In post-hoc mode (``post_hoc=True``) f is given and frozen and the CE term is dropped.

Interpretation:
- local relevance r_{j,x} = phi_j(x) w_{j,c} / max_i |phi_i(x) w_{i,c}|, c = g's prediction (or a
  given target);
- global relevance r_{j,c}: the mean local relevance over the samples g assigns to class c;
- conciseness CNS(tau): the mean number of attributes with r_{j,x} > 1/tau (tau in 1.5 ... 5);
- maximum-activating samples per (class, attribute);
- AM+PI: activation maximisation of phi_j from a partial initialisation (a scaled input) with
  total-variation and bound penalties, run for all (input, attribute) pairs as ONE batched
  optimisation (one image tensor, one Adam; the per-pair losses are independent, so the result
  equals running the pairs one by one, up to rounding).

    from lfi_fast.explain.flint import FlintInterpreter, default_config
    exp = FlintInterpreter(default_config("mnist"))
    exp.fit(train_loader); exp.evaluate(test_loader)    # accuracy_f, accuracy_g, fidelity, cns_*
    res = exp.explain(x, n_visualize=3); res.plot()

    python -m lfi_fast.explain.flint --data mnist --out results/flint      # the recorded full run
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from .base import Explainer, Explanation, check_images, check_positive_int, get_layer, progress_bar

__all__ = ["TAUS", "FlintConfig", "FlintInterpreter", "FlintResult", "am_pi", "default_config"]

METHOD = "flint"
TAUS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


def _tau_key(tau: float) -> str:
    return f"cns_{tau:g}"


@dataclass
class FlintConfig:
    """Every field JSON-able; defaults are the published MNIST setting."""

    classifier: str = "builtin:FlintNet"
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    # hidden layers of f the attribute functions read (forward hooks; several allowed)
    tap_layers: list = field(default_factory=lambda: ["tap"])
    n_attributes: int = 25  # J
    psi_channels: int = 64  # Psi: conv 3x3 (C_tap -> 64), LeakyReLU, avg-pool to 3x3, linear -> J
    psi_pool: int = 3
    post_hoc: bool = False  # True: f frozen (trained first if not ready), no CE term
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-4
    # the last lr_decay_epochs epochs of the schedule run at lr * lr_decay (0: constant lr)
    lr_decay_epochs: int = 0
    lr_decay: float = 0.1
    beta: float = 0.5  # output fidelity
    beta_from: int = 3  # first epoch (1-based) the weight is on
    gamma: float = 0.8  # input fidelity
    gamma_from: int = 1
    delta: float = 0.2  # conciseness (entropy)
    delta_from: int = 5
    eta: float = 0.1  # L1 of Phi
    eta_from: int = 3
    classifier_epochs: int = 3  # post-hoc only: training of an f that is not ready
    classifier_lr: float = 1e-3
    seed: int = 0  # shuffling of the training data in fit()
    # interpretation
    relevance_threshold: float = 0.1  # a class's relevant attributes: global relevance above this
    am_rounds: int = 12  # AM+PI: rounds of a fresh Adam, lr halved each round
    am_steps: int = 50  # steps per round
    am_lr: float = 0.05
    am_init: float = 0.3  # partial initialisation: am_init * input
    am_weight: float = 2.0  # weight of the attribute's activation
    am_tv: float = 6.0  # total-variation penalty
    am_bound: float = 10.0  # penalty on pixels outside [am_min, am_max]
    am_min: float = 0.0
    am_max: float = 1.0


def default_config(data: str = "mnist", **overrides) -> FlintConfig:
    """The configuration for "digits" (run at image_size 28), "mnist" and "fashion-mnist".

    MNIST and Fashion-MNIST use the published schedule, FlintConfig's own defaults (Adam 1e-4,
    batch 16, 12 epochs, gamma from epoch 1, beta and eta from epoch 3, delta from epoch 5), then
    3 more epochs at lr 1e-5: 56,250 steps, about 15 minutes on this project's 2-core CPU when the
    machine is otherwise idle (results/flint/README.md records the runs; the 12 published epochs
    alone reached fidelity 0.984, short of 0.985). digits (1,437 training images) uses a larger
    learning rate and more epochs."""
    if data in ("mnist", "fashion-mnist"):
        cfg = FlintConfig(epochs=15, lr_decay_epochs=3)
    elif data == "digits":
        cfg = FlintConfig(
            epochs=30, batch_size=16, lr=1e-3, beta_from=2, gamma_from=1, eta_from=3, delta_from=4
        )
    else:
        raise ValueError(f"data must be one of 'digits', 'mnist', 'fashion-mnist' (got {data!r})")
    fields = {f.name for f in dataclasses.fields(FlintConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown FlintConfig fields: {sorted(unknown)}")
    return dataclasses.replace(cfg, **overrides)


# ---- hooks on named layers -----------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last tap's hook when the rest of f's forward is not needed."""


def _logits(out: Any) -> torch.Tensor:
    """A classifier's output: a tensor of scores, or a tuple/list whose first item is."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"classifier must return a tensor of class scores (got {type(out).__name__})"
        )
    return out


def run_taps(model: nn.Module, names: Sequence[str], x: torch.Tensor, *, stop: bool = False):
    """(f's output or None, [output of each named layer]) of one forward of `model`. With stop=True
    the forward is cut short once every tap has fired (the layers after them are not run)."""
    out: dict[str, torch.Tensor] = {}
    handles = []

    def make(name):
        def hook(_m, _i, o):
            if not isinstance(o, torch.Tensor):
                raise TypeError(
                    f"tap_layers: layer {name!r} returns {type(o).__name__}, not a tensor"
                )
            out[name] = o
            if stop and len(out) == len(names):
                raise _StopForward

        return hook

    for n in names:
        handles.append(get_layer(model, n, "tap_layers").register_forward_hook(make(n)))
    y = None
    try:
        y = model(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(
            f"tap_layers: layer(s) {missing} were not called in the classifier's forward"
        )
    return (None if y is None else _logits(y)), [out[n] for n in names]


# ---- sub-networks --------------------------------------------------------------------------------


class AttributeNet(nn.Module):
    """Phi: one branch per tapped layer (4-D: conv 3x3 -> LeakyReLU -> adaptive avg-pool to
    pool x pool; 2-D: linear -> LeakyReLU), concatenated, then linear -> J and LeakyReLU."""

    def __init__(
        self,
        tap_shapes: Sequence[tuple[int, ...]],
        n_attributes: int,
        channels: int = 64,
        pool: int = 3,
    ):
        super().__init__()
        self.branches = nn.ModuleList()
        width = channels * pool * pool
        for shape in tap_shapes:
            if len(shape) == 3:
                self.branches.append(
                    nn.Sequential(
                        nn.Conv2d(shape[0], channels, 3, padding=1),
                        nn.LeakyReLU(),
                        nn.AdaptiveAvgPool2d(pool),
                        nn.Flatten(),
                    )
                )
            elif len(shape) == 1:
                self.branches.append(nn.Sequential(nn.Linear(shape[0], width), nn.LeakyReLU()))
            else:
                raise ValueError(
                    f"tap_layers: a tapped layer must give (N, C, H, W) or (N, D) outputs "
                    f"(got per-example shape {tuple(shape)})"
                )
        self.fc = nn.Linear(width * len(tap_shapes), n_attributes)
        self.act = nn.LeakyReLU()

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        z = torch.cat([b(t) for b, t in zip(self.branches, taps)], dim=1)
        return self.act(self.fc(z))


class Decoder(nn.Module):
    """d: linear J -> 2 x s x s (s = ceil(size / 4)), two stride-2 transposed convolutions with
    ReLU (the public MNIST decoder), resized to the image size when it is not a multiple of 4."""

    def __init__(self, n_attributes: int, out_channels: int, image_size: int):
        super().__init__()
        self.side = math.ceil(image_size / 4)
        self.size = image_size
        self.fc = nn.Linear(n_attributes, 2 * self.side * self.side)
        self.up1 = nn.ConvTranspose2d(2, 8, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(8, out_channels, 3, stride=2, padding=1, output_padding=1)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        x = self.fc(phi).view(-1, 2, self.side, self.side)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


# ---- losses and interpretation maths -------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between softmax(target_logits) (the target distribution) and softmax(logits)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(scores, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def conciseness_loss(phi: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy of softmax(|phi|) minus the entropy of softmax(batch mean |phi|):
    each sample uses few attributes, the batch uses many."""
    a = phi.abs()
    return _entropy(a).mean() - _entropy(a.mean(0))


def local_relevance(phi: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """r_{j,x} = phi_j(x) w_{j,c} / max_i |phi_i(x) w_{i,c}| (0 where every product is 0)."""
    contrib = phi * weight[target]
    scale = contrib.abs().amax(dim=1, keepdim=True)
    return torch.where(
        scale > 0,
        contrib / scale.clamp_min(torch.finfo(contrib.dtype).tiny),
        torch.zeros_like(contrib),
    )


def conciseness(relevance: torch.Tensor, taus: Sequence[float] = TAUS) -> dict[str, float]:
    """CNS(tau): the mean number of attributes whose relevance exceeds 1/tau."""
    return {
        _tau_key(t): float((relevance > 1.0 / t).sum(1).double().mean())
        if len(relevance)
        else float("nan")
        for t in taus
    }


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean |vertical difference| + mean |horizontal difference| (over C, H, W)."""
    dv = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dv + dh


def am_pi(
    phi_fn,
    inputs: torch.Tensor,
    attributes: torch.Tensor,
    *,
    rounds: int = 12,
    steps: int = 50,
    lr: float = 0.05,
    init: float = 0.3,
    weight: float = 2.0,
    tv: float = 6.0,
    bound: float = 10.0,
    min_value: float = 0.0,
    max_value: float = 1.0,
) -> torch.Tensor:
    """Activation maximisation from partial initialisation, for N (input, attribute) pairs at once.

    Image b starts at init * inputs[b] and ascends
        weight * phi_{attributes[b]}(x_b) - bound * mean(|x_b| outside [min, max]) - tv * TV(x_b)
    with Adam: `rounds` rounds of `steps` steps, a fresh Adam each round, the learning rate halved
    after each (the public code's schedule). The pairs do not interact (Adam is element-wise and
    each image's loss depends on it alone), so this equals N separate runs. phi_fn maps images to
    attributes (N, J). Only the image gets gradients (torch.autograd.grad), never the networks.
    Returns the optimised images (N, C, H, W), unclipped."""
    if inputs.shape[0] != attributes.shape[0]:
        raise ValueError(
            f"attributes must have one entry per input ({attributes.shape[0]} vs {inputs.shape[0]})"
        )
    x = (init * inputs.detach()).clone().requires_grad_(True)
    if x.shape[0] == 0:
        return x.detach()
    rows = torch.arange(x.shape[0], device=x.device)
    attributes = attributes.to(x.device)
    for r in range(rounds):
        opt = torch.optim.Adam([x], lr=lr / (2**r))
        for _ in range(steps):
            phi = phi_fn(x)
            outside = ((x > max_value) | (x < min_value)).to(x.dtype) * x.abs()
            objective = (
                weight * phi[rows, attributes]
                - bound * outside.flatten(1).mean(1)
                - tv * total_variation(x)
            )
            (grad,) = torch.autograd.grad(-objective.sum(), [x])
            x.grad = grad
            opt.step()
    return x.detach()


# ---- results -------------------------------------------------------------------------------------


@dataclass
class FlintResult(Explanation):
    """FLINT's explanation of a batch (batch first).

    attributes (B, J) phi(x); logits_f / logits_g (B, K); prediction_f / prediction_g (B,);
    target (B,) the class explained (g's prediction unless given); relevance (B, J) local
    relevance to target; top_attributes / top_relevance (B, k) the k most relevant attributes;
    am_pi (B, n_visualize, C, H, W) AM+PI images of the top n_visualize attributes (from each
    input), empty when n_visualize = 0; inputs (B, C, H, W)."""

    inputs: torch.Tensor
    attributes: torch.Tensor
    logits_f: torch.Tensor
    logits_g: torch.Tensor
    prediction_f: torch.Tensor
    prediction_g: torch.Tensor
    target: torch.Tensor
    relevance: torch.Tensor
    top_attributes: torch.Tensor
    top_relevance: torch.Tensor
    am_pi: torch.Tensor

    def plot(self, max_rows: int = 8):
        """Per input: the image, the relevance of its top attributes, their AM+PI images."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        n = min(max_rows, len(self))
        nv = self.am_pi.shape[1]
        cols = 2 + nv
        fig, axes = plt.subplots(
            max(n, 1), cols, figsize=(2.2 * cols + 1.0, 2.2 * max(n, 1)), squeeze=False
        )
        for i in range(n):
            ax = axes[i, 0]
            ax.imshow(_img(self.inputs[i]), cmap="gray", vmin=0, vmax=1)
            ax.set_title(
                f"f: {int(self.prediction_f[i])}  g: {int(self.prediction_g[i])}", fontsize=8
            )
            ax.axis("off")
            ax = axes[i, 1]
            k = self.top_attributes.shape[1]
            ax.bar(range(k), self.top_relevance[i].cpu().numpy(), color="tab:green")
            ax.set_xticks(
                range(k), [f"$\\phi_{{{int(j)}}}$" for j in self.top_attributes[i]], fontsize=8
            )
            ax.set_ylim(min(0.0, float(self.top_relevance[i].min())), 1.05)
            ax.set_title(f"relevance to class {int(self.target[i])}", fontsize=8)
            for v in range(nv):
                ax = axes[i, 2 + v]
                ax.imshow(_img(self.am_pi[i, v]), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"AM+PI $\\phi_{{{int(self.top_attributes[i, v])}}}$", fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        return fig


def _img(t: torch.Tensor):
    t = t.detach().float().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


# ---- the explainer -------------------------------------------------------------------------------


class FlintInterpreter(Explainer):
    """FLINT: predictor f, attribute functions Phi on named hidden layers of f, linear h, decoder d.

    f is config.classifier (built with models.build_model) unless a module is given; its weights
    are saved with the interpreter. `classifier_ready` says whether f has been trained or given."""

    METHOD = METHOD
    Config = FlintConfig

    def __init__(self, config: FlintConfig, classifier: nn.Module | None = None):
        super().__init__(config)
        c = config
        check_positive_int(c.n_attributes, "n_attributes", minimum=2)
        check_positive_int(c.in_channels, "in_channels")
        check_positive_int(c.image_size, "image_size")
        check_positive_int(c.num_classes, "num_classes", minimum=2)
        check_positive_int(c.epochs, "epochs", minimum=0)
        check_positive_int(c.batch_size, "batch_size")
        if isinstance(c.tap_layers, str):
            c.tap_layers = [c.tap_layers]
        if (
            not isinstance(c.tap_layers, (list, tuple))
            or not c.tap_layers
            or not all(isinstance(n, str) and n for n in c.tap_layers)
        ):
            raise ValueError(
                f"tap_layers must be a non-empty list of layer names (got {c.tap_layers!r})"
            )
        c.tap_layers = list(c.tap_layers)
        if len(set(c.tap_layers)) != len(c.tap_layers):
            raise ValueError(f"tap_layers has duplicates: {c.tap_layers}")
        if not (c.lr > 0):
            raise ValueError(f"lr must be > 0 (got {c.lr})")
        if not (0 < c.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1] (got {c.lr_decay})")
        check_positive_int(c.lr_decay_epochs, "lr_decay_epochs", minimum=0)
        for w in ("beta", "gamma", "delta", "eta"):
            if not (getattr(c, w) >= 0):
                raise ValueError(f"{w} must be >= 0 (got {getattr(c, w)})")
        given = classifier is not None
        if classifier is None:
            if c.classifier.startswith("builtin:"):
                classifier = models.build_model(
                    c.classifier,
                    in_channels=c.in_channels,
                    num_classes=c.num_classes,
                    image_size=c.image_size,
                )
            else:
                classifier = models.build_model(c.classifier)
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module (got {type(classifier).__name__})")
        self.classifier = classifier
        for n in c.tap_layers:
            get_layer(classifier, n, "tap_layers")  # a clear error for a name that does not exist
        shapes = self._probe(classifier)
        self.psi = AttributeNet(shapes, c.n_attributes, c.psi_channels, c.psi_pool)
        self.h = nn.Sequential(nn.Dropout(0.01), nn.Linear(c.n_attributes, c.num_classes))
        self.decoder = Decoder(c.n_attributes, c.in_channels, c.image_size)
        self.register_buffer("classifier_ready", torch.tensor(given))
        if given and c.post_hoc:
            self._freeze_classifier()

    def _probe(self, classifier: nn.Module) -> list[tuple[int, ...]]:
        c = self.config
        was = classifier.training
        classifier.eval()
        try:
            dev = next(iter(classifier.parameters())).device
        except StopIteration:
            dev = torch.device("cpu")
        with torch.no_grad():
            y, taps = run_taps(
                classifier,
                c.tap_layers,
                torch.zeros(2, c.in_channels, c.image_size, c.image_size, device=dev),
            )
        classifier.train(was)
        if y.dim() != 2 or y.shape[1] != c.num_classes:
            raise ValueError(
                f"classifier must output (N, num_classes={c.num_classes}) scores "
                f"(got {tuple(y.shape)})"
            )
        return [tuple(t.shape[1:]) for t in taps]

    def _freeze_classifier(self) -> None:
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.classifier.eval()

    @property
    def weight(self) -> torch.Tensor:
        """h's weight (K, J): w_{j,c} = weight[c, j]."""
        return self.h[1].weight

    def _check(self, x, name="inputs") -> torch.Tensor:
        c = self.config
        return check_images(x, c.in_channels, (c.image_size, c.image_size), name)

    # ---- forward pieces ----
    def attributes(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) (N, J); f's layers after the last tap are not run."""
        _, taps = run_taps(self.classifier, self.config.tap_layers, x, stop=True)
        return self.psi(taps)

    def forward(self, x: torch.Tensor):
        """(f logits, phi, g logits)."""
        y, taps = run_taps(self.classifier, self.config.tap_layers, x)
        phi = self.psi(taps)
        return y, phi, self.h(phi)

    # ---- training ----
    def _weights(self, epoch: int) -> dict[str, float]:
        c = self.config
        return {
            w: getattr(c, w) if epoch >= getattr(c, w + "_from") else 0.0
            for w in ("beta", "gamma", "delta", "eta")
        }

    def _lr(self, epoch: int) -> float:
        c = self.config
        decayed = c.lr_decay_epochs > 0 and epoch > c.epochs - c.lr_decay_epochs
        return c.lr * c.lr_decay if decayed else c.lr

    def fit(
        self,
        train_loader,
        epochs: int | None = None,
        *,
        progress: bool = True,
        callback=None,
        start_epoch: int = 1,
    ) -> dict:
        """Train (f too unless post_hoc) with the scheduled loss; history: per-epoch means.
        callback(epoch, history), when given, runs after each epoch (e.g. to save a checkpoint).
        start_epoch: the schedule's number of the first epoch (to resume a saved interpreter;
        the optimiser's state starts afresh)."""
        c = self.config
        epochs = c.epochs if epochs is None else check_positive_int(epochs, "epochs", minimum=0)
        start_epoch = check_positive_int(start_epoch, "start_epoch")
        dev = self.device
        history: dict[str, list] = {
            k: []
            for k in (
                "loss",
                "ce",
                "output_fidelity",
                "input_fidelity",
                "conciseness",
                "l1",
                "accuracy_f",
                "fidelity",
                "seconds",
            )
        }
        if c.post_hoc and not bool(self.classifier_ready):
            if not c.classifier.startswith("builtin:"):
                raise ValueError(
                    "post_hoc: the classifier is not trained; give a trained classifier "
                    "(classifier=...) or a built-in one to train"
                )
            torch.manual_seed(c.seed)
            t0 = time.perf_counter()
            history["classifier_loss"] = models.train_classifier(
                self.classifier,
                train_loader,
                epochs=c.classifier_epochs,
                lr=c.classifier_lr,
                device=dev,
                progress=progress,
            )
            history["classifier_seconds"] = time.perf_counter() - t0
            self.classifier_ready.fill_(True)
        if c.post_hoc:
            self._freeze_classifier()
            params = [p for m in (self.psi, self.h, self.decoder) for p in m.parameters()]
        else:
            params = list(self.parameters())
        opt = torch.optim.Adam(params, lr=c.lr)
        checked = False
        for epoch in range(start_epoch, start_epoch + epochs):
            t0 = time.perf_counter()
            w = self._weights(epoch)
            for group in opt.param_groups:
                group["lr"] = self._lr(epoch)
            self.train()
            if c.post_hoc:
                self.classifier.eval()
            sums = {
                k: 0.0
                for k in ("loss", "ce", "output_fidelity", "input_fidelity", "conciseness", "l1")
            }
            agree = correct = n = 0
            for x, y in progress_bar(
                train_loader,
                desc=f"flint epoch {epoch}/{start_epoch + epochs - 1}",
                disable=not progress,
            ):
                if not checked:
                    self._check(x)
                    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c.num_classes):
                        raise ValueError(
                            f"labels must be in [0, {c.num_classes}) (got {int(y.min())}..{int(y.max())})"
                        )
                    checked = True
                x, y = x.to(dev), y.to(dev)
                if c.post_hoc:
                    with torch.no_grad():
                        logits, taps = run_taps(self.classifier, c.tap_layers, x)
                    ce = torch.zeros((), device=dev)
                else:
                    logits, taps = run_taps(self.classifier, c.tap_layers, x)
                    ce = F.cross_entropy(logits, y)
                phi = self.psi(taps)
                g_logits = self.h(phi)
                zero = torch.zeros((), device=dev)
                out_fid = soft_cross_entropy(g_logits, logits.detach())
                in_fid = F.mse_loss(self.decoder(phi), x) if w["gamma"] > 0 else zero
                cd = conciseness_loss(phi) if w["delta"] > 0 else zero
                l1 = phi.abs().mean()
                loss = (
                    ce + w["beta"] * out_fid + w["gamma"] * in_fid + w["delta"] * cd + w["eta"] * l1
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = len(y)
                for k, v in (
                    ("loss", loss),
                    ("ce", ce),
                    ("output_fidelity", out_fid),
                    ("input_fidelity", in_fid),
                    ("conciseness", cd),
                    ("l1", l1),
                ):
                    sums[k] += float(v.detach()) * b
                pf = logits.argmax(1)
                correct += int((pf == y).sum())
                agree += int((g_logits.argmax(1) == pf).sum())
                n += b
            for k, v in sums.items():
                history[k].append(v / max(n, 1))
            history["accuracy_f"].append(correct / max(n, 1))
            history["fidelity"].append(agree / max(n, 1))
            history["seconds"].append(time.perf_counter() - t0)
            if not c.post_hoc:
                self.classifier_ready.fill_(True)
            if callback is not None:
                self.eval()
                callback(epoch, history)
        self.eval()
        return history

    # ---- evaluation ----
    @torch.no_grad()
    def collect(
        self, loader, *, limit: int | None = None, keep_images: bool = False, progress: bool = False
    ):
        """phi, f and g logits, labels (and images) over a loader, at most `limit` samples."""
        self.eval()
        dev = self.device
        out = {k: [] for k in ("phi", "logits_f", "logits_g", "labels", "images")}
        n = 0
        for x, y in progress_bar(loader, desc="flint collect", disable=not progress):
            self._check(x)
            if limit is not None and n >= limit:
                break
            if limit is not None:
                x, y = x[: limit - n], y[: limit - n]
            lf, phi, lg = self(x.to(dev))
            out["phi"].append(phi.cpu())
            out["logits_f"].append(lf.cpu())
            out["logits_g"].append(lg.cpu())
            out["labels"].append(y.cpu())
            if keep_images:
                out["images"].append(x.cpu())
            n += len(y)
        c = self.config
        empty = {
            "phi": (0, c.n_attributes),
            "logits_f": (0, c.num_classes),
            "logits_g": (0, c.num_classes),
            "labels": (0,),
            "images": (0, c.in_channels, c.image_size, c.image_size),
        }
        return {
            k: (
                torch.cat(v)
                if v
                else torch.zeros(empty[k], dtype=torch.int64 if k == "labels" else torch.float32)
            )
            for k, v in out.items()
        }

    def evaluate(self, test_loader, *, progress: bool = True) -> dict[str, float]:
        """accuracy_f, accuracy_g (against the labels), fidelity (g's prediction equals f's), and
        cns_1.5 ... cns_5 (relevance to g's prediction)."""
        d = self.collect(test_loader, progress=progress)
        pf, pg, y = d["logits_f"].argmax(1), d["logits_g"].argmax(1), d["labels"]
        n = max(len(y), 1)
        rel = local_relevance(d["phi"], self.weight.detach().cpu(), pg)
        return {
            "accuracy_f": int((pf == y).sum()) / n,
            "accuracy_g": int((pg == y).sum()) / n,
            "fidelity": int((pf == pg).sum()) / n,
            **conciseness(rel),
        }

    # ---- interpretation ----
    def global_relevance(self, phi: torch.Tensor, prediction_g: torch.Tensor) -> torch.Tensor:
        """(K, J): r_{j,c}, the mean local relevance over the samples g assigns to class c (0 for a
        class g never predicts)."""
        K = self.config.num_classes
        rel = local_relevance(phi, self.weight.detach().cpu(), prediction_g)
        sums = torch.zeros(K, rel.shape[1]).index_add_(0, prediction_g, rel)
        counts = torch.bincount(prediction_g, minlength=K).clamp_min(1).unsqueeze(1)
        return sums / counts

    @staticmethod
    def max_activating(
        phi: torch.Tensor, labels: torch.Tensor, k: int = 3, num_classes: int | None = None
    ) -> torch.Tensor:
        """(K, k, J) sample positions: per class c and attribute j, the k samples of class c with the
        largest phi_j (-1 where the class has fewer than k samples)."""
        K = int(labels.max()) + 1 if num_classes is None else num_classes
        out = torch.full((K, k, phi.shape[1]), -1, dtype=torch.int64)
        for c in range(K):
            pos = torch.nonzero(labels == c).flatten()
            if len(pos) == 0:
                continue
            kk = min(k, len(pos))
            top = phi[pos].topk(kk, dim=0).indices  # (kk, J)
            out[c, :kk] = pos[top]
        return out

    def am_pi(self, inputs: torch.Tensor, attributes: torch.Tensor, **overrides) -> torch.Tensor:
        """AM+PI images for (inputs[b], attributes[b]) pairs, one batched optimisation (see am_pi)."""
        self._check(inputs)
        attributes = torch.as_tensor(attributes, dtype=torch.int64)
        if attributes.dim() != 1 or attributes.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"attributes must be (N,) with N = {inputs.shape[0]} (got {tuple(attributes.shape)})"
            )
        if attributes.numel() and (
            int(attributes.min()) < 0 or int(attributes.max()) >= self.config.n_attributes
        ):
            raise ValueError(f"attributes must be in [0, {self.config.n_attributes})")
        c = self.config
        kw = {
            "rounds": c.am_rounds,
            "steps": c.am_steps,
            "lr": c.am_lr,
            "init": c.am_init,
            "weight": c.am_weight,
            "tv": c.am_tv,
            "bound": c.am_bound,
            "min_value": c.am_min,
            "max_value": c.am_max,
        }
        unknown = set(overrides) - set(kw)
        if unknown:
            raise ValueError(f"unknown AM+PI options {sorted(unknown)}; known: {sorted(kw)}")
        kw.update(overrides)
        was = self.training
        self.eval()
        try:
            return am_pi(self.attributes, inputs.to(self.device), attributes, **kw)
        finally:
            self.train(was)

    def explain(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        seed: int = 0,
        index: torch.Tensor | None = None,
        n_top: int = 3,
        n_visualize: int = 0,
        **am_options,
    ) -> FlintResult:
        """Local explanation of a batch: attributes, relevance to `target` (default g's
        prediction), the n_top most relevant attributes, and with n_visualize > 0 the AM+PI images of
        the top n_visualize of them (initialised from each input). Deterministic: seed and index
        are accepted for the common interface and unused (no randomness)."""
        self._check(inputs)
        c = self.config
        n_top = check_positive_int(n_top, "n_top")
        n_top = min(n_top, c.n_attributes)
        n_visualize = check_positive_int(n_visualize, "n_visualize", minimum=0)
        if n_visualize > n_top:
            raise ValueError(f"n_visualize must be <= n_top ({n_top}) (got {n_visualize})")
        if index is not None and (
            not isinstance(index, torch.Tensor) or index.shape != (inputs.shape[0],)
        ):
            raise ValueError(f"index must be a ({inputs.shape[0]},) tensor of dataset indices")
        self.eval()
        dev = self.device
        x = inputs.to(dev)
        with torch.no_grad():
            lf, phi, lg = self(x)
        pg = lg.argmax(1)
        if target is None:
            target = pg
        else:
            target = torch.as_tensor(target, dtype=torch.int64, device=dev).reshape(-1)
            if target.numel() == 1 and x.shape[0] != 1:
                target = target.expand(x.shape[0])
            if target.shape[0] != x.shape[0]:
                raise ValueError(
                    f"target must be one class or one per input (got {tuple(target.shape)})"
                )
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c.num_classes):
                raise ValueError(f"target out of range: classes are 0..{c.num_classes - 1}")
        rel = local_relevance(phi, self.weight.detach(), target)
        top_rel, top = rel.topk(n_top, dim=1)
        if n_visualize:
            B = x.shape[0]
            pairs_x = (
                x.unsqueeze(1)
                .expand(B, n_visualize, *x.shape[1:])
                .reshape(B * n_visualize, *x.shape[1:])
            )
            imgs = self.am_pi(pairs_x, top[:, :n_visualize].reshape(-1), **am_options)
            vis = imgs.view(B, n_visualize, *x.shape[1:])
        else:
            if am_options:
                raise ValueError(f"AM+PI options {sorted(am_options)} given with n_visualize = 0")
            vis = x.new_zeros((x.shape[0], 0, *x.shape[1:]))
        return FlintResult(
            inputs=inputs.detach().cpu(),
            attributes=phi.cpu(),
            logits_f=lf.cpu(),
            logits_g=lg.cpu(),
            prediction_f=lf.argmax(1).cpu(),
            prediction_g=pg.cpu(),
            target=target.cpu(),
            relevance=rel.cpu(),
            top_attributes=top.cpu(),
            top_relevance=top_rel.cpu(),
            am_pi=vis.cpu(),
        )

    # ---- figures ----
    def report(
        self,
        test_loader,
        out_dir,
        *,
        limit: int = 2000,
        max_attributes: int = 3,
        n_samples: int = 3,
        n_local: int = 4,
        **am_options,
    ) -> list[Path]:
        """Writes into out_dir:
        flint_class_attributes.png  per class, its relevant attributes (global relevance above
                                    config.relevance_threshold, at most max_attributes), each with
                                    its n_samples maximum-activating samples of the class and the
                                    AM+PI image from the top one (all pairs in one optimisation);
        flint_global_relevance.png  the class x attribute global relevance;
        flint_local_explanation.png the local explanation (relevance, AM+PI of the top 3) of the
                                    first n_local inputs.
        Statistics use the first `limit` samples of the loader."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        c = self.config
        d = self.collect(test_loader, limit=limit, keep_images=True)
        if len(d["labels"]) == 0:
            raise ValueError("report: the loader gave no samples")
        pg = d["logits_g"].argmax(1)
        grel = self.global_relevance(d["phi"], pg)
        idx = self.max_activating(d["phi"], d["labels"], n_samples, c.num_classes)
        pairs = []  # (class, attribute)
        for k in range(c.num_classes):
            order = grel[k].argsort(descending=True)[:max_attributes]
            pairs += [
                (k, int(j))
                for j in order
                if grel[k, j] > c.relevance_threshold and idx[k, 0, j] >= 0
            ]
        paths = []
        # per class: relevant attributes, their maximum-activating samples and AM+PI images
        if pairs:
            starts = torch.stack([d["images"][idx[k, 0, j]] for k, j in pairs])
            vis = self.am_pi(starts, torch.tensor([j for _, j in pairs]), **am_options).cpu()
        rows = [k for k in range(c.num_classes) if any(p[0] == k for p in pairs)]
        per_row = max([sum(1 for p in pairs if p[0] == k) for k in rows], default=1)
        cols = per_row * (n_samples + 1)
        fig, axes = plt.subplots(
            max(len(rows), 1),
            max(cols, 1),
            figsize=(1.1 * max(cols, 1) + 0.6, 1.2 * max(len(rows), 1) + 0.4),
            squeeze=False,
        )
        for ax in axes.flat:
            ax.axis("off")
        for r, k in enumerate(rows):
            mine = [(i, p) for i, p in enumerate(pairs) if p[0] == k]
            for a, (i, (_, j)) in enumerate(mine):
                for s in range(n_samples):
                    pos = int(idx[k, s, j])
                    if pos >= 0:
                        axes[r, a * (n_samples + 1) + s].imshow(
                            _img(d["images"][pos]), cmap="gray", vmin=0, vmax=1
                        )
                ax = axes[r, a * (n_samples + 1) + n_samples]
                ax.imshow(_img(vis[i]), cmap="magma", vmin=0, vmax=1)
                ax.set_title(f"$\\phi_{{{j}}}$ r={float(grel[k, j]):.2f}", fontsize=7)
            axes[r, 0].set_title(f"class {k}", fontsize=8, loc="left")
        fig.suptitle(
            "FLINT: relevant attributes per class (max-activating samples, AM+PI)", fontsize=9
        )
        fig.tight_layout()
        p = out_dir / "flint_class_attributes.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
        # global relevance
        fig, ax = plt.subplots(figsize=(0.3 * c.n_attributes + 1.5, 0.3 * c.num_classes + 1.2))
        im = ax.imshow(grel.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xlabel("attribute j")
        ax.set_ylabel("class")
        ax.set_title("FLINT global relevance $r_{j,c}$", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / "flint_global_relevance.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
        # local explanation
        nl = min(n_local, len(d["labels"]))
        res = self.explain(
            d["images"][:nl], n_top=3, n_visualize=min(3, c.n_attributes), **am_options
        )
        fig = res.plot(max_rows=nl)
        p = out_dir / "flint_local_explanation.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
        return paths


# ---- the recorded run ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """python -m lfi_fast.explain.flint --data mnist --out DIR: train, evaluate, save the
    interpreter, write DIR/metrics.json (with train_seconds) and the figures."""
    import argparse
    import json

    from torch.utils.data import DataLoader

    from ..data import load_dataset

    ap = argparse.ArgumentParser(prog="python -m lfi_fast.explain.flint", description=main.__doc__)
    ap.add_argument("--data", default="mnist", choices=("digits", "mnist", "fashion-mnist"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--checkpoint", default=None, help="where to save the interpreter (default OUT/checkpoint)"
    )
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images")
    ap.add_argument("--post-hoc", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument(
        "--figures-from",
        default=None,
        metavar="CHECKPOINT",
        help="only write the figures of a saved interpreter into OUT (no training)",
    )
    ap.add_argument(
        "--am-rounds", type=int, default=None, help="AM+PI rounds for the figures (default: config)"
    )
    ap.add_argument(
        "--am-steps", type=int, default=None, help="AM+PI steps per round for the figures"
    )
    ap.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue training a saved interpreter (with --start-epoch)",
    )
    ap.add_argument(
        "--start-epoch", type=int, default=1, help="the schedule's number of the first epoch"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    am = {k: v for k, v in (("rounds", args.am_rounds), ("steps", args.am_steps)) if v is not None}
    if args.figures_from:
        exp = FlintInterpreter.load(args.figures_from)
        size = 28 if args.data == "digits" else None
        test = load_dataset(args.data, "test", data_dir=args.data_dir, image_size=size)
        t1 = time.perf_counter()
        paths = exp.report(DataLoader(test, batch_size=500), args.out, **am)
        print(f"figures ({time.perf_counter() - t1:.0f} s):", ", ".join(str(p) for p in paths))
        return 0
    over = {
        k: v
        for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
        if v is not None
    }
    if args.post_hoc:
        over["post_hoc"] = True
    cfg = default_config(args.data, seed=args.seed, **over)
    size = 28 if args.data == "digits" else None
    train = load_dataset(
        args.data, "train", data_dir=args.data_dir, image_size=size, limit=args.limit
    )
    test = load_dataset(args.data, "test", data_dir=args.data_dir, image_size=size)
    if args.resume:
        exp = FlintInterpreter.load(args.resume)
        exp.config = cfg = dataclasses.replace(exp.config, seed=args.seed, **over)
    else:
        exp = FlintInterpreter(cfg)
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "checkpoint"
    test_loader = DataLoader(test, batch_size=500)
    t0 = time.perf_counter()
    per_epoch = []

    def after_epoch(epoch, hist):  # test metrics and a checkpoint after each epoch (not timed)
        t1 = time.perf_counter()
        m = exp.evaluate(test_loader, progress=False)
        exp.save(ckpt)
        per_epoch.append(
            {
                "epoch": epoch,
                "train_seconds_so_far": t1 - t0 - sum(e["eval_seconds"] for e in per_epoch),
                **m,
                "eval_seconds": time.perf_counter() - t1,
            }
        )
        (out / "metrics_per_epoch.json").write_text(json.dumps(per_epoch, indent=2) + "\n")
        print(json.dumps(per_epoch[-1]), flush=True)

    history = exp.fit(loader, callback=after_epoch, start_epoch=args.start_epoch)
    train_seconds = time.perf_counter() - t0 - sum(e["eval_seconds"] for e in per_epoch)
    if per_epoch:  # the last epoch's evaluation is the final one
        metrics = {
            k: per_epoch[-1][k]
            for k in ("accuracy_f", "accuracy_g", "fidelity", *map(_tau_key, TAUS))
        }
    else:
        metrics = exp.evaluate(test_loader, progress=False)
    exp.save(ckpt)
    doc = {
        **metrics,
        "resumed_from": args.resume,
        "start_epoch": args.start_epoch,
        "train_seconds": train_seconds,
        "data": args.data,
        "train_images": len(train),
        "test_images": len(test),
        "threads": args.threads,
        "config": dataclasses.asdict(cfg),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({**metrics, "train_seconds": round(train_seconds, 1)}, indent=2))
    if not args.no_figures:
        t1 = time.perf_counter()
        paths = exp.report(test_loader, out, **am)
        print(f"figures ({time.perf_counter() - t1:.0f} s):", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
