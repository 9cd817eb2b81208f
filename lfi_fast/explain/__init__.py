"""The four explanation methods (DESIGN.md): each an explainer class with fit / evaluate / explain /
save / load, loaded on first use so that importing one does not import the others."""
from __future__ import annotations

import importlib

_CLASSES = {
    "InvarianceExplainer": "invariance",
    "InterventionExplainer": "intervention",
    "FlintInterpreter": "flint",
    "HyperbolicRuleExplainer": "hyperbolic",
}

METHODS = tuple(_CLASSES.values())

__all__ = list(_CLASSES) + ["METHODS", "Explainer", "Explanation", "load_explainer"]


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    if name in ("Explainer", "Explanation", "load_explainer"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

