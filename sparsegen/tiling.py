"""Token permutations of a row-major (T, H, W) token grid: tiles, partitions and axis orders.

Sparse methods group tokens so that the tokens a block of queries needs sit next to each
other: GNA tiles the grid into small cuboids, VMoBA partitions it into 1D/2D/3D blocks,
PARO reorders the three axes. All of them are a :class:`TokenPermutation`: permute q, k
and v once along the sequence, run the kernel, invert on the output.

Tile layout (2D example, grid (H, W) = (3, 5), tile (2, 2), ragged edge tiles)::

    grid tokens (row-major)       tiles in row-major tile order     permuted sequence
     0  1 | 2  3 | 4               A | B | C                        A: 0 1 5 6
     5  6 | 7  8 | 9               A | B | C                        B: 2 3 7 8
    ------+------+---             ---+---+--                        C: 4 9
    10 11 |12 13 |14               D | E | F                        D: 10 11
                                                                    E: 12 13   F: 14

Each tile's tokens are contiguous and in row-major order inside the tile. With
``pad=True`` every tile instead holds exactly ``prod(tile)`` positions and the missing
ones are padding (zeros on :meth:`TokenPermutation.apply`, dropped on ``invert``), so
tile ``t`` occupies positions ``[t * prod(tile), (t + 1) * prod(tile))``: a kernel block of
``prod(tile)`` tokens is exactly one tile.

Dilation groups (used by neighborhood attention with dilation ``d`` on an axis): the axis
is first reordered as ``[0, d, 2d, ..., 1, 1 + d, ...]`` and each residue group is tiled
(and padded) on its own, so a dilated window is contiguous in the tiled order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "AXIS_ORDERS",
    "AxisTiling",
    "TileLayout",
    "TokenPermutation",
    "axis_order",
    "balanced_segments",
    "check_grid",
    "partition_layout",
    "tile_layout",
]

AXIS_ORDERS = ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH")

IntOrSeq = Union[int, Sequence[int]]


def check_grid(grid, ndim: Optional[int] = None) -> tuple[int, ...]:
    """A token grid as a tuple of positive ints.

    Args:
        grid: an int, a sequence of ints, or an object with a ``grid`` attribute (an
            ``AttentionGeometry``).
        ndim: the number of axes required (None: any).

    Raises:
        TypeError / ValueError: not ints, not positive, or not ``ndim`` axes.
    """
    grid = getattr(grid, "grid", grid)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    try:
        g = tuple(grid)
    except TypeError:
        raise TypeError(f"grid must be an int or a sequence of ints, got {grid!r}") from None
    if ndim is not None and (len(g) != ndim or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in g)):
        raise ValueError(f"grid must be {ndim} positive ints (frames, height, width) after patchify, got {grid!r}")
    try:
        g = tuple(int(x) for x in g)
    except (TypeError, ValueError):
        raise TypeError(f"grid must be an int or a sequence of ints, got {grid!r}") from None
    if not g or any(x <= 0 for x in g) or any(isinstance(x, bool) for x in grid):
        raise ValueError(f"grid must hold positive ints (e.g. (frames, height, width)), got {grid!r}")
    return g


def _broadcast(name: str, value: IntOrSeq, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """An int, or one int per grid axis, checked against ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        vals = (value,) * ndim
    else:
        try:
            vals = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}") from None
        if len(vals) != ndim:
            raise ValueError(f"{name}={value!r} has {len(vals)} entries but the grid has {ndim} axes; "
                             f"give one value per axis or a single int")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{name}={value!r}: every entry must be an int >= {minimum}")
    return tuple(int(v) for v in vals)


class TokenPermutation:
    """A reordering (optionally with padding) of the tokens of one sequence.

    Attributes:
        perm: long (L,): ``perm[p]`` is the source token at output position ``p``;
            the value ``num_tokens`` marks a padding position.
        inverse: long (N,): output position of each source token.
        num_tokens: N, the source sequence length.
        length: L >= N, the permuted (padded) length.

    ``invert(apply(x))`` equals ``x`` exactly (the gathers copy values; an identity order
    returns ``x`` itself, no copy).
    """

    def __init__(self, perm: torch.Tensor, num_tokens: int):
        perm = torch.as_tensor(perm, dtype=torch.long).cpu().contiguous()
        n = int(num_tokens)
        if perm.dim() != 1:
            raise ValueError(f"perm must be 1D, got {tuple(perm.shape)=}")
        valid = perm < n
        src = perm[valid]
        if src.numel() != n or bool((perm < 0).any()) or bool((perm > n).any()):
            raise ValueError(f"perm must hold every token 0..{n - 1} once plus pad markers == {n}")
        inverse = torch.full((n,), -1, dtype=torch.long)
        inverse[src] = torch.nonzero(valid).squeeze(1)
        if bool((inverse < 0).any()):
            raise ValueError("perm repeats a token; it must hold every token exactly once")
        self.perm = perm
        self.inverse = inverse
        self.num_tokens = n
        self.length = int(perm.numel())
        self.valid = valid
        self.has_padding = self.length != n
        self._identity = not self.has_padding and bool(torch.equal(perm, torch.arange(n)))
        self._dev: dict = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens}, length={self.length})"

    def _on(self, device: torch.device):
        key = str(device)
        if key not in self._dev:
            gather = self.perm.clamp(max=self.num_tokens - 1)
            self._dev[key] = (gather.to(device), self.inverse.to(device), self.valid.to(device))
        return self._dev[key]

    def is_identity(self) -> bool:
        """True when the order is the source order without padding (then apply/invert return ``x`` itself)."""
        return self._identity

    def apply(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reorder ``x`` along ``dim`` (size N) into the permuted order (size L; pads are 0).

        Args:
            x: e.g. (B, N, H, D) with ``dim=1``.
        Returns:
            (B, L, H, D) for ``dim=1``.
        """
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim={dim} but the permutation is for "
                             f"{self.num_tokens}; {tuple(x.shape)=}")
        if self._identity:
            return x
        gather, _, valid = self._on(x.device)
        out = x.index_select(dim, gather)
        if self.has_padding:
            shape = [1] * x.dim()
            shape[dim] = self.length
            out = out.masked_fill(~valid.view(shape), 0)
        return out

    def invert(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Undo :meth:`apply` along ``dim`` (size L -> N; padding positions are dropped)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"x has {x.shape[dim]} positions along dim={dim} but the permuted sequence "
                             f"has {self.length}; {tuple(x.shape)=}")
        if self._identity:
            return x
        _, inverse, _ = self._on(x.device)
        return x.index_select(dim, inverse)


@dataclass(frozen=True)
class AxisTiling:
    """How one grid axis of length ``n`` is laid out: an order of its positions cut into segments.

    Attributes:
        n: axis length.
        order: long (Lp,): original axis index at each laid-out position, -1 for padding.
        segments: length of each segment (tile extent along this axis), summing to Lp.
    """

    n: int
    order: torch.Tensor
    segments: tuple[int, ...]

    @property
    def padded_length(self) -> int:
        return int(self.order.numel())

    @property
    def offsets(self) -> torch.Tensor:
        """long (num_segments + 1,): first laid-out position of each segment."""
        return torch.tensor((0,) + tuple(int(x) for x in torch.tensor(self.segments).cumsum(0).tolist()),
                            dtype=torch.long)


def balanced_segments(n: int, count: int) -> tuple[int, ...]:
    """Split ``n`` positions into ``min(count, n)`` segments whose sizes differ by at most one.

    The larger segments come first (like ``numpy.array_split``): 10 into 4 -> (3, 3, 2, 2).
    """
    if count < 1 or n < 1:
        raise ValueError(f"balanced_segments needs n >= 1 and count >= 1, got n={n}, count={count}")
    count = min(count, n)
    base, extra = divmod(n, count)
    return tuple(base + 1 if i < extra else base for i in range(count))


def _axis_tiling(n: int, tile: int, dilation: int, pad: bool) -> AxisTiling:
    order, segs = [], []
    for r in range(dilation):
        idx = list(range(r, n, dilation))
        if not idx:
            continue
        ng = len(idx)
        full, rest = divmod(ng, tile)
        if pad and rest:
            idx = idx + [-1] * (tile - rest)
            segs += [tile] * (full + 1)
        else:
            segs += [tile] * full + ([rest] if rest else [])
        order += idx
    return AxisTiling(n, torch.tensor(order, dtype=torch.long), tuple(segs))


class TileLayout(TokenPermutation):
    """A :class:`TokenPermutation` that groups the grid into tiles (one tile = one block).

    Attributes:
        grid: the token grid, row-major.
        axes: one :class:`AxisTiling` per axis.
        tile_counts: number of tiles along each axis.
        tile_offsets: long (num_tiles + 1,): first permuted position of each tile
            (tiles in row-major tile order).
        tile_shape: the tile extent per axis when every tile has the same shape (padded
            layouts), else None.
    """

    def __init__(self, grid: Sequence[int], axes: Sequence[AxisTiling]):
        grid = tuple(grid)
        self.grid = grid
        self.axes = tuple(axes)
        nd = len(grid)
        counts = tuple(len(a.segments) for a in self.axes)
        self.tile_counts = counts
        # Size of every tile: outer product of segment lengths, row-major over tiles.
        sizes = torch.ones(counts, dtype=torch.long)
        for ax, a in enumerate(self.axes):
            shape = [1] * nd
            shape[ax] = counts[ax]
            sizes = sizes * torch.tensor(a.segments, dtype=torch.long).view(shape)
        flat_sizes = sizes.reshape(-1)
        self.tile_offsets = torch.cat([torch.zeros(1, dtype=torch.long), flat_sizes.cumsum(0)])
        length = int(self.tile_offsets[-1])
        # For each laid-out position along each axis: its segment, offset in it and segment length.
        seg_of, off_in, seg_len = [], [], []
        for a in self.axes:
            lens = torch.tensor(a.segments, dtype=torch.long)
            sid = torch.repeat_interleave(torch.arange(len(a.segments)), lens)
            starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
            seg_of.append(sid)
            off_in.append(torch.arange(a.padded_length) - starts[sid])
            seg_len.append(lens[sid])

        def bcast(ts, ax):
            shape = [1] * nd
            shape[ax] = ts.numel()
            return ts.view(shape)

        tile_id = torch.zeros((), dtype=torch.long)
        within = torch.zeros((), dtype=torch.long)
        src = torch.zeros((), dtype=torch.long)
        pad = torch.zeros((), dtype=torch.bool)
        stride = 1
        for ax in range(nd):
            tile_id = tile_id * counts[ax] + bcast(seg_of[ax], ax)
            within = within * bcast(seg_len[ax], ax) + bcast(off_in[ax], ax)
        for ax in range(nd - 1, -1, -1):
            o = bcast(self.axes[ax].order, ax)
            src = src + o.clamp(min=0) * stride
            pad = pad | (o < 0)
            stride *= grid[ax]
        num_tokens = math.prod(grid)
        out_pos = (self.tile_offsets[tile_id] + within).reshape(-1)
        src = torch.where(pad, torch.full_like(src, num_tokens), src).reshape(-1)
        perm = torch.empty(length, dtype=torch.long)
        perm[out_pos] = src
        super().__init__(perm, num_tokens)
        uniform = all(len(set(a.segments)) == 1 for a in self.axes)
        self.tile_shape: Optional[tuple[int, ...]] = (
            tuple(a.segments[0] for a in self.axes) if uniform else None)

    @property
    def num_tiles(self) -> int:
        return int(self.tile_offsets.numel() - 1)

    def tile_of_position(self) -> torch.Tensor:
        """long (L,): the tile holding each permuted position."""
        sizes = self.tile_offsets[1:] - self.tile_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_tiles), sizes)

    def __repr__(self) -> str:
        return (f"TileLayout(grid={self.grid}, tiles={self.tile_counts}, tile_shape={self.tile_shape}, "
                f"num_tokens={self.num_tokens}, length={self.length})")


def tile_layout(grid: IntOrSeq, tile: IntOrSeq, *, pad: bool = False, dilation: IntOrSeq = 1) -> TileLayout:
    """Tile a row-major grid into cuboids of shape ``tile`` (tiles in row-major tile order).

    Args:
        grid: axis lengths, e.g. (T, H, W); 1, 2 or 3 axes (any number works).
        tile: tile extent per axis (an int applies to every axis). Tiles that do not
            divide an axis leave a smaller edge tile (``pad=False``) or are padded to full
            size (``pad=True``).
        pad: pad edge tiles so every tile has ``prod(tile)`` positions.
        dilation: per axis, tile each residue class ``i % dilation`` separately.

    Returns:
        a :class:`TileLayout`. Example: ``layout.apply(q)`` (B, N, H, D) -> (B, L, H, D).

    Raises:
        ValueError: non-positive sizes, or as many entries as axes not given.
    """
    g = check_grid(grid)
    t = _broadcast("tile", tile, len(g))
    d = _broadcast("dilation", dilation, len(g))
    for ax, (n, dd) in enumerate(zip(g, d)):
        if dd > n:
            raise ValueError(f"dilation={d!r} exceeds the grid {g} on axis {ax}; use dilation <= axis length")
    axes = [_axis_tiling(n, tt, dd, pad) for n, tt, dd in zip(g, t, d)]
    return TileLayout(g, axes)


def partition_layout(grid: IntOrSeq, segments: Sequence[Sequence[int]]) -> TileLayout:
    """Partition a grid into blocks given the segment sizes along every axis (no padding).

    Args:
        grid: axis lengths.
        segments: per axis, block extents summing to the axis length, e.g.
            ``[(3,) * 7, (30,), (52,)]`` for 1D temporal blocks of 3 frames on (21, 30, 52).
    """
    g = check_grid(grid)
    if len(segments) != len(g):
        raise ValueError(f"segments has {len(segments)} axes but grid {g} has {len(g)}")
    axes = []
    for ax, (n, segs) in enumerate(zip(g, segments)):
        segs = tuple(int(s) for s in segs)
        if sum(segs) != n or any(s <= 0 for s in segs):
            raise ValueError(f"segments[{ax}]={segs} must be positive and sum to the axis length {n}")
        axes.append(AxisTiling(n, torch.arange(n), segs))
    return TileLayout(g, axes)


def axis_order(grid: Sequence[int], order: str) -> TokenPermutation:
    """Reorder a (F, H, W) grid so that tokens iterate ``order[0]`` slowest, ``order[2]`` fastest.

    ``"FHW"`` is the identity (row-major frames, rows, columns); ``"HWF"`` puts all frames
    of one spatial position next to each other. One of :data:`AXIS_ORDERS`.
    """
    g = check_grid(grid)
    if len(g) != 3:
        raise ValueError(f"axis_order needs a 3-axis (frames, height, width) grid, got {g}")
    if order not in AXIS_ORDERS:
        raise ValueError(f"order={order!r} is not one of {AXIS_ORDERS}")
    dims = tuple("FHW".index(c) for c in order)
    perm = torch.arange(math.prod(g)).view(g).permute(dims).reshape(-1)
    return TokenPermutation(perm, math.prod(g))
