"""Sparse-attention methods: each module defines a :class:`MethodConfig` subclass and the
:class:`SparseAttentionMethod` subclass serving it (see :mod:`.base`).

Names matter only where a user gives one (``sparsegen.apply(pipe, "radial", ...)``, the
command line, ``config_from_dict``): :func:`config_class` resolves a name to its config
class, importing the shipped method's module on first use. Everything after that works
on the config object, which knows its method (``config.make_method()``).
"""

from __future__ import annotations

import importlib

from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod

__all__ = ["AttentionCall", "AttentionGeometry", "MethodConfig", "SparseAttentionMethod",
           "available_methods", "config_class", "config_from_dict", "register_method"]

# Shipped methods: name -> (module, config class name). Imported on first use.
_SHIPPED = {
    "dense": ("sparsegen.methods.dense", "DenseConfig"),
    "radial": ("sparsegen.methods.radial", "RadialConfig"),
    "gna": ("sparsegen.methods.gna", "GNAConfig"),
    "vmoba": ("sparsegen.methods.vmoba", "VMoBAConfig"),
    "paro": ("sparsegen.methods.paro", "PAROConfig"),
    "agent": ("sparsegen.methods.agent", "AgentConfig"),
}
# Methods registered by users: name -> config class.
_REGISTERED: dict[str, type] = {}


def available_methods(*, registered: bool = True) -> list[str]:
    """Names of the shipped methods and (with ``registered``) of those registered in this process."""
    return sorted({*_SHIPPED, *(_REGISTERED if registered else ())})


def config_class(name: str) -> type:
    """The config class of a method name.

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _SHIPPED:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    module, cls_name = _SHIPPED[name]
    return getattr(importlib.import_module(module), cls_name)


def register_method(config_cls: type, method_cls: type = None) -> None:
    """Make a user-defined method known by its name (``config_cls.method``).

    Only needed to refer to the method by name; a config object can always be passed to
    ``sparsegen.apply`` directly.

    Args:
        config_cls: a MethodConfig subclass with a non-empty ``method`` name, served by a
            SparseAttentionMethod subclass whose ``config_cls`` is it.
        method_cls: optional; if given, must be the class serving ``config_cls``.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig) and config_cls.method):
        raise TypeError("config_cls must be a MethodConfig subclass with a non-empty `method` name")
    served_by = config_cls.method_class()
    if method_cls is not None and method_cls is not served_by:
        given = getattr(method_cls, "__name__", method_cls)
        raise TypeError(f"{config_cls.__name__} is served by {served_by.__name__}, not {given}")
    if config_cls.method in _SHIPPED:
        raise ValueError(f"method name {config_cls.method!r} is a shipped method; choose another name")
    _REGISTERED[config_cls.method] = config_cls


def config_from_dict(d: dict) -> MethodConfig:
    """Rebuild any method's config from ``config.to_dict()`` output.

    Raises:
        ValueError: no or unknown ``method``, unknown options, or a ``version`` this
            release does not read.
    """
    if not isinstance(d, dict) or "method" not in d:
        raise ValueError("config dict has no 'method' key; write it with config.to_dict()")
    return config_class(d["method"]).from_dict(d)
