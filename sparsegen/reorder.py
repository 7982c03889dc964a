"""Reordering video tokens along one of the six orders of (frames, height, width), per head.

A video's tokens arrive in row-major (F, H, W) order: frames slowest, columns fastest.
Attention heads whose pattern is "the same pixel across frames" or "the same row" become
block-diagonal once the tokens are laid out in another order; PARO chooses one order per
(layer, head). An order is a permutation of the letters ``"FHW"``, slowest axis first::

    grid (F, H, W) = (2, 2, 3), token t = f * 6 + h * 3 + w

    "FHW" (identity)   0  1  2  3  4  5 |  6  7  8  9 10 11
    "HWF"              0  6  1  7  2  8 |  3  9  4 10  5 11     (each pixel's frames adjacent)
    "WHF"              0  6  3  9  1  7 |  4 10  2  8  5 11

Position ``p`` of the reordered sequence holds source token ``perm[p]``; ``inverse=True``
puts every token back. Exact: the round trip returns the input bit for bit.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Sequence, Union

import torch

__all__ = ["ORDERS", "reorder_tokens", "order_permutation", "reordered_attention"]

# The six orders of (F, H, W), slowest axis first; "FHW" is the layout tokens arrive in.
ORDERS = tuple("".join(p) for p in itertools.permutations("FHW"))


def _check_grid(grid) -> tuple[int, int, int]:
    """The grid as a (hashable) tuple; a list is accepted."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
        raise ValueError(f"grid must be (frames, height, width) of ints >= 1, got {grid!r}")
    return tuple(grid)


def _check_order(order) -> str:
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (slowest axis first), got {order!r}")
    return order


@lru_cache(maxsize=256)
def _permutation(grid: tuple[int, int, int], order: str, inverse: bool) -> torch.Tensor:
    f, h, w = grid
    perm = torch.arange(f * h * w).view(f, h, w).permute(*("FHW".index(a) for a in order)).reshape(-1)
    return torch.argsort(perm) if inverse else perm


def order_permutation(grid: Sequence[int], order: str, *, inverse: bool = False) -> torch.Tensor:
    """long (F*H*W,): the source token at each position of ``order`` (or, with ``inverse``,
    the position of each source token), for a grid of (frames, height, width) tokens.

    Raises:
        ValueError: a grid that is not three ints >= 1, an order that is not a permutation of "FHW".
    """
    return _permutation(_check_grid(grid), _check_order(order),
                        bool(inverse)).clone()


def reorder_tokens(x: torch.Tensor, *, grid: Sequence[int], order: Union[str, Sequence[str]],
                   inverse: bool = False) -> torch.Tensor:
    """Lay the video tokens of ``x`` out in another order of (F, H, W), per head.

    Args:
        x: (B, S, H, D) with S = F * H * W video tokens in row-major (F, H, W) order
            (``inverse=True``: in the reordered layout).
        grid: (F, H, W), the latent grid after patchify.
        order: one of :data:`ORDERS` for every head, or a sequence of one order per head
            (length H of ``x``).
        inverse: undo the reordering (``reorder_tokens(reorder_tokens(x, ...), ...,
            inverse=True)`` is ``x`` exactly).

    Returns:
        (B, S, H, D), a new tensor (one gather of (token, head) rows, whatever the orders).

    Raises:
        TypeError: ``x`` is not a tensor. ValueError: ``x`` is not 4-D, S != F * H * W, a
        bad grid or order, or a per-head list whose length is not H.

    Example::

        >>> q = torch.randn(1, 2 * 4 * 4, 3, 8)
        >>> qr = reorder_tokens(q, grid=(2, 4, 4), order=["FHW", "HWF", "HWF"])
        >>> torch.equal(reorder_tokens(qr, grid=(2, 4, 4), order=["FHW", "HWF", "HWF"], inverse=True), q)
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be laid out (batch, seq, heads, head_dim); got {tuple(x.shape)=}")
    grid = _check_grid(grid)
    n = grid[0] * grid[1] * grid[2]
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} tokens but grid {grid} holds {n}; pass the video tokens only "
                         f"(split off text tokens first), {tuple(x.shape)=}")
    if isinstance(order, str):
        return x.index_select(1, _on_device(_permutation, grid, _check_order(order), inverse, device=str(x.device)))
    orders = [_check_order(o) for o in order]
    if len(orders) != x.shape[2]:
        raise ValueError(f"order lists {len(orders)} orders but x has {x.shape[2]} heads; give one per head "
                         "or a single string for all")
    if len(set(orders)) == 1:
        return reorder_tokens(x, grid=grid, order=orders[0], inverse=inverse)
    b, _, h, d = x.shape
    # One gather of (token, head) rows, in whichever of the two layouts x is stored
    # (attention outputs are often (B, H, S, D) memory seen as (B, S, H, D)).
    if not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        rows = _on_device(_per_head_rows, grid, tuple(orders), inverse, True, device=str(x.device))
        return x.transpose(1, 2).reshape(b, h * n, d).index_select(1, rows).view(b, h, n, d).transpose(1, 2)
    rows = _on_device(_per_head_rows, grid, tuple(orders), inverse, False, device=str(x.device))
    return x.reshape(b, n * h, d).index_select(1, rows).view(b, n, h, d)


_DEVICE_TABLES: dict = {}  # (table, args, device) -> index tensor; index tables only, no pipeline state
_MAX_DEVICE_TABLES = 256


def _on_device(table, *args, device: str) -> torch.Tensor:
    """An index table built on the host, copied to ``device`` once (not on every call).

    A plain dict rather than ``lru_cache``: a compiled graph reads a table already in it as
    a constant tensor instead of tracing its construction (Dynamo traces through
    ``lru_cache`` wrappers, which would rebuild the table on every call)."""
    key = (table.__name__, args, device)
    found = _DEVICE_TABLES.get(key)
    if found is None:
        if len(_DEVICE_TABLES) >= _MAX_DEVICE_TABLES:
            _DEVICE_TABLES.clear()
        found = _DEVICE_TABLES[key] = table(*args).to(device)
    return found


@lru_cache(maxsize=64)
def _per_head_rows(grid: tuple[int, int, int], orders: tuple[str, ...], inverse: bool,
                   heads_major: bool) -> torch.Tensor:
    """long (S * H,): the source row of each output row; rows are ``s * H + h`` (token
    major) or ``h * S + s`` (``heads_major``), and output (s, h) reads source (perm_h[s], h)."""
    heads, n = len(orders), grid[0] * grid[1] * grid[2]
    perms = torch.stack([_permutation(grid, o, inverse) for o in orders], 1)  # (S, H)
    if heads_major:
        return (perms.t() + torch.arange(heads)[:, None] * n).reshape(-1)
    return (perms * heads + torch.arange(heads)).reshape(-1)


def reordered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, grid: Sequence[int],
                        order: Union[str, Sequence[str]], scale=None, return_lse: bool = False, quant=None,
                        backend="auto"):
    """Block-sparse attention over video tokens laid out per head in another (F, H, W) order.

    Reorders q, k and v with :func:`reorder_tokens`, runs
    :func:`~sparsegen.kernels.block_sparse_attention` with ``mask`` (its blocks refer to the
    reordered positions; a per-head layout (1 or B, H, ...) gives each head its own), and
    puts the output (and LSE) back in row-major (F, H, W) order.

    Args:
        q, k, v: (B, S, H, D), S = F * H * W video tokens in row-major order.
        mask: a ``BlockSparseMask`` over the reordered tokens (q_len = kv_len = S).
        grid, order: as :func:`reorder_tokens`.
        scale, return_lse, quant, backend: as ``block_sparse_attention``.

    Returns:
        out (B, S, H, D) in the input order, and with ``return_lse`` the LSE (B, H, S).
    """
    from .kernels import block_sparse_attention

    qr, kr, vr = (reorder_tokens(t, grid=grid, order=order) for t in (q, k, v))
    res = block_sparse_attention(qr, kr, vr, mask, scale=scale, return_lse=return_lse, quant=quant, backend=backend)
    out, lse = res if return_lse else (res, None)
    out = reorder_tokens(out, grid=grid, order=order, inverse=True)
    if not return_lse:
        return out
    # (B, H, S) -> (B, S, H, 1) to reuse the per-head inverse, and back.
    lse = reorder_tokens(lse.transpose(1, 2)[..., None], grid=grid, order=order, inverse=True)[..., 0].transpose(1, 2)
    return out, lse
