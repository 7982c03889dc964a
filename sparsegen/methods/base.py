"""What every sparse-attention method is: a config dataclass and a method object.

Methods know nothing about diffusers. They receive q, k, v of the *video tokens* of one
self-attention call, laid out (batch, tokens, heads, head_dim) in row-major
(frame, row, column) order, plus an :class:`AttentionCall` describing the token grid and
where in the denoising schedule the call is. Text tokens of joint attention are handled
by :mod:`sparsegen.joint`, never by a method.

Writing a method::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        method: ClassVar[str] = "mine"
        strength: float = 1.0

    class MyMethod(SparseAttentionMethod):
        config_cls = MyConfig
        def attention(self, q, k, v, call):          # -> (out, lse)
            mask = self.cached(call, lambda: build_mask(call.geometry, ...))
            return block_sparse_attention(q, k, v, mask, return_lse=True, backend=call.backend)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch

__all__ = ["MethodConfig", "AttentionGeometry", "AttentionCall", "SparseAttentionMethod", "config_error"]


def config_error(cls_name: str, field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{cls_name}.{field_name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class MethodConfig:
    """Schedule and execution options shared by every method.

    Args:
        dense_steps: the first N denoising steps run dense attention.
        dense_last_steps: the last M denoising steps run dense attention.
        dense_layers: an int N (the first N patched layers stay dense) or a list of
            layer indices that stay dense.
        backend: kernel backend for the sparse layers (``auto``, ``triton``, ``torch``).
        version: config schema version (serialised with the config).
    """

    method: ClassVar[str] = ""
    dense_steps: int = 0
    dense_last_steps: int = 0
    dense_layers: Union[int, tuple[int, ...]] = 0
    backend: str = "auto"
    version: int = 1

    def __post_init__(self):
        name = type(self).__name__
        for f in ("dense_steps", "dense_last_steps"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise config_error(name, f, v, "must be an integer >= 0")
        dl = self.dense_layers
        if isinstance(dl, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dl):
                raise config_error(name, "dense_layers", dl, "a list must hold layer indices >= 0")
            object.__setattr__(self, "dense_layers", tuple(sorted(set(dl))))
        elif not isinstance(dl, int) or isinstance(dl, bool) or dl < 0:
            raise config_error(name, "dense_layers", dl, "must be an integer >= 0 or a list of layer indices")
        if self.backend not in ("auto", "triton", "torch", "reference"):
            raise config_error(name, "backend", self.backend, "must be one of 'auto', 'triton', 'torch', 'reference'")

    # --------------------------------------------------------------- schedule
    def layer_is_dense(self, layer: int) -> bool:
        if isinstance(self.dense_layers, tuple):
            return layer in self.dense_layers
        return layer < self.dense_layers

    def step_is_dense(self, step: Optional[int], num_steps: Optional[int]) -> bool:
        if step is None:
            return False
        if step < self.dense_steps:
            return True
        return num_steps is not None and self.dense_last_steps > 0 and step >= num_steps - self.dense_last_steps

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif hasattr(v, "value") and isinstance(getattr(v, "value"), (str, int)):
                v = v.value
            d[f.name] = v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        d = dict(d)
        m = d.pop("method", cls.method)
        if cls.method and m != cls.method:
            raise ValueError(f"config is for method {m!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option(s) {unknown}; options are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class AttentionGeometry:
    """Token grid of one attention call (after patchify).

    ``frames x height x width`` video tokens in row-major (frame, row, column) order.
    """

    frames: int
    height: int
    width: int

    def __post_init__(self):
        for f in ("frames", "height", "width"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"AttentionGeometry.{f} must be a positive int, got {v!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


@dataclass
class AttentionCall:
    """Everything a method may use about one self-attention call besides q, k, v.

    Args:
        geometry: video token grid.
        layer: index of this layer among the patched self-attention layers.
        num_layers: number of patched layers.
        step: denoising step index (0-based), or None when unknown.
        num_steps: total denoising steps of the current generation, or None.
        head_offset: global index of the first head in q (head-parallel execution
            gives each rank a slice of heads; per-head methods must index by it).
        total_heads: number of heads of the full layer.
        backend: kernel backend to use.
        stats: a dict the method may fill (e.g. ``density``) for reporting.
    """

    geometry: AttentionGeometry
    layer: int = 0
    num_layers: int = 1
    step: Optional[int] = None
    num_steps: Optional[int] = None
    head_offset: int = 0
    total_heads: Optional[int] = None
    backend: str = "auto"
    stats: dict = field(default_factory=dict)


class SparseAttentionMethod:
    """Base class of methods. Subclasses set ``config_cls`` and implement ``attention``.

    One instance belongs to one patched pipeline (one ``apply`` handle), so caches kept
    on it are never shared across pipelines.
    """

    config_cls: ClassVar[type] = MethodConfig

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self._cache: dict = {}

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        """Raise ValueError (saying what to change) if this method cannot serve ``geometry``."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Sparse self-attention over video tokens.

        Args:
            q, k, v: (B, N, H, D) with N = call.geometry.num_tokens.
        Returns:
            (out (B, N, H, D), lse fp32 (B, H, N) natural log).
        """
        raise NotImplementedError

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-instance cache (e.g. masks per geometry and device)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()
