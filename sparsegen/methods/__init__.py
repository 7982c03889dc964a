"""Sparse-attention methods: each module defines ``CONFIG`` (a MethodConfig subclass)
and ``METHOD`` (a SparseAttentionMethod subclass). Modules are imported on first use."""

from __future__ import annotations

import importlib

from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod

__all__ = ["AttentionCall", "AttentionGeometry", "MethodConfig", "SparseAttentionMethod",
           "METHOD_MODULES", "available_methods", "get_method", "config_from_dict", "register_method"]

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
    entry = METHOD_MODULES[name]
    if isinstance(entry, tuple):
        return entry
    mod = importlib.import_module(entry)
    return mod.CONFIG, mod.METHOD


def register_method(config_cls: type, method_cls: type) -> None:
    """Make a user-defined method available to ``sparsegen.apply`` by its name.

    Args:
        config_cls: a MethodConfig subclass whose ``method`` class attribute is the name.
        method_cls: the SparseAttentionMethod subclass serving it.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig) and config_cls.method):
        raise TypeError("config_cls must be a MethodConfig subclass with a non-empty `method` name")
    if not (isinstance(method_cls, type) and issubclass(method_cls, SparseAttentionMethod)):
        raise TypeError("method_cls must be a SparseAttentionMethod subclass")
    METHOD_MODULES[config_cls.method] = (config_cls, method_cls)


def config_from_dict(d: dict) -> MethodConfig:
    """Rebuild any method's config from ``config.to_dict()`` output."""
    if "method" not in d:
        raise ValueError("config dict has no 'method' key")
    cfg_cls, _ = get_method(d["method"])
    return cfg_cls.from_dict(d)
