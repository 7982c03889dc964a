"""Triton kernels of block-sparse attention, and the thin launchers that run them.

Layouts (one convention for every kernel here)::

    q, k, v, out, dq, dk, dv   (B, S, H, D)    as diffusers passes them; last dim contiguous
    INT8 q, k (and v)          (B, H, S, D)    from the quantizer; passed as (batch, seq, head) strides
    lse, delta                 fp32 (B, H, Sq) contiguous; lse in natural log
    num, num_full              int32 (Bm, Hm, NB)      Bm in {1, B}, Hm in {1, H} (size 1: stride 0)
    indices, tile_ids          int32 (Bm, Hm, NB, K)   last dim contiguous
    tiles                      uint8 (T, Q_BLOCK, KV_BLOCK) contiguous

The lists are a :class:`~.mask.KernelLayout`: per (batch, head, block) the visited
blocks with the **full blocks first** (``indices[..., :num_full]``, no token of them
masked) and the **partial blocks after** (``indices[..., num_full:num]``: a token tile
``tiles[tile_ids[...]]``, or the last block of a sequence that does not fill it, with
``tile_id = -1``). The mask type derives them once per mask.

Work decomposition: one program per (tile of its own block, batch * head). The forward
and the dQ kernel own ``BLOCK_M`` query rows of one query block and walk the key blocks
of that block's lists; the dK/dV kernel owns ``BLOCK_N`` key columns of one key block
and walks the query blocks of the transposed lists. Each list is walked by **one flat
loop over (visited block x sub-tile)**, FlexAttention's shape::

    full blocks:    for it in range(num_full * SUB):   unmasked loads, no per-element mask
    partial blocks: for it in range((num - num_full) * SUB):   + token tile and length masks

    it ──► block = indices[it // SUB], sub-tile it % SUB of BLOCK_N (or BLOCK_M) tokens

The block index of the next tile is loaded one iteration ahead and carried in a
register, so the tile's address never waits on a load issued in the same iteration and
Triton's software pipeliner keeps the next tiles' K and V loads in flight while the
current tile computes (the wait before each tile leaves ``num_stages - 1`` groups
outstanding, as in Triton's fused-attention tutorial). Block sizes, tile sizes and head
dims are compile-time constants. Scores live in the log2 domain (``sm_scale * log2(e)``
is folded in) so the online softmax uses ``exp2``; on full blocks the scale is applied
inside the exponent's fused multiply-add, as the tutorial does (this needs
``sm_scale >= 0``: the ops layer flips the sign of K otherwise). A row that attends
nothing keeps a running max of -inf and ends with out = 0, lse = -inf.

The backward pass follows FlashAttention-2: a preprocess computes
``delta = rowsum(dO * O) - dLSE`` (the second term carries a gradient flowing into the
returned LSE); the dK/dV kernel and the dQ kernel each own their outputs, so no atomics.

Tile sizes, warps and stages come from :mod:`.tuning` (also read by the ahead-of-time
GPU gate, :mod:`.gpu_check`, which compiles exactly the builds the launchers run).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .mask import KernelLayout

__all__ = [
    "KERNELS",
    "kernel_constexprs",
    "stride_align",
    "pv_dtype_for",
    "layout_offset",
    "launch_forward",
    "launch_forward_quant",
    "launch_backward",
]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Integer arguments Triton must not specialize on (value 1 or divisibility by 16): mask
# layout strides vary from call to call (a broadcast mask has stride 0), and sizes vary
# with every resolution; specializing on them would compile a new binary per mask shape.
# Only the data strides stay specialized, since their divisibility decides vectorized
# loads. The ahead-of-time gate (:mod:`.gpu_check`) compiles exactly this specialization.
_LAYOUT_ARGS = ["stride_nb", "stride_nh", "stride_nblk", "stride_ib", "stride_ih", "stride_iblk"]
_SIZE_ARGS = ["H", "q_len", "kv_len"]
_SCALE_ARGS = ["stride_qsb", "stride_qsh", "stride_ksb", "stride_ksh", "stride_vsb", "stride_vsh"]


# ---------------------------------------------------------------------------- helpers


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride`` itself, with the compiler told it is a multiple of ``ALIGN`` elements.

    The launchers pass ``ALIGN = 8`` when every data stride is a multiple of 8 elements
    (any contiguous tensor whose head dim is a multiple of 8). Triton only learns
    divisibility by 16 from argument values, so without this a head dim of 72 (head
    stride 72) would load element by element instead of in 16-byte vectors.
    """
    if ALIGN > 1:
        stride = stride // ALIGN * ALIGN
    return stride


@triton.jit
def _base(P, b, h, stride_b, stride_s, stride_h, ALIGN: tl.constexpr):
    """(pointer to the (b, h) slice of a (B, S, H, D) tensor, its aligned sequence stride); int64 offsets."""
    return (P + b.to(tl.int64) * _aligned(stride_b, ALIGN) + h.to(tl.int64) * _aligned(stride_h, ALIGN),
            _aligned(stride_s, ALIGN))


@triton.jit
def layout_offset(b, h, blk, stride_b, stride_h, stride_blk):
    """Element offset of (b, h, blk) in a mask-layout tensor, in int64.

    A per-batch layout can hold more than 2^31 entries (HunyuanVideo: 460,800 tokens in
    blocks of 64 is 7,200 x 7,200 blocks per head), so the product is formed in 64 bits.
    """
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + blk.to(tl.int64) * stride_blk


@triton.jit
def _program(H, own_len, Num, NumFull, stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk,
             OWN_BLOCK: tl.constexpr, OWN_TILE: tl.constexpr):
    """The preamble every block-sparse program shares: what it owns and where its lists are.

    A program owns ``OWN_TILE`` tokens (query rows, or key columns for dK/dV) of one mask
    block of ``OWN_BLOCK`` tokens; program id 0 enumerates (block, tile), id 1 is
    batch * H + head. Returns ``(b, h, bh, local, idx, ok, n_full, n_visit, lists)``:
    ``local`` (OWN_TILE,) token positions inside the block, ``idx`` their sequence
    positions, ``ok`` which of them exist, the two list lengths and the int64 offset of
    the block's lists.
    """
    TILES: tl.constexpr = (OWN_BLOCK + OWN_TILE - 1) // OWN_TILE
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    blk = pid // TILES
    local = (pid % TILES) * OWN_TILE + tl.arange(0, OWN_TILE)
    idx = blk * OWN_BLOCK + local
    ok = (local < OWN_BLOCK) & (idx < own_len)
    counts = layout_offset(b, h, blk, stride_nb, stride_nh, stride_nblk)
    n_full = tl.load(NumFull + counts)
    n_visit = tl.load(Num + counts)
    lists = layout_offset(b, h, blk, stride_ib, stride_ih, stride_iblk)
    return b, h, bh, local, idx, ok, n_full, n_visit, lists


@triton.jit
def _load_rows(base, idx, ok, stride_s, offs_d, HEAD_DIM: tl.constexpr):
    """(len(idx), BLOCK_D) rows ``idx`` of a (b, h) slice; absent rows and padded columns read 0."""
    return tl.load(base + idx.to(tl.int64)[:, None] * stride_s + offs_d[None, :],
                   mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0)


@triton.jit
def _first_tile(List, n, BLOCK: tl.constexpr):
    """(token offset of the first tile, block index of the next list entry) of a list of ``n`` blocks."""
    start = tl.load(List, mask=n > 0, other=0) * BLOCK
    nxt = tl.load(List + 1, mask=n > 1, other=0)
    return start, nxt


@triton.jit
def _next_tile(List, n, it, start, nxt, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Advance (start, nxt) from flat iteration ``it`` to ``it + 1`` of a list of ``n`` blocks.

    Sub-tiles of one block follow each other (``start + TILE``); after a block's last
    sub-tile the carried ``nxt`` block begins, and the entry after it is loaded now, one
    whole iteration before its address is needed.
    """
    SUB: tl.constexpr = (BLOCK + TILE - 1) // TILE
    if SUB == 1:
        start = nxt * BLOCK
        nxt = tl.load(List + it + 2, mask=it + 2 < n, other=0)
    else:
        last = it % SUB == SUB - 1
        start = tl.where(last, nxt * BLOCK, start + TILE)
        j = it // SUB + 2
        nxt = tl.where(last, tl.load(List + j, mask=last & (j < n), other=0), nxt)
    return start, nxt


@triton.jit
def _partial_walk(Idx, TileIds, lists, n_full, n_visit, BLOCK: tl.constexpr):
    """Start of the partial-block walk: (its list, its tile ids, its length, start, nxt, first tile id)."""
    part_list = Idx + lists + n_full
    part_ids = TileIds + lists + n_full
    n_part = n_visit - n_full
    start, nxt = _first_tile(part_list, n_part, BLOCK)
    tid = tl.load(part_ids, mask=n_part > 0, other=-1)
    return part_list, part_ids, n_part, start, nxt, tid


@triton.jit
def _next_partial(part_list, part_ids, n_part, it, start, nxt, tid, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """:func:`_next_tile` for the partial walk, which also carries the tile id of the current block."""
    SUB: tl.constexpr = (BLOCK + TILE - 1) // TILE
    if SUB == 1:
        tid = tl.load(part_ids + it + 1, mask=it + 1 < n_part, other=-1)
    else:
        j = it // SUB + 1
        tid = tl.where(it % SUB == SUB - 1, tl.load(part_ids + j, mask=j < n_part, other=-1), tid)
    start, nxt = _next_tile(part_list, n_part, it, start, nxt, BLOCK, TILE)
    return start, nxt, tid


@triton.jit
def _tile_bits(Tiles, tile_id, rows, cols, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr):
    """bool (len(rows), len(cols)) token tile ``tile_id`` at block-local ``rows`` x ``cols``; -1: all True.

    ``rows`` / ``cols`` may be 2D already broadcast against each other (the dK/dV kernel
    passes them transposed). Positions past the block read False.
    """
    keep = (rows < Q_BLOCK) & (cols < KV_BLOCK)
    if tile_id >= 0:
        t = tl.load(Tiles + tile_id.to(tl.int64) * (Q_BLOCK * KV_BLOCK) + rows * KV_BLOCK + cols, mask=keep, other=0)
        keep = keep & (t != 0)
    return keep


@triton.jit
def _key_tile_keep(Tiles, tid, r_in, start, kv_len, TILE_N: tl.constexpr, Q_BLOCK: tl.constexpr,
                   KV_BLOCK: tl.constexpr):
    """(keep (len(r_in), TILE_N), col_ok (TILE_N,)) of the partial key tile from token ``start``:
    the token tile ``tid`` of the block, the block's end and the key sequence's end."""
    offs_n = tl.arange(0, TILE_N)
    c_in = start % KV_BLOCK + offs_n
    c_ok = (c_in < KV_BLOCK) & (start + offs_n < kv_len)
    return _tile_bits(Tiles, tid, r_in[:, None], c_in[None, :], Q_BLOCK, KV_BLOCK) & c_ok[None, :], c_ok


@triton.jit
def _attention_program(Q, K, V, X, H, own_len, Num, NumFull,
                       stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_vb, stride_vs, stride_vh, stride_xb, stride_xs, stride_xh,
                       stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk,
                       OWN_BLOCK: tl.constexpr, OWN_TILE: tl.constexpr, ALIGN: tl.constexpr):
    """The preamble of the forward and both gradient kernels: :func:`_program`, and the (b, h)
    slices of Q, K, V and a fourth (B, S, H, D) tensor X (Out, or dO).

    Returns ``(b, h, bh, local, idx, ok, n_full, n_visit, lists)`` as :func:`_program`,
    then (base pointer, sequence stride) of Q, K, V and X.
    """
    b, h, bh, local, idx, ok, n_full, n_visit, lists = _program(
        H, own_len, Num, NumFull, stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk,
        OWN_BLOCK, OWN_TILE)
    q_base, stride_qs = _base(Q, b, h, stride_qb, stride_qs, stride_qh, ALIGN)
    k_base, stride_ks = _base(K, b, h, stride_kb, stride_ks, stride_kh, ALIGN)
    v_base, stride_vs = _base(V, b, h, stride_vb, stride_vs, stride_vh, ALIGN)
    x_base, stride_xs = _base(X, b, h, stride_xb, stride_xs, stride_xh, ALIGN)
    return (b, h, bh, local, idx, ok, n_full, n_visit, lists,
            q_base, stride_qs, k_base, stride_ks, v_base, stride_vs, x_base, stride_xs)


# ---------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(acc, acc_hi, l_i, m_i, q, q_scale, K, KS, V, start, stride_ks, stride_vs, keep, col_ok,
              qk_scale, p_scale_inv,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
              MASKED: tl.constexpr, LOAD_MASKED: tl.constexpr,
              QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, PV_DTYPE: tl.constexpr, QUANT_K_BLOCK: tl.constexpr,
              SPLIT_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of one query tile with the ``TILE_N`` keys from token ``start``.

    acc: fp32 (BLOCK_M, BLOCK_D), or its first half when ``SPLIT_D`` (``acc_hi`` the
    second); l_i, m_i: fp32 (BLOCK_M,). ``keep`` (bool, broadcast to (BLOCK_M, TILE_N))
    masks scores when ``MASKED``; ``col_ok`` (TILE_N,) masks K/V loads when
    ``LOAD_MASKED``. Without ``MASKED`` every row has at least one finite score, so the
    empty-row guard is left out.
    """
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + start.to(tl.int64) * stride_ks + (offs_n[None, :] * stride_ks + offs_d[:, None])
    if LOAD_MASKED:
        kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0)
    elif HEAD_DIM < BLOCK_D:
        kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0)
    else:
        kt = tl.load(k_ptrs)
    if QK_INT8:
        s = tl.dot(q, kt).to(tl.float32)
        if QUANT_K_BLOCK % TILE_N == 0:
            # The tile lies inside one quantization block of K: one scale per row.
            row_scale = q_scale * tl.load(KS + start // QUANT_K_BLOCK)
            s_scale = row_scale[:, None]
        else:
            ks = tl.load(KS + (start + offs_n) // QUANT_K_BLOCK, mask=col_ok, other=0.0)
            s = s * (q_scale[:, None] * ks[None, :])
            row_scale = 1.0
            s_scale = 1.0
    else:
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        row_scale = qk_scale
        s_scale = qk_scale
    if MASKED:
        s = tl.where(keep, s * s_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing attended so far keeps -inf; shift by 0 so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
    else:
        # Scales are >= 0, so max(s * scale) = max(s) * scale; the scale then rides in the
        # exponent's fused multiply-add instead of a multiply per score.
        m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
        p = tl.math.exp2(s * s_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_INT8:
        # p is in [0, 1] (relative to the running max): round(p * p_scale_inv), half away from zero.
        p_op = (p * p_scale_inv + 0.5).to(tl.int8)
    else:
        p_op = p.to(PV_DTYPE)
    OUT_D: tl.constexpr = BLOCK_D // 2 if SPLIT_D else BLOCK_D
    offs_o = tl.arange(0, OUT_D)
    for half in tl.static_range(2 if SPLIT_D else 1):
        o_ok = half * OUT_D + offs_o < HEAD_DIM
        v_ptrs = V + start.to(tl.int64) * stride_vs + (offs_n[:, None] * stride_vs + half * OUT_D + offs_o[None, :])
        if LOAD_MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & o_ok[None, :], other=0)
        elif HEAD_DIM < BLOCK_D:
            v = tl.load(v_ptrs, mask=o_ok[None, :], other=0)
        else:
            v = tl.load(v_ptrs)
        a = acc if half == 0 else acc_hi
        if PV_INT8:
            a = a * alpha[:, None] + tl.dot(p_op, v).to(tl.float32)
        else:
            a = tl.dot(p_op, v.to(PV_DTYPE), a * alpha[:, None], input_precision=DOT_PRECISION)
        if half == 0:
            acc = a
        else:
            acc_hi = a
    return acc, acc_hi, l_i, m_new


@triton.jit
def _fwd_store(acc, l_i, m_i, scale, Out, Lse, out_base, stride_os, bh, rows, row_ok, q_len, half,
               HEAD_DIM: tl.constexpr, OUT_D: tl.constexpr, STORE_LSE: tl.constexpr):
    """Normalise and store one (BLOCK_M, OUT_D) slice of the output (columns from ``half * OUT_D``).

    ``scale`` (OUT_D,) multiplies the accumulator first (INT8 P·V's V scales, else 1).
    """
    nonempty = l_i > 0.0
    offs_o = half * OUT_D + tl.arange(0, OUT_D)
    out = acc * scale[None, :] / tl.where(nonempty, l_i, 1.0)[:, None]
    tl.store(out_base + rows.to(tl.int64)[:, None] * stride_os + offs_o[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_o < HEAD_DIM)[None, :])
    if STORE_LSE:
        lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * _LN2, float("-inf"))
        tl.store(Lse + bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=_LAYOUT_ARGS + _SIZE_ARGS + _SCALE_ARGS)
def _bsa_fwd_kernel(
    Q, QS, K, KS, V, VS, Out, Lse,
    Num, NumFull, KvIdx, TileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    stride_nb, stride_nh, stride_nblk,
    stride_ib, stride_ih, stride_iblk,
    H, q_len, kv_len,
    qk_scale, p_scale_inv,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL_BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, PV_DTYPE: tl.constexpr,
    QUANT_Q_BLOCK: tl.constexpr, QUANT_K_BLOCK: tl.constexpr,
    SPLIT_D: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """Forward of block-sparse attention (float, or INT8 Q·K) for one (query tile, batch*head).

    Float (``QK_INT8`` false): Q (B, Sq, H, D); K, V (B, Sk, H, D); ``qk_scale =
    sm_scale * log2(e)``; QS, KS, VS unused. INT8: Q, K int8 (B, H, S, D) (strides
    passed as batch, seq, head); QS fp32 (B, H, ceil(Sq / QUANT_Q_BLOCK)) with
    ``sm_scale * log2(e)`` folded in, KS fp32 (B, H, ceil(Sk / QUANT_K_BLOCK)); scores
    are ``int32(Q·K^T) * QS[row] * KS[col]``. V: float (B, Sk, H, D), multiplied as
    PV_DTYPE, or with ``PV_INT8`` int8 (B, H, Sk, D) with VS fp32 (B, H, D) per channel
    and P stored as ``round(P * p_scale_inv)``. Out: (B, Sq, H, D); Lse: fp32 (B, H, Sq).
    Lists: see the module docstring.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16 and PARTIAL_BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert(not QK_INT8 or (BLOCK_N >= 32 and PARTIAL_BLOCK_N >= 32 and BLOCK_D >= 32),
                     "int8 tl.dot needs K >= 32 along each reduction axis")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    tl.static_assert(not SPLIT_D or BLOCK_D >= 32, "SPLIT_D halves need 16 columns each")
    tl.static_assert((QUANT_Q_BLOCK & (QUANT_Q_BLOCK - 1)) == 0 and (QUANT_K_BLOCK & (QUANT_K_BLOCK - 1)) == 0,
                     "quantization blocks are powers of two")
    EVEN_N: tl.constexpr = KV_BLOCK % BLOCK_N == 0

    (b, h, bh, r_in, rows, row_ok, n_full, n_visit, lists,
     q_base, stride_qs, k_base, stride_ks, v_base, stride_vs, out_base, stride_os) = _attention_program(
        Q, K, V, Out, H, q_len, Num, NumFull, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
        stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk, Q_BLOCK, BLOCK_M, STRIDE_ALIGN)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, row_ok, stride_qs, offs_d, HEAD_DIM)
    if QK_INT8:
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + rows // QUANT_Q_BLOCK, mask=row_ok, other=0.0)
        ks_base = KS + b * stride_ksb + h * stride_ksh
    else:
        q_scale = qk_scale
        ks_base = KS

    OUT_D: tl.constexpr = BLOCK_D // 2 if SPLIT_D else BLOCK_D
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, OUT_D], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, OUT_D if SPLIT_D else 16], dtype=tl.float32)

    # Full blocks: no token of them is masked. Only a sub-tile reaching past a block whose
    # size BLOCK_N does not divide needs a column mask (never for the shipped block sizes).
    full_list = KvIdx + lists
    start, nxt = _first_tile(full_list, n_full, KV_BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, n_full * ((KV_BLOCK + BLOCK_N - 1) // BLOCK_N)):
        c_ok = (start % KV_BLOCK + offs_n) < KV_BLOCK
        acc, acc_hi, l_i, m_i = _fwd_tile(
            acc, acc_hi, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start, stride_ks, stride_vs,
            c_ok[None, :], c_ok, qk_scale, p_scale_inv,
            HEAD_DIM, BLOCK_D, BLOCK_N, not EVEN_N, not EVEN_N, QK_INT8, PV_INT8, PV_DTYPE, QUANT_K_BLOCK,
            SPLIT_D, DOT_PRECISION)
        start, nxt = _next_tile(full_list, n_full, it, start, nxt, KV_BLOCK, BLOCK_N)

    # Partial blocks: token tiles and the end of the key sequence.
    part_list, part_ids, n_part, start, nxt, tid = _partial_walk(KvIdx, TileIds, lists, n_full, n_visit, KV_BLOCK)
    for it in range(0, n_part * ((KV_BLOCK + PARTIAL_BLOCK_N - 1) // PARTIAL_BLOCK_N)):
        keep, c_ok = _key_tile_keep(Tiles, tid, r_in, start, kv_len, PARTIAL_BLOCK_N, Q_BLOCK, KV_BLOCK)
        acc, acc_hi, l_i, m_i = _fwd_tile(
            acc, acc_hi, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start, stride_ks, stride_vs,
            keep, c_ok, qk_scale, p_scale_inv,
            HEAD_DIM, BLOCK_D, PARTIAL_BLOCK_N, True, True, QK_INT8, PV_INT8, PV_DTYPE, QUANT_K_BLOCK,
            SPLIT_D, DOT_PRECISION)
        start, nxt, tid = _next_partial(part_list, part_ids, n_part, it, start, nxt, tid, KV_BLOCK, PARTIAL_BLOCK_N)

    for half in tl.static_range(2 if SPLIT_D else 1):
        offs_o = half * OUT_D + tl.arange(0, OUT_D)
        if PV_INT8:
            scale = tl.load(VS + b * stride_vsb + h * stride_vsh + offs_o, mask=offs_o < HEAD_DIM, other=0.0)
            scale = scale / p_scale_inv
        else:
            scale = tl.full([OUT_D], 1.0, dtype=tl.float32)
        _fwd_store(acc if half == 0 else acc_hi, l_i, m_i, scale, Out, Lse, out_base, stride_os, bh, rows, row_ok,
                   q_len, half, HEAD_DIM, OUT_D, half == 0)


# ---------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["H", "q_len"])
def _bsa_bwd_preprocess_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_os, stride_oh,
    stride_gb, stride_gs, stride_gh,
    H, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dLSE, fp32 (B, H, Sq).

    Out, DOut: (B, Sq, H, D); DLse: fp32 (B, H, Sq) contiguous (read when HAS_DLSE).
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    offs_d = tl.arange(0, BLOCK_D)
    o_base, stride_os = _base(Out, b, h, stride_ob, stride_os, stride_oh, STRIDE_ALIGN)
    g_base, stride_gs = _base(DOut, b, h, stride_gb, stride_gs, stride_gh, STRIDE_ALIGN)
    o = _load_rows(o_base, rows, row_ok, stride_os, offs_d, HEAD_DIM)
    do = _load_rows(g_base, rows, row_ok, stride_gs, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * q_len + rows, delta, mask=row_ok)


@triton.jit
def _log2_lse(lse):
    """LSE in the log2 domain; rows that attend nothing (-inf) get +inf, so their P = exp2(s - inf) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DOut, Lse, Delta, start, stride_qs, stride_gs, row_base, q_len, keep,
               qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_M: tl.constexpr, MASKED: tl.constexpr,
               OUTPUTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK and/or dV (fp32 (BLOCK_N, BLOCK_D)) of one key tile over ``TILE_M`` query rows from ``start``.

    k, v: (BLOCK_N, BLOCK_D). ``OUTPUTS``: 3 both, 1 dV only, 2 dK only (the other
    accumulator passes through untouched). ``keep`` (broadcast to (BLOCK_N, TILE_M))
    masks P when ``MASKED``, which also masks the row loads at the end of the query sequence.
    """
    WANT_DV: tl.constexpr = OUTPUTS % 2 == 1
    WANT_DK: tl.constexpr = OUTPUTS >= 2
    offs_m = tl.arange(0, TILE_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start + offs_m
    qd_ptrs = start.to(tl.int64) * stride_qs + (offs_m[:, None] * stride_qs + offs_d[None, :])
    gd_ptrs = start.to(tl.int64) * stride_gs + (offs_m[:, None] * stride_gs + offs_d[None, :])
    if MASKED:
        ok = rows < q_len
        q = tl.load(Q + qd_ptrs, mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0)
        do = tl.load(DOut + gd_ptrs, mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0)
        lse2 = _log2_lse(tl.load(Lse + row_base + rows, mask=ok, other=float("-inf")))
        if WANT_DK:
            delta = tl.load(Delta + row_base + rows, mask=ok, other=0.0)
    else:
        # Every row of a full block attends its whole key block: its LSE is finite.
        if HEAD_DIM < BLOCK_D:
            q = tl.load(Q + qd_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0)
            do = tl.load(DOut + gd_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0)
        else:
            q = tl.load(Q + qd_ptrs)
            do = tl.load(DOut + gd_ptrs)
        lse2 = tl.load(Lse + row_base + rows) * _LOG2E
        if WANT_DK:
            delta = tl.load(Delta + row_base + rows)
    # Transposed scores (BLOCK_N, TILE_M): key rows, query columns.
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    if MASKED:
        pt = tl.where(keep, pt, 0.0)
    if WANT_DV:
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    if WANT_DK:
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_LAYOUT_ARGS + _SIZE_ARGS)
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    Num, NumFull, QIdx, TileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dkb, stride_dks, stride_dkh,
    stride_nb, stride_nh, stride_nblk,
    stride_ib, stride_ih, stride_iblk,
    H, q_len, kv_len,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL_BLOCK_M: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, OUTPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """dK, dV for one (key tile, batch*head), walking the query blocks that visit its key block.

    Q, DOut: (B, Sq, H, D); K, V: (B, Sk, H, D); Lse, Delta: fp32 (B, H, Sq); DK, DV:
    (B, Sk, H, D) sharing strides. Lists: the mask's transposed :class:`~.mask.KernelLayout`
    (query blocks per key block; a partial block is a token tile or the last, short
    query block). ``OUTPUTS``: 3 computes both gradients; 1 (dV) and 2 (dK) split them
    over two launches where two fp32 (BLOCK_N, head dim) accumulators do not fit in
    registers (the split recomputes Q·K^T once more).
    """
    tl.static_assert(BLOCK_M >= 16 and PARTIAL_BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    tl.static_assert(OUTPUTS >= 1 and OUTPUTS <= 3, "OUTPUTS: 1 dV, 2 dK, 3 both")
    EVEN_M: tl.constexpr = Q_BLOCK % BLOCK_M == 0
    WANT_DV: tl.constexpr = OUTPUTS % 2 == 1
    WANT_DK: tl.constexpr = OUTPUTS >= 2

    (b, h, bh, c_in, cols, col_ok, n_full, n_visit, lists,
     q_base, stride_qs, k_base, stride_ks, v_base, stride_vs, g_base, stride_gs) = _attention_program(
        Q, K, V, DOut, H, kv_len, Num, NumFull, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
        stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk, KV_BLOCK, BLOCK_N, STRIDE_ALIGN)
    dk_base, stride_dks = _base(DK, b, h, stride_dkb, stride_dks, stride_dkh, STRIDE_ALIGN)
    dv_base, _ = _base(DV, b, h, stride_dkb, stride_dks, stride_dkh, STRIDE_ALIGN)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, cols, col_ok, stride_ks, offs_d, HEAD_DIM)
    if WANT_DK:
        v = _load_rows(v_base, cols, col_ok, stride_vs, offs_d, HEAD_DIM)
    else:
        v = k  # unused
    row_base = bh.to(tl.int64) * q_len

    # An accumulator this launch does not compute is a 16 x 16 placeholder.
    dk = tl.zeros([BLOCK_N if WANT_DK else 16, BLOCK_D if WANT_DK else 16], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N if WANT_DV else 16, BLOCK_D if WANT_DV else 16], dtype=tl.float32)
    full_list = QIdx + lists
    start, nxt = _first_tile(full_list, n_full, Q_BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    for it in range(0, n_full * ((Q_BLOCK + BLOCK_M - 1) // BLOCK_M)):
        # Only a sub-tile reaching past a block whose size BLOCK_M does not divide is masked.
        r_ok = (start % Q_BLOCK + offs_m) < Q_BLOCK
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, g_base, Lse, Delta, start, stride_qs, stride_gs, row_base, q_len,
                            r_ok[None, :], qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, not EVEN_M, OUTPUTS, DOT_PRECISION)
        start, nxt = _next_tile(full_list, n_full, it, start, nxt, Q_BLOCK, BLOCK_M)

    part_list, part_ids, n_part, start, nxt, tid = _partial_walk(QIdx, TileIds, lists, n_full, n_visit, Q_BLOCK)
    offs_pm = tl.arange(0, PARTIAL_BLOCK_M)
    for it in range(0, n_part * ((Q_BLOCK + PARTIAL_BLOCK_M - 1) // PARTIAL_BLOCK_M)):
        r_in = start % Q_BLOCK + offs_pm
        keep = _tile_bits(Tiles, tid, r_in[None, :], c_in[:, None], Q_BLOCK, KV_BLOCK)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, g_base, Lse, Delta, start, stride_qs, stride_gs, row_base, q_len,
                            keep, qk_scale, HEAD_DIM, BLOCK_D, PARTIAL_BLOCK_M, True, OUTPUTS, DOT_PRECISION)
        start, nxt, tid = _next_partial(part_list, part_ids, n_part, it, start, nxt, tid, Q_BLOCK, PARTIAL_BLOCK_M)

    out_off = cols.to(tl.int64)[:, None] * stride_dks + offs_d[None, :]
    kv_msk = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if WANT_DK:
        tl.store(dk_base + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_msk)
    if WANT_DV:
        tl.store(dv_base + out_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, start, stride_ks, stride_vs, keep, col_ok, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
             LOAD_MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (fp32 (BLOCK_M, BLOCK_D)) over the ``TILE_N`` keys from token ``start``.

    ``keep`` (broadcast to (BLOCK_M, TILE_N)) masks P when ``MASKED``; ``col_ok`` masks the
    K/V loads when ``LOAD_MASKED``.
    """
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + start.to(tl.int64) * stride_ks + (offs_n[None, :] * stride_ks + offs_d[:, None])
    v_ptrs = V + start.to(tl.int64) * stride_vs + (offs_n[None, :] * stride_vs + offs_d[:, None])
    if LOAD_MASKED:
        kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0)
        vt = tl.load(v_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0)
    elif HEAD_DIM < BLOCK_D:
        kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0)
        vt = tl.load(v_ptrs, mask=d_ok[:, None], other=0)
    else:
        kt = tl.load(k_ptrs)
        vt = tl.load(v_ptrs)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_LAYOUT_ARGS + _SIZE_ARGS)
def _bsa_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    Num, NumFull, KvIdx, TileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_nb, stride_nh, stride_nblk,
    stride_ib, stride_ih, stride_iblk,
    H, q_len, kv_len,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL_BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """dQ for one (query tile, batch*head), walking the key blocks of its query block's lists.

    Shapes as in the forward; DQ: (B, Sq, H, D) in the input dtype.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16 and PARTIAL_BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    EVEN_N: tl.constexpr = KV_BLOCK % BLOCK_N == 0

    (b, h, bh, r_in, rows, row_ok, n_full, n_visit, lists,
     q_base, stride_qs, k_base, stride_ks, v_base, stride_vs, g_base, stride_gs) = _attention_program(
        Q, K, V, DOut, H, q_len, Num, NumFull, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
        stride_nb, stride_nh, stride_nblk, stride_ib, stride_ih, stride_iblk, Q_BLOCK, BLOCK_M, STRIDE_ALIGN)
    dq_base, stride_dqs = _base(DQ, b, h, stride_dqb, stride_dqs, stride_dqh, STRIDE_ALIGN)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, row_ok, stride_qs, offs_d, HEAD_DIM)
    do = _load_rows(g_base, rows, row_ok, stride_gs, offs_d, HEAD_DIM)
    row_base = bh.to(tl.int64) * q_len
    # Rows past the sequence read lse = -inf, hence +inf here and P = 0.
    lse2 = _log2_lse(tl.load(Lse + row_base + rows, mask=row_ok, other=float("-inf")))
    delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_list = KvIdx + lists
    start, nxt = _first_tile(full_list, n_full, KV_BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, n_full * ((KV_BLOCK + BLOCK_N - 1) // BLOCK_N)):
        c_ok = (start % KV_BLOCK + offs_n) < KV_BLOCK
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start, stride_ks, stride_vs, c_ok[None, :], c_ok,
                      qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, not EVEN_N, not EVEN_N, DOT_PRECISION)
        start, nxt = _next_tile(full_list, n_full, it, start, nxt, KV_BLOCK, BLOCK_N)

    part_list, part_ids, n_part, start, nxt, tid = _partial_walk(KvIdx, TileIds, lists, n_full, n_visit, KV_BLOCK)
    for it in range(0, n_part * ((KV_BLOCK + PARTIAL_BLOCK_N - 1) // PARTIAL_BLOCK_N)):
        keep, c_ok = _key_tile_keep(Tiles, tid, r_in, start, kv_len, PARTIAL_BLOCK_N, Q_BLOCK, KV_BLOCK)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start, stride_ks, stride_vs, keep, c_ok,
                      qk_scale, HEAD_DIM, BLOCK_D, PARTIAL_BLOCK_N, True, True, DOT_PRECISION)
        start, nxt, tid = _next_partial(part_list, part_ids, n_part, it, start, nxt, tid, KV_BLOCK, PARTIAL_BLOCK_N)

    dq *= sm_scale
    tl.store(dq_base + rows.to(tl.int64)[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------- launchers


def _layout_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, block) strides of a layout tensor; size-1 batch/head dims broadcast (stride 0)."""
    return tuple(0 if (i < 2 and t.shape[i] == 1) else t.stride(i) for i in range(3))


def _layout_args(layout: KernelLayout) -> tuple:
    """Layout tensors and their strides as the kernels take them (counts share strides, lists share strides)."""
    tiles = layout.tiles
    if tiles is None:
        tiles = torch.zeros((1,), dtype=torch.uint8, device=layout.indices.device)  # never read: no tile ids >= 0
    return ((layout.num, layout.num_full, layout.indices, layout.tile_ids, tiles),
            _layout_strides(layout.num) + _layout_strides(layout.indices))


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a (B, S, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    """Input precision of ``tl.dot`` for ``dtype`` inputs: "tf32" (fp16 / bf16 ignore it).

    fp32 inputs multiply on the tensor cores with TF32 operands (10-bit mantissa) and
    fp32 accumulation, as torch does for fp32 matmuls with
    ``torch.backends.cuda.matmul.allow_tf32 = True``: expect relative errors around 1e-3
    rather than fp32's 1e-6; use ``backend="torch"`` when exact fp32 products matter.
    Why not exact fp32: "ieee" compiles to FMA loops without tensor cores, and "tf32x3"
    (three TF32 products, near-fp32 accuracy) needs so many registers that every
    head dim above 64 spills (measured with :mod:`.gpu_check`).
    Triton's CPU interpreter ignores the setting and multiplies in fp32, so the
    interpreter tests check the fp32 algorithm, not the TF32 rounding.
    """
    return "tf32"


def pv_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of P·V in quantized attention with ``pv="half"``: bf16 for bf16 inputs, else fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def stride_align(*tensors: torch.Tensor) -> int:
    """``STRIDE_ALIGN`` for a launch: 8 if every batch / seq / head stride of ``tensors`` is a
    multiple of 8 elements (always so for contiguous inputs with a head dim multiple of 8),
    else 1. The ahead-of-time check compiles the aligned builds."""
    ok = all(t.stride(i) % 8 == 0 for t in tensors for i in range(t.dim() - 1))
    return 8 if ok else 1


def kernel_constexprs(kernel: str, dtype: torch.dtype, head_dim: int, tiles: tuning.TileConfig, *,
                      q_block: int = 128, kv_block: int = 128, arch: int = 80, pv_int8: bool = False,
                      quant_blocks: tuple[int, int] = (128, 64), has_dlse: bool = True,
                      strides_aligned: int = 8, outputs: int = 3) -> dict:
    """Compile-time arguments of ``kernel`` (a key of :data:`KERNELS`) for one launch.

    The launchers and the ahead-of-time gate both build them here, so the gate compiles
    what the launchers run. ``dtype`` is the input (q) dtype; ``q_block`` / ``kv_block``
    the mask's block sizes; ``arch`` the :func:`.tuning.arch_of` key (it decides
    ``SPLIT_D``); ``quant_blocks`` are ``QuantConfig.q_block, k_block``;
    ``strides_aligned`` is :func:`stride_align` of the data tensors; ``outputs`` the
    dK/dV kernel's ``OUTPUTS`` (3 both; 1 dV, 2 dK when the tiles split them).
    """
    block_d = tuning.padded_head_dim(head_dim)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.block_m, STRIDE_ALIGN=strides_aligned)
    if kernel == "bwd_preprocess":
        meta["HAS_DLSE"] = has_dlse
        return meta
    meta.update(BLOCK_N=tiles.block_n, Q_BLOCK=q_block, KV_BLOCK=kv_block)
    meta["PARTIAL_BLOCK_M" if kernel == "bwd_dkdv" else "PARTIAL_BLOCK_N"] = tiles.partial_tile(kernel)
    if kernel == "bwd_dkdv":
        meta["OUTPUTS"] = outputs
    if kernel in ("fwd", "fwd_quant"):
        quant = kernel == "fwd_quant"
        meta.update(QK_INT8=quant, PV_INT8=quant and pv_int8,
                    PV_DTYPE=tuning.triton_dtype(pv_dtype_for(dtype) if quant else dtype),
                    QUANT_Q_BLOCK=quant_blocks[0], QUANT_K_BLOCK=quant_blocks[1],
                    SPLIT_D=tuning.split_head_dim(arch, tiles.block_m, block_d))
    meta["DOT_PRECISION"] = _dot_precision(dtype)
    return meta


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KernelLayout,
    q_block: int, kv_block: int, sm_scale: float, out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Run the forward kernel, writing ``out`` (B, Sq, H, D) and ``lse`` fp32 (B, H, Sq).

    q: (B, Sq, H, D), k, v: (B, Sk, H, D), last dim contiguous; ``layout`` from
    :meth:`~.mask.BlockSparseMask.kernel_layout`; ``sm_scale >= 0`` (module docstring).
    """
    bsz, sq, nh, d = q.shape
    arch = tuning.arch_of(q.device)
    cfg = tuning.select("fwd", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tensors, layout_strides = _layout_args(layout)
    grid = (triton.cdiv(q_block, cfg.block_m) * layout.num.shape[2], bsz * nh)
    _bsa_fwd_kernel[grid](
        q, lse, k, lse, v, lse, out, lse,  # lse stands in for the unused scale pointers
        *tensors,
        *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out),
        0, 0, 0, 0, 0, 0,
        *layout_strides,
        nh, sq, k.shape[1],
        sm_scale * _LOG2E.value, 1.0,
        **kernel_constexprs("fwd", q.dtype, d, cfg, q_block=q_block, kv_block=kv_block, arch=arch,
                            strides_aligned=stride_align(q, k, v, out)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tuning.LAUNCH_OPTIONS,
    )


def launch_forward_quant(
    q_int: torch.Tensor, q_scale: torch.Tensor, k_int: torch.Tensor, k_scale: torch.Tensor,
    v: torch.Tensor, v_scale: Optional[torch.Tensor], layout: KernelLayout,
    q_block: int, kv_block: int, quant_q_block: int, quant_k_block: int, p_scale_inv: int,
    out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Run the forward kernel with INT8 Q·K.

    q_int: int8 (B, H, Sq, D), q_scale fp32 (B, H, nQ); k_int: int8 (B, H, Sk, D),
    k_scale fp32 (B, H, nK) (from ``quantize_qk``); v: float (B, Sk, H, D) with
    ``v_scale=None`` (P·V in :func:`pv_dtype_for` of out's dtype), or int8 (B, H, Sk, D)
    with ``v_scale`` fp32 (B, H, D) (INT8 P·V). Writes out (B, Sq, H, D) and lse fp32 (B, H, Sq).
    """
    bsz, nh, sq, d = q_int.shape
    pv_int8 = v_scale is not None
    arch = tuning.arch_of(q_int.device)
    cfg = tuning.select("fwd_quant", q_int.device, out.dtype, d, q_block=q_block, kv_block=kv_block,
                        pv_int8=pv_int8)
    tensors, layout_strides = _layout_args(layout)
    if pv_int8:
        v_str = (v.stride(0), v.stride(2), v.stride(1))  # (B, H, Sk, D): batch, seq, head strides
        vs, vs_str = v_scale, (v_scale.stride(0), v_scale.stride(1))
    else:
        v_str = _bsh(v)
        vs, vs_str = q_scale, (0, 0)  # placeholder, never read
    grid = (triton.cdiv(q_block, cfg.block_m) * layout.num.shape[2], bsz * nh)
    _bsa_fwd_kernel[grid](
        q_int, q_scale, k_int, k_scale, v, vs, out, lse,
        *tensors,
        q_int.stride(0), q_int.stride(2), q_int.stride(1),
        k_int.stride(0), k_int.stride(2), k_int.stride(1),
        *v_str, *_bsh(out),
        q_scale.stride(0), q_scale.stride(1), k_scale.stride(0), k_scale.stride(1), *vs_str,
        *layout_strides,
        nh, sq, k_int.shape[2],
        1.0, float(p_scale_inv),
        **kernel_constexprs("fwd_quant", out.dtype, d, cfg, q_block=q_block, kv_block=kv_block, arch=arch,
                            pv_int8=pv_int8, quant_blocks=(quant_q_block, quant_k_block),
                            strides_aligned=stride_align(q_int, k_int, v, out)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tuning.LAUNCH_OPTIONS,
    )


def launch_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    layout: KernelLayout, layout_t: KernelLayout,
    q_block: int, kv_block: int, sm_scale: float,
    delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
) -> None:
    """Run the three backward kernels.

    grad_out, q, out, dq: (B, Sq, H, D); k, v, dk, dv: (B, Sk, H, D) (dk, dv share
    strides); lse, delta (workspace), grad_lse (or None): fp32 (B, H, Sq) contiguous.
    Layouts: the forward one (``layout``, for dQ) and the transposed one (``layout_t``,
    from :meth:`~.mask.BlockSparseMask.kernel_layout_transposed`, for dK/dV).
    """
    bsz, sq, nh, d = q.shape
    sk = k.shape[1]
    align = stride_align(q, k, v, out, grad_out, dq, dk, dv)
    opts = tuning.LAUNCH_OPTIONS
    prep = tuning.select("bwd_preprocess", q.device, q.dtype, d)
    _bsa_bwd_preprocess_kernel[(triton.cdiv(sq, prep.block_m), bsz * nh)](
        out, grad_out, grad_lse if grad_lse is not None else lse, delta,
        *_bsh(out), *_bsh(grad_out),
        nh, sq,
        **kernel_constexprs("bwd_preprocess", q.dtype, d, prep, has_dlse=grad_lse is not None, strides_aligned=align),
        num_warps=prep.num_warps, num_stages=prep.num_stages, **opts,
    )
    qk_scale = sm_scale * _LOG2E.value
    kvc = tuning.select("bwd_dkdv", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tensors, layout_strides = _layout_args(layout_t)
    grid = (triton.cdiv(kv_block, kvc.block_n) * layout_t.num.shape[2], bsz * nh)
    for outputs in ((1, 2) if kvc.split_dkdv else (3,)):
        _bsa_bwd_dkdv_kernel[grid](
            q, k, v, grad_out, lse, delta, dk, dv,
            *tensors,
            *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(grad_out), *_bsh(dk),
            *layout_strides,
            nh, sq, sk,
            sm_scale, qk_scale,
            **kernel_constexprs("bwd_dkdv", q.dtype, d, kvc, q_block=q_block, kv_block=kv_block,
                                strides_aligned=align, outputs=outputs),
            num_warps=kvc.num_warps, num_stages=kvc.num_stages, **opts,
        )
    qc = tuning.select("bwd_dq", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tensors, layout_strides = _layout_args(layout)
    grid = (triton.cdiv(q_block, qc.block_m) * layout.num.shape[2], bsz * nh)
    _bsa_bwd_dq_kernel[grid](
        q, k, v, grad_out, lse, delta, dq,
        *tensors,
        *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(grad_out), *_bsh(dq),
        *layout_strides,
        nh, sq, sk,
        sm_scale, qk_scale,
        **kernel_constexprs("bwd_dq", q.dtype, d, qc, q_block=q_block, kv_block=kv_block, strides_aligned=align),
        num_warps=qc.num_warps, num_stages=qc.num_stages, **opts,
    )


# Kernel names used by :mod:`.tuning` and :mod:`.gpu_check`. The float and INT8 forward
# are one kernel specialized by QK_INT8 / PV_INT8.
KERNELS = {
    "fwd": _bsa_fwd_kernel,
    "fwd_quant": _bsa_fwd_kernel,
    "bwd_preprocess": _bsa_bwd_preprocess_kernel,
    "bwd_dkdv": _bsa_bwd_dkdv_kernel,
    "bwd_dq": _bsa_bwd_dq_kernel,
}
