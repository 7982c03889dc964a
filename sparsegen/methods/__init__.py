"""Sparse-attention methods: each module defines ``CONFIG`` (a MethodConfig subclass)
and ``METHOD`` (a SparseAttentionMethod subclass). Modules are imported on first use."""

from __future__ import annotations

import importlib

from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod

__all__ = ["AttentionCall", "AttentionGeometry", "MethodConfig", "SparseAttentionMethod",
           "METHOD_MODULES", "available_methods", "get_method", "config_from_dict"]

# method name -> module defining CONFIG and METHOD
METHOD_MODULES = {
    "dense": "sparsegen.methods.dense",
    "radial": "sparsegen.methods.radial",
    "gna": "sparsegen.methods.gna",
    "vmoba": "sparsegen.methods.vmoba",
}


def available_methods() -> list[str]:
    return sorted(METHOD_MODULES)


def get_method(name: str):
    """(config class, method class) of a method name."""
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    mod = importlib.import_module(METHOD_MODULES[name])
    return mod.CONFIG, mod.METHOD


def config_from_dict(d: dict) -> MethodConfig:
    """Rebuild any method's config from ``config.to_dict()`` output."""
    if "method" not in d:
        raise ValueError("config dict has no 'method' key")
    cfg_cls, _ = get_method(d["method"])
    return cfg_cls.from_dict(d)
