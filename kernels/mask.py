"""The one mask type of the engine: a block layout per (batch, head, query block).

Layout (the same as PyTorch FlexAttention's ``BlockMask``, so masks convert both ways)::

    query blocks  (q_block_size tokens each, the last one may be partial)
        |
        v
    kv_num_blocks[b, h, i]      how many key blocks query block i visits
    kv_indices[b, h, i, :n]     which ones, ascending (entries past n are padding)
    tile_ids[b, h, i, :n]       -1: the whole block is attended ("full block")
                                t >= 0: only the tokens set in tiles[t] ("partial block")
    tiles[t]                    bool (q_block_size, kv_block_size) token mask

The batch and head dimensions of the layout may be 1 and then broadcast over the
attention's batch and heads. Tokens past ``q_len`` / ``kv_len`` in the last block
never take part; the kernels mask them, so any sequence length works.

A query token whose row is empty (possible only through tiles) gets a zero output
and a log-sum-exp of -inf, on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

__all__ = ["BlockSparseMask", "KernelLayout", "MaskModFn", "kernel_layout_from_lists"]

# FlexAttention's mask_mod signature: (b, h, q_idx, kv_idx) -> bool tensor.
MaskModFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_count(length: int, block_size: int) -> int:
    """Number of blocks covering ``length`` tokens (the last block may be partial)."""
    return -(-length // block_size)


class KernelLayout(NamedTuple):
    """A block layout as the Triton kernels walk it: full blocks first, partial blocks after.

    Per (batch, head, block ``i`` of the walking side)::

        indices[b, h, i, :num_full]         full blocks: every token pair attended, no mask work
        indices[b, h, i, num_full:num]      partial blocks: a token tile, or the last block of a
                                            sequence that does not fill it
        tile_ids[b, h, i, :num]             tile of each entry, -1 for none (full, or only short)

    Attributes:
        num, num_full: int32 (B, H, NB); B, H may be 1 (broadcast), as in the mask.
        indices, tile_ids: int32 (B, H, NB, K), contiguous; entries past ``num`` are padding.
        tiles: uint8 (T, q_block_size, kv_block_size), contiguous, or None (no token tiles).
    """

    num: torch.Tensor
    num_full: torch.Tensor
    indices: torch.Tensor
    tile_ids: torch.Tensor
    tiles: Optional[torch.Tensor]


def kernel_layout_from_lists(num: torch.Tensor, indices: torch.Tensor, tile_ids: Optional[torch.Tensor],
                             tiles: Optional[torch.Tensor], *, short_block: Optional[int]) -> KernelLayout:
    """Reorder block lists into a :class:`KernelLayout`, on the lists' device and without host syncs.

    Args:
        num: int (B, H, NB) visited blocks per row of the layout.
        indices: int (B, H, NB, K) visited blocks (any order; entries past ``num`` ignored).
        tile_ids: int (B, H, NB, K) or None: token tile per entry, -1 for a whole block.
        tiles: bool or uint8 (T, q_block_size, kv_block_size), any strides, or None.
        short_block: index of the walked side's last block when it is shorter than a block
            (its sequence length is not a multiple of the block size), else None.

    A block is partial when it has a token tile or is ``short_block``; the order inside
    each group is kept (a stable sort), so both stay ascending when ``indices`` is.
    """
    k = indices.shape[-1]
    valid = torch.arange(k, device=indices.device) < num[..., None].long()
    tid = (torch.full(indices.shape, -1, dtype=torch.int32, device=indices.device) if tile_ids is None
           else tile_ids.to(torch.int32))
    partial = tid >= 0
    if short_block is not None:
        partial = partial | (indices == short_block)
    # 0: full, 1: partial, 2: padding.
    group = torch.where(valid, partial.to(torch.int8), torch.full_like(partial, 2, dtype=torch.int8))
    order = torch.sort(group, dim=-1, stable=True).indices
    num_full = (valid & ~partial).sum(-1).to(torch.int32)
    if tiles is not None:
        tiles = tiles.contiguous().view(torch.uint8) if tiles.dtype == torch.bool else tiles.to(torch.uint8).contiguous()
    return KernelLayout(num.to(torch.int32).contiguous(), num_full.contiguous(),
                        torch.gather(indices.to(torch.int32), -1, order).contiguous(),
                        torch.gather(tid, -1, order).contiguous(), tiles)


_VISITS_EVERY_BLOCK = ("visits_every_block",)  # the mask cache key of visits_every_block()


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """Block-sparse attention layout. Build it with a ``from_*`` constructor.

    Attributes:
        kv_num_blocks: int32 (B, H, Qb).
        kv_indices: int32 (B, H, Qb, K), K >= max(kv_num_blocks), ascending per row.
        q_len, kv_len: true sequence lengths.
        q_block_size, kv_block_size: tokens per block.
        tile_ids: int32 (B, H, Qb, K) or None (None: every visited block is full).
        tiles: bool (T, q_block_size, kv_block_size) or None.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_len: int
    kv_len: int
    q_block_size: int
    kv_block_size: int
    tile_ids: Optional[torch.Tensor] = None
    tiles: Optional[torch.Tensor] = None

    def __post_init__(self):
        n, idx = self.kv_num_blocks, self.kv_indices
        if n.dim() != 3 or idx.dim() != 4 or idx.shape[:3] != n.shape:
            raise ValueError(
                f"kv_num_blocks must be (B, H, Qb) and kv_indices (B, H, Qb, K); got "
                f"{tuple(n.shape)=} and {tuple(idx.shape)=}"
            )
        for name in ("q_len", "kv_len", "q_block_size", "kv_block_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if n.shape[2] != block_count(self.q_len, self.q_block_size):
            raise ValueError(
                f"kv_num_blocks has {n.shape[2]} query blocks but q_len={self.q_len} with "
                f"q_block_size={self.q_block_size} needs {block_count(self.q_len, self.q_block_size)}"
            )
        if (self.tile_ids is None) != (self.tiles is None):
            raise ValueError("tile_ids and tiles must be given together")
        if self.tile_ids is not None:
            if self.tile_ids.shape != idx.shape:
                raise ValueError(f"{tuple(self.tile_ids.shape)=} must equal {tuple(idx.shape)=}")
            if self.tiles.dim() != 3 or tuple(self.tiles.shape[1:]) != (self.q_block_size, self.kv_block_size):
                raise ValueError(
                    f"tiles must be (T, {self.q_block_size}, {self.kv_block_size}); got {tuple(self.tiles.shape)=}"
                )
        object.__setattr__(self, "_cache", {})

    # ------------------------------------------------------------------ shape
    @property
    def num_q_blocks(self) -> int:
        return block_count(self.q_len, self.q_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return block_count(self.kv_len, self.kv_block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Qb, Kb) of the block grid (B and H may be 1: broadcast)."""
        b, h, qb = self.kv_num_blocks.shape
        return (b, h, qb, self.num_kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def has_tiles(self) -> bool:
        return self.tiles is not None

    def __repr__(self) -> str:
        b, h, qb, kb = self.shape
        return (
            f"BlockSparseMask(shape=(B={b}, H={h}, Qb={qb}, Kb={kb}), q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.q_block_size}, {self.kv_block_size}), density={self.density():.4f}, "
            f"partial_blocks={self.num_partial_blocks()})"
        )

    # ----------------------------------------------------------- construction
    @classmethod
    def from_block_matrix(
        cls,
        blocks: torch.Tensor,
        *,
        q_len: int,
        kv_len: int,
        q_block_size: int,
        kv_block_size: int,
        tile_ids: Optional[torch.Tensor] = None,
        tiles: Optional[torch.Tensor] = None,
        max_blocks: Optional[int] = None,
    ) -> "BlockSparseMask":
        """Build from a boolean block matrix.

        Args:
            blocks: bool (Qb, Kb), (H, Qb, Kb) or (B, H, Qb, Kb); True = visit the block.
            tile_ids: optional int (same shape as blocks): -1 for a full block, else an
                index into ``tiles`` (bool (T, q_block_size, kv_block_size)).
            max_blocks: an upper bound on the key blocks any query block visits, known
                without looking at ``blocks`` (a top-k selection's k, or Kb). With it the
                layout is ``max_blocks`` wide and nothing is read back from the device,
                so masks built per call (block selections on a GPU, under
                ``torch.compile``) cost no synchronisation; the caller guarantees that
                every query block visits a key block (not checked then).

        Raises:
            ValueError: wrong block counts for the lengths, or a query block with no key block.
        """
        if blocks.dtype != torch.bool:
            raise TypeError(f"blocks must be a bool tensor, got {blocks.dtype=}")
        while blocks.dim() < 4:
            blocks = blocks.unsqueeze(0)
            if tile_ids is not None:
                tile_ids = tile_ids.unsqueeze(0)
        qb, kb = block_count(q_len, q_block_size), block_count(kv_len, kv_block_size)
        if tuple(blocks.shape[-2:]) != (qb, kb):
            raise ValueError(
                f"blocks has grid {tuple(blocks.shape[-2:])} but q_len={q_len}, kv_len={kv_len} with blocks "
                f"({q_block_size}, {kv_block_size}) need ({qb}, {kb})"
            )
        counts = blocks.sum(-1).to(torch.int32)
        if max_blocks is None:
            cls._check_rows_nonempty(blocks)
            kmax = max(int(counts.max()), 1)
        elif isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be an int >= 1 (an upper bound on key blocks per query block), "
                             f"got {max_blocks=}")
        else:
            kmax = min(max_blocks, kb)
        # Stable sort puts visited block indices first, in ascending order.
        order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
        indices = order[..., :kmax].to(torch.int32).contiguous()
        gathered_tiles = None
        if tile_ids is not None:
            gathered_tiles = torch.gather(tile_ids.to(torch.int32).expand_as(blocks), -1, order[..., :kmax].long())
            valid = torch.arange(kmax, device=blocks.device) < counts[..., None]
            gathered_tiles = torch.where(valid, gathered_tiles, torch.full_like(gathered_tiles, -1)).contiguous()
        return cls(counts.contiguous(), indices, int(q_len), int(kv_len), int(q_block_size), int(kv_block_size),
                   gathered_tiles, None if tiles is None else tiles.to(torch.bool).contiguous())

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskModFn,
        *,
        q_len: int,
        kv_len: int,
        q_block_size: int,
        kv_block_size: int,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str = "cpu",
        exact: bool = True,
    ) -> "BlockSparseMask":
        """Build from a token-level predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

        The predicate uses FlexAttention's signature and is evaluated on broadcast index
        tensors, one band of query blocks at a time (memory O(q_block_size * kv_len)).
        Blocks where the predicate holds everywhere become full blocks; blocks where it
        holds somewhere become partial blocks carrying their token tile (``exact=True``)
        or full blocks (``exact=False``: the block layout only, for block-level methods).
        """
        qb, kb = block_count(q_len, q_block_size), block_count(kv_len, kv_block_size)
        dev = torch.device(device)
        blocks = torch.zeros(batch, heads, qb, kb, dtype=torch.bool, device=dev)
        full = torch.zeros_like(blocks)
        tile_list: list[torch.Tensor] = []
        tile_ids = torch.full((batch, heads, qb, kb), -1, dtype=torch.int32, device=dev)
        kv_pad = kb * kv_block_size
        kv_idx = torch.arange(kv_pad, device=dev)
        kv_valid = kv_idx < kv_len
        b_idx = torch.arange(batch, device=dev).view(batch, 1, 1, 1)
        h_idx = torch.arange(heads, device=dev).view(1, heads, 1, 1)
        tile_lookup: dict[bytes, int] = {}
        for i in range(qb):
            q_idx = torch.arange(i * q_block_size, (i + 1) * q_block_size, device=dev)
            q_valid = q_idx < q_len
            m = mask_mod(b_idx, h_idx, q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1))
            m = torch.as_tensor(m, device=dev).to(torch.bool).expand(batch, heads, q_block_size, kv_pad)
            valid = q_valid[:, None] & kv_valid[None, :]
            m = m & valid
            mt = m.view(batch, heads, q_block_size, kb, kv_block_size).permute(0, 1, 3, 2, 4)
            vt = valid.view(q_block_size, kb, kv_block_size).permute(1, 0, 2)
            anyb = mt.flatten(-2).any(-1)
            allb = (mt | ~vt).flatten(-2).all(-1) & anyb
            blocks[:, :, i] = anyb
            full[:, :, i] = allb
            if exact:
                part = anyb & ~allb
                for bb, hh, j in part.nonzero().tolist():
                    t = mt[bb, hh, j]
                    key = t.cpu().numpy().tobytes()
                    tid = tile_lookup.get(key)
                    if tid is None:
                        tid = len(tile_list)
                        tile_lookup[key] = tid
                        tile_list.append(t.clone())
                    tile_ids[bb, hh, i, j] = tid
        if exact and tile_list:
            return cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                         kv_block_size=kv_block_size, tile_ids=tile_ids, tiles=torch.stack(tile_list))
        return cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                     kv_block_size=kv_block_size)

    @classmethod
    def from_dense(
        cls, token_mask: torch.Tensor, *, q_block_size: int, kv_block_size: int, exact: bool = True
    ) -> "BlockSparseMask":
        """Build from a token-level bool mask (Sq, Sk), (H, Sq, Sk) or (B, H, Sq, Sk)."""
        while token_mask.dim() < 4:
            token_mask = token_mask.unsqueeze(0)
        b, h, sq, sk = token_mask.shape
        tm = token_mask.to(torch.bool)

        def mask_mod(bi, hi, qi, ki):
            return tm[bi, hi, qi.clamp(max=sq - 1), ki.clamp(max=sk - 1)]

        return cls.from_mask_mod(mask_mod, q_len=sq, kv_len=sk, q_block_size=q_block_size,
                                 kv_block_size=kv_block_size, batch=b, heads=h, device=tm.device, exact=exact)

    @classmethod
    def full(cls, *, q_len: int, kv_len: int, q_block_size: int = 128, kv_block_size: int = 128,
             device="cpu") -> "BlockSparseMask":
        """Every query block visits every key block (dense attention)."""
        qb, kb = block_count(q_len, q_block_size), block_count(kv_len, kv_block_size)
        blocks = torch.ones(qb, kb, dtype=torch.bool, device=device)
        # Known full: nothing is read back from the device (masks built per call, under torch.compile).
        mask = cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                     kv_block_size=kv_block_size, max_blocks=kb)
        mask._cache[_VISITS_EVERY_BLOCK] = True
        return mask

    def visits_every_block(self) -> bool:
        """Whether every query block visits every key block in full (no token tiles): dense
        attention. A host read of the layout the first time (cached; known without one for
        :meth:`full` masks)."""
        if _VISITS_EVERY_BLOCK not in self._cache:
            self._cache[_VISITS_EVERY_BLOCK] = self.tile_ids is None and bool(
                (self.kv_num_blocks == self.num_kv_blocks).all())
        return self._cache[_VISITS_EVERY_BLOCK]

    @classmethod
    def rank_causal(cls, *, q_rank: torch.Tensor, kv_rank: torch.Tensor, q_block_size: int,
                    kv_block_size: int) -> "BlockSparseMask":
        """Token pairs whose key's rank is at most its query's rank.

        Ranks generalise causality: a token's position gives causal attention, its frame
        (or block of frames) gives frame-causal attention in any token order. Blocks are
        classified from each block's lowest and highest ranks; only blocks with both kinds
        of pairs get token tiles (deduplicated), so the cost follows the number of such
        blocks, not the sequence length squared.

        Args:
            q_rank: int (q_len,), kv_rank: int (kv_len,), host or device.
        """
        q_rank, kv_rank = q_rank.long().cpu(), kv_rank.long().cpu()
        q_len, kv_len = q_rank.numel(), kv_rank.numel()
        nqb, nkb = block_count(q_len, q_block_size), block_count(kv_len, kv_block_size)
        # Pad by repeating the last rank: padding positions change no block's min or max.
        qr = torch.cat([q_rank, q_rank[-1:].expand(nqb * q_block_size - q_len)]).view(nqb, q_block_size)
        kr = torch.cat([kv_rank, kv_rank[-1:].expand(nkb * kv_block_size - kv_len)]).view(nkb, kv_block_size)
        full = kr.amax(1)[None, :] <= qr.amin(1)[:, None]
        empty = kr.amin(1)[None, :] > qr.amax(1)[:, None]
        mixed = ~full & ~empty
        i, j = mixed.nonzero(as_tuple=True)
        if i.numel() == 0:
            return cls.from_block_matrix(full, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                         kv_block_size=kv_block_size)
        tiles = kr[j][:, None, :] <= qr[i][:, :, None]  # (P, q_block_size, kv_block_size)
        unique, inverse = torch.unique(tiles.flatten(1), dim=0, return_inverse=True)
        tile_ids = torch.full((nqb, nkb), -1, dtype=torch.int32)
        tile_ids[i, j] = inverse.to(torch.int32)
        return cls.from_block_matrix(full | mixed, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                     kv_block_size=kv_block_size, tile_ids=tile_ids,
                                     tiles=unique.view(-1, q_block_size, kv_block_size))

    @staticmethod
    def _check_rows_nonempty(blocks: torch.Tensor) -> None:
        empty = ~blocks.any(-1)
        if bool(empty.any()):
            where = empty.nonzero()[:5].tolist()
            raise ValueError(
                f"every query block must visit at least one key block; {int(empty.sum())} do not "
                f"(first (batch, head, query block): {where}). Add the diagonal or a sink block to the mask, "
                f"e.g. `blocks |= torch.eye(Qb, Kb, dtype=torch.bool)`."
            )

    # -------------------------------------------------------------- inspection
    def block_state(self) -> torch.Tensor:
        """int8 (B, H, Qb, Kb): 0 skipped, 1 full, 2 partial (token tile)."""
        key = ("state",)
        if key not in self._cache:
            b, h, qb, kb = self.shape
            state = torch.zeros(b, h, qb, kb + 1, dtype=torch.int8, device=self.device)
            valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None].long()
            idx = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices, kb).long())
            val = torch.ones_like(idx, dtype=torch.int8)
            if self.tile_ids is not None:
                val = torch.where(self.tile_ids >= 0, torch.full_like(val, 2), val)
            state.scatter_(-1, idx, val)
            self._cache[key] = state[..., :kb].contiguous()
        return self._cache[key]

    def to_block_matrix(self) -> torch.Tensor:
        """bool (B, H, Qb, Kb): True where a block is visited."""
        return self.block_state() > 0

    def num_visited_blocks(self) -> int:
        return int(self.kv_num_blocks.sum())

    def num_partial_blocks(self) -> int:
        if self.tile_ids is None:
            return 0
        valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None].long()
        return int(((self.tile_ids >= 0) & valid).sum())

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, over the batch and heads of the layout."""
        b, h, qb, kb = self.shape
        return self.num_visited_blocks() / float(b * h * qb * kb)

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def token_density(self) -> float:
        """Fraction of valid (query token, key token) pairs attended (counts tile contents)."""
        return float(self.to_dense().float().mean())

    def to_dense(self) -> torch.Tensor:
        """bool (B, H, q_len, kv_len) token-level mask. For tests and small sizes only."""
        b, h, qb, kb = self.shape
        st = self.block_state()
        tok = (st > 0).repeat_interleave(self.q_block_size, 2).repeat_interleave(self.kv_block_size, 3)
        if self.tile_ids is not None:
            ids = torch.full((b, h, qb, kb), -1, dtype=torch.long, device=self.device)
            valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None].long()
            src = torch.where(valid, self.tile_ids.long(), torch.full_like(self.tile_ids, -1).long())
            idx = torch.where(valid, self.kv_indices.long(), torch.zeros_like(self.kv_indices).long())
            ids.scatter_reduce_(-1, idx, src, reduce="amax")
            for bb, hh, i, j in (ids >= 0).nonzero().tolist():
                tok[bb, hh, i * self.q_block_size:(i + 1) * self.q_block_size,
                    j * self.kv_block_size:(j + 1) * self.kv_block_size] = self.tiles[ids[bb, hh, i, j]]
        return tok[:, :, : self.q_len, : self.kv_len].contiguous()

    def query_blocks(self, blocks: torch.Tensor) -> "BlockSparseMask":
        """The rows of the listed query blocks, in the order given, as a mask of their own.

        Args:
            blocks: long (R,) query block indices (a host or same-device tensor).
        Returns:
            a mask with ``R`` query blocks, ``q_len = R * q_block_size`` (every block full
            length: rows past the original ``q_len`` hold padding queries) and the same keys,
            key blocks and token tiles.
        """
        idx = blocks.to(device=self.device, dtype=torch.long)
        return self._take(2, idx, q_len=int(idx.numel()) * self.q_block_size)

    def _take(self, dim: int, index: Union[slice, torch.Tensor], q_len: int) -> "BlockSparseMask":
        """The layout's entries ``index`` (a slice, or long indices) along ``dim`` (1: heads,
        2: query blocks), as a mask of ``q_len`` queries with the same keys and tiles."""
        def take(t):
            return (t[(slice(None),) * dim + (index,)] if isinstance(index, slice) else t.index_select(dim, index)
                    ).contiguous()

        return BlockSparseMask(take(self.kv_num_blocks), take(self.kv_indices), q_len, self.kv_len, self.q_block_size,
                               self.kv_block_size, None if self.tile_ids is None else take(self.tile_ids), self.tiles)

    def to(self, device) -> "BlockSparseMask":
        device = torch.device(device)
        if self.device == device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            self._cache[key] = BlockSparseMask(
                self.kv_num_blocks.to(device), self.kv_indices.to(device), self.q_len, self.kv_len,
                self.q_block_size, self.kv_block_size,
                None if self.tile_ids is None else self.tile_ids.to(device),
                None if self.tiles is None else self.tiles.to(device),
            )
        return self._cache[key]

    def kernel_layout(self, *, cache: bool = True) -> KernelLayout:
        """The forward layout as the Triton kernels walk it (full blocks first), see :class:`KernelLayout`.

        Derived on the mask's device without host synchronisation and cached on the mask
        (``cache=False`` derives it afresh, e.g. while ``torch.compile`` traces).
        """
        key = ("kernel",)
        if not cache:
            return self._kernel_layout()
        if key not in self._cache:
            self._cache[key] = self._kernel_layout()
        return self._cache[key]

    def _kernel_layout(self) -> KernelLayout:
        short = self.num_kv_blocks - 1 if self.kv_len % self.kv_block_size else None
        return kernel_layout_from_lists(self.kv_num_blocks, self.kv_indices, self.tile_ids, self.tiles,
                                        short_block=short)

    def kernel_layout_transposed(self) -> KernelLayout:
        """The transposed layout (query blocks per key block, for dK/dV) as a :class:`KernelLayout`; cached.

        A query block is partial for a key block when their pair has a token tile or the
        query block is the last, short one.
        """
        key = ("kernel", "T")
        if key not in self._cache:
            num, indices, tile_ids = self.transposed()
            short = self.num_q_blocks - 1 if self.q_len % self.q_block_size else None
            tiles = self.kernel_layout().tiles  # the forward layout's uint8 copy, shared
            self._cache[key] = kernel_layout_from_lists(num, indices, tile_ids, tiles, short_block=short)
        return self._cache[key]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The layout seen from key blocks (for the backward pass).

        Returns:
            q_num_blocks: int32 (B, H, Kb); q_indices: int32 (B, H, Kb, Q) ascending;
            q_tile_ids: int32 (B, H, Kb, Q) or None (tile index per entry, -1 full).
        """
        key = ("T",)
        if key not in self._cache:
            st = self.block_state().transpose(-1, -2)  # (B, H, Kb, Qb)
            vis = st > 0
            counts = vis.sum(-1).to(torch.int32)
            order = torch.sort((~vis).to(torch.int8), dim=-1, stable=True).indices
            qmax = max(int(counts.max()), 1)
            q_indices = order[..., :qmax].to(torch.int32).contiguous()
            q_tiles = None
            if self.tile_ids is not None:
                b, h, qb, kb = self.shape
                ids = torch.full((b, h, qb, kb), -1, dtype=torch.int32, device=self.device)
                valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None].long()
                src = torch.where(valid, self.tile_ids, torch.full_like(self.tile_ids, -1))
                idx = torch.where(valid, self.kv_indices.long(), torch.zeros_like(self.kv_indices).long())
                ids.scatter_reduce_(-1, idx, src, reduce="amax")
                q_tiles = torch.gather(ids.transpose(-1, -2), -1, order[..., :qmax].long()).contiguous()
            self._cache[key] = (counts.contiguous(), q_indices, q_tiles)
        return self._cache[key]

    # ------------------------------------------------------------- composition
    def _combine(self, other: "BlockSparseMask", op: str) -> "BlockSparseMask":
        if not isinstance(other, BlockSparseMask):
            return NotImplemented
        if (self.q_len, self.kv_len, self.q_block_size, self.kv_block_size) != (
            other.q_len, other.kv_len, other.q_block_size, other.kv_block_size
        ):
            raise ValueError(
                "masks must share lengths and block sizes to combine: "
                f"({self.q_len}, {self.kv_len}, {self.q_block_size}, {self.kv_block_size}) vs "
                f"({other.q_len}, {other.kv_len}, {other.q_block_size}, {other.kv_block_size})"
            )
        other = other.to(self.device)
        b = max(self.shape[0], other.shape[0])
        h = max(self.shape[1], other.shape[1])
        sa = self.block_state().expand(b, h, -1, -1)
        sb = other.block_state().expand(b, h, -1, -1)
        if op == "or":
            out = torch.maximum((sa > 0).to(torch.int8), (sb > 0).to(torch.int8))
            out = torch.where((sa == 1) | (sb == 1), torch.ones_like(out), out * 2)  # partial unless one is full
        else:
            both = (sa > 0) & (sb > 0)
            out = torch.where(both & (sa == 1) & (sb == 1), 1, torch.where(both, 2, 0)).to(torch.int8)
        partial = (out == 2).nonzero().tolist()
        if not partial:
            return BlockSparseMask.from_block_matrix(out > 0, q_len=self.q_len, kv_len=self.kv_len,
                                                     q_block_size=self.q_block_size, kv_block_size=self.kv_block_size)
        ta, tb = self._tile_lookup(b, h), other._tile_lookup(b, h)
        ones = torch.ones(self.q_block_size, self.kv_block_size, dtype=torch.bool, device=self.device)
        zeros = torch.zeros_like(ones)
        tile_list, lookup = [], {}
        tile_ids = torch.full(out.shape, -1, dtype=torch.int32, device=self.device)
        blocks = out > 0
        for bb, hh, i, j in partial:
            ma = self._tile_of(sa, ta, bb, hh, i, j, ones, zeros)
            mb = other._tile_of(sb, tb, bb, hh, i, j, ones, zeros)
            t = (ma | mb) if op == "or" else (ma & mb)
            if bool(t.all()):
                continue  # became a full block
            if not bool(t.any()):
                blocks[bb, hh, i, j] = False
                continue
            k = t.cpu().numpy().tobytes()
            if k not in lookup:
                lookup[k] = len(tile_list)
                tile_list.append(t)
            tile_ids[bb, hh, i, j] = lookup[k]
        if not tile_list:
            return BlockSparseMask.from_block_matrix(blocks, q_len=self.q_len, kv_len=self.kv_len,
                                                     q_block_size=self.q_block_size, kv_block_size=self.kv_block_size)
        return BlockSparseMask.from_block_matrix(blocks, q_len=self.q_len, kv_len=self.kv_len,
                                                 q_block_size=self.q_block_size, kv_block_size=self.kv_block_size,
                                                 tile_ids=tile_ids, tiles=torch.stack(tile_list))

    def _tile_lookup(self, b: int, h: int) -> Optional[torch.Tensor]:
        if self.tile_ids is None:
            return None
        bb, hh, qb, kb = self.shape
        ids = torch.full((bb, hh, qb, kb), -1, dtype=torch.long, device=self.device)
        valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None].long()
        src = torch.where(valid, self.tile_ids.long(), torch.full_like(self.tile_ids, -1).long())
        idx = torch.where(valid, self.kv_indices.long(), torch.zeros_like(self.kv_indices).long())
        ids.scatter_reduce_(-1, idx, src, reduce="amax")
        return ids.expand(b, h, qb, kb)

    def _tile_of(self, state, lookup, b, h, i, j, ones, zeros):
        s = int(state[b, h, i, j])
        if s == 0:
            return zeros
        if s == 1:
            return ones
        return self.tiles[int(lookup[b, h, i, j])]

    def __or__(self, other: "BlockSparseMask") -> "BlockSparseMask":
        """Union: a token pair is attended if either mask attends it."""
        return self._combine(other, "or")

    def __and__(self, other: "BlockSparseMask") -> "BlockSparseMask":
        """Intersection: a token pair is attended if both masks attend it.

        Raises:
            ValueError: if the intersection leaves a query block with no key block.
        """
        return self._combine(other, "and")

    # ---------------------------------------------------------------- heads
    def select_heads(self, start: int, stop: int) -> "BlockSparseMask":
        """The layout of heads [start, stop) (for head-parallel execution). Broadcast masks pass through."""
        if self.shape[1] == 1:
            return self
        return self._take(1, slice(start, stop), q_len=self.q_len)

    # -------------------------------------------------------------- rendering
    def render(self, path: str, *, batch: int = 0, heads: Optional[list[int]] = None, max_pixels: int = 2048) -> str:
        """Write a PNG of the block layout: white = full block, grey = partial, black = skipped.

        One panel per head in ``heads`` (default: the first, at most 8).
        """
        from PIL import Image

        state = self.block_state()[min(batch, self.shape[0] - 1)].cpu()
        heads = list(range(min(state.shape[0], 8))) if heads is None else heads
        qb, kb = state.shape[-2:]
        scale = max(1, min(max_pixels // max(qb, kb), 8))
        panels = []
        for h in heads:
            s = state[h]
            img = torch.zeros(qb, kb, dtype=torch.uint8)
            img[s == 1] = 255
            img[s == 2] = 128
            arr = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
            panels.append(arr)
        gap = 4
        width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
        canvas = Image.new("L", (width, panels[0].shape[0]), color=64)
        x = 0
        for p in panels:
            canvas.paste(Image.fromarray(p), (x, 0))
            x += p.shape[1] + gap
        canvas.save(path)
        return path

    # ------------------------------------------------------------ FlexAttention
    def to_flex_block_mask(self):
        """Convert to ``torch.nn.attention.flex_attention.BlockMask``.

        Full blocks go to the ``full_kv_*`` lists, partial blocks to ``kv_*`` with a
        ``mask_mod`` that reads the token tiles and the sequence lengths.
        """
        from torch.nn.attention.flex_attention import BlockMask

        b, h, qb, kb = self.shape
        st = self.block_state()
        full = st == 1
        part = st == 2
        qbs, kbs = self.q_block_size, self.kv_block_size

        def lists(sel):
            counts = sel.sum(-1).to(torch.int32)
            order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
            return counts.contiguous(), order.contiguous()

        q_len, kv_len = self.q_len, self.kv_len
        ragged = q_len % qbs != 0 or kv_len % kbs != 0
        if self.tiles is None and not ragged:
            # Pure block sparsity: full blocks only, no mask_mod needed.
            fn, fi = lists(full)
            pn, pi = lists(torch.zeros_like(full))
            mask_mod = None
        else:
            # The mask_mod alone defines the token mask everywhere (skipped blocks read an
            # all-zeros tile, full blocks an all-ones tile), whatever blocks flex evaluates.
            fn, fi = lists(full) if not ragged else (None, None)
            pn, pi = lists(part) if not ragged else lists(full | part)
            ones = torch.ones(1, qbs, kbs, dtype=torch.bool, device=self.device)
            parts = [ones, torch.zeros_like(ones)]
            if self.tiles is not None:
                parts.insert(0, self.tiles.expand(-1, qbs, kbs))
            tiles = torch.cat(parts, 0)
            n_t = tiles.shape[0]
            if self.tiles is not None:
                tl = self._tile_lookup(b, h)
                lookup = torch.where(st == 0, n_t - 1, torch.where(tl < 0, n_t - 2, tl))
            else:
                lookup = torch.where(st == 0, n_t - 1, n_t - 2)
            bmax, hmax = b - 1, h - 1

            def mask_mod(bi, hi, qi, ki):
                tid = lookup[torch.clamp(bi, max=bmax), torch.clamp(hi, max=hmax), qi // qbs, ki // kbs]
                return tiles[tid, qi % qbs, ki % kbs] & (qi < q_len) & (ki < kv_len)
        kwargs = dict(BLOCK_SIZE=(qbs, kbs), seq_lengths=(q_len, kv_len))
        if mask_mod is not None:
            kwargs["mask_mod"] = mask_mod
        return BlockMask.from_kv_blocks(pn, pi, fn, fi, **kwargs)

    @classmethod
    def from_flex_block_mask(cls, block_mask, *, exact: bool = True) -> "BlockSparseMask":
        """Convert a FlexAttention ``BlockMask`` (e.g. from ``create_block_mask``).

        Full blocks stay full. Partial blocks are evaluated with the block mask's
        ``mask_mod`` into token tiles (``exact=True``) or kept whole (``exact=False``).
        """
        q_len, kv_len = block_mask.seq_lengths
        qbs, kbs = block_mask.BLOCK_SIZE
        qb, kb = block_count(q_len, qbs), block_count(kv_len, kbs)
        dev = block_mask.kv_num_blocks.device

        def dense(num, idx):
            bsz, hsz = num.shape[:2]
            out = torch.zeros(bsz, hsz, num.shape[2], idx.shape[-1] + 1, dtype=torch.bool, device=dev)
            valid = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()
            col = torch.where(valid, idx.long(), torch.full_like(idx, idx.shape[-1]).long())
            out.scatter_(-1, col.clamp(max=idx.shape[-1]), torch.ones_like(col, dtype=torch.bool))
            return out[..., :-1][..., :qb, :kb]

        part = dense(block_mask.kv_num_blocks, block_mask.kv_indices)
        full = (dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
                if block_mask.full_kv_num_blocks is not None else torch.zeros_like(part))
        bsz, hsz = part.shape[:2]
        from torch.nn.attention.flex_attention import noop_mask

        mm = block_mask.mask_mod
        ragged = q_len % qbs != 0 or kv_len % kbs != 0
        if mm is noop_mask or not exact:
            blocks = part | full
            return cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=qbs, kv_block_size=kbs)
        tile_ids = torch.full((bsz, hsz, qb, kb), -1, dtype=torch.int32, device=dev)
        blocks = part | full
        tile_list, lookup = [], {}
        ar_q = torch.arange(qbs, device=dev)
        ar_k = torch.arange(kbs, device=dev)
        for bb, hh, i, j in (part & ~full).nonzero().tolist():
            qi = (i * qbs + ar_q).view(-1, 1)
            ki = (j * kbs + ar_k).view(1, -1)
            t = mm(torch.tensor(bb, device=dev), torch.tensor(hh, device=dev), qi, ki)
            t = torch.as_tensor(t, device=dev).to(torch.bool).expand(qbs, kbs)
            valid = (qi < q_len) & (ki < kv_len)
            if bool((t | ~valid).all()):
                continue
            if not bool((t & valid).any()):
                blocks[bb, hh, i, j] = False
                continue
            t = t & valid
            k = t.cpu().numpy().tobytes()
            if k not in lookup:
                lookup[k] = len(tile_list)
                tile_list.append(t.clone())
            tile_ids[bb, hh, i, j] = lookup[k]
        del ragged
        if not tile_list:
            return cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=qbs, kv_block_size=kbs)
        return cls.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=qbs, kv_block_size=kbs,
                                     tile_ids=tile_ids, tiles=torch.stack(tile_list))

    # --------------------------------------------------------------- checks
    def check_compatible(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        """Raise ValueError unless this mask can serve attention of the given sizes."""
        b, h = self.shape[:2]
        if self.q_len != q_len or self.kv_len != kv_len:
            raise ValueError(
                f"mask was built for q_len={self.q_len}, kv_len={self.kv_len} but the inputs have "
                f"q_len={q_len}, kv_len={kv_len}; build the mask for the inputs' sequence lengths"
            )
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(
                f"mask batch/heads ({b}, {h}) must be 1 or equal to the inputs' ({batch}, {heads})"
            )

