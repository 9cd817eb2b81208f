"""Hierarchical symbolic rules in hyperbolic space: the features of a frozen classifier become
symbols on an abstraction tree, and each prediction is explained by rules read off that tree.

    from lfi_fast.explain.hyperbolic import HyperbolicRuleExplainer, default_config
    exp = HyperbolicRuleExplainer(default_config("mnist"))
    exp.fit(train_loader)                     # trains the built-in classifier first when needed
    metrics = exp.evaluate(test_loader)       # accuracy_f, fidelity, symbols_level_*, ...
    res = exp.explain(x)                      # codes, contributions, visual semantics, attribution
    res.records()[0]["text"]                  # ["3 <- s2_1 <- (s1_5 <- (s0_12, s0_40), ...)", ...]

The model (DESIGN.md, issue 11):

- f: a frozen classifier and a named feature layer (N, C, h, w) read through a forward hook
  (default ConvBlocks3's "block3": 64x4x4). A modulator (residual convolutions) adapts the features.
- Level 0: each channel's spatial map (a vector of D = h*w values) is quantised to the nearest of
  K0 Euclidean codes (lfi_fast.vq, EMA codebook with dead-code restarts). Its point on the Poincaré
  ball is expmap0(tangent_scale * code).
- Level l+1: a reasoning map g_l (lfi_fast.nn.MobiusLinear, initialised to the identity) carries
  each level-l point to level l+1; the level-(l+1) codebook is *derived from its parents*: child k
  is the tangent-space mean at the origin of g_l(parent) over its parents j, those with A_l[j, k] =
  1 in a learned binary adjacency (logits trained straight-through: an edge is on while its logit is
  positive, so the optimiser both adds and removes edges; every child keeps at least one parent).
  Symbols are found by Poincaré-distance nearest search (vq.nearest(metric="poincare")).
  Averaging pulls children towards the origin: abstract symbols sit near the centre of the disk.
- Hierarchy loss on the adjacency: with d_jk the geodesic distance between g_l(parent j) and child
  k, each child is pulled to its parents and pushed from its non-parents (-log of the softmax mass,
  over parents, of the adjacent ones), and each parent likewise over children; an L1 term keeps the
  adjacency sparse.
- A linear surrogate on the last level's points (tangent coordinates, C*D inputs) is distilled on
  f's argmax (cross-entropy on logits). A decoder maps the level-0 codes (detached) to the image.

Because a channel's level-(l+1) symbol is a function of its level-l symbol (g_l of a code is one
point), the symbols of every level follow from the level-0 codes through one transition table per
level: explanation searches the K_l transformed codes once instead of every channel of every input.

Explanation of input x for class t (default: f's prediction): the contribution of channel i is
w_t[i] . logmap0(q_L[i]) (the surrogate is linear), a symbol's contribution sums its channels'. A
rule is `t <- sL_a <- (s(L-1)_b <- (...), ...)` for each top-level symbol a that fires in x with a
positive contribution, its body the symbols of x below a. The visual semantics of a symbol is
decoder(z) - decoder(z without that symbol's channels), z the level-0 codes of x: one decoder call
for all the (input, symbol) pairs of a batch.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import base
from .base import Explainer, Explanation, capture, check_images, check_positive_int, progress_bar

__all__ = ["HyperbolicRuleExplainer", "HyperbolicRuleResult", "HyperbolicRuleConfig", "default_config",
           "FastOps", "StraightforwardOps", "symbol_name", "rule_text", "local_rules", "geodesics",
           "plot_tree", "semantics_grid"]

METHOD = "hyperbolic"


# ---- configuration -------------------------------------------------------------------------------

@dataclass
class HyperbolicRuleConfig:
    """Every field JSON-able; defaults for MNIST (28x28, 1 channel, 10 classes)."""

    classifier: str = "builtin:ConvBlocks3"
    feature_layer: str = "block3"
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    codebook_sizes: list = field(default_factory=lambda: [64, 32, 4])
    curvature: float = 1.0
    tangent_scale: float = 0.5      # level-0 codes enter the ball as expmap0(tangent_scale * code)
    beta: float = 0.25              # commitment weight (every level)
    ema_decay: float = 0.99         # level-0 codebook EMA
    dead_code_threshold: float = 0.5
    hierarchy_weight: float = 0.5
    hierarchy_temperature: float = 0.5
    sparsity_weight: float = 0.5    # times the mean number of children per parent
    recon_weight: float = 1.0
    classifier_epochs: int = 2
    classifier_lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    adjacency_lr: float = 0.02
    semantics_per_level: int = 3    # symbols per level in the main rule's visual semantics
    rule_support: float = 0.01      # a rule counts for its class from this fraction of its inputs
    robustness_samples: int = 256   # test inputs the robustness metrics use
    noise_draws: int = 8
    ig_steps: int = 16
    seed: int = 0


def default_config(data: str = "mnist", **overrides) -> HyperbolicRuleConfig:
    """The tuned configuration for "digits" (run at image_size 28), "mnist" or "fashion-mnist"."""
    presets = {
        "digits": dict(classifier_epochs=15, epochs=25, batch_size=64, rule_support=0.02,
                       robustness_samples=128),
        "mnist": dict(classifier_epochs=4, epochs=5),
        "fashion-mnist": dict(classifier_epochs=4, epochs=6),
    }
    if data not in presets:
        raise ValueError(f"data must be one of {', '.join(presets)} (got {data!r})")
    cfg = HyperbolicRuleConfig(**presets[data])
    fields = {f.name for f in dataclasses.fields(HyperbolicRuleConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; the fields are {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def _check_config(cfg: HyperbolicRuleConfig) -> None:
    sizes = cfg.codebook_sizes
    if (not isinstance(sizes, (list, tuple)) or len(sizes) < 1
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes)):
        raise ValueError(f"codebook_sizes must be a non-empty list of ints >= 1 (got {sizes!r})")
    for lo, hi in zip(sizes, sizes[1:]):
        if hi >= lo:
            raise ValueError(f"codebook_sizes must shrink level by level (each level fewer symbols "
                             f"than its parent level), got {list(sizes)}")
    for name in ("in_channels", "image_size", "num_classes", "epochs", "batch_size", "noise_draws",
                 "ig_steps", "semantics_per_level", "robustness_samples"):
        check_positive_int(getattr(cfg, name), name)
    check_positive_int(cfg.classifier_epochs, "classifier_epochs", minimum=0)
    for name in ("curvature", "tangent_scale", "lr", "adjacency_lr", "classifier_lr",
                 "hierarchy_temperature"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a positive finite number (got {v!r})")
    for name in ("beta", "hierarchy_weight", "sparsity_weight", "recon_weight", "rule_support"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0 (got {v!r})")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (got {cfg.ema_decay})")


def symbol_name(level: int, symbol: int) -> str:
    return f"s{level}_{symbol}"


# ---- the operations the pipeline runs (fast: lfi_fast's; the benchmark swaps in the baseline) ----

class FastOps:
    """lfi_fast's fused ops; the transition table and one batched decoder call."""

    transition_table = True
    batched_decode = True

    def nearest(self, x: torch.Tensor, codebook: torch.Tensor, metric: str, c: float) -> torch.Tensor:
        from .. import vq

        return vq.nearest(x, codebook, metric=metric, c=c)[0]

    def expmap0(self, u, c):
        from .. import hyperbolic as hyp

        return hyp.expmap0(u, c)

    def logmap0(self, x, c):
        from .. import hyperbolic as hyp

        return hyp.logmap0(x, c)

    def mobius_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)


FAST_OPS = FastOps()


class StraightforwardOps:
    """The straightforward implementation the benchmark compares against: torch.cdist + argmin
    (Euclidean) and geoopt's broadcast distance + argmin (Poincaré) for every channel of every
    input, geoopt's Möbius ops, one decoder call per (input, symbol). Needs geoopt."""

    transition_table = False
    batched_decode = False

    def __init__(self, c: float = 1.0):
        import geoopt

        self.ball = geoopt.PoincareBall(c=c)

    def nearest(self, x, codebook, metric, c):
        if metric == "l2":
            return torch.cdist(x, codebook).argmin(-1)
        return self.ball.dist(x[:, None, :], codebook[None]).argmin(-1)

    def expmap0(self, u, c):
        return self.ball.expmap0(u)

    def logmap0(self, x, c):
        return self.ball.logmap0(x)

    def mobius_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = self.ball.mobius_matvec(layer.weight, x)
        return self.ball.mobius_add(y, self.ball.expmap0(layer.bias)) if layer.bias is not None else y


# ---- modules -------------------------------------------------------------------------------------

class Modulator(nn.Module):
    """Residual convolutions on the feature map; the identity at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.relu(self.conv1(h)))


class Decoder(nn.Module):
    """Level-0 codes (N, C, h, w) -> image (N, in_channels, H, W) in [0, 1]: three upsampling
    stages (to H/4, H/2, H) of 3x3 convolutions."""

    def __init__(self, channels: int, out_channels: int, image_size: int):
        super().__init__()
        self.sizes = [max(1, math.ceil(image_size / 4)), max(1, math.ceil(image_size / 2)), image_size]
        widths = [channels, 64, 32, 16]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(3))
        self.out = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for size, conv in zip(self.sizes, self.convs):
            if h.shape[-1] != size or h.shape[-2] != size:
                h = F.interpolate(h, size=(size, size), mode="nearest")
            h = F.relu(conv(h))
        return torch.sigmoid(self.out(h))


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Lloyd's k-means (k-means++ seeding) on rows of x: (centres (k, D), assignment (N,))."""
    n = x.shape[0]
    centres = x[torch.randint(0, n, (1,), generator=gen)]
    for _ in range(1, k):
        d = torch.cdist(x, centres).min(1).values.pow(2)
        p = d / d.sum() if float(d.sum()) > 0 else torch.full_like(d, 1.0 / n)
        centres = torch.cat([centres, x[torch.multinomial(p, 1, generator=gen)]])
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
        assign = torch.cdist(x, centres).argmin(1)
    return centres, assign


# ---- the result ----------------------------------------------------------------------------------

@dataclass
class HyperbolicRuleResult(Explanation):
    """Explanation of a batch (tensors batch first).

    index (B,): dataset indices; target (B,): the explained class; prediction (B,): f's argmax;
    logits (B, K): f's; surrogate_logits (B, K); codes (B, L, C) int64: each channel's symbol per
    level; contributions (B, C): channel contributions to the target's surrogate logit;
    reconstruction (B, c, H, W): decoder(level-0 codes); semantic_symbols (B, S, 2) int64:
    (level, symbol) of the main rule's symbols, top-down, (-1, -1) where unused; semantics
    (B, S, c, H, W): their visual semantics; attribution (B, c, H, W): the top-level symbols'
    semantics weighted by their positive contributions (the map whose robustness is measured).
    """

    index: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor
    logits: torch.Tensor
    surrogate_logits: torch.Tensor
    codes: torch.Tensor
    contributions: torch.Tensor
    reconstruction: torch.Tensor
    semantic_symbols: torch.Tensor
    semantics: torch.Tensor
    attribution: torch.Tensor

    def records(self) -> list[dict]:
        """One dict per input: its rules (nested, and as text) and its local tree."""
        codes = self.codes.cpu().tolist()
        contrib = self.contributions.detach().cpu().double().tolist()
        out = []
        for b in range(len(codes)):
            t = int(self.target[b])
            rules, tree = local_rules(codes[b], contrib[b])
            out.append({
                "index": int(self.index[b]), "target": t, "prediction_f": int(self.prediction[b]),
                "prediction_surrogate": int(self.surrogate_logits[b].argmax()),
                "rules": rules, "text": [rule_text(t, r) for r in rules], "tree": tree,
            })
        return out

    def plot(self, max_rows: int = 8):
        """The visual-semantics grid: per input, its reconstruction and the semantics of its main
        rule's symbols (red: what the symbol adds, blue: what it removes)."""
        return semantics_grid(self, max_rows)


def local_rules(codes: list[list[int]], contrib: list[float]) -> tuple[list[dict], dict]:
    """Rules and local tree of one input from its codes (L lists of C symbols) and channel
    contributions (C floats). A rule per top-level symbol with a positive summed contribution,
    strongest first; each node: symbol, level, contribution, channels, children."""
    levels = len(codes)
    channels = len(codes[0])
    edges = set()
    for lev in range(levels - 1):
        for i in range(channels):
            edges.add((lev, codes[lev][i], codes[lev + 1][i]))

    def node(lev: int, sym: int, chans: list[int]) -> dict:
        d = {"symbol": symbol_name(lev, sym), "level": lev, "id": sym,
             "contribution": round(sum(contrib[i] for i in chans), 6), "channels": len(chans)}
        if lev > 0:
            groups: dict[int, list[int]] = defaultdict(list)
            for i in chans:
                groups[codes[lev - 1][i]].append(i)
            kids = [node(lev - 1, s, ch) for s, ch in groups.items()]
            kids.sort(key=lambda k: -k["contribution"])
            d["children"] = kids
        return d

    top: dict[int, list[int]] = defaultdict(list)
    for i in range(channels):
        top[codes[-1][i]].append(i)
    rules = [node(levels - 1, s, ch) for s, ch in top.items()]
    rules = [r for r in rules if r["contribution"] > 0]
    rules.sort(key=lambda r: -r["contribution"])
    tree = {"levels": [sorted(set(codes[lev])) for lev in range(levels)],
            "edges": [list(e) for e in sorted(edges)]}
    return rules, tree


def rule_text(target: int, rule: dict) -> str:
    """`t <- s2_a <- (s1_b <- (s0_c, s0_d), s1_e <- (...))`."""

    def body(n: dict) -> str:
        kids = n.get("children")
        if not kids:
            return n["symbol"]
        inner = ", ".join(body(k) for k in kids)
        return f"{n['symbol']} <- ({inner})"

    return f"{target} <- {body(rule)}"


# ---- the explainer -------------------------------------------------------------------------------

class HyperbolicRuleExplainer(Explainer):
    """Hierarchical symbolic rules in hyperbolic space (module docstring)."""

    METHOD = METHOD
    Config = HyperbolicRuleConfig

    def __init__(self, config: HyperbolicRuleConfig, classifier: nn.Module | None = None):
        super().__init__(config)
        _check_config(config)
        from .. import models
        from ..nn import MobiusLinear

        cfg = config
        if classifier is None:
            classifier = models.build_model(cfg.classifier)
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module (got {type(classifier).__name__})")
        self.classifier = classifier
        base.get_layer(classifier, cfg.feature_layer, "feature_layer")
        self.register_buffer("classifier_ready", torch.tensor(False))
        self.register_buffer("codebook_ready", torch.tensor(False))
        shape = self._probe_features()
        self.channels, self.fh, self.fw = shape
        self.code_dim = self.fh * self.fw
        self.levels = len(cfg.codebook_sizes)
        self.modulator = Modulator(self.channels)
        # level 0: EMA codebook (updated after each optimiser step by vq.ema_update)
        k0 = cfg.codebook_sizes[0]
        self.register_buffer("codebook0", torch.zeros(k0, self.code_dim))
        self.register_buffer("ema_counts", torch.ones(k0))
        self.register_buffer("ema_sums", torch.zeros(k0, self.code_dim))
        self.reason = nn.ModuleList()
        self.adjacency_logits = nn.ParameterList()
        for lo, hi in zip(cfg.codebook_sizes, cfg.codebook_sizes[1:]):
            layer = MobiusLinear(self.code_dim, self.code_dim, c=cfg.curvature)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(self.code_dim))
                layer.bias.zero_()
            self.reason.append(layer)
            self.adjacency_logits.append(nn.Parameter(torch.full((lo, hi), -2.0)))
        self.surrogate = nn.Linear(self.channels * self.code_dim, cfg.num_classes)
        self.decoder = Decoder(self.channels, cfg.in_channels, cfg.image_size)
        self._freeze_classifier()

    # ---- pieces ----
    def _probe_features(self) -> tuple[int, int, int]:
        cfg = self.config
        was = self.classifier.training
        self.classifier.eval()
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size,
                        device=base.module_device(self.classifier))
        try:
            with torch.no_grad(), capture(self.classifier, cfg.feature_layer, "feature_layer") as out:
                logits = self.classifier(x)
        finally:
            self.classifier.train(was)
        feat = out.get("value")
        if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
            raise ValueError(f"feature_layer {cfg.feature_layer!r} must output (N, C, h, w) feature maps "
                             f"(got {None if not isinstance(feat, torch.Tensor) else tuple(feat.shape)})")
        if logits.dim() != 2 or logits.shape[1] != cfg.num_classes:
            raise ValueError(f"classifier must output (N, num_classes={cfg.num_classes}) logits "
                             f"(got {tuple(logits.shape)})")
        return tuple(feat.shape[1:])

    def _freeze_classifier(self) -> None:
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.classifier.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()  # frozen: batch-norm statistics never move
        return self

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f's logits, the feature layer's output) in one forward pass, without gradient."""
        with torch.no_grad(), capture(self.classifier, self.config.feature_layer, "feature_layer") as out:
            logits = self.classifier(x)
        return logits, out["value"]

    def adjacency(self, level: int, straight_through: bool = True) -> torch.Tensor:
        """Binary adjacency (K_level, K_level+1) from the logits; columns without a parent get
        their most likely one. Straight-through: the value is binary, the gradient the sigmoid's."""
        w = self.adjacency_logits[level]
        hard = (w > 0).to(w.dtype)
        empty = hard.sum(0) == 0
        if bool(empty.any()):
            fix = F.one_hot(w.argmax(0), w.shape[0]).t().to(w.dtype)
            hard = torch.where(empty[None, :], fix, hard)
        if not straight_through:
            return hard
        soft = torch.sigmoid(w)
        return hard + soft - soft.detach()

    def codebooks(self, ops=FAST_OPS, straight_through: bool = True):
        """(positions, transformed, adjacencies): positions[l] (K_l, D) the symbols of level l as
        points of the ball; transformed[l] = g_l(positions[l]); adjacencies[l] (K_l, K_l+1)."""
        c = self.config.curvature
        pos = [ops.expmap0(self.config.tangent_scale * self.codebook0, c)]
        trans, adjs = [], []
        for lev, layer in enumerate(self.reason):
            t = ops.mobius_linear(layer, pos[-1])
            a = self.adjacency(lev, straight_through)
            u = ops.logmap0(t, c)
            mean = (a.t() @ u) / a.sum(0).clamp_min(1.0)[:, None]
            pos.append(ops.expmap0(mean, c))
            trans.append(t)
            adjs.append(a)
        return pos, trans, adjs

    def hierarchy_loss(self, trans, pos, adjs) -> torch.Tensor:
        """Children near their parents and away from non-parents (softmax over parents), parents
        near their children and away from non-children (softmax over children), plus sparsity."""
        from .. import hyperbolic as hyp

        cfg = self.config
        total = trans[0].new_zeros(()) if trans else torch.zeros(())
        for t, child, a in zip(trans, pos[1:], adjs):
            d = hyp.pairwise_dist(t, child, cfg.curvature) / cfg.hierarchy_temperature
            over_parents = torch.softmax(-d, 0)
            over_children = torch.softmax(-d, 1)
            child_term = -(a * over_parents).sum(0).clamp_min(1e-12).log().mean()
            parent_term = -(a * over_children).sum(1).clamp_min(1e-12).log().mean()
            total = total + child_term + parent_term + cfg.sparsity_weight * a.sum() / a.shape[0]
        return total

    # ---- data-driven initialisation ----
    @torch.no_grad()
    def _initialise_codebooks(self, z: torch.Tensor) -> None:
        """Level-0 codebook by k-means on the first batch's channel maps; the adjacency of each
        level by k-means of the transformed parents into the children (a tree to start from)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        rows = z.reshape(-1, self.code_dim).detach().cpu().double()
        k0 = cfg.codebook_sizes[0]
        if rows.shape[0] < k0:
            raise ValueError(f"the first batch has {rows.shape[0]} channel maps, fewer than the "
                             f"{k0} level-0 codes: use a larger batch_size")
        centres, _ = _kmeans(rows, k0, 10, gen)
        cb = centres.to(self.codebook0)
        self.codebook0.copy_(cb)
        self.ema_counts.fill_(1.0)
        self.ema_sums.copy_(cb)
        c = cfg.curvature
        from .. import hyperbolic as hyp

        pos = hyp.expmap0(cfg.tangent_scale * self.codebook0, c)
        for lev, layer in enumerate(self.reason):
            t = layer(pos)
            u = hyp.logmap0(t, c).cpu().double()
            k = cfg.codebook_sizes[lev + 1]
            _, assign = _kmeans(u, k, 10, gen)
            logits = torch.full_like(self.adjacency_logits[lev], -2.0)
            logits[torch.arange(len(assign)), assign.to(logits.device)] = 2.0
            self.adjacency_logits[lev].copy_(logits)
            a = self.adjacency(lev, straight_through=False)
            mean = (a.t() @ hyp.logmap0(t, c)) / a.sum(0).clamp_min(1.0)[:, None]
            pos = hyp.expmap0(mean, c)
        self.codebook_ready.fill_(True)

    @torch.no_grad()
    def _ema_step(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA update of the level-0 codebook; codes whose EMA count falls below
        dead_code_threshold restart at random channel maps of the batch."""
        from .. import vq

        cfg = self.config
        counts, sums, cb = vq.ema_update(z.detach(), idx, self.ema_counts, self.ema_sums,
                                         cfg.ema_decay)
        self.ema_counts.copy_(counts)
        self.ema_sums.copy_(sums)
        self.codebook0.copy_(cb)
        dead = (self.ema_counts < cfg.dead_code_threshold).nonzero().reshape(-1)
        if dead.numel():
            rows = z.detach().reshape(-1, self.code_dim)
            pick = torch.randint(0, rows.shape[0], (dead.numel(),), device=rows.device)
            self.codebook0[dead] = rows[pick]
            self.ema_sums[dead] = rows[pick]
            self.ema_counts[dead] = 1.0

    # ---- forward ----
    def _symbols_train(self, feats: torch.Tensor):
        """Training forward: straight-through symbols of every channel at every level."""
        from .. import hyperbolic as hyp
        from .. import vq

        cfg = self.config
        c = cfg.curvature
        n = feats.shape[0]
        h = self.modulator(feats)
        z = h.flatten(2)                                     # (N, C, D)
        q0, idx0, loss_vq = vq.quantize(z, self.codebook0, beta=cfg.beta)
        pos, trans, adjs = self.codebooks()
        p = hyp.expmap0(cfg.tangent_scale * q0, c)
        codes = [idx0]
        commit = z.new_zeros(())
        for lev, layer in enumerate(self.reason):
            x = layer(p)
            cb = pos[lev + 1]
            with torch.no_grad():
                idx, _ = vq.nearest(x.detach(), cb.detach(), metric="poincare", c=c)
            chosen = cb[idx]
            commit = commit + cfg.beta * hyp.dist(x, chosen.detach(), c).pow(2).mean() \
                + hyp.dist(x.detach(), chosen, c).pow(2).mean()
            p = x + (chosen - x).detach()
            codes.append(idx)
        v = hyp.logmap0(p, c).reshape(n, -1)
        return {"z": z, "q0": q0, "codes": codes, "surrogate_logits": self.surrogate(v),
                "loss_vq": loss_vq, "commit": commit, "hierarchy": self.hierarchy_loss(trans, pos, adjs)}

    @torch.no_grad()
    def symbols(self, x: torch.Tensor, ops=FAST_OPS) -> dict[str, torch.Tensor]:
        """Inference: f's logits, every level's codes (N, L, C), the level-0 code maps, the
        surrogate's logits and input v (N, C, D)."""
        cfg = self.config
        c = cfg.curvature
        logits, feats = self.features(x)
        n = feats.shape[0]
        z = self.modulator(feats).flatten(2)                 # (N, C, D)
        cb0 = self.codebook0
        idx = ops.nearest(z.reshape(-1, self.code_dim), cb0, "l2", c).reshape(n, self.channels)
        pos, trans, _ = self.codebooks(ops, straight_through=False)
        codes = [idx]
        if ops.transition_table:
            # a channel's next symbol depends only on its symbol: search the K_l codes once
            for lev in range(len(self.reason)):
                table = ops.nearest(trans[lev], pos[lev + 1], "poincare", c)
                codes.append(table[codes[-1]])
            last = ops.logmap0(pos[-1], c)[codes[-1]]
        else:
            p = ops.expmap0(cfg.tangent_scale * cb0[idx], c)
            for lev, layer in enumerate(self.reason):
                xl = ops.mobius_linear(layer, p.reshape(-1, self.code_dim))
                i = ops.nearest(xl, pos[lev + 1], "poincare", c).reshape(n, self.channels)
                p = pos[lev + 1][i]
                codes.append(i)
            last = ops.logmap0(p, c)
        v = last.reshape(n, self.channels, self.code_dim)
        return {"logits": logits, "codes": torch.stack(codes, 1), "zq": cb0[idx],
                "surrogate_logits": self.surrogate(v.reshape(n, -1)), "v": v}

    def contributions(self, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Channel contributions (N, C) to the target's surrogate logit (the surrogate is linear)."""
        w = self.surrogate.weight[target].reshape(-1, self.channels, self.code_dim)
        return (w * v).sum(-1)

    # ---- training ----
    def fit(self, train_loader, epochs: int | None = None, *, progress: bool = True) -> dict:
        cfg = self.config
        epochs = cfg.epochs if epochs is None else check_positive_int(epochs, "epochs")
        device = self.device
        history: dict[str, list] = defaultdict(list)
        torch.manual_seed(cfg.seed)
        if not bool(self.classifier_ready):
            t0 = time.perf_counter()
            from .. import models

            for p in self.classifier.parameters():
                p.requires_grad_(True)
            if cfg.classifier_epochs:
                history["classifier_loss"] = models.train_classifier(
                    self.classifier, train_loader, epochs=cfg.classifier_epochs, lr=cfg.classifier_lr,
                    device=device, progress=progress)
            self._freeze_classifier()
            self.classifier_ready.fill_(True)
            history["classifier_seconds"] = [time.perf_counter() - t0]
        main = [p for n, p in self.named_parameters()
                if not n.startswith("classifier.") and not n.startswith("adjacency_logits")]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": list(self.adjacency_logits), "lr": cfg.adjacency_lr}])
        steps = epochs * max(1, len(train_loader))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, cfg.adjacency_lr],
                                                    total_steps=steps, pct_start=0.1)
        self.train()
        for epoch in range(epochs):
            sums: dict[str, float] = defaultdict(float)
            seen = agree = 0
            for x, _y in progress_bar(train_loader, desc=f"hyperbolic epoch {epoch + 1}/{epochs}",
                                      disable=not progress):
                x = x.to(device)
                check_images(x, cfg.in_channels, (cfg.image_size, cfg.image_size), "train_loader images")
                logits, feats = self.features(x)
                if not bool(self.codebook_ready):
                    with torch.no_grad():
                        self._initialise_codebooks(self.modulator(feats).flatten(2))
                out = self._symbols_train(feats)
                teacher = logits.argmax(-1)
                ce = F.cross_entropy(out["surrogate_logits"], teacher)
                recon = self.decoder(out["q0"].detach().reshape(-1, self.channels, self.fh, self.fw))
                rec = F.binary_cross_entropy(recon, x.clamp(0, 1))
                loss = (ce + out["loss_vq"] + out["commit"] + cfg.hierarchy_weight * out["hierarchy"]
                        + cfg.recon_weight * rec)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                self._ema_step(out["z"], out["codes"][0])
                b = x.shape[0]
                for k, v in (("loss", loss), ("ce", ce), ("vq", out["loss_vq"]), ("commit", out["commit"]),
                             ("hierarchy", out["hierarchy"]), ("recon", rec)):
                    sums[k] += float(v.detach()) * b
                agree += int((out["surrogate_logits"].argmax(-1) == teacher).sum())
                seen += b
            for k, v in sums.items():
                history[k].append(v / max(seen, 1))
            history["train_fidelity"].append(agree / max(seen, 1))
            history["edges"].append([int((w > 0).sum()) for w in self.adjacency_logits])
        self.eval()
        return dict(history)

    # ---- explanation ----
    def _check_target(self, target, n: int, default: torch.Tensor) -> torch.Tensor:
        if target is None:
            return default
        if isinstance(target, int) and not isinstance(target, bool):
            target = torch.full((n,), target, dtype=torch.int64)
        if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
            raise TypeError("target must be None, an int or an int64 tensor (N,)")
        target = target.reshape(-1).to(torch.int64).to(default.device)
        if target.numel() == 1 and n != 1:
            target = target.expand(n)
        if target.shape[0] != n:
            raise ValueError(f"target must hold one class per input (got {target.shape[0]} for {n} inputs)")
        if n and (int(target.min()) < 0 or int(target.max()) >= self.config.num_classes):
            raise ValueError(f"target must be in [0, {self.config.num_classes}) "
                             f"(got values in [{int(target.min())}, {int(target.max())}])")
        return target

    def _semantic_slots(self, codes: torch.Tensor, contrib: torch.Tensor) -> torch.Tensor:
        """(N, S, 2) (level, symbol) of the main rule, top-down: the strongest top-level symbol,
        then per level the `semantics_per_level` strongest symbols under it; (-1, -1) padding."""
        cfg = self.config
        n, levels, _ = codes.shape
        per = cfg.semantics_per_level
        sizes = cfg.codebook_sizes
        top_sum = torch.zeros(n, sizes[-1], dtype=contrib.dtype, device=contrib.device)
        top_sum.scatter_add_(1, codes[:, -1], contrib)
        fired = torch.zeros(n, sizes[-1], dtype=torch.bool, device=codes.device)
        fired.scatter_(1, codes[:, -1], True)
        top = top_sum.masked_fill(~fired, -math.inf).argmax(1)       # (N,)
        in_rule = codes[:, -1] == top[:, None]                        # (N, C)
        slots = [torch.stack([torch.full_like(top, levels - 1), top], -1)[:, None]]
        for lev in range(levels - 2, -1, -1):
            k = sizes[lev]
            s = torch.zeros(n, k, dtype=contrib.dtype, device=contrib.device)
            s.scatter_add_(1, codes[:, lev], torch.where(in_rule, contrib, torch.zeros_like(contrib)))
            present = torch.zeros(n, k, dtype=torch.bool, device=codes.device)
            present.scatter_(1, codes[:, lev], in_rule)
            m = min(per, k)
            vals, ids = s.masked_fill(~present, -math.inf).topk(m, 1)
            ok = torch.isfinite(vals)
            lv = torch.where(ok, torch.full_like(ids, lev), torch.full_like(ids, -1))
            slots.append(torch.stack([lv, torch.where(ok, ids, torch.full_like(ids, -1))], -1))
        return torch.cat(slots, 1)

    def _decode_without(self, zq: torch.Tensor, masks: torch.Tensor, ops=FAST_OPS) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder(z), decoder(z) - decoder(z without the masked channels)) for masks (N, S, C):
        one batched decoder call (or, for the baseline, one call per symbol)."""
        n, s, _ = masks.shape
        z = zq.reshape(n, self.channels, self.fh, self.fw)
        recon = self.decoder(z)
        if n * s == 0:
            return recon, recon.new_zeros(n, s, *recon.shape[1:])
        if ops.batched_decode:
            removed = z[:, None] * (~masks).to(z.dtype)[..., None, None]
            dec = self.decoder(removed.reshape(n * s, *z.shape[1:])).reshape(n, s, *recon.shape[1:])
        else:
            dec = torch.stack([torch.stack([self.decoder((z[b] * (~masks[b, j]).to(z.dtype)[:, None, None])[None])[0]
                                            for j in range(s)]) for b in range(n)])
        return recon, recon[:, None] - dec

    @torch.no_grad()
    def explain(self, inputs: torch.Tensor, target: torch.Tensor | None = None, *, seed: int = 0,
                index: torch.Tensor | None = None, ops=None, semantics: bool = True,
                **kw) -> HyperbolicRuleResult:
        """Explain a batch. Deterministic (seed is accepted for the common interface and unused).

        Args:
            inputs: (N, in_channels, image_size, image_size) images.
            target: class to explain per input (int or (N,) int64); default f's prediction.
            index: dataset indices of the rows (default arange(N)), stored in the result.
            ops: the operation set (default lfi_fast's; the benchmark passes its baseline).
            semantics: decode the visual semantics and the attribution (the decoder is most of
                the cost); False leaves semantics (N, 0, c, H, W), attribution and
                reconstruction zeros, and the rules unchanged.
        """
        if kw:
            raise TypeError(f"explain() got unexpected keyword arguments {sorted(kw)}")
        cfg = self.config
        ops = FAST_OPS if ops is None else ops
        check_images(inputs, cfg.in_channels, (cfg.image_size, cfg.image_size))
        self._check_ready()
        x = inputs.to(self.device)
        n = x.shape[0]
        index = torch.arange(n) if index is None else index
        if not isinstance(index, torch.Tensor) or index.shape != (n,):
            raise ValueError(f"index must be an int64 tensor (N,) = ({n},)")
        sym = self.symbols(x, ops)
        pred = sym["logits"].argmax(-1)
        t = self._check_target(target, n, pred)
        contrib = self.contributions(sym["v"], t)
        codes = sym["codes"]
        slots = self._semantic_slots(codes, contrib) if n else codes.new_zeros(0, 1, 2)
        # masks: the top-level symbols (attribution) and the rule's slots (semantics), one call
        ktop = cfg.codebook_sizes[-1]
        top_masks = codes[:, -1, None, :] == torch.arange(ktop, device=codes.device)[None, :, None]
        lv = slots[..., 0].clamp_min(0)
        slot_codes = torch.gather(codes, 1, lv[..., None].expand(-1, -1, self.channels))  # (N, S, C)
        slot_masks = (slot_codes == slots[..., 1:2]) & (slots[..., :1] >= 0)
        if semantics:
            recon, sem = self._decode_without(sym["zq"], torch.cat([top_masks, slot_masks], 1), ops)
        else:
            img = (cfg.in_channels, cfg.image_size, cfg.image_size)
            recon = x.new_zeros(n, *img)
            sem = x.new_zeros(n, ktop, *img)
            slots = slots[:, :0]
        top_sem, slot_sem = sem[:, :ktop], sem[:, ktop:]
        top_w = torch.zeros(n, ktop, dtype=contrib.dtype, device=contrib.device)
        top_w.scatter_add_(1, codes[:, -1], contrib)
        attribution = (top_w.clamp_min(0)[:, :, None, None, None] * top_sem).sum(1)
        return HyperbolicRuleResult(
            index=index.to(torch.int64).cpu(), target=t.cpu(), prediction=pred.cpu(),
            logits=sym["logits"].cpu(), surrogate_logits=sym["surrogate_logits"].cpu(),
            codes=codes.cpu(), contributions=contrib.cpu(), reconstruction=recon.cpu(),
            semantic_symbols=slots.cpu(), semantics=slot_sem.cpu(), attribution=attribution.cpu())

    def _check_ready(self) -> None:
        if not bool(self.classifier_ready) or not bool(self.codebook_ready):
            raise RuntimeError("the explainer is not trained: call fit() (or load a checkpoint) first")

    # ---- the global tree ----
    @torch.no_grad()
    def abstraction_tree(self, loader, *, progress: bool = True) -> dict:
        """The abstraction tree over a data set, pruned by usage: per level the symbols used (with
        counts, and their points on the ball), the adjacency edges that the data traverse (with
        counts), per class the symbols that fire (fraction of the class's inputs) and its rules
        (with support), and the agreement of f's labels with the surrogate."""
        cfg = self.config
        self._check_ready()
        levels = self.levels
        usage = [Counter() for _ in range(levels)]
        transitions = [Counter() for _ in range(levels - 1)]
        per_class = defaultdict(lambda: [Counter() for _ in range(levels)])
        class_count = Counter()
        rules = defaultdict(Counter)
        correct = agree = total = 0
        for x, y in progress_bar(loader, desc="hyperbolic tree", disable=not progress):
            x = x.to(self.device)
            check_images(x, cfg.in_channels, (cfg.image_size, cfg.image_size), "loader images")
            sym = self.symbols(x)
            pred = sym["logits"].argmax(-1)
            contrib = self.contributions(sym["v"], pred)
            correct += int((pred.cpu() == y).sum())
            agree += int((sym["surrogate_logits"].argmax(-1) == pred).sum())
            total += len(y)
            codes = sym["codes"].cpu().tolist()
            contrib = contrib.cpu().double().tolist()
            for b, t in enumerate(pred.cpu().tolist()):
                cb = codes[b]
                class_count[t] += 1
                for lev in range(levels):
                    s = set(cb[lev])
                    usage[lev].update(s)
                    per_class[t][lev].update(s)
                for lev in range(levels - 1):
                    transitions[lev].update(set(zip(cb[lev], cb[lev + 1])))
                rs, _ = local_rules(cb, contrib[b])
                for r in rs:
                    rules[t][_rule_key(r)] += 1
        adj = [self.adjacency(lev, straight_through=False).bool().cpu() for lev in range(levels - 1)]
        pos, _, _ = self.codebooks(straight_through=False)
        edges, consistent, observed = [], 0, 0
        for lev in range(levels - 1):
            for (j, k), cnt in sorted(transitions[lev].items()):
                observed += 1
                in_adj = bool(adj[lev][j, k])
                consistent += in_adj
                if in_adj:
                    edges.append({"level": lev, "parent": j, "child": k, "count": cnt})
        class_rules = {}
        for t in sorted(class_count):
            keep = [(k, v) for k, v in rules[t].most_common() if v >= cfg.rule_support * class_count[t]]
            class_rules[t] = [{"text": f"{t} <- {k}", "support": v / class_count[t]} for k, v in keep]
        return {
            "codebook_sizes": list(cfg.codebook_sizes),
            "symbols": [{"level": lev, "id": s, "name": symbol_name(lev, s), "count": cnt,
                         "point": [round(float(v), 6) for v in pos[lev][s].tolist()]}
                        for lev in range(levels) for s, cnt in sorted(usage[lev].items())],
            "symbols_per_level": [len(u) for u in usage],
            "edges": edges,
            "transitions_in_adjacency": consistent / max(observed, 1),
            "adjacency_edges": [int(a.sum()) for a in adj],
            "classes": {t: {"inputs": class_count[t],
                            "symbols": [{symbol_name(lev, s): round(v / class_count[t], 4)
                                         for s, v in per_class[t][lev].most_common()}
                                        for lev in range(levels)],
                            "rules": class_rules[t]} for t in sorted(class_count)},
            "rules_per_class": (sum(len(v) for v in class_rules.values()) / max(len(class_rules), 1)),
            "accuracy_f": correct / max(total, 1),
            "fidelity": agree / max(total, 1),
        }

    # ---- evaluation ----
    def _noise(self, shape, index: torch.Tensor, sigma: float, draws: int) -> torch.Tensor:
        """Gaussian noise (N, draws, *shape) whose row b depends only on (seed, index[b])."""
        out = torch.empty(len(index), draws, *shape)
        g = torch.Generator()
        for b, i in enumerate(index.tolist()):
            g.manual_seed((self.config.seed * 1_000_003 + int(i)) & 0x7FFFFFFFFFFFFFFF)
            out[b] = torch.randn(draws, *shape, generator=g)
        return out * sigma

    def integrated_gradients(self, x: torch.Tensor, target: torch.Tensor, n_steps: int | None = None,
                             internal_batch_size: int = 512) -> torch.Tensor:
        """Integrated gradients of f's target logit, zero baseline, midpoint Riemann sum."""
        n_steps = self.config.ig_steps if n_steps is None else check_positive_int(n_steps, "n_steps")
        alphas = (torch.arange(n_steps, dtype=x.dtype, device=x.device) + 0.5) / n_steps
        grads = torch.zeros_like(x)
        flat_x = x[:, None].expand(-1, n_steps, *x.shape[1:]) * alphas.view(1, -1, *[1] * (x.dim() - 1))
        flat_x = flat_x.reshape(-1, *x.shape[1:])
        flat_t = target[:, None].expand(-1, n_steps).reshape(-1)
        g_all = torch.empty_like(flat_x)
        for s in range(0, flat_x.shape[0], internal_batch_size):
            xi = flat_x[s:s + internal_batch_size].detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.classifier(xi)
                sel = out.gather(1, flat_t[s:s + internal_batch_size, None]).sum()
                g_all[s:s + internal_batch_size] = torch.autograd.grad(sel, xi)[0]
        grads = g_all.reshape(x.shape[0], n_steps, *x.shape[1:]).mean(1)
        return x * grads

    @staticmethod
    def _normalise(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.reshape(maps.shape[0], -1)
        scale = flat.abs().amax(1).clamp_min(1e-12)
        return (flat / scale[:, None]).reshape(maps.shape)

    def robustness(self, x: torch.Tensor, index: torch.Tensor, sigma: float) -> tuple[float, float]:
        """Mean per-pixel variance, over noise draws, of the max-abs-normalised explanation map
        (ours: `attribution`; IG's) of x + N(0, sigma^2), the class fixed to f's clean prediction."""
        cfg = self.config
        n, draws = x.shape[0], cfg.noise_draws
        target = self.features(x)[0].argmax(-1)
        noisy = (x[:, None].cpu() + self._noise(x.shape[1:], index, sigma, draws)).to(x.device)
        noisy = noisy.reshape(n * draws, *x.shape[1:])
        t = target[:, None].expand(-1, draws).reshape(-1)
        ours = self._normalise(self.explain(noisy, t).attribution).reshape(n, draws, -1)
        ig = self._normalise(self.integrated_gradients(noisy, t).detach().cpu()).reshape(n, draws, -1)
        return float(ours.var(1).mean()), float(ig.var(1).mean())

    def evaluate(self, test_loader, *, progress: bool = True) -> dict[str, float]:
        cfg = self.config
        tree = self.abstraction_tree(test_loader, progress=progress)
        metrics = {"accuracy_f": tree["accuracy_f"], "fidelity": tree["fidelity"]}
        for lev, k in enumerate(tree["symbols_per_level"]):
            metrics[f"symbols_level_{lev}"] = float(k)
        metrics["rules_per_class"] = float(tree["rules_per_class"])
        xs, idx, seen = [], [], 0
        for x, _y in test_loader:
            take = min(len(x), cfg.robustness_samples - seen)
            xs.append(x[:take])
            idx.append(torch.arange(seen, seen + take))
            seen += take
            if seen >= cfg.robustness_samples:
                break
        x = torch.cat(xs).to(self.device)
        index = torch.cat(idx)
        chunk = 64
        for sigma in (0.05, 0.1):
            ours, ig = [], []
            for s in progress_bar(range(0, len(x), chunk), desc=f"robustness {sigma}", disable=not progress):
                o, g = self.robustness(x[s:s + chunk], index[s:s + chunk], sigma)
                ours.append(o * len(x[s:s + chunk]))
                ig.append(g * len(x[s:s + chunk]))
            metrics[f"robustness_{sigma:g}"] = sum(ours) / max(len(x), 1)
            metrics[f"ig_robustness_{sigma:g}"] = sum(ig) / max(len(x), 1)
        return metrics

    # ---- figures and exports ----
    def report(self, test_loader, out_dir) -> list[Path]:
        """Writes tree.png (the abstraction tree on the Poincaré disk), semantics.png (a
        visual-semantics grid, one row per rule), and the exports tree.json, rules.json (one
        record per input of the first batch) and rules.txt. Returns their paths."""
        import json

        import matplotlib

        matplotlib.use("Agg")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tree = self.abstraction_tree(test_loader, progress=False)
        fig = plot_tree(tree, self.config.curvature)
        paths = [out / "tree.png"]
        fig.savefig(paths[0], dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        x, _y = next(iter(test_loader))
        res = self.explain(x[:32].to(self.device))
        # one input per predicted class where possible
        order, seen = [], set()
        for b, t in enumerate(res.target.tolist()):
            if t not in seen:
                seen.add(t)
                order.append(b)
        sel = torch.tensor(order[:10])
        sub = HyperbolicRuleResult(**{k: v[sel] for k, v in res.tensors().items()})
        fig = sub.plot(max_rows=len(sel))
        paths.append(out / "semantics.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / "tree.json")
        paths[-1].write_text(json.dumps(tree, indent=1) + "\n")
        recs = res.records()
        paths.append(out / "rules.json")
        paths[-1].write_text(json.dumps(recs, indent=1) + "\n")
        lines = []
        for t, info in tree["classes"].items():
            lines.append(f"class {t} ({info['inputs']} inputs):")
            lines += [f"  {r['text']}    [support {r['support']:.3f}]" for r in info["rules"]]
        lines.append("")
        lines.append("per input (first batch):")
        for r in recs:
            lines += [f"  #{r['index']}: {txt}" for txt in r["text"]]
        paths.append(out / "rules.txt")
        paths[-1].write_text("\n".join(lines) + "\n")
        return paths


def _rule_key(rule: dict) -> str:
    """A rule's identity for counting: its top symbol and the symbols of the level below it."""
    kids = sorted(k["symbol"] for k in rule.get("children", []))
    return f"{rule['symbol']} <- ({', '.join(kids)})" if kids else rule["symbol"]


# ---- figures -------------------------------------------------------------------------------------

def _disk_layout(points: torch.Tensor, c: float) -> torch.Tensor:
    """Points of the D-dim ball -> the 2-D disk: the tangent vectors at the origin projected on
    their two principal directions, rescaled to keep each one's norm (its distance to the origin),
    then mapped back with expmap0."""
    from .. import hyperbolic as hyp

    u = hyp.logmap0(points.double(), c)
    if u.shape[1] >= 2 and u.shape[0] >= 2:
        _, _, vh = torch.linalg.svd(u - u.mean(0), full_matrices=False)
        u2 = u @ vh[:2].t()
    else:
        u2 = torch.nn.functional.pad(u[:, :2], (0, max(0, 2 - u.shape[1])))
    norm = u.norm(dim=1, keepdim=True)
    u2 = u2 / u2.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    return hyp.expmap0(u2, c)


def geodesics(a: torch.Tensor, b: torch.Tensor, c: float, steps: int = 32) -> torch.Tensor:
    """Points along the geodesics from a[e] to b[e] (E, D): (E, steps, D), all at once:
    a ⊕ (t ⊗ ((-a) ⊕ b)) for t in [0, 1]."""
    from .. import hyperbolic as hyp

    e, d = a.shape
    ts = torch.linspace(0, 1, steps, dtype=a.dtype)
    v = hyp.mobius_add(-a, b, c)                                       # (E, D)
    r = ts.view(1, -1, 1).expand(e, -1, 1)
    pts = hyp.mobius_scalar_mul(r, v[:, None].expand(-1, steps, -1), c)
    return hyp.mobius_add(a[:, None].expand(-1, steps, -1), pts, c)


def plot_tree(tree: dict, c: float = 1.0):
    """The abstraction tree on the Poincaré disk: symbols as points (coloured by level, sized by
    usage), edges as geodesics (one LineCollection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    syms = tree["symbols"]
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_patch(plt.Circle((0, 0), 1 / math.sqrt(c), fill=False, color="0.6", lw=1))
    if syms:
        pts = torch.tensor([s["point"] for s in syms], dtype=torch.float64)
        xy = _disk_layout(pts, c)
        where = {(s["level"], s["id"]): i for i, s in enumerate(syms)}
        pairs = [(where[(e["level"], e["parent"])], where[(e["level"] + 1, e["child"])])
                 for e in tree["edges"] if (e["level"], e["parent"]) in where
                 and (e["level"] + 1, e["child"]) in where]
        if pairs:
            ia = torch.tensor([p[0] for p in pairs])
            ib = torch.tensor([p[1] for p in pairs])
            segs = geodesics(xy[ia], xy[ib], c).numpy()
            ax.add_collection(LineCollection(segs, colors="0.35", linewidths=0.6, alpha=0.7))
        levels = torch.tensor([s["level"] for s in syms])
        counts = torch.tensor([s["count"] for s in syms], dtype=torch.float64)
        size = 15 + 120 * (counts / counts.max()).sqrt()
        sc = ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=levels.numpy(), s=size.numpy(),
                        cmap="viridis", edgecolors="k", linewidths=0.4, zorder=3)
        top = len(tree["symbols_per_level"]) - 1
        for s, (px, py) in zip(syms, xy.tolist()):
            if s["level"] == top:
                ax.annotate(s["name"], (px, py), fontsize=9, xytext=(4, 4), textcoords="offset points")
        cb = fig.colorbar(sc, ax=ax, shrink=0.7, ticks=range(top + 1))
        cb.set_label("level (0: most specific)")
    r = 1.02 / math.sqrt(c)
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("abstraction tree on the Poincaré disk (pruned by usage)")
    return fig


def semantics_grid(res: HyperbolicRuleResult, max_rows: int = 8):
    """One row per input: its reconstruction, then the visual semantics of its main rule's
    symbols, drawn as one mosaic image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(len(res), max_rows)
    s = res.semantics.shape[1]
    h, w = res.reconstruction.shape[-2:]
    pad = 2
    mosaic = torch.full((rows * (h + pad), (s + 1) * (w + pad)), float("nan"))
    for r in range(rows):
        y0 = r * (h + pad)
        mosaic[y0:y0 + h, :w] = res.reconstruction[r].mean(0) * 2 - 1   # [0,1] -> [-1,1] (grey)
        sem = res.semantics[r].mean(1)                                   # (S, h, w)
        scale = sem.abs().amax().clamp_min(1e-8)
        for j in range(s):
            if int(res.semantic_symbols[r, j, 0]) >= 0:
                x0 = (j + 1) * (w + pad)
                mosaic[y0:y0 + h, x0:x0 + w] = sem[j] / scale
    fig, ax = plt.subplots(figsize=(1.1 * (s + 1) + 1, 1.2 * rows + 0.6))
    ax.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    for r in range(rows):
        y0 = r * (h + pad)
        ax.text(-3, y0 + h / 2, f"{int(res.target[r])} <-", ha="right", va="center", fontsize=9)
        for j in range(s):
            lev, sid = res.semantic_symbols[r, j].tolist()
            if lev >= 0:
                ax.text((j + 1) * (w + pad) + w / 2, y0 - 0.5, symbol_name(lev, sid), ha="center",
                        va="bottom", fontsize=6)
    ax.set_title("rule symbols' visual semantics: decoder(z) - decoder(z without the symbol)", fontsize=9)
    ax.axis("off")
    return fig


# ---- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """python -m lfi_fast.explain.hyperbolic --data mnist --out DIR [--epochs N] [--limit N]"""
    import argparse
    import json

    from torch.utils.data import DataLoader, Subset

    from ..data import load_dataset

    ap = argparse.ArgumentParser(prog="python -m lfi_fast.explain.hyperbolic", description=main.__doc__)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--classifier-epochs", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    over = {}
    if args.epochs is not None:
        over["epochs"] = args.epochs
    if args.classifier_epochs is not None:
        over["classifier_epochs"] = args.classifier_epochs
    cfg = default_config(args.data, **over)
    size = cfg.image_size if args.data == "digits" else None
    train = load_dataset(args.data, split="train", data_dir=args.data_dir, image_size=size)
    test = load_dataset(args.data, split="test", data_dir=args.data_dir, image_size=size)
    if args.limit:
        train = Subset(train, range(min(args.limit, len(train))))
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    torch.manual_seed(cfg.seed)
    exp = HyperbolicRuleExplainer(cfg)
    t0 = time.perf_counter()
    history = exp.fit(train_loader, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = exp.evaluate(test_loader, progress=not args.no_progress)
    eval_seconds = time.perf_counter() - t1
    out = Path(args.out)
    exp.save(out / "checkpoint")
    metrics["train_seconds"] = train_seconds
    metrics["eval_seconds"] = eval_seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    paths = exp.report(test_loader, out)
    print(json.dumps(metrics, indent=2))
    print("wrote", ", ".join(str(p) for p in [out / "metrics.json", *paths]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
