"""The registry of dictionary kinds: KINDS names the module and classes of each kind a run folder may hold
(imported by name when a folder of that kind is loaded: nothing here imports a model file at import time),
LEGACY the module paths of folders written before kinds existed, and `check_finite`, the check every loader
runs on weights. support/saved.py (our folders) and support/saelens.py (SAELens folders) both build on it.
"""
from __future__ import annotations

import importlib

import torch

KINDS = {"sae": ("sae", "SAE", "SAEConfig"), "crosscoder": ("crosscoder", "CrossCoder", "CrossCoderConfig"),
         "fmxcoder": ("fmxcoder", "FMXCoder", "FMXCoderConfig"), "polysae": ("polysae", "PolySAE", "PolySAEConfig")}
LEGACY = {"sae.SAE": "sae", "crosscoder.CrossCoder": "crosscoder", "fmxcoder.FMXCoder": "fmxcoder",
          "polysae.PolySAE": "polysae"}
RERUN = "rerun training or delete the folder"


def kind_classes(kind: str) -> tuple[type, type]:
    """(model class, config class) of a registered kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r}: one of {', '.join(KINDS)}")
    module, cls, config = KINDS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, config)


def kind_of(model) -> str:
    name = type(model).__name__
    for kind, (_, cls, _) in KINDS.items():
        if cls == name:
            return kind
    raise ValueError(f"{name} is not a registered dictionary kind (support/saved.py KINDS)")


def meta_kind(meta: dict) -> str | None:
    """The kind a config.json records (its "kind", or an old "class" entry), None if neither."""
    if isinstance(meta.get("kind"), str):
        return meta["kind"]
    return LEGACY.get(meta.get("class")) if isinstance(meta.get("class"), str) else None


def check_finite(tensors: dict, file, fix: str = RERUN) -> None:
    """ValueError naming the first floating-point tensor that holds nan or inf (a damaged file, or weights
    saved from a diverged training): such a dictionary is never evaluated as a normal one."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{str(file)!r}: {name} holds nan or inf ({bad:,} of {t.numel():,} values): these weights "
                             f"cannot be evaluated; {fix}")
