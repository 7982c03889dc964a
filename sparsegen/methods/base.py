"""What every sparse-attention method is: a config dataclass and a method object.

Methods know nothing about diffusers. They receive q, k, v of the *video tokens* of one
self-attention call, laid out (batch, tokens, heads, head_dim) in row-major
(frame, row, column) order, plus an :class:`AttentionCall` describing the token grid and
where in the denoising schedule the call is. Text tokens of joint attention are handled
by :mod:`sparsegen.joint`, never by a method.

A config knows its method: defining a ``SparseAttentionMethod`` subclass with
``config_cls = MyConfig`` binds the two, and ``config.make_method()`` builds the method
object that one patched pipeline owns. Names (``"radial"``) are looked up only where a
user gives a name (``sparsegen.apply(pipe, "radial", ...)``, the CLI, ``config_from_dict``).

Writing a method::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        method: ClassVar[str] = "mine"
        strength: float = 1.0          # validated once, in __post_init__

    class MyMethod(SparseAttentionMethod):
        config_cls = MyConfig
        def attention(self, q, k, v, call):          # -> (out, lse)
            mask = self.cached(("mask", call.geometry), lambda: build_mask(call.geometry, ...))
            return block_sparse_attention(q, k, v, mask, return_lse=True, backend=call.backend)

    sparsegen.apply(pipe, MyConfig(strength=2.0))     # or sparsegen.apply(pipe, MyMethod(MyConfig()))
    sparsegen.register_method(MyConfig)               # only to make the name "mine" known
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch

from ..kernels import Backend, BlockSparseMask, block_sparse_attention

__all__ = ["MethodConfig", "AttentionGeometry", "AttentionCall", "SparseAttentionMethod", "config_error", "global_heads",
           "CONFIG_VERSION", "check_int"]

# Version of the serialised config schema (``MethodConfig.version``); configs written
# by a later schema are refused rather than misread.
CONFIG_VERSION = 1


def config_error(cls_name: str, field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{cls_name}.{field_name}={value!r} is invalid: {allowed}")


def check_int(cls_name: str, field_name: str, value: Any, *, low: int = 0, multiple_of: int = 1,
              what: str = "") -> int:
    """``value`` if it is an int (not a bool) >= ``low`` and a multiple of ``multiple_of``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value % multiple_of:
        if multiple_of > 1 and low == multiple_of:
            allowed = f"must be a positive multiple of {multiple_of}"
        else:
            allowed = f"must be an integer >= {low}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
        raise config_error(cls_name, field_name, value, allowed + (f" ({what})" if what else ""))
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Schedule and execution options shared by every method.

    Args:
        dense_steps: the first N denoising steps run dense attention.
        dense_last_steps: the last M denoising steps run dense attention.
        dense_layers: an int N (the first N patched layers stay dense) or a list of
            layer indices that stay dense.
        backend: kernel backend of the sparse layers, a :class:`~sparsegen.kernels.Backend`
            or its value (``"auto"``, ``"triton"``, ``"torch"``, ...).
        balance_heads: under Ulysses context parallelism, give each rank the heads that
            even out the ranks' work (greedy, from the method's per-head work; methods
            whose heads all cost the same are unaffected) instead of contiguous slices.
        version: config schema version (serialised with the config; only
            :data:`CONFIG_VERSION` is understood).

    Class attributes of a method's config: ``method`` (its name) and ``presets``
    (named option sets, e.g. a model's official settings; :meth:`preset`).
    """

    method: ClassVar[str] = ""
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    dense_steps: int = 0
    dense_last_steps: int = 0
    dense_layers: Union[int, tuple[int, ...]] = 0
    backend: Backend = Backend.AUTO
    balance_heads: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self):
        name = type(self).__name__
        if self.version != CONFIG_VERSION:
            raise config_error(name, "version", self.version,
                               f"this sparsegen reads config version {CONFIG_VERSION}; the config was written by "
                               "another release: upgrade sparsegen or rebuild the config with this one")
        for f in ("dense_steps", "dense_last_steps"):
            check_int(name, f, getattr(self, f))
        dl = self.dense_layers
        if isinstance(dl, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dl):
                raise config_error(name, "dense_layers", dl, "a list must hold layer indices >= 0")
            object.__setattr__(self, "dense_layers", tuple(sorted(set(dl))))
        else:
            check_int(name, "dense_layers", dl, what="or a list of layer indices")
        if not isinstance(self.balance_heads, bool):
            raise config_error(name, "balance_heads", self.balance_heads, "must be True or False")
        try:
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            raise config_error(name, "backend", self.backend,
                               f"must be one of {[b.value for b in Backend]}") from None

    # ------------------------------------------------------------- method binding
    @classmethod
    def method_class(cls) -> type:
        """The :class:`SparseAttentionMethod` subclass serving this config."""
        method_cls = cls.__dict__.get("_method_class")
        if method_cls is None:
            raise TypeError(f"{cls.__name__} has no method: define a SparseAttentionMethod subclass with "
                            f"config_cls = {cls.__name__}")
        return method_cls

    def make_method(self) -> "SparseAttentionMethod":
        """A new method object for this config (its caches belong to one patched pipeline)."""
        return self.method_class()(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MethodConfig":
        """The named option set ``name`` of :attr:`presets`, with ``overrides`` applied field by field."""
        if name not in cls.presets:
            raise ValueError(f"{cls.__name__} has no preset {name!r}; presets: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

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
    @classmethod
    def option_fields(cls, *, shared: bool = True) -> list[dataclasses.Field]:
        """The config's options (``version`` excluded); ``shared=False`` keeps only the
        method's own, leaving out the schedule and backend fields of :class:`MethodConfig`."""
        base = {f.name for f in dataclasses.fields(MethodConfig)}
        return [f for f in dataclasses.fields(cls)
                if f.name != "version" and (shared or f.name not in base)]

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Resolved type annotation of every field."""
        return typing.get_type_hints(cls)

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, enum.Enum):
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
        step: denoising step index (0-based), or None when unknown or when the method
            does not declare ``uses_step``.
        num_steps: total denoising steps of the current generation, or None (same).
        head_offset: global index of the first head in q (head-parallel execution
            gives each rank a slice of heads; per-head methods must index by it).
        head_indices: when q's heads are not a contiguous slice (balanced head
            assignment), the global index of each of q's heads; None: contiguous from
            ``head_offset``. Per-head methods read :meth:`global_heads`.
        total_heads: number of heads of the full layer.
        backend: kernel backend to use.
        downsample: the resolution level's downsampling factor (UNets: 1 at the latent
            resolution, 2, 4, ...; 1 for DiTs), and level: its rank among the model's
            attention levels (0 = the highest resolution with attention).
        frame_causal: when set, a query may attend only keys in its own block of this many
            latent frames or in earlier ones (SkyReels-V2's diffusion forcing); methods
            intersect their mask with it. None: bidirectional.
        stats: a dict the method may fill for reporting: ``density`` (visited blocks /
            all blocks) as a Python float or a 0-dim device tensor, never read back to
            the host during the call.
    """

    geometry: AttentionGeometry
    layer: int = 0
    num_layers: int = 1
    step: Optional[int] = None
    num_steps: Optional[int] = None
    head_offset: int = 0
    total_heads: Optional[int] = None
    head_indices: Optional[tuple[int, ...]] = None
    backend: Backend = Backend.AUTO
    downsample: int = 1
    level: int = 0
    frame_causal: Optional[int] = None
    stats: dict = field(default_factory=dict)


def global_heads(call: "AttentionCall", num_heads: int) -> list[int]:
    """Global indices of the ``num_heads`` heads of a call (see ``AttentionCall.head_indices``)."""
    if call.head_indices is not None:
        return list(call.head_indices)
    return list(range(call.head_offset, call.head_offset + num_heads))


class SparseAttentionMethod:
    """Base class of methods. Subclasses set ``config_cls`` and implement ``attention``.

    One instance belongs to one patched pipeline (one ``apply`` handle), so caches kept
    on it are never shared across pipelines. Optional capabilities, declared here with
    their defaults:

    * :meth:`static_mask` — the block mask for a geometry when it does not depend on
      q and k (``has_static_mask = True``); ``sparsegen flops`` and ``sparsegen mask``
      count it.
    * :meth:`attended_pairs` — exact (query, key) pairs, when the mask's blocks hold
      padding (tiled token orders).
    * :meth:`prepare` — build what a geometry needs before the first call (masks,
      partitions), outside any compiled region.
    """

    config_cls: ClassVar[type] = MethodConfig
    has_static_mask: ClassVar[bool] = False
    # Whether ``attention`` reads ``call.step`` / ``call.num_steps`` (they are None
    # otherwise): a compiled model specializes on every value the call reads, so a
    # method that reads the step should read it coarsely (e.g. a step bucket).
    uses_step: ClassVar[bool] = False
    # Whether ``attention`` takes ``text=(k_text, v_text, valid)`` and attends the text keys
    # of joint attention itself, returning (out, None); otherwise sparsegen.joint merges
    # the method's (out, lse) with a dense attention over the text keys.
    attends_text: ClassVar[bool] = False
    # Whether ``attention`` puts its per-head work of this call in ``call.stats["head_blocks"]``
    # ((H,) visited blocks on the device; it varies per call, e.g. VMoBA's selection). Such a
    # method must not depend on which heads it is given: head-parallel execution balances
    # the ranks with the previous call's work by handing them other heads.
    reports_head_work: ClassVar[bool] = False
    # Whether ``attention`` honours ``call.frame_causal`` (diffusion forcing), e.g. by taking
    # its mask from :meth:`call_mask`; calls that carry it are refused for other methods.
    serves_frame_causal: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cfg = cls.__dict__.get("config_cls")
        if cfg is not None and cfg is not MethodConfig:
            # A config knows its method; the most derived method class defined for it wins.
            cfg._method_class = cls

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self._cache: dict = {}

    def check_model(self, *, model_class: str, num_layers: int, transformer_index: int,
                    multi_resolution: bool = False) -> None:
        """Raise ValueError if this method cannot serve the model being patched (default: any).

        Args:
            model_class: class name of the transformer; num_layers: its patched layers;
            transformer_index: 0, or 1 for a pipeline's second transformer (Wan 2.2);
            multi_resolution: its layers attend at several token grids (a UNet's levels).
        """

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        """Raise ValueError (saying what to change) if this method cannot serve ``geometry``."""

    def head_work(self, geometry: AttentionGeometry, call: "AttentionCall") -> Optional[list[float]]:
        """Per head of the full layer, its work in visited blocks when it is known on the
        host before the call (static per-head masks); None: the same for every head or
        unknown. Head-parallel execution balances ranks with it."""
        return None

    def runs_dense(self, call: "AttentionCall") -> bool:
        """Whether this call runs the model's own attention (e.g. a UNet level the method
        leaves alone); decided from the call's host-side fields only."""
        return False

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        """Build and cache what calls on ``geometry`` need (default: nothing)."""

    def static_mask(self, geometry: AttentionGeometry, device="cpu") -> BlockSparseMask:
        """The block mask used for every call on ``geometry`` (methods with ``has_static_mask``)."""
        raise ValueError(f"method {self.config.method!r} has no static mask (it selects blocks per call from q "
                         "and k)")

    def call_mask(self, geometry: AttentionGeometry, device, call: AttentionCall) -> tuple[BlockSparseMask, float]:
        """(mask, density as a host float) for a call: the static mask, intersected with the
        frame-causal pairs when ``call.frame_causal`` asks for them (built once per geometry)."""
        mask = self.static_mask(geometry, device)
        if call.frame_causal is None:
            return mask, self.cached(("density", geometry, str(device)), mask.density)

        def build():
            q_layout, kv_layout = self.token_layouts(geometry, "cpu")
            per_block = geometry.tokens_per_frame * call.frame_causal
            n = geometry.num_tokens

            def ranks(layout):  # frame block of each position of the mask's order (padding: the last)
                src = torch.arange(n) if layout is None else layout.perm.clamp(max=n - 1)
                return src // per_block

            causal = BlockSparseMask.rank_causal(q_rank=ranks(q_layout), kv_rank=ranks(kv_layout),
                                                 q_block_size=mask.q_block_size, kv_block_size=mask.kv_block_size)
            both = self.static_mask(geometry, "cpu") & causal
            return both.to(device), both.density()

        return self.cached(("frame_causal", geometry, call.frame_causal, str(device)), build)

    def token_layouts(self, geometry: AttentionGeometry, device="cpu") -> tuple:
        """(query layout, key layout): the token permutations (``sparsegen.tiling.TokenPermutation``)
        the static mask is expressed over; None for the tokens' own order (the default)."""
        return None, None

    def shard_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, *,
                        start: int):
        """Rows ``[start, start + Nq)`` of this method's attention, for a contiguous shard of
        the queries against all keys (context parallelism with sharded queries).

        Only the query blocks that hold the shard's tokens are computed (their other rows
        are zero queries whose output is dropped), with their rows of the static mask.

        Args:
            q: (B, Nq, H, D), tokens ``start .. start + Nq - 1`` of the row-major video tokens.
            k, v: (B, N, H, D), all N = call.geometry.num_tokens tokens.
        Returns:
            out (B, Nq, H, D) and lse fp32 (B, H, Nq).

        Raises:
            ValueError: the method has no static mask (it selects blocks or pools agents from
                the whole sequence), or the shard is out of range.
        """
        g = call.geometry
        n, nq = g.num_tokens, q.shape[1]
        if not self.has_static_mask:
            raise ValueError(f"method {self.config.method!r} selects its blocks from the whole sequence on every call, "
                             "so it cannot run on a shard of the queries")
        if k.shape[1] != n or not 0 <= start <= n - nq:
            raise ValueError(f"a query shard [{start}, {start + nq}) against {k.shape[1]} keys does not fit the grid "
                             f"{g.grid} ({n} tokens)")
        mask = self.static_mask(g, q.device)
        kv_layout = self.token_layouts(g, q.device)[1]

        def plan():
            blocks, slots = self._shard_query_blocks(g, start, nq)
            return mask.query_blocks(blocks), slots.to(q.device), mask.density()

        sub, slots, density = self.cached(("shard", g, start, nq, str(q.device)), plan)
        b, _, h, d = q.shape
        q_sub = q.new_zeros(b, sub.q_len, h, d).index_copy(1, slots, q)
        if kv_layout is not None:
            k, v = kv_layout.apply(k), kv_layout.apply(v)
        out, lse = block_sparse_attention(q_sub, k, v, sub, return_lse=True, backend=call.backend)
        call.stats["density"] = density  # of the whole mask (a host value, read once per shard)
        return out.index_select(1, slots), lse.index_select(2, slots)

    def _shard_query_blocks(self, geometry: AttentionGeometry, start: int, nq: int) -> tuple:
        """(blocks, slots) host tensors: the static mask's query blocks holding tokens
        ``[start, start + nq)``, ascending, and each token's row in those blocks laid end to end."""
        mask = self.static_mask(geometry, "cpu")
        q_layout = self.token_layouts(geometry, "cpu")[0]
        tokens = torch.arange(start, start + nq)
        pos = tokens if q_layout is None else q_layout.inverse[tokens]  # position in the mask's query order
        blocks, slot_block = torch.unique(pos // mask.q_block_size, sorted=True, return_inverse=True)
        return blocks, slot_block * mask.q_block_size + pos % mask.q_block_size

    def shard_work(self, geometry: AttentionGeometry, shards: int) -> list[int]:
        """Per contiguous query shard (``shards`` equal ones, as ring attention splits the
        sequence), the visited blocks of the query blocks it computes (summed over heads):
        host values from the static mask's CPU copy, cached per geometry.

        Raises:
            ValueError: no static mask, or the tokens do not split evenly.
        """
        n = geometry.num_tokens
        if n % shards:
            raise ValueError(f"{n} tokens {geometry.grid} do not split into {shards} equal shards")

        def count():
            visits = self.static_mask(geometry, "cpu").kv_num_blocks.sum(dim=(0, 1))  # per query block
            return [int(visits[self._shard_query_blocks(geometry, r * (n // shards), n // shards)[0]].sum())
                    for r in range(shards)]

        return self.cached(("shard_work", geometry, shards), count)

    def attended_pairs(self, geometry: AttentionGeometry) -> Optional[int]:
        """(query, key) token pairs attended per batch element and head, when the static
        mask's blocks hold padding; None: count them from the mask."""
        return None

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
