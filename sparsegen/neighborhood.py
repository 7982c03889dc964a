"""Generalized neighborhood attention (GNA) on the block-sparse engine.

Semantics (NATTEN's, per axis of length ``n`` with kernel ``k``, stride ``s``, dilation
``d`` and a causal flag; the mask is the AND over axes). Query ``i``, key ``j``:

- dilation: only keys with ``j % d == i % d``; group coordinates ``ig = i // d``,
  ``jg = j // d``, group length ``ng = n // d + (1 if i % d < n % d else 0)``;
- halves ``L = k // 2``, ``R = k // 2 + k % 2 - 1`` (even kernels reach one further left);
- non-causal: ``leader = min((ig // s) * s + s // 2, ng - 1)``,
  ``center = clamp(leader, L, ng - 1 - R)``, attend iff ``center - L <= jg <= center + R``.
  Windows shift at the borders instead of shrinking, so every query sees exactly ``k``
  keys per axis, and the queries of one stride group share one window;
- causal: ``leader = min((ig // s) * s + s - 1, ng - 1)``; attend iff ``jg <= ig`` and
  ``leader - jg < k``.

1D example, n = 8, k = 3, s = 1 (``x`` = attended)::

    query 0: x x x . . . . .     <- window shifted right at the border
    query 3: . . x x x . . .
    query 7: . . . . . x x x     <- shifted left

How it runs: queries and keys are tiled (:func:`sparsegen.tiling.tile_layout`, padded)
so that one tile is one kernel block. A (query tile, key tile) pair is skipped when no
query of the tile sees a key of the other, a *full* block when every query sees every
key, and otherwise a *partial* block carrying its token tile. The builder works per axis
on window intervals and combines axes by products, so it never forms an N x N mask.
With tiles aligned to the stride and the window (the published FLUX and HunyuanVideo
settings), every visited block is full.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .kernels import BlockSparseMask, block_sparse_attention
from .tiling import TileLayout, _axis_tiling, _broadcast, check_grid, tile_layout

__all__ = [
    "NeighborhoodSpec",
    "GNALayout",
    "axis_neighborhood_mask",
    "neighborhood_mask",
    "neighborhood_layout",
    "choose_tiles",
    "neighborhood_attention",
]

IntOrSeq = Union[int, Sequence[int]]
BoolOrSeq = Union[bool, Sequence[bool]]

# Kernel block size the automatic tile choice aims at: the Triton kernels' natural tile.
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class NeighborhoodSpec:
    """A validated neighborhood: one value per grid axis for every parameter."""

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @classmethod
    def make(cls, grid, kernel_size, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
             is_causal: BoolOrSeq = False) -> "NeighborhoodSpec":
        """Broadcast ints to every axis and check NATTEN's constraints.

        Raises:
            ValueError: ``kernel_size * dilation > axis length``, ``stride > kernel_size``,
                non-positive values, or a per-axis value with the wrong number of entries.
        """
        g = check_grid(grid)
        nd = len(g)
        k = _broadcast("kernel_size", kernel_size, nd)
        s = _broadcast("stride", stride, nd)
        d = _broadcast("dilation", dilation, nd)
        if isinstance(is_causal, bool):
            c = (is_causal,) * nd
        else:
            c = tuple(is_causal)
            if len(c) != nd or not all(isinstance(x, bool) for x in c):
                raise ValueError(f"is_causal={is_causal!r} must be a bool or {nd} bools (one per axis of grid {g})")
        for ax in range(nd):
            if k[ax] * d[ax] > g[ax]:
                raise ValueError(
                    f"kernel_size * dilation must not exceed the grid on every axis; axis {ax}: "
                    f"kernel_size={k[ax]} * dilation={d[ax]} > {g[ax]} (grid={g}). Use a smaller kernel or dilation."
                )
            if s[ax] > k[ax]:
                raise ValueError(
                    f"stride must not exceed kernel_size; axis {ax}: stride={s[ax]} > kernel_size={k[ax]} "
                    f"(stride == kernel_size is blocked attention)"
                )
        return cls(g, k, s, d, c)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


# ----------------------------------------------------------------------------------------
# Token-level definition (the oracle): written directly from the semantics above.
# ----------------------------------------------------------------------------------------
def axis_neighborhood_mask(n: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                           is_causal: bool = False) -> torch.Tensor:
    """bool (n, n): ``[i, j]`` is True when query ``i`` attends key ``j`` along one axis."""
    spec = NeighborhoodSpec.make((n,), kernel_size, stride, dilation, is_causal)
    k, s, d = spec.kernel_size[0], spec.stride[0], spec.dilation[0]
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    same_group = (j % d) == (i % d)
    ig, jg = i // d, j // d
    ng = n // d + ((i % d) < (n % d)).long()
    if spec.is_causal[0]:
        leader = torch.minimum((ig // s) * s + s - 1, ng - 1)
        inside = (jg <= ig) & (leader - jg < k)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum((ig // s) * s + s // 2, ng - 1)
        center = torch.maximum(torch.minimum(leader, ng - 1 - right), torch.full_like(leader, left))
        inside = (center - left <= jg) & (jg <= center + right)
    return same_group & inside


def neighborhood_mask(grid: IntOrSeq, kernel_size: IntOrSeq, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
                      is_causal: BoolOrSeq = False) -> torch.Tensor:
    """bool (N, N) token mask in row-major grid order, N = prod(grid). For tests and small grids.

    The AND over axes of :func:`axis_neighborhood_mask`.
    """
    spec = NeighborhoodSpec.make(grid, kernel_size, stride, dilation, is_causal)
    nd = len(spec.grid)
    full = torch.ones((), dtype=torch.bool)
    for ax in range(nd):
        m = axis_neighborhood_mask(spec.grid[ax], spec.kernel_size[ax], spec.stride[ax], spec.dilation[ax],
                                   spec.is_causal[ax])
        shape = [1] * (2 * nd)
        shape[ax] = spec.grid[ax]
        shape[nd + ax] = spec.grid[ax]
        full = full & m.view(shape)
    n = spec.num_tokens
    return full.expand(*spec.grid, *spec.grid).reshape(n, n)


# ----------------------------------------------------------------------------------------
# Per-axis plan on tiled positions: window intervals, visited tile ranges, sub-tiles.
# ----------------------------------------------------------------------------------------
def _axis_windows(n: int, k: int, s: int, d: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-coordinate window [lo, hi] (long (n,) each) of every query index."""
    i = torch.arange(n)
    ig = i // d
    ng = n // d + ((i % d) < (n % d)).long()
    if causal:
        leader = torch.minimum((ig // s) * s + s - 1, ng - 1)
        return (leader - k + 1).clamp(min=0), ig
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = torch.minimum((ig // s) * s + s // 2, ng - 1)
    center = torch.minimum(leader, ng - 1 - right).clamp(min=left)
    return center - left, center + right


@dataclass
class _AxisPlan:
    first: torch.Tensor      # long (Sq,): first visited kv segment of each q segment
    count: torch.Tensor      # long (Sq,): number of visited kv segments (contiguous range)
    full: torch.Tensor       # bool (Sq, M): slot m (kv segment first + m) is fully attended
    sub_id: torch.Tensor     # long (Sq, M): index into subs for partial slots, -1 otherwise
    subs: torch.Tensor       # bool (U, tq, tk): distinct partial sub-tiles along this axis
    num_kv_segments: int
    window_sum: int          # sum over queries of the window size along this axis


def _axis_plan(n: int, k: int, s: int, d: int, causal: bool, tq: int, tk: int, *, need_subs: bool = True) -> _AxisPlan:
    qa = _axis_tiling(n, tq, d, pad=True)
    ka = _axis_tiling(n, tk, d, pad=True)
    lo, hi = _axis_windows(n, k, s, d, causal)
    # Laid-out kv position of key j is pos_of[j % d] + j // d (groups are contiguous).
    pos_of = torch.empty(n, dtype=torch.long)
    real = ka.order >= 0
    pos_of[ka.order[real]] = torch.nonzero(real).squeeze(1)
    qi = qa.order
    qreal = qi >= 0
    qc = qi.clamp(min=0)
    base = pos_of[qc % d]
    big = 1 << 40
    a = torch.where(qreal, base + lo[qc], torch.full_like(qc, big))     # first key position (inclusive)
    b = torch.where(qreal, base + hi[qc], torch.full_like(qc, -big))    # last key position (inclusive)
    nsq, nsk = qa.padded_length // tq, ka.padded_length // tk
    a2, b2, real2 = a.view(nsq, tq), b.view(nsq, tq), qreal.view(nsq, tq)
    a_min = a2.amin(1)
    b_max = b2.amax(1)
    a_max = torch.where(real2, a2, torch.full_like(a2, -big)).amax(1)
    b_min = torch.where(real2, b2, torch.full_like(b2, big)).amin(1)
    first = a_min // tk
    count = b_max // tk - first + 1
    m = int(count.max())
    slot = torch.arange(m)
    seg = first[:, None] + slot[None, :]
    valid = slot[None, :] < count[:, None]
    seg_c = seg.clamp(max=nsk - 1)
    seg_has_pad = (ka.order.view(nsk, tk) < 0).any(1)
    full = valid & (a_max[:, None] <= seg_c * tk) & (b_min[:, None] >= seg_c * tk + tk - 1) & ~seg_has_pad[seg_c]
    partial = valid & ~full
    sub_id = torch.full((nsq, m), -1, dtype=torch.long)
    subs = torch.zeros(0, tq, tk, dtype=torch.bool)
    if need_subs and bool(partial.any()):
        sq_idx, slot_idx = torch.nonzero(partial, as_tuple=True)
        cols = seg_c[sq_idx, slot_idx][:, None] * tk + torch.arange(tk)[None, :]        # (P, tk)
        rows_a, rows_b = a2[sq_idx], b2[sq_idx]                                           # (P, tq)
        tiles = (rows_a[:, :, None] <= cols[:, None, :]) & (cols[:, None, :] <= rows_b[:, :, None])
        subs, inv = torch.unique(tiles.reshape(len(sq_idx), -1), dim=0, return_inverse=True)
        subs = subs.view(-1, tq, tk)
        sub_id[sq_idx, slot_idx] = inv
    window_sum = int((hi - lo + 1).sum())
    return _AxisPlan(first, count, full, sub_id, subs, nsk, window_sum)


# ----------------------------------------------------------------------------------------
# Layout: permutations + block-sparse mask.
# ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class GNALayout:
    """Everything needed to run neighborhood attention block-sparsely.

    Attributes:
        spec: the neighborhood.
        q_layout, kv_layout: padded tile layouts of queries and keys (one tile = one block).
        mask: the :class:`BlockSparseMask` over the tiled sequences
            (q_len = q_layout.length, kv_len = kv_layout.length).
        q_tile, kv_tile: tile shapes (tokens per axis).
        attended_pairs: number of (query, key) token pairs the definition attends.
    """

    spec: NeighborhoodSpec
    q_layout: TileLayout
    kv_layout: TileLayout
    mask: BlockSparseMask
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    attended_pairs: int

    def stats(self) -> dict:
        """density, full/partial blocks, tile shapes, computed work and the speedup bound."""
        visited = self.mask.num_visited_blocks()
        partial = self.mask.num_partial_blocks()
        n = self.spec.num_tokens
        work = visited * self.mask.q_block_size * self.mask.kv_block_size
        return {
            "grid": list(self.spec.grid),
            "kernel_size": list(self.spec.kernel_size),
            "stride": list(self.spec.stride),
            "dilation": list(self.spec.dilation),
            "is_causal": list(self.spec.is_causal),
            "tile": list(self.q_tile),
            "kv_tile": list(self.kv_tile),
            "q_block_size": self.mask.q_block_size,
            "kv_block_size": self.mask.kv_block_size,
            "q_len_padded": self.q_layout.length,
            "kv_len_padded": self.kv_layout.length,
            "density": self.mask.density(),
            "token_density": self.attended_pairs / float(n * n),
            "visited_blocks": visited,
            "full_blocks": visited - partial,
            "partial_blocks": partial,
            "computed_pairs": work,
            "speedup_bound": (n * n) / float(work),
        }


def _build_mask(spec: NeighborhoodSpec, q_tile, kv_tile, plans: list[_AxisPlan], q_len: int, kv_len: int,
                device) -> BlockSparseMask:
    nd = len(spec.grid)
    nq = [p.first.numel() for p in plans]
    nk = [p.num_kv_segments for p in plans]
    ms = [p.full.shape[1] for p in plans]
    qshape = nq + ms  # (nq_0..nq_{nd-1}, m_0..m_{nd-1})

    def bc(t: torch.Tensor, ax: int, with_slot: bool) -> torch.Tensor:
        shape = [1] * (2 * nd)
        shape[ax] = t.shape[0]
        if with_slot:
            shape[nd + ax] = t.shape[1]
        return t.reshape(shape)

    kv_idx = torch.zeros((), dtype=torch.long)
    valid = torch.ones((), dtype=torch.bool)
    full = torch.ones((), dtype=torch.bool)
    code = torch.zeros((), dtype=torch.long)
    for ax, p in enumerate(plans):
        slot = torch.arange(ms[ax])
        seg = p.first[:, None] + slot[None, :]
        kv_idx = kv_idx * nk[ax] + bc(seg, ax, True)
        valid = valid & bc(slot[None, :] < p.count[:, None], ax, True)
        full = full & bc(p.full, ax, True)
        code = code * (p.subs.shape[0] + 1) + bc(p.sub_id + 1, ax, True)
    qt = math.prod(nq)
    kk = math.prod(ms)
    kv_idx = kv_idx.expand(qshape).reshape(qt, kk)
    valid = valid.expand(qshape).reshape(qt, kk)
    full = full.expand(qshape).reshape(qt, kk)
    code = code.expand(qshape).reshape(qt, kk)
    counts = valid.sum(1)
    # Visited entries first, keeping their (ascending) order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    kmax = int(counts.max())
    order = order[:, :kmax]
    kv_idx = kv_idx.gather(1, order)
    valid_c = valid.gather(1, order)
    partial = valid_c & ~full.gather(1, order)
    kv_idx = torch.where(valid_c, kv_idx, torch.zeros_like(kv_idx))
    qbs, kbs = math.prod(q_tile), math.prod(kv_tile)
    tile_ids = tiles = None
    if bool(partial.any()):
        codes = code.gather(1, order)
        uniq, inv = torch.unique(codes[partial], return_inverse=True)
        ids = torch.full_like(codes, -1)
        ids[partial] = inv
        tile_ids = ids.to(torch.int32).view(1, 1, qt, kmax)
        # Decode each distinct code into per-axis sub-tiles and take their product.
        tiles = torch.ones((uniq.numel(),) + (1,) * (2 * nd), dtype=torch.bool)
        rem = uniq.clone()
        for ax in range(nd - 1, -1, -1):
            p = plans[ax]
            base = p.subs.shape[0] + 1
            sid = rem % base
            rem = rem // base
            ones = torch.ones(1, q_tile[ax], kv_tile[ax], dtype=torch.bool)
            table = torch.cat([ones, p.subs], 0)        # id 0 = full along this axis
            m = table[sid]                              # (U, tq, tk)
            shape = [uniq.numel()] + [1] * (2 * nd)
            shape[1 + ax] = q_tile[ax]
            shape[1 + nd + ax] = kv_tile[ax]
            tiles = tiles & m.view(shape)
        tiles = tiles.expand(uniq.numel(), *q_tile, *kv_tile).reshape(uniq.numel(), qbs, kbs).contiguous()
        tile_ids = tile_ids.to(device)
        tiles = tiles.to(device)
    return BlockSparseMask(
        counts.to(torch.int32).view(1, 1, qt).to(device),
        kv_idx.to(torch.int32).view(1, 1, qt, kmax).contiguous().to(device),
        q_len, kv_len, qbs, kbs, tile_ids, tiles,
    )


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile_shapes(grid: tuple[int, ...], volume: int) -> list[tuple[int, ...]]:
    """Power-of-two tile shapes of the given volume, no axis extent above the axis' next power of two."""
    per_axis = [[1 << e for e in range(_pow2_at_least(n).bit_length())] for n in grid]
    return [t for t in itertools.product(*per_axis) if math.prod(t) == volume]


def choose_tiles(spec: NeighborhoodSpec, *, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pick (q_tile, kv_tile) of ``block_size`` tokens each that minimize wasted work.

    Wasted work is computed token pairs (visited blocks x block area, padding included)
    minus attended pairs; ties go to fewer partial blocks, then to equal q and kv tiles.
    Candidate extents are powers of two, so blocks suit the Triton kernels. Grids with
    fewer than ``block_size`` tokens use the largest power of two they can fill.
    """
    volume = min(block_size, _pow2_at_least(spec.num_tokens))
    cands = _tile_shapes(spec.grid, volume)
    while not cands and volume > 1:
        volume //= 2
        cands = _tile_shapes(spec.grid, volume)
    nd = len(spec.grid)
    # Per axis and per (tq, tk): visited and full segment pairs; totals are products over axes.
    cache: dict = {}

    def axis_stats(ax: int, tq: int, tk: int):
        key = (ax, tq, tk)
        if key not in cache:
            p = _axis_plan(spec.grid[ax], spec.kernel_size[ax], spec.stride[ax], spec.dilation[ax],
                           spec.is_causal[ax], tq, tk, need_subs=False)
            cache[key] = (int(p.count.sum()), int(p.full.sum()))
        return cache[key]

    best, best_key = None, None
    for qt in cands:
        for kt in cands:
            visited = 1
            fullb = 1
            for ax in range(nd):
                v, f = axis_stats(ax, qt[ax], kt[ax])
                visited *= v
                fullb *= f
            key = (visited, visited - fullb, qt != kt, tuple(-x for x in qt), tuple(-x for x in kt))
            if best_key is None or key < best_key:
                best, best_key = (qt, kt), key
    return best


def neighborhood_layout(grid: IntOrSeq, kernel_size: IntOrSeq, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
                        is_causal: BoolOrSeq = False, *, tile: Optional[IntOrSeq] = None,
                        kv_tile: Optional[IntOrSeq] = None, block_size: int = DEFAULT_BLOCK_SIZE,
                        device: Union[str, torch.device] = "cpu") -> GNALayout:
    """Tile layouts and block-sparse mask of a neighborhood (cached per arguments).

    Args:
        grid: token grid, row-major (1, 2 or 3 axes).
        kernel_size, stride, dilation, is_causal: per axis or one value for all axes.
        tile: query tile shape (tokens per axis); None picks tiles with :func:`choose_tiles`.
        kv_tile: key tile shape; defaults to ``tile``.
        block_size: target tokens per block for the automatic choice.

    Returns:
        a :class:`GNALayout`; ``layout.mask`` is the engine mask over tiled tokens.
    """
    spec = NeighborhoodSpec.make(grid, kernel_size, stride, dilation, is_causal)
    nd = len(spec.grid)
    if tile is None:
        if kv_tile is not None:
            raise ValueError("kv_tile was given without tile; give both or neither")
        q_t, k_t = choose_tiles(spec, block_size=block_size)
    else:
        q_t = _broadcast("tile", tile, nd)
        k_t = q_t if kv_tile is None else _broadcast("kv_tile", kv_tile, nd)
    return _layout_cached(spec, q_t, k_t, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _layout_cached(spec: NeighborhoodSpec, q_tile, kv_tile, device: str) -> GNALayout:
    nd = len(spec.grid)
    plans = [
        _axis_plan(spec.grid[ax], spec.kernel_size[ax], spec.stride[ax], spec.dilation[ax], spec.is_causal[ax],
                   q_tile[ax], kv_tile[ax])
        for ax in range(nd)
    ]
    q_layout = tile_layout(spec.grid, q_tile, pad=True, dilation=spec.dilation)
    kv_layout = tile_layout(spec.grid, kv_tile, pad=True, dilation=spec.dilation)
    mask = _build_mask(spec, q_tile, kv_tile, plans, q_layout.length, kv_layout.length, torch.device(device))
    attended = math.prod(p.window_sum for p in plans)
    return GNALayout(spec, q_layout, kv_layout, mask, q_tile, kv_tile, attended)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
    backend: str = "auto",
    tile: Optional[IntOrSeq] = None,
    kv_tile: Optional[IntOrSeq] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Neighborhood attention over a 1D/2D/3D token grid (NATTEN semantics, see module doc).

    Args:
        q, k, v: (batch, prod(grid), heads, head_dim), tokens in row-major grid order.
        grid: e.g. ``(frames, height, width)``; ``kernel_size``, ``stride``, ``dilation`` and
            ``is_causal`` are one value per axis or one value for all axes.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (as
            :func:`sparsegen.block_sparse_attention`).
        tile: query tile shape; None chooses tiles that minimize wasted work. ``kv_tile``
            defaults to ``tile``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp, fp32 (batch, heads, prod(grid)).

    Returns:
        out (batch, prod(grid), heads, head_dim), and the LSE with ``return_lse``.
        Differentiable in q, k and v on the ``torch`` and ``triton`` backends.

    Raises:
        ValueError: q's sequence length is not ``prod(grid)``, or invalid neighborhood
            parameters (see :meth:`NeighborhoodSpec.make`).

    Example::

        >>> q = k = v = torch.randn(1, 16 * 16, 2, 32)
        >>> out = neighborhood_attention(q, k, v, grid=(16, 16), kernel_size=5, backend="torch")
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (batch, tokens, heads, head_dim) tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    layout = neighborhood_layout(grid, kernel_size, stride, dilation, is_causal, tile=tile, kv_tile=kv_tile,
                                 device=q.device)
    n = layout.spec.num_tokens
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[1] != n:
            raise ValueError(f"{name} must be (batch, prod(grid)={n}, heads, head_dim) for grid={layout.spec.grid}; "
                             f"got {tuple(t.shape)=}")
    qp = layout.q_layout.apply(q)
    kp = layout.kv_layout.apply(k)
    vp = layout.kv_layout.apply(v)
    out, lse = block_sparse_attention(qp, kp, vp, layout.mask, scale=scale, return_lse=True, backend=backend)
    out = layout.q_layout.invert(out)
    if return_lse:
        return out, layout.q_layout.invert(lse, dim=2)
    return out
