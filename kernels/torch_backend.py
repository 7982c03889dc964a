"""The CPU path of block-sparse attention: gather visited key blocks, batched dense attention.

How it works::

    mask layout ──(once per mask)──> groups of query blocks with the same key-set shape
                                     (number of visited key blocks, ragged last block
                                     among them or not, token tiles or not)
                ──(once per batch/heads)──> flat block ids per group:
                                     query block  bh * Qb + i
                                     key blocks   bh * Kb + j  (one row per query block)

    per group, per chunk of rows:
        K, V blocks ──index_select(out=workspace)──> (n, 1, c * kv_block_size, D)
        Q blocks    ──index_select──────────────────> (n, 1, q_block_size, D)
        PyTorch's fused CPU flash kernel (returns the LSE too) ──index_copy_──> out, lse

Q, K and V are first laid out as whole blocks, ``(B * H * num_blocks, block_size * D)``
(zero padded past the true lengths), so one gathered row is one block: copying a
few large contiguous rows is several times faster than gathering single tokens.
Inside a group every query block sees the same number of keys, so one batched call
serves the whole chunk. The workspace is reused across chunks and groups; memory is
proportional to the visited blocks of one chunk, never to Sq x Sk.

Query blocks of one (batch, head) that visit exactly the same key blocks (common in
banded and radial masks, e.g. rows that only see whole neighbouring frames) are
merged into one taller query tile, so their keys are gathered once and the fused
kernel runs larger, more efficient tiles.

The backward pass recomputes probabilities per group from the saved log-sum-exp
(as FlashAttention does) and also propagates a gradient flowing into the LSE, which
merges of partial attentions (text tokens, ring attention) need.

Quantized attention (``quant=``) runs the integer arithmetic of the INT8 kernel (same
quantizer, exact integer Q·K products, P and V formats) with plain matmuls, in one pass
per row: P is formed against the row's final maximum, where the kernel's online
softmax uses its running maximum. With half-precision P·V the two agree to rounding;
with INT8 P·V (fixed 1/127 scale) P is quantized against a different maximum, so the
errors differ slightly (``evals/quant_accuracy.py --triton``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import logging

import torch

from ._env import new_empty
from .mask import BlockSparseMask
from .quant import LOG2E, PVFormat, QuantConfig, quantize_qk, quantize_v, round_half_away

__all__ = ["torch_block_sparse_attention", "prefers_dense_route", "ROUTES"]

logger = logging.getLogger("sparsegen.kernels")

# Elements of one gathered K (and V) chunk. Measured on a 2-core EPYC (L2 1 MiB per
# core, L3 32 MiB): chunks of a few MiB keep the gathered blocks in cache until the
# fused kernel reads them and still amortise its per-call overhead.
_WORKSPACE_ELEMENTS = 1 << 20
# The dense route (one fused call with the mask as a token bias; prefers_dense_route).
# Measured on the 2-core machine (python evals/dense_route.py, fp32, head dim 32, 320-2112
# tokens): the dense route takes 1.1-1.3x unmasked SDPA's time whatever the mask; walking
# the blocks takes about (cost per block size) x (block density) of it, the cost growing as
# blocks shrink (more, smaller gathers and fused calls).
DENSE_ROUTE_COST = 1.2
BLOCK_ROUTE_COST = ((16, 3.5), (32, 2.5), (64, 1.7))  # (largest block size, cost); larger blocks 1.5
# The dense route is taken only while the mask's token bias (one per batch and head of the
# layout) stays this small.
DENSE_ROUTE_MAX_BIAS_ELEMENTS = 1 << 24
# Tallest query tile built by merging query blocks with identical key sets. The CPU
# flash kernel uses 256-row query splits from 768 rows on, so larger tiles gain little.
_MAX_MERGED_QUERY_TOKENS = 1024


@dataclass(frozen=True)
class _LayoutGroup:
    """Query blocks of the mask layout that share one key-set shape."""

    rows: torch.Tensor                # long (G,): layout row = layout_bh * Qb + q_block
    kv_blocks: torch.Tensor           # long (G, c): visited key blocks, ascending
    tile_ids: Optional[torch.Tensor]  # long (G, c) or None: -1 full, else tile index
    keys: int                         # tokens per row: c * kv_block_size minus the ragged tail


@dataclass(frozen=True)
class _WorkGroup:
    """One group expanded to the call's batch and heads, as flat block ids.

    ``merge`` query blocks with identical key sets share one row: row r covers the
    query blocks ``q_blocks[r]`` (each ``bh * Qb + i``) and gathers ``kv_blocks[r]``
    (each ``bh * Kb + j``).
    """

    q_blocks: torch.Tensor            # long (N, merge)
    kv_blocks: torch.Tensor           # long (N, c)
    tile_ids: Optional[torch.Tensor]  # long (N, c) or None (tiled groups are never merged)
    keys: int

    @property
    def merge(self) -> int:
        return self.q_blocks.shape[1]

    @property
    def width(self) -> int:
        return self.kv_blocks.shape[1]


def _layout_groups(mask: BlockSparseMask) -> list[_LayoutGroup]:
    """Group the layout's query blocks by key-set shape. Cached on the mask."""
    key = ("torch_plan",)
    cache = mask._cache
    if key in cache:
        return cache[key]
    nb = mask.kv_num_blocks.reshape(-1).long().cpu()
    idx = mask.kv_indices.reshape(nb.numel(), -1).long().cpu()
    tid = None if mask.tile_ids is None else mask.tile_ids.reshape(nb.numel(), -1).long().cpu()
    kb = mask.num_kv_blocks
    ragged = mask.kv_len % mask.kv_block_size
    pos = torch.arange(idx.shape[1])
    valid = pos[None, :] < nb[:, None]
    last_col = idx.gather(1, (nb - 1).clamp(min=0)[:, None]).squeeze(1)
    has_last = (last_col == kb - 1) & (ragged != 0)
    has_tile = torch.zeros_like(has_last) if tid is None else ((tid >= 0) & valid).any(1)
    groups = []
    code = nb * 4 + has_last.long() * 2 + has_tile.long()
    for val in torch.unique(code).tolist():
        rows = (code == val).nonzero().squeeze(1)
        c = val // 4
        if c == 0:
            continue
        last, tile = bool(val & 2), bool(val & 1)
        keys = c * mask.kv_block_size - (mask.kv_block_size - ragged if last else 0)
        groups.append(_LayoutGroup(rows, idx[rows, :c].contiguous(),
                                   tid[rows, :c].contiguous() if tile else None, keys))
    cache[key] = groups
    return groups


def _merge_identical_rows(q_blocks: torch.Tensor, kv_blocks: torch.Tensor, max_merge: int):
    """Split rows into runs of ``m`` rows with identical key sets, for each m.

    Args:
        q_blocks: long (N,) flat query block ids; kv_blocks: long (N, c) flat key block ids
            (identical rows can only occur within one (batch, head): the ids embed bh).
    Returns:
        dict m -> (q_blocks (R, m), kv_blocks (R, c)).
    """
    n = q_blocks.numel()
    if n == 0:
        return {}
    # Sort rows by key set so identical sets are adjacent (lexicographic via unique).
    uniq, inverse, counts = torch.unique(kv_blocks, dim=0, return_inverse=True, return_counts=True)
    order = torch.sort(inverse * (q_blocks.max() + 1) + q_blocks).indices
    q_sorted = q_blocks[order]
    set_of_row = inverse[order]
    # Position of each row inside its run of identical sets, then cut runs into pieces
    # of at most max_merge rows; pieces of equal size form one batch.
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n) - starts[set_of_row]
    sizes = counts[set_of_row]
    piece = pos // max_merge
    full_pieces = sizes // max_merge
    piece_size = torch.where(piece < full_pieces, torch.full_like(sizes, max_merge), sizes % max_merge)
    out = {}
    for m in torch.unique(piece_size).tolist():
        sel = (piece_size == m).nonzero().squeeze(1)
        qb = q_sorted[sel].view(-1, m)
        kvb = uniq[set_of_row[sel].view(-1, m)[:, 0]]
        out[m] = (qb, kvb)
    return out


def _work_groups(mask: BlockSparseMask, batch: int, heads: int, device: torch.device,
                 allow_merge: bool) -> list[_WorkGroup]:
    """Expand the layout groups to ``batch`` x ``heads`` as flat block ids. Cached on the mask."""
    key = ("torch_work", batch, heads, str(device), allow_merge)
    cache = mask._cache
    if key in cache:
        return cache[key]
    bm, hm, qb = mask.kv_num_blocks.shape
    kb = mask.num_kv_blocks
    max_merge = max(1, _MAX_MERGED_QUERY_TOKENS // mask.q_block_size) if allow_merge else 1
    work = []
    for g in _layout_groups(mask):
        lbh, qi = g.rows // qb, g.rows % qb
        lb, lh = lbh // hm, lbh % hm
        b_all = torch.arange(batch)[None, :].expand(len(g.rows), batch) if bm == 1 else lb[:, None]
        h_all = torch.arange(heads)[None, :].expand(len(g.rows), heads) if hm == 1 else lh[:, None]
        bh = (b_all[:, :, None] * heads + h_all[:, None, :]).reshape(len(g.rows), -1)  # (G, R)
        q_flat = (bh * qb + qi[:, None]).reshape(-1)
        c = g.kv_blocks.shape[1]
        kv_flat = (bh[:, :, None] * kb + g.kv_blocks[:, None, :]).reshape(-1, c)
        # Ascending query blocks: consecutive rows read nearby K/V of one head.
        order = torch.argsort(q_flat)
        q_flat, kv_flat = q_flat[order], kv_flat[order]
        if g.tile_ids is not None or max_merge == 1:
            tiles = None
            if g.tile_ids is not None:
                tiles = g.tile_ids[:, None, :].expand(-1, bh.shape[1], -1).reshape(-1, c)[order]
                tiles = tiles.contiguous().to(device)
            work.append(_WorkGroup(q_flat[:, None].contiguous().to(device), kv_flat.contiguous().to(device),
                                   tiles, g.keys))
            continue
        for m, (qbm, kvbm) in sorted(_merge_identical_rows(q_flat, kv_flat, max_merge).items()):
            work.append(_WorkGroup(qbm.contiguous().to(device), kvbm.contiguous().to(device), None, g.keys))
    cache[key] = work
    return work


def _as_blocks(x: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """(B, S, H, D) -> contiguous (B * H * num_blocks, block * D), zero padded along S."""
    b, s, h, d = x.shape
    pad = num_blocks * block - s
    t = x.transpose(1, 2)
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return t.reshape(b * h * num_blocks, block * d).contiguous()


def _from_blocks(x: torch.Tensor, b: int, h: int, s: int, d: int) -> torch.Tensor:
    """(B * H * num_blocks, block * D) -> (B, S, H, D) view (padding dropped)."""
    return x.view(b, h, -1, d)[:, :, :s].transpose(1, 2)


def _tile_bias(mask: BlockSparseMask, tile_ids: torch.Tensor, keys: int, dtype, device) -> torch.Tensor:
    """(G, c) tile ids -> additive bias (G, 1, q_block_size, keys): 0 attend, -inf skip."""
    tiles = mask.tiles.to(device)
    tid = tile_ids.to(device).long()
    # Index only the tiles this chunk uses (tiles may be a stride-0 expanded view; never copy it whole).
    t = tiles[tid.clamp(min=0)] | (tid < 0)[..., None, None]  # (G, c, qbs, kbs); -1 -> the all-ones tile
    allowed = t.permute(0, 2, 1, 3).reshape(tile_ids.shape[0], mask.q_block_size, -1)[:, :, :keys]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None]


def _rows_per_chunk(group: _WorkGroup, kv_block_size: int, d: int) -> int:
    return max(1, _WORKSPACE_ELEMENTS // (group.width * kv_block_size * d))


class _Workspace:
    """Reused buffers for gathered K and V blocks (grown on demand, never shrunk)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.k = self.v = None

    def get(self, elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.k.numel() < elements:
            self.k = torch.empty(elements, dtype=self.dtype, device=self.device)
            self.v = torch.empty(elements, dtype=self.dtype, device=self.device)
        return self.k[:elements], self.v[:elements]


def _dense_route_bias(mask: BlockSparseMask, dtype: torch.dtype) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(bias, empty): the additive bias (B or 1, H or 1, q_len, kv_len) of the mask's token
    pairs (None if it attends all) and the bool (B or 1, H or 1, q_len) rows that attend
    nothing (None if there are none).

    Built once per mask and dtype (the mask is host data on CPU: nothing is synchronised).
    """
    key = ("dense_route_bias", dtype)
    cache = mask._cache
    if key not in cache:
        if mask.visits_every_block():
            cache[key] = (None, None)
        else:
            allowed = mask.to_dense()
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            empty = ~allowed.any(-1)
            cache[key] = (bias.masked_fill_(~allowed, float("-inf")), empty if bool(empty.any()) else None)
    return cache[key]


def block_route_cost(mask: BlockSparseMask) -> float:
    """Time of walking every block of ``mask``'s geometry, relative to unmasked SDPA (measured; see above)."""
    size = min(mask.q_block_size, mask.kv_block_size)
    return next((cost for largest, cost in BLOCK_ROUTE_COST if size <= largest), 1.5)


def prefers_dense_route(mask: BlockSparseMask, q_len: int, kv_len: int) -> bool:
    """Whether one fused dense call (with the mask as a token bias) beats gathering blocks on CPU.

    Gathering pays per visited block (more for small blocks) and runs the fused kernel on
    short query tiles. A mask that visits every block takes the dense call without a bias
    (the same result, bit for bit the unmasked kernel). Otherwise, while the token bias
    stays under :data:`DENSE_ROUTE_MAX_BIAS_ELEMENTS`, the dense call with the bias is taken
    when :func:`block_route_cost` x block density reaches :data:`DENSE_ROUTE_COST`
    (``python evals/dense_route.py`` measures both routes). Decided from the mask's host
    data, cached on the mask.
    """
    key = ("dense_route", q_len, kv_len)
    cache = mask._cache
    if key not in cache:
        if mask.visits_every_block():
            cache[key] = True
        else:
            b, h = mask.shape[:2]
            bias_fits = b * h * q_len * kv_len <= DENSE_ROUTE_MAX_BIAS_ELEMENTS
            density = mask.density()
            cache[key] = bias_fits and block_route_cost(mask) * density >= DENSE_ROUTE_COST
            if not torch.compiler.is_compiling():  # a logger call breaks a torch.compile graph
                logger.debug("torch path: %s route for q_len=%d, kv_len=%d, block density %.3f",
                             "dense" if cache[key] else "block", q_len, kv_len, density)
    return cache[key]


def _dense_route_forward(q, k, v, mask: BlockSparseMask, scale: float):
    """The masked result from one call of PyTorch's fused CPU kernel: out (B, Sq, H, D), lse (B, H, Sq)."""
    bias, empty = _dense_route_bias(mask, q.dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # The bias broadcasts over a layout's batch and heads of size 1 (never expanded: the
    # fused kernel reads a broadcast bias faster than an expanded view).
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias,
                                                                        scale=scale)
    lse = lse.float()
    if empty is not None:
        # Rows that attend nothing: zero output and -inf LSE (mask.py's contract; the fused
        # kernel reports a finite LSE for them).
        empty = empty.expand(q.shape[0], q.shape[2], -1)
        o = o.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return o.transpose(1, 2), lse


ROUTES = ("auto", "blocks", "dense")


def _forward(q, k, v, mask: BlockSparseMask, scale: float, quant: Optional[QuantConfig], route: str = "auto"):
    if quant is not None:
        return _forward_quant(q, k, v, mask, scale, quant)
    if q.device.type == "cpu" and (route == "dense" or (route == "auto" and
                                                       prefers_dense_route(mask, q.shape[1], k.shape[1]))):
        return _dense_route_forward(q, k, v, mask, scale)
    return _block_forward(q, k, v, mask, scale)


def _block_forward(q, k, v, mask: BlockSparseMask, scale: float):
    """Gathered key blocks, one fused call per chunk of query blocks (the module docstring)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    nqb, nkb = mask.num_q_blocks, mask.num_kv_blocks
    cpu = q.device.type == "cpu"
    groups = _work_groups(mask, b, h, q.device, allow_merge=cpu and not mask.has_tiles)
    qf = _as_blocks(q, qbs, nqb)
    kf = _as_blocks(k, kbs, nkb)
    vf = _as_blocks(v, kbs, nkb)
    out = new_empty((b * h * nqb, qbs * d), dtype=q.dtype, device=q.device)
    lse = new_empty((b * h * nqb, qbs), dtype=torch.float32, device=q.device)
    ws = _Workspace(k.dtype, q.device)
    for grp in groups:
        c, m = grp.width, grp.merge
        per = _rows_per_chunk(grp, kbs, d)
        for s in range(0, grp.q_blocks.shape[0], per):
            kv_ids = grp.kv_blocks[s:s + per]
            q_ids = grp.q_blocks[s:s + per].reshape(-1)
            n = kv_ids.shape[0]
            wk, wv = ws.get(n * c * kbs * d)
            kc = torch.index_select(kf, 0, kv_ids.reshape(-1), out=wk.view(n * c, kbs * d))
            vc = torch.index_select(vf, 0, kv_ids.reshape(-1), out=wv.view(n * c, kbs * d))
            # The ragged tail of the last key block is sliced off (a strided view).
            kc4 = kc.view(n, 1, c * kbs, d)[:, :, : grp.keys]
            vc4 = vc.view(n, 1, c * kbs, d)[:, :, : grp.keys]
            qc = qf.index_select(0, q_ids).view(n, 1, m * qbs, d)
            bias = None
            if grp.tile_ids is not None:
                bias = _tile_bias(mask, grp.tile_ids[s:s + per], grp.keys, q.dtype, q.device)
            if cpu:
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qc, kc4, vc4, 0.0, False, attn_mask=bias, scale=scale)
            else:
                o, l = _math_attention(qc, kc4, vc4, bias, scale)
            o = o.reshape(n * m, qbs * d)
            l = l.reshape(n * m, qbs).float()
            if bias is not None:
                # Rows whose tiles attend nothing: zero output and -inf LSE (mask.py's contract).
                # Read them off the bias: the fused kernel reports a finite LSE for such rows.
                # Branch-free: a host read of "any empty row" would break a torch.compile graph.
                empty = torch.isneginf(bias).all(-1).view(n * m, qbs)
                o = o.masked_fill(empty.repeat_interleave(d, 1), 0.0)
                l = l.masked_fill(empty, float("-inf"))
            out.index_copy_(0, q_ids, o if o.dtype == out.dtype else o.to(out.dtype))
            lse.index_copy_(0, q_ids, l)
    return _from_blocks(out, b, h, sq, d), lse.view(b, h, -1)[:, :, :sq]


def _math_attention(qc, kc, vc, bias, scale):
    """Plain fp32 attention for one chunk (non-CPU devices): returns out, lse."""
    s = torch.matmul(qc.float(), kc.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isneginf(lse[..., None]), 0))
    return torch.matmul(p, vc.float()).to(qc.dtype), lse


def _token_ids(block_ids: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """(n, c) flat block ids -> (n, keep) flat token ids (first ``keep`` tokens of the row)."""
    ar = torch.arange(block, device=block_ids.device)
    return (block_ids[:, :, None] * block + ar).reshape(block_ids.shape[0], -1)[:, :keep]


def _forward_quant(q, k, v, mask: BlockSparseMask, scale: float, cfg: QuantConfig):
    """INT8/INT4 emulation with the kernel's arithmetic (integer Q·K, exp2, P/V formats)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    nqb, nkb = mask.num_q_blocks, mask.num_kv_blocks
    sq_pad, sk_pad = nqb * qbs, nkb * kbs
    groups = _work_groups(mask, b, h, q.device, allow_merge=False)
    qz = quantize_qk(q, k, cfg, scale)
    # Per-token scales, flattened like the (padded) data.
    qs = qz.q_scale.repeat_interleave(cfg.q_block, -1)[..., :sq]
    ks = qz.k_scale.repeat_interleave(cfg.k_block, -1)[..., :sk]
    qi_f = torch.nn.functional.pad(qz.q_int.float(), (0, 0, 0, sq_pad - sq)).reshape(-1, d)
    qs_f = torch.nn.functional.pad(qs, (0, sq_pad - sq)).reshape(-1)
    ki_f = torch.nn.functional.pad(qz.k_int.float(), (0, 0, 0, sk_pad - sk)).reshape(-1, d)
    ks_f = torch.nn.functional.pad(ks, (0, sk_pad - sk)).reshape(-1)
    if cfg.pv == PVFormat.INT8:
        v_int, v_scale = quantize_v(v)
        vf = v_int.float()
    else:
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
        vf = v.transpose(1, 2).to(half).float()
        v_scale = None
    vf = torch.nn.functional.pad(vf, (0, 0, 0, sk_pad - sk)).reshape(-1, d)
    out = new_empty((b * h * sq_pad, d), dtype=torch.float32, device=q.device)
    lse = new_empty((b * h * sq_pad,), dtype=torch.float32, device=q.device)
    for grp in groups:
        per = max(1, _WORKSPACE_ELEMENTS // (grp.keys * max(d, qbs)))
        for s in range(0, grp.q_blocks.shape[0], per):
            q_blk = grp.q_blocks[s:s + per, 0]
            kv_tok = _token_ids(grp.kv_blocks[s:s + per], kbs, grp.keys)
            q_tok = _token_ids(q_blk[:, None], qbs, qbs)
            # Integer products are exact in fp32 (|sum| <= 127 * 127 * D < 2**24).
            sc = torch.matmul(qi_f[q_tok], ki_f[kv_tok].transpose(-1, -2))
            sc = sc * qs_f[q_tok][..., None] * ks_f[kv_tok][:, None, :]  # log2-domain logits
            if grp.tile_ids is not None:
                sc = sc + _tile_bias(mask, grp.tile_ids[s:s + per], grp.keys, torch.float32, q.device)[:, 0]
            mx = sc.amax(-1, keepdim=True)
            mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
            p = torch.exp2(sc - mx)
            l = p.sum(-1, keepdim=True)
            if cfg.pv == PVFormat.INT8:
                p = round_half_away(p * cfg.p_scale_inv)
                o = torch.matmul(p, vf[kv_tok]) / cfg.p_scale_inv
                o = o * v_scale.reshape(b * h, d)[q_blk // nqb][:, None, :]
            else:
                o = torch.matmul(p.to(half).float(), vf[kv_tok])
            o = o / torch.where(l > 0, l, torch.ones_like(l))
            ll = torch.where(l > 0, (mx + torch.log2(l)) / LOG2E, torch.full_like(l, float("-inf")))
            out.index_copy_(0, q_tok.reshape(-1), o.reshape(-1, d))
            lse.index_copy_(0, q_tok.reshape(-1), ll.reshape(-1))
    out = out.view(b, h, sq_pad, d)[:, :, :sq].transpose(1, 2).to(q.dtype)
    return out, lse.view(b, h, sq_pad)[:, :, :sq]


def _backward(q, k, v, out, lse, grad_out, grad_lse, mask: BlockSparseMask, scale: float):
    """dq, dk, dv by recomputation per group (fp32 math), including the LSE's gradient."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    nqb, nkb = mask.num_q_blocks, mask.num_kv_blocks
    groups = _work_groups(mask, b, h, q.device, allow_merge=False)
    qf = _as_blocks(q.float(), qbs, nqb)
    kf = _as_blocks(k.float(), kbs, nkb)
    vf = _as_blocks(v.float(), kbs, nkb)
    dof = _as_blocks(grad_out.float(), qbs, nqb)
    of = _as_blocks(out.float(), qbs, nqb)
    pad_q = nqb * qbs - sq
    lse_f = torch.nn.functional.pad(lse.float(), (0, pad_q), value=float("-inf")).reshape(-1, qbs)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i - dLSE_i (the LSE's own gradient enters here).
    delta = (dof.view(-1, qbs, d) * of.view(-1, qbs, d)).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.nn.functional.pad(grad_lse.float(), (0, pad_q)).reshape(-1, qbs)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for grp in groups:
        c = grp.width
        per = max(1, _WORKSPACE_ELEMENTS // (grp.keys * max(d, qbs)))
        for s in range(0, grp.q_blocks.shape[0], per):
            q_ids = grp.q_blocks[s:s + per, 0]
            kv_ids = grp.kv_blocks[s:s + per].reshape(-1)
            n = q_ids.numel()
            qc = qf.index_select(0, q_ids).view(n, qbs, d)
            doc = dof.index_select(0, q_ids).view(n, qbs, d)
            kc = kf.index_select(0, kv_ids).view(n, c * kbs, d)[:, : grp.keys]
            vc = vf.index_select(0, kv_ids).view(n, c * kbs, d)[:, : grp.keys]
            sc = torch.matmul(qc, kc.transpose(-1, -2)) * scale
            if grp.tile_ids is not None:
                sc = sc + _tile_bias(mask, grp.tile_ids[s:s + per], grp.keys, torch.float32, q.device)[:, 0]
            l = lse_f.index_select(0, q_ids)[..., None]
            empty = torch.isneginf(l)
            p = torch.exp(sc - torch.where(empty, torch.zeros_like(l), l))
            p = torch.where(empty, torch.zeros_like(p), p)
            dv_c = torch.matmul(p.transpose(-1, -2), doc)
            dp = torch.matmul(doc, vc.transpose(-1, -2))
            ds = p * (dp - delta.index_select(0, q_ids)[..., None])
            dq.index_copy_(0, q_ids, (torch.matmul(ds, kc) * scale).view(n, qbs * d))
            dk_c = torch.matmul(ds.transpose(-1, -2), qc) * scale
            tail = c * kbs - grp.keys
            if tail:
                dv_c = torch.nn.functional.pad(dv_c, (0, 0, 0, tail))
                dk_c = torch.nn.functional.pad(dk_c, (0, 0, 0, tail))
            dv.index_add_(0, kv_ids, dv_c.reshape(n * c, kbs * d))
            dk.index_add_(0, kv_ids, dk_c.reshape(n * c, kbs * d))
    return (_from_blocks(dq, b, h, sq, d).to(q.dtype), _from_blocks(dk, b, h, sk, d).to(k.dtype),
            _from_blocks(dv, b, h, sk, d).to(v.dtype))


class _TorchBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, route):
        out, lse = _forward(q, k, v, mask, scale, None, route)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, grad_lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None


def torch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float,
    quant: Optional[QuantConfig] = None,
    route: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on any device with PyTorch ops (fast on CPU).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D); mask already checked against the shapes.
        route: on CPU, how the forward computes the masked result: ``"blocks"`` (gather
            the visited key blocks), ``"dense"`` (one fused call over all pairs with the
            mask as a token bias) or ``"auto"`` (:func:`prefers_dense_route`). Same result
            either way; the backward always walks the blocks.
    Returns:
        out (B, Sq, H, D) in q's dtype, lse fp32 (B, H, Sq) (natural log).
    """
    if route not in ROUTES:
        raise ValueError(f"route={route!r} is not one of {ROUTES}")
    if quant is not None:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ValueError("quantized attention is inference-only; run it under torch.no_grad() or use quant=None")
        return _forward(q, k, v, mask, scale, quant)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TorchBlockSparse.apply(q, k, v, mask, scale, route)
    return _forward(q, k, v, mask, scale, None, route)
