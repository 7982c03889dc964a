"""VMoBA: mixture of block attention for video, on the block-sparse engine.

Every self-attention layer partitions the (T, H, W) video token grid into blocks, scores
every key block for every query block, and attends only the selected key blocks.

**Partitions cycle with the layer index** (``layer`` is the index of the patched
self-attention layer)::

    layer % 3 == 0   temporal (1D)        whole frames:  temporal_block x H x W
    layer % 3 == 1   spatial (2D)         all frames of a patch:  T x spatial_block
    layer % 3 == 2   spatiotemporal (3D)  cuboids:  spatiotemporal_block

Block extents are given in tokens per axis. An extent larger than the axis is clipped to
it; an extent that does not divide the axis leaves a smaller last block on that axis
(grid 5 x 8 x 8 with spatial block (3, 3): rows 3, 3, 2 and columns 3, 3, 2). Blocks are
numbered in row-major block order and each block's tokens keep their row-major order.

**Query blocks.** Each partition block's tokens, in that order, are cut into query blocks
of ``block_size`` tokens (the last query block of a partition block may be shorter), so
a query block never spans two partition blocks: its own block is well defined. In the
kernel's token order (q, k and v are permuted once and the output is permuted back),
every partition block is padded to a multiple of ``block_size``; pad keys are excluded by
the mask's token tiles, pad queries are dropped on the way back::

    grid order ──permute──> | block 0 ....... pad | block 1 ..... pad | ...
                              \\_ query blocks _/    (block_size positions each)

On the CPU torch path, when a key block size g >= min(block_size, 32) divides every
partition block, the keys are laid out without padding in blocks of g tokens instead
(no token tiles, which that path runs much faster); the selection is the same.

**Score** of key block ``j`` for query block ``i`` (per batch element and head), in fp32::

    score[i, j] = mean(q over query block i) · mean(k over key block j)

which is the mean over the query block's queries of VMoBA's per-query score ``q · mean(k)``
(no softmax scale: the selection rules below do not depend on it).

**Selection** (per batch element and head; the own block is always attended):

* ``topk``: each query block attends its own block and the ``top_k - 1`` other blocks with
  the highest scores (``top_k`` counts the own block, as in the official code, which
  boosts the own block's score before taking the top k). ``top_k`` is given per layer
  kind (1D, 2D, 3D). Ties go to the lower block index.
* ``threshold`` (per query block): scores are min-max normalised over the row
  (``n[j] = (s[j] - min) / (max - min)``); starting from the own block, the other blocks
  are added in decreasing ``n`` until the selected mass reaches ``threshold`` times the
  row's total mass: the smallest such set.
* ``threshold_global`` (per head, VMoBA's "global block selection"): the same, with the
  min-max normalisation, the total mass and the ranking taken over every (query block,
  key block) pair of the head, so query blocks with concentrated scores get more blocks
  and diffuse ones fewer. The own blocks of all query blocks count first.

When all scores of a row (``threshold``) or head (``threshold_global``) are equal, there is
no ranking to act on and every block is selected. The official code differs in one
detail: it always adds at least one block beyond the own block in threshold mode, even
when the own block alone reaches the threshold; here the set is the smallest one, as the
paper defines it.

Presets (:data:`PRESETS`, ``VMoBAConfig.preset(name)``), from the paper's settings:
``training-free`` (local + top-k 2 / 6 / 18 with the 480p blocks, first 25% of steps
dense) and ``training`` (global threshold 0.25 with the 576p blocks).

Example::

    >>> cfg = VMoBAConfig.preset("training-free")
    >>> handle = sparsegen.apply(pipe, cfg)

Benchmarks and custom models can build one layer's mask directly with
:func:`vmoba_mask` or run :func:`vmoba_attention`.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence, Union

import torch

from ..kernels import BlockSparseMask, block_sparse_attention
from ..tiling import TokenPermutation, check_grid, partition_layout
from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod, config_error

__all__ = [
    "Selection",
    "LAYER_KINDS",
    "PRESETS",
    "VMoBAConfig",
    "VMoBAMethod",
    "VMoBAPartition",
    "vmoba_partition",
    "vmoba_block_scores",
    "select_blocks",
    "vmoba_mask",
    "vmoba_selection",
    "vmoba_attention",
]

# Smallest key block the torch path uses for unpadded keys (smaller blocks cost more in
# per-block overhead than the token tiles of the padded layout).
_MIN_UNPADDED_KEY_BLOCK = 32

# Layer kind of layer l is LAYER_KINDS[l % 3].
LAYER_KINDS = ("temporal", "spatial", "spatiotemporal")


class Selection(str, enum.Enum):
    """How key blocks are selected (see the module docstring)."""

    TOPK = "topk"
    THRESHOLD = "threshold"
    THRESHOLD_GLOBAL = "threshold_global"


# The paper's settings. Block extents are in latent tokens (after patchify):
# training-free, Wan 2.1 480p 81 frames, grid 21 x 30 x 52: 1D 3 frames (7 blocks),
# 2D 5 x 13 (24 blocks), 3D 7 x 5 x 13 (72 blocks), top-k 2 / 6 / 18;
# training, 576p 93 frames, grid 24 x 36 x 64: 1D 3 frames (8 blocks), 2D 6 x 8 (48),
# 3D 8 x 12 x 8 (72), global threshold 0.25.
PRESETS: dict[str, dict] = {
    "training-free": dict(temporal_block=3, spatial_block=(5, 13), spatiotemporal_block=(7, 5, 13),
                          selection="topk", top_k=(2, 6, 18), dense_step_fraction=0.25),
    "training": dict(temporal_block=3, spatial_block=(6, 8), spatiotemporal_block=(8, 12, 8),
                     selection="threshold_global", threshold=0.25),
}


def _is_int(x, low: int = 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class VMoBAConfig(MethodConfig):
    """VMoBA options. The defaults are the paper's training-free setting, every step sparse.

    Args:
        temporal_block: frames per block of the 1D (temporal) layers.
        spatial_block: (rows, columns) per block of the 2D (spatial) layers; a block spans
            every frame.
        spatiotemporal_block: (frames, rows, columns) per block of the 3D layers.
        selection: ``"topk"``, ``"threshold"`` (per query block) or ``"threshold_global"``
            (per head); a :class:`Selection`.
        top_k: key blocks per query block, own block included, for ``topk``: an int for
            every layer kind or (1D, 2D, 3D). Clipped to the number of blocks.
        threshold: share of the normalised score mass the selected blocks must reach,
            in (0, 1], for the threshold modes.
        block_size: query block and kernel block size in tokens, a multiple of 16
            (default 128).
        dense_step_fraction: the denoising steps whose index is below this fraction of
            the generation's steps run dense (0.25 of 50 steps: steps 0 to 12), in [0, 1).
            Adds to ``dense_steps``; needs the number of steps (pipelines provide it).
        dense_steps, dense_last_steps, dense_layers, backend, version: see MethodConfig.
    """

    method: ClassVar[str] = "vmoba"
    presets: ClassVar[dict] = PRESETS
    temporal_block: int = 3
    spatial_block: tuple[int, int] = (5, 13)
    spatiotemporal_block: tuple[int, int, int] = (7, 5, 13)
    selection: Selection = Selection.TOPK
    top_k: Union[int, tuple[int, int, int]] = (2, 6, 18)
    threshold: float = 0.25
    block_size: int = 128
    dense_step_fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not _is_int(self.temporal_block):
            raise config_error(name, "temporal_block", self.temporal_block, "must be an int >= 1 (frames per block)")
        for f, n, what in (("spatial_block", 2, "(rows, columns)"),
                           ("spatiotemporal_block", 3, "(frames, rows, columns)")):
            v = getattr(self, f)
            if isinstance(v, list):
                v = tuple(v)
            if not (isinstance(v, tuple) and len(v) == n and all(_is_int(x) for x in v)):
                raise config_error(name, f, getattr(self, f), f"must be {n} ints >= 1: {what} in tokens")
            object.__setattr__(self, f, v)
        try:
            object.__setattr__(self, "selection", Selection(self.selection))
        except ValueError:
            raise config_error(name, "selection", self.selection,
                               f"must be one of {[s.value for s in Selection]}") from None
        k = self.top_k
        if isinstance(k, list):
            k = tuple(k)
        if not (_is_int(k) or (isinstance(k, tuple) and len(k) == 3 and all(_is_int(x) for x in k))):
            raise config_error(name, "top_k", self.top_k,
                               "must be an int >= 1 or 3 ints >= 1 (1D, 2D, 3D layers), own block included")
        object.__setattr__(self, "top_k", k)
        t = self.threshold
        if not (_is_number(t) and 0 < t <= 1):
            raise config_error(name, "threshold", t, "must be a number in (0, 1] (the paper uses 0.25)")
        object.__setattr__(self, "threshold", float(t))
        b = self.block_size
        if not (_is_int(b, 16) and b % 16 == 0):
            raise config_error(name, "block_size", b, "must be a positive multiple of 16 (e.g. 64 or 128)")
        f = self.dense_step_fraction
        if not (_is_number(f) and 0 <= f < 1):
            raise config_error(name, "dense_step_fraction", f, "must be a number in [0, 1) (0.25: first quarter)")
        object.__setattr__(self, "dense_step_fraction", float(f))

    def top_k_for(self, layer: int) -> int:
        """``top_k`` of the layer's kind."""
        return self.top_k if isinstance(self.top_k, int) else self.top_k[layer % 3]

    def block_extent(self, layer: int, grid: Sequence[int]) -> tuple[int, int, int]:
        """(frames, rows, columns) extent of the layer's blocks on ``grid``, clipped to the grid."""
        t, h, w = grid
        kind = layer % 3
        if kind == 0:
            ext = (self.temporal_block, h, w)
        elif kind == 1:
            ext = (t,) + tuple(self.spatial_block)
        else:
            ext = tuple(self.spatiotemporal_block)
        return tuple(min(e, n) for e, n in zip(ext, grid))

    def step_is_dense(self, step: Optional[int], num_steps: Optional[int]) -> bool:
        if super().step_is_dense(step, num_steps):
            return True
        if step is None or self.dense_step_fraction == 0:
            return False
        if num_steps is None:
            raise ValueError(
                f"VMoBAConfig.dense_step_fraction={self.dense_step_fraction} needs the number of denoising steps, "
                "which is unknown here (a bare transformer); call handle.reset_schedule(num_steps=...) before "
                "generating, or use dense_steps=<int> instead"
            )
        return step < self.dense_step_fraction * num_steps


# ------------------------------------------------------------------ partitions
def _segments(n: int, extent: int) -> tuple[int, ...]:
    """Blocks of ``extent`` along an axis of length ``n``; the last one takes the remainder."""
    full, rest = divmod(n, extent)
    return (extent,) * full + ((rest,) if rest else ())


@dataclass(frozen=True, eq=False)
class VMoBAPartition:
    """One layer kind's partition of a grid, laid out for the kernel.

    Attributes:
        grid: (T, H, W).
        kind: 0 temporal, 1 spatial, 2 spatiotemporal.
        extent: block extent per axis (clipped to the grid).
        block_size: query / kernel block size.
        permutation: grid order -> kernel order (N -> L positions, padding included).
        block_tokens: long (P,): real tokens of each partition block.
        block_offsets: long (P + 1,): first kernel position of each block (multiples of
            ``block_size``).
        position_block: long (L,): partition block of each kernel position.
        query_block_owner: long (Qb,): partition block of each query (= kernel) block.
        query_block_tokens: long (Qb,): real tokens of each query block.
        kv_tile_ids: int32 (Qb,): -1 for kernel key blocks without padding, else an index
            into ``tiles``; ``tiles`` bool (T, block_size, block_size) keeps the real columns.
        unpadded_keys: None, or (key permutation without padding (N -> N), key block size
            g, long (N / g,) partition block of each key block) when a g >= min(block_size,
            32) divides every partition block: keys then need neither padding nor tiles.
        kernel_blocks_per_block: most kernel blocks one partition block spans (padded
            order); ``unpadded_blocks_per_block`` the same in blocks of g (unpadded keys).
            Host ints, so a selection's mask width is known without reading the device.
    """

    grid: tuple[int, int, int]
    kind: int
    extent: tuple[int, int, int]
    block_size: int
    permutation: TokenPermutation
    block_tokens: torch.Tensor
    block_offsets: torch.Tensor
    position_block: torch.Tensor
    query_block_owner: torch.Tensor
    query_block_tokens: torch.Tensor
    kv_tile_ids: torch.Tensor
    tiles: Optional[torch.Tensor]
    unpadded_keys: Optional[tuple[TokenPermutation, int, torch.Tensor]] = None
    kernel_blocks_per_block: int = 1
    unpadded_blocks_per_block: int = 1

    @property
    def num_blocks(self) -> int:
        return int(self.block_tokens.numel())

    @property
    def num_query_blocks(self) -> int:
        return int(self.query_block_owner.numel())

    @property
    def length(self) -> int:
        return self.permutation.length

    def to(self, device) -> "VMoBAPartition":
        device = torch.device(device)
        if self.block_tokens.device == device:
            return self
        return VMoBAPartition(
            self.grid, self.kind, self.extent, self.block_size, self.permutation,
            self.block_tokens.to(device), self.block_offsets.to(device), self.position_block.to(device),
            self.query_block_owner.to(device), self.query_block_tokens.to(device), self.kv_tile_ids.to(device),
            None if self.tiles is None else self.tiles.to(device),
            None if self.unpadded_keys is None else (self.unpadded_keys[0], self.unpadded_keys[1],
                                                     self.unpadded_keys[2].to(device)),
            self.kernel_blocks_per_block, self.unpadded_blocks_per_block,
        )

    def block_mask(self, selected: torch.Tensor, *, unpadded_keys: bool = False,
                   max_selected: Optional[int] = None) -> BlockSparseMask:
        """The kernel mask of a block selection.

        Args:
            selected: bool (B, H, Qb, P): query block i attends partition block j.
            unpadded_keys: keys in ``unpadded_keys[0]``'s order (no padding, no tiles)
                instead of the padded order; needs ``unpadded_keys``.
            max_selected: at most this many partition blocks per query block (top-k's k,
                or P): the mask's width follows from it and nothing is read back from the
                device. None reads the widest row (one host read).
        Returns:
            BlockSparseMask, layout (B, H, Qb, Kb): q_len = L, kv_len = L (padded keys, Kb =
            Qb) or N (unpadded keys, Kb = N / g).
        """
        if unpadded_keys:
            if self.unpadded_keys is None:
                raise ValueError(f"no key block size divides every partition block of grid {self.grid} "
                                 f"(blocks of {sorted(set(self.block_tokens.tolist()))} tokens)")
            kv_perm, g, kv_owner = self.unpadded_keys
            blocks = selected.index_select(-1, kv_owner.to(selected.device))
            width = None if max_selected is None else max_selected * self.unpadded_blocks_per_block
            return BlockSparseMask.from_block_matrix(blocks, q_len=self.length, kv_len=kv_perm.num_tokens,
                                                     q_block_size=self.block_size, kv_block_size=g,
                                                     max_blocks=width)
        kv_owner = self.query_block_owner.to(selected.device)
        blocks = selected.index_select(-1, kv_owner)
        n = self.length
        b = self.block_size
        width = None if max_selected is None else max_selected * self.kernel_blocks_per_block
        if self.tiles is None:
            return BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=b, kv_block_size=b,
                                                     max_blocks=width)
        tile_ids = self.kv_tile_ids.to(selected.device).view(1, 1, 1, -1)
        return BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=b, kv_block_size=b,
                                                 tile_ids=tile_ids, tiles=self.tiles.to(selected.device),
                                                 max_blocks=width)


def vmoba_partition(grid, layer: int, config: VMoBAConfig) -> VMoBAPartition:
    """The partition layer ``layer`` uses on ``grid`` (kind ``layer % 3``), laid out for the kernel.

    Args:
        grid: (frames, height, width) token counts, or an AttentionGeometry.
        layer: patched layer index >= 0.
        config: block extents and block size.
    """
    g = check_grid(grid, 3)
    if not _is_int(layer, 0):
        raise ValueError(f"layer must be an int >= 0, got layer={layer!r}")
    return _build_partition(g, layer % 3, config.block_extent(layer, g), config.block_size)


# Partitions depend only on (grid, kind, extent, block size): memoised so that repeated
# functional calls (vmoba_attention, vmoba_mask) do not rebuild them. Methods also keep
# their own per-instance cache.
@functools.lru_cache(maxsize=32)
def _build_partition(g: tuple[int, int, int], kind: int, ext: tuple[int, int, int], bs: int) -> VMoBAPartition:
    layout = partition_layout(g, [_segments(n, e) for n, e in zip(g, ext)])
    sizes = layout.tile_offsets[1:] - layout.tile_offsets[:-1]
    padded = (sizes + bs - 1) // bs * bs
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    length = int(offsets[-1])
    n = layout.num_tokens
    # Position of every unpadded laid-out token once each block is padded to a multiple of bs.
    block_of = layout.tile_of_position()
    new_pos = offsets[block_of] + (torch.arange(n) - layout.tile_offsets[block_of])
    perm = torch.full((length,), n, dtype=torch.long)
    perm[new_pos] = layout.perm
    permutation = TokenPermutation(perm, n)
    position_block = torch.repeat_interleave(torch.arange(sizes.numel()), padded)
    qb = length // bs
    owner = position_block[::bs].contiguous()
    real = permutation.valid.view(qb, bs).sum(1)
    tile_ids = torch.full((qb,), -1, dtype=torch.int32)
    partial = (real < bs).nonzero().squeeze(1)
    tiles = None
    if partial.numel():
        widths = sorted(set(real[partial].tolist()))
        cols = torch.arange(bs)
        tiles = torch.stack([(cols < w).expand(bs, bs) for w in widths])
        lookup = {w: i for i, w in enumerate(widths)}
        tile_ids[partial] = torch.tensor([lookup[w] for w in real[partial].tolist()], dtype=torch.int32)
    unpadded = None
    unpadded_per_block = 1
    if tiles is not None:
        common = math.gcd(*sizes.tolist())
        kv_block = max(d for d in range(1, min(bs, common) + 1) if common % d == 0)
        if kv_block >= min(bs, _MIN_UNPADDED_KEY_BLOCK):
            unpadded = (layout, kv_block, block_of[::kv_block].contiguous())
            unpadded_per_block = int(sizes.max()) // kv_block
    return VMoBAPartition(g, kind, ext, bs, permutation, sizes, offsets, position_block, owner, real,
                          tile_ids, tiles, unpadded, int(padded.max()) // bs, unpadded_per_block)


# ------------------------------------------------------------------ selection
def vmoba_block_scores(qp: torch.Tensor, kp: torch.Tensor, partition: VMoBAPartition) -> torch.Tensor:
    """Score of every partition block for every query block: mean(q) · mean(k), in fp32.

    Args:
        qp, kp: (B, L, H, D) queries and keys in the partition's kernel order (padding
            positions zero, as ``partition.permutation.apply`` leaves them).
    Returns:
        fp32 (B, H, Qb, P).
    """
    b, length, h, d = qp.shape
    if length != partition.length or kp.shape[1] != partition.length:
        raise ValueError(f"qp and kp must be in the partition's kernel order of {partition.length} positions; "
                         f"got {tuple(qp.shape)=}, {tuple(kp.shape)=}")
    bs = partition.block_size
    dev = qp.device
    q_mean = qp.float().view(b, partition.num_query_blocks, bs, h, d).sum(2)
    q_mean = q_mean / partition.query_block_tokens.to(dev).view(1, -1, 1, 1)
    k_sum = torch.zeros(b, partition.num_blocks, h, d, dtype=torch.float32, device=dev)
    k_sum.index_add_(1, partition.position_block.to(dev), kp.float())
    k_mean = k_sum / partition.block_tokens.to(dev).view(1, -1, 1, 1)
    return torch.einsum("bqhd,bphd->bhqp", q_mean, k_mean)


def _threshold_rows(scores: torch.Tensor, own: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold selection along the last dim (a query block's row, or a whole head flattened).

    Scores are min-max normalised along the row; after the own entries, the others are
    taken in decreasing order (stable: ties keep index order) while the mass taken so far
    is below ``threshold`` times the row's total: the smallest set reaching it. Rows of
    equal scores select everything.
    """
    lo, hi = scores.amin(-1, keepdim=True), scores.amax(-1, keepdim=True)
    flat = hi <= lo
    spread = torch.where(flat, torch.ones_like(hi), hi - lo)
    norm = torch.where(flat, torch.zeros_like(scores), (scores - lo) / spread)
    total = norm.sum(-1, keepdim=True)
    own_mass = (norm * own).sum(-1, keepdim=True)
    order = torch.sort(norm.masked_fill(own, float("-inf")), dim=-1, descending=True, stable=True).indices
    values = norm.masked_fill(own, 0.0).gather(-1, order)
    before = torch.cumsum(values, -1) - values  # mass of the others taken before this one
    take = (own_mass + before < threshold * total) & ~own.gather(-1, order)
    return torch.zeros_like(own).scatter(-1, order, take) | own | flat


def select_blocks(scores: torch.Tensor, owner: torch.Tensor, *, selection: Union[str, Selection],
                  top_k: int = 1, threshold: float = 0.25) -> torch.Tensor:
    """Select key blocks from block scores (the own block is always selected).

    Args:
        scores: (B, H, Qb, P) block scores.
        owner: long (Qb,): each query block's own partition block.
        selection: ``topk``, ``threshold`` or ``threshold_global`` (module docstring).
        top_k: blocks per query block including the own block (``topk``).
        threshold: mass share in (0, 1] (threshold modes).
    Returns:
        bool (B, H, Qb, P).
    """
    selection = Selection(selection)
    bsz, h, qb, p = scores.shape
    own = torch.zeros(qb, p, dtype=torch.bool, device=scores.device)
    own[torch.arange(qb, device=scores.device), owner.to(scores.device)] = True
    own = own.expand(bsz, h, qb, p)
    s = scores.double()
    if selection == Selection.TOPK:
        k = min(int(top_k), p)
        key = s.masked_fill(own, float("inf"))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros_like(own).scatter(-1, order, True)
    if selection == Selection.THRESHOLD:
        return _threshold_rows(s, own, threshold)
    # Global per head: one ranking over all (query block, key block) pairs of the head.
    return _threshold_rows(s.reshape(bsz, h, qb * p), own.reshape(bsz, h, qb * p), threshold).view(bsz, h, qb, p)


def _check_qk(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int]) -> None:
    n = math.prod(grid)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != n:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be (batch, {n}, heads, head_dim) for grid {grid} (frames x height x "
                             f"width tokens, row-major); got {name}.shape={shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got {tuple(q.shape)=}, {tuple(k.shape)=}")


def _partition_for_inputs(q, k, grid, layer, config) -> tuple[VMoBAConfig, VMoBAPartition]:
    """Check the public functions' arguments; the config (default VMoBAConfig()) and the partition on q's device."""
    config = VMoBAConfig() if config is None else config
    if not isinstance(config, VMoBAConfig):
        raise TypeError(f"config must be a VMoBAConfig, got {type(config).__name__}")
    g = check_grid(grid, 3)
    _check_qk(q, k, g)
    return config, vmoba_partition(g, layer, config).to(q.device)


def _select_for(partition: VMoBAPartition, qp: torch.Tensor, kp: torch.Tensor, layer: int,
                config: VMoBAConfig) -> torch.Tensor:
    with torch.no_grad():
        scores = vmoba_block_scores(qp.detach(), kp.detach(), partition)
        return select_blocks(scores, partition.query_block_owner, selection=config.selection,
                             top_k=config.top_k_for(layer), threshold=config.threshold)


def vmoba_selection(q: torch.Tensor, k: torch.Tensor, grid, layer: int,
                    config: Optional[VMoBAConfig] = None) -> tuple[VMoBAPartition, torch.Tensor]:
    """The partition of layer ``layer`` and the partition blocks each query block selects
    (arguments as :func:`vmoba_mask`).

    Returns:
        (partition, selected bool (B, H, Qb, P)); ``partition.block_mask(selected)`` is
        the layer's kernel mask.
    """
    config, part = _partition_for_inputs(q, k, grid, layer, config)
    qp, kp = part.permutation.apply(q), part.permutation.apply(k)
    return part, _select_for(part, qp, kp, layer, config)


def vmoba_mask(q: torch.Tensor, k: torch.Tensor, grid, layer: int,
               config: Optional[VMoBAConfig] = None) -> tuple[BlockSparseMask, TokenPermutation]:
    """The block mask VMoBA layer ``layer`` uses for these queries and keys.

    Args:
        q, k: (B, N, H, D), N = T * H * W, row-major (frame, row, column) order.
        grid: (T, H, W) token grid (or an AttentionGeometry).
        layer: layer index (its kind is ``layer % 3``).
        config: VMoBA options (default ``VMoBAConfig()``).

    Returns:
        (mask, permutation): run ``block_sparse_attention(permutation.apply(q),
        permutation.apply(k), permutation.apply(v), mask)`` and map the output back with
        ``permutation.invert(out)``. The mask's layout is (B, H, Qb, Qb).

    Example::

        >>> mask, perm = vmoba_mask(q, k, (21, 30, 52), layer=2, config=VMoBAConfig.preset("training-free"))
        >>> out = perm.invert(block_sparse_attention(perm.apply(q), perm.apply(k), perm.apply(v), mask))
    """
    part, selected = vmoba_selection(q, k, grid, layer, config)
    return part.block_mask(selected), part.permutation


def _attend(part: VMoBAPartition, q, k, v, layer: int, config: VMoBAConfig, backend: str, stats: Optional[dict]):
    perm = part.permutation
    qp, kp = perm.apply(q), perm.apply(k)
    selected = _select_for(part, qp, kp, layer, config)
    # The CPU torch path runs masks without token tiles much faster (it can merge query
    # blocks and skips the per-token bias), so there keys go unpadded when a key block
    # size divides every partition block. The Triton kernels prefer power-of-two blocks.
    torch_path = backend == "torch" or (backend == "auto" and q.device.type != "cuda")
    # The mask's width is bounded on the host (top-k's k, else every block), so building
    # it reads nothing back from the device.
    k_max = min(config.top_k_for(layer), part.num_blocks) if config.selection == Selection.TOPK else part.num_blocks
    if torch_path and part.unpadded_keys is not None:
        kv_perm = part.unpadded_keys[0]
        mask = part.block_mask(selected, unpadded_keys=True, max_selected=k_max)
        kp, vp = kv_perm.apply(k), kv_perm.apply(v)
    else:
        mask = part.block_mask(selected, max_selected=k_max)
        vp = perm.apply(v)
    out, lse = block_sparse_attention(qp, kp, vp, mask, return_lse=True, backend=backend)
    if stats is not None:
        # Kept on the device (0-dim tensors): read only when a user asks for them.
        n = perm.num_tokens
        pairs = (selected.double() * part.query_block_tokens.to(selected.device).view(-1, 1)
                 * part.block_tokens.to(selected.device).view(1, -1)).sum() / (n * n)
        b, h, qb, kb = mask.shape
        stats["density"] = mask.kv_num_blocks.sum(dtype=torch.float32) / (b * h * qb * kb)
        stats["token_density"] = pairs / (selected.shape[0] * selected.shape[1])
        stats["blocks"] = part.num_blocks
        stats["head_blocks"] = mask.kv_num_blocks.sum(dim=(0, 2), dtype=torch.float32)  # (H,) this call's work
    return perm.invert(out), perm.invert(lse, dim=2)


def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, layer: int,
                    config: Optional[VMoBAConfig] = None, backend: str = "auto", return_lse: bool = False):
    """VMoBA self-attention of one layer over a video token grid (differentiable).

    Args:
        q, k, v: (B, N, H, D), N = T * H * W, row-major (frame, row, column) order.
        grid: (T, H, W) token grid.
        layer: layer index (kind ``layer % 3``: temporal, spatial, spatiotemporal).
        config: VMoBA options (default ``VMoBAConfig()``); its ``backend`` is ignored in
            favour of ``backend``.
        backend: engine backend (``auto``, ``triton``, ``torch``, ``reference``).
        return_lse: also return the fp32 (B, H, N) log-sum-exp.

    Returns:
        out (B, N, H, D) (and the LSE).
    """
    config, part = _partition_for_inputs(q, k, grid, layer, config)
    if v.shape != q.shape:
        raise ValueError(f"v must have q's shape {tuple(q.shape)}; got {tuple(v.shape)=}")
    out, lse = _attend(part, q, k, v, layer, config, backend, None)
    return (out, lse) if return_lse else out


class VMoBAMethod(SparseAttentionMethod):
    """VMoBA over the video tokens; partitions are cached per (geometry, layer kind, device),
    block selection runs on every call."""

    config_cls = VMoBAConfig
    reports_head_work = True

    def partition_for(self, geometry: AttentionGeometry, layer: int, device="cpu") -> VMoBAPartition:
        """The (cached) partition of layer ``layer`` on ``geometry``."""
        dev = torch.device(device)

        def build():
            if dev.type != "cpu":
                return self.partition_for(geometry, layer, "cpu").to(dev)
            return vmoba_partition(geometry.grid, layer, self.config)

        return self.cached(("vmoba_partition", geometry, layer % 3, str(dev)), build)

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        """Every grid is served (blocks that do not divide it are smaller at the end)."""
        for kind in range(3):
            self.partition_for(geometry, kind)

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        for kind in range(3):
            self.partition_for(geometry, kind, device)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """VMoBA attention of layer ``call.layer``.

        Args:
            q, k, v: (B, N, H, D), N = call.geometry.num_tokens, row-major (frame, row, column).
        Returns:
            out (B, N, H, D) and lse fp32 (B, H, N). ``call.stats`` gets ``density`` (visited
            kernel blocks, padding included), ``token_density`` (attended token pairs),
            ``blocks`` (partition blocks of the layer) and ``head_blocks`` ((H,) visited
            blocks per head).
        """
        g = call.geometry
        if q.dim() != 4 or q.shape[1] != g.num_tokens:
            raise ValueError(f"VMoBA attention expects q of shape (batch, {g.num_tokens}, heads, head_dim) for "
                             f"geometry {g.grid}; got {tuple(q.shape)=}")
        part = self.partition_for(g, call.layer, q.device)
        return _attend(part, q, k, v, call.layer, self.config, call.backend, call.stats)
