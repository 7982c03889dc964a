"""Generalized neighborhood attention (GNA) as a sparsegen method.

Every video token attends the tokens of a (frames, rows, columns) window around it, with
NATTEN's semantics (windows shift at the borders, strides share windows, dilation,
causal axes): see :mod:`sparsegen.neighborhood`. The mask is static per geometry, built
once on tiled tokens and cached.

Example::

    >>> cfg = GNAConfig(kernel_size=(18, 24, 24), stride=(16, 8, 8))    # HunyuanVideo setting
    >>> sparsegen.apply(pipe, cfg)

The published settings (ANCHORS): FLUX 256 x 256 tokens, window 80 x 80, stride 16 x 16;
HunyuanVideo 30 x 48 x 80, window (18, 24, 24), stride (16, 8, 8). With the tiles
:func:`sparsegen.neighborhood.choose_tiles` picks, both are perfectly block-sparse (no
partial blocks): ``sparsegen mask gna --grid 30,48,80 --kernel-size 18,24,24 --stride 16,8,8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from ..kernels import block_sparse_attention
from ..kernels import BlockSparseMask
from ..neighborhood import DEFAULT_BLOCK_SIZE, GNALayout, NeighborhoodSpec, neighborhood_layout
from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod, config_error

__all__ = ["GNAConfig", "GNAMethod"]

IntOrTuple = Union[int, tuple[int, ...]]


def _norm_axes(name: str, cls_name: str, value, *, allow_none: bool = False, kind=int):
    """An int/bool or a 2- or 3-tuple (lists from JSON become tuples)."""
    if value is None and allow_none:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if kind is bool:
        ok = isinstance(value, bool) or (isinstance(value, tuple) and len(value) in (2, 3)
                                         and all(isinstance(x, bool) for x in value))
        hint = "must be a bool or a tuple of 2 (height, width) or 3 (frames, height, width) bools"
    else:
        def good(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1
        ok = good(value) or (isinstance(value, tuple) and len(value) in (2, 3) and all(good(x) for x in value))
        hint = "must be an int >= 1 or a tuple of 2 (height, width) or 3 (frames, height, width) ints >= 1"
    if not ok:
        raise config_error(cls_name, name, value, hint)
    return value


_AXIS_NAMES = ("frames", "height", "width")


def _three_axes(value, frames_value):
    """(frames, height, width) values of an int or a 2-/3-tuple; a 2-tuple gets ``frames_value``."""
    if isinstance(value, (int, bool)):
        return (value, value, value)
    return (frames_value,) + tuple(value) if len(value) == 2 else tuple(value)


@dataclass(frozen=True)
class GNAConfig(MethodConfig):
    """Neighborhood attention options.

    Args:
        kernel_size: window size in tokens: an int (every axis), (height, width) (every
            frame attends all frames: spatial-only neighborhoods) or (frames, height, width).
            Required.
        stride: queries in groups of ``stride`` share one window (same forms as kernel_size).
        dilation: attend every ``dilation``-th token (same forms).
        is_causal: per axis, attend only earlier tokens (a bool or 2/3 bools).
        tile: query tile (frames, height, width) in tokens; None chooses the tile with the
            least wasted work for each geometry. ``kv_tile`` defaults to ``tile``.
        block_size: tokens per block the automatic tile choice aims at (default 128).

    On an axis of length 1 (the frame axis of an image model) the window is that token.
    """

    method: ClassVar[str] = "gna"
    kernel_size: Optional[IntOrTuple] = None
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: Union[bool, tuple[bool, ...]] = False
    tile: Optional[tuple[int, int, int]] = None
    kv_tile: Optional[tuple[int, int, int]] = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.kernel_size is None:
            raise config_error(name, "kernel_size", None, "is required, e.g. GNAConfig(kernel_size=(18, 24, 24))")
        for f in ("kernel_size", "stride", "dilation"):
            object.__setattr__(self, f, _norm_axes(f, name, getattr(self, f)))
        object.__setattr__(self, "is_causal", _norm_axes("is_causal", name, self.is_causal, kind=bool))
        for f in ("tile", "kv_tile"):
            v = getattr(self, f)
            if isinstance(v, list):
                v = tuple(v)
            if v is not None and not (isinstance(v, tuple) and len(v) == 3
                                      and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
                raise config_error(name, f, v, "must be None or a (frames, height, width) tuple of ints >= 1")
            object.__setattr__(self, f, v)
        if self.kv_tile is not None and self.tile is None:
            raise config_error(name, "kv_tile", self.kv_tile, "needs tile to be set too")
        # Catch stride > kernel_size now rather than at the first generation; a 2-tuple
        # kernel spans all frames, which only the geometry knows (checked in spec_for).
        kernel3 = _three_axes(self.kernel_size, None)
        stride3 = _three_axes(self.stride, 1)
        for ax, (kk, ss) in enumerate(zip(kernel3, stride3)):
            if kk is not None and ss > kk:
                raise config_error(name, "stride", self.stride,
                                   f"must not exceed kernel_size={self.kernel_size} on any axis ({_AXIS_NAMES[ax]}: "
                                   f"stride {ss} > kernel {kk}); stride == kernel_size is blocked attention")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1):
            raise config_error(name, "block_size", b, "must be a power of two (e.g. 64 or 128)")

    def spec_for(self, geometry: AttentionGeometry) -> NeighborhoodSpec:
        """The 3D neighborhood for a (frames, height, width) grid.

        Raises:
            ValueError: the window does not fit the grid (says which axis and what to change).
        """
        grid = geometry.grid
        k = list(_three_axes(self.kernel_size, grid[0]))
        s = list(_three_axes(self.stride, 1))
        d = list(_three_axes(self.dilation, 1))
        c = list(_three_axes(self.is_causal, False))
        for ax in range(3):
            if grid[ax] == 1:  # a single position: its only neighborhood is itself
                k[ax], s[ax], d[ax] = 1, 1, 1
        try:
            return NeighborhoodSpec.make(grid, tuple(k), tuple(s), tuple(d), tuple(c))
        except ValueError as e:
            raise ValueError(f"GNAConfig does not fit the token grid {grid} (frames, height, width): {e}") from None


class GNAMethod(SparseAttentionMethod):
    """Neighborhood attention over the video tokens; the layout is cached per (geometry, device)."""

    config_cls = GNAConfig
    has_static_mask = True
    serves_frame_causal = True

    def _layout(self, geometry: AttentionGeometry, device) -> tuple[GNALayout, float]:
        """(tile layouts and block mask on ``device``, the mask's density as a host float)."""
        cfg = self.config
        dev = torch.device(device)

        def build():
            spec = cfg.spec_for(geometry)
            layout = neighborhood_layout(spec.grid, spec.kernel_size, spec.stride, spec.dilation, spec.is_causal,
                                         tile=cfg.tile, kv_tile=cfg.kv_tile, block_size=cfg.block_size, device=dev)
            return layout, layout.mask.density()

        return self.cached(("gna_layout", geometry, str(dev)), build)

    def layout_for(self, geometry: AttentionGeometry, device="cpu") -> GNALayout:
        """Tile layouts and block mask used for ``geometry`` (cached)."""
        return self._layout(geometry, device)[0]

    def static_mask(self, geometry: AttentionGeometry, device="cpu") -> BlockSparseMask:
        """The block mask over *tiled* tokens used for ``geometry`` (see :meth:`layout_for`)."""
        return self.layout_for(geometry, device).mask

    def token_layouts(self, geometry: AttentionGeometry, device="cpu") -> tuple:
        lay = self.layout_for(geometry, device)
        return lay.q_layout, lay.kv_layout

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        self._layout(geometry, device)

    def attended_pairs(self, geometry: AttentionGeometry) -> int:
        """(query, key) token pairs the neighborhood attends, per batch element and head.

        Counted from the definition, not from the tiled mask: padding query rows of full
        blocks are computed but attend nothing real.
        """
        return self.layout_for(geometry).attended_pairs

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        self.config.spec_for(geometry)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Neighborhood attention.

        Args:
            q, k, v: (B, N, H, D), N = call.geometry.num_tokens, row-major (frame, row, column).
        Returns:
            out (B, N, H, D) and lse fp32 (B, H, N); ``call.stats["density"]`` is the
            fraction of visited blocks of the tiled mask.
        """
        g = call.geometry
        if q.dim() != 4 or q.shape[1] != g.num_tokens:
            raise ValueError(f"q must be (batch, {g.num_tokens}, heads, head_dim) for geometry {g.grid}; "
                             f"got {tuple(q.shape)=}")
        lay, density = self._layout(g, q.device)
        mask = lay.mask
        if call.frame_causal is not None:
            mask, density = self.call_mask(g, q.device, call)
        qp = lay.q_layout.apply(q)
        kp = lay.kv_layout.apply(k)
        vp = lay.kv_layout.apply(v)
        out, lse = block_sparse_attention(qp, kp, vp, mask, return_lse=True, backend=call.backend)
        call.stats["density"] = density
        return lay.q_layout.invert(out), lay.q_layout.invert(lse, dim=2)
