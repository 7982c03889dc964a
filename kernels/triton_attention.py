"""Triton kernels of block-sparse attention, and the thin launchers that run them.

Layouts (one convention for every kernel here)::

    q, k, v, out, dq, dk, dv   (B, S, H, D)    as diffusers passes them; last dim contiguous
    lse, delta                 fp32 (B, H, Sq) contiguous; lse in natural log
    kv_num_blocks              int32 (Bm, Hm, Qb)       Bm in {1, B}, Hm in {1, H}
    kv_indices, tile_ids       int32 (Bm, Hm, Qb, K)    (a mask dim of size 1 broadcasts: stride 0)
    tiles                      bool (T, q_block, kv_block), any strides (may be an expanded view)

Work decomposition: one program per (query tile, batch * head). A query tile is
``BLOCK_M`` rows of one query block of the mask; a mask block of ``q_block`` tokens is
covered by ``cdiv(q_block, BLOCK_M)`` tiles, the rows past the block's end (when
``BLOCK_M`` does not divide it) or past ``q_len`` are masked. Each program walks only
the key blocks the mask lists for its query block and, inside each, ``BLOCK_N``-wide
key sub-tiles::

    query block i ──► kv_indices[b, h, i, 0:kv_num_blocks[b, h, i]] = [j0, j1, ...]
                       key block j ──► sub-tiles [0, BLOCK_N), [BLOCK_N, 2 BLOCK_N), ...

A partial block (``tile_ids >= 0``) loads its bool token tile and masks scores with it.
Scores live in the log2 domain (``sm_scale * log2(e)`` is folded in) so the online
softmax uses ``exp2``. A row that attends nothing keeps a running max of -inf and
ends with out = 0, lse = -inf.

The backward pass follows FlashAttention-2: a preprocess computes
``delta = rowsum(dO * O) - dLSE`` (the second term carries a gradient flowing into the
returned LSE), a key-side kernel walks the query blocks that visit each key block
(the mask's transposed layout) to accumulate dK and dV, and a query-side kernel walks
the key blocks of each query block to accumulate dQ.

Tile sizes, warps and stages come from :mod:`.tuning` (also read by the ahead-of-time
GPU check, :mod:`.gpu_check`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning

__all__ = [
    "KERNELS",
    "kernel_constexprs",
    "stride_align",
    "pv_dtype_for",
    "launch_forward",
    "launch_forward_quant",
    "launch_backward",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------- helpers


def _unspecialized(*groups: str, key_side: bool = False) -> list[str]:
    """Integer arguments Triton must not specialize on (value 1 or divisibility by 16).

    Mask-layout strides, sizes and scale strides vary from call to call (a broadcast mask
    has stride 0, contiguous tile ids stride 1, ...); specializing on them would compile
    a new binary per mask shape. Only the (B, S, H, D) data strides stay specialized,
    since their divisibility decides vectorized loads. The ahead-of-time check
    (:mod:`.gpu_check`) compiles exactly this specialization.
    """
    last = ("k", "q") if key_side else ("q", "k")
    names = {
        "n": ["stride_nb", "stride_nh", f"stride_n{last[0]}"],
        "i": ["stride_ib", "stride_ih", f"stride_i{last[0]}"],
        "j": ["stride_jb", "stride_jh", f"stride_j{last[0]}", f"stride_j{last[1]}"],
        "t": ["stride_tt", "stride_tr", "stride_tc"],
        "sizes": ["H", "q_len", "kv_len", "q_block", "kv_block"],
        "scales": ["stride_qsb", "stride_qsh", "stride_ksb", "stride_ksh", "stride_vsb", "stride_vsh"],
    }
    return [n for g in groups for n in names[g]]


@triton.jit
def _tile_keep(keep, Tiles, tile_id, stride_tt, tile_offsets):
    """Narrow ``keep`` (bool 2D) with the token tile of a partial block.

    ``tile_id < 0`` marks a full block: nothing is loaded (a uniform branch, so full
    blocks pay one scalar compare). ``tile_offsets`` (2D, arranged like ``keep``) are
    element offsets inside one tile: row * stride_row + col * stride_col.
    """
    if tile_id >= 0:
        t = tl.load(Tiles + tile_id.to(tl.int64) * stride_tt + tile_offsets, mask=keep, other=0)
        keep = keep & (t != 0)
    return keep


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride`` itself, with the compiler told it is a multiple of ``ALIGN`` elements.

    The launchers pass ``ALIGN = 8`` when every data stride is a multiple of 8 elements
    (any contiguous tensor whose head dim is a multiple of 8). Triton only learns
    divisibility by 16 from argument values, so without this a head dim of 72 (head
    stride 72) would load Q, K, V element by element instead of in 16-byte vectors.
    """
    if ALIGN > 1:
        stride = stride // ALIGN * ALIGN
    return stride


# ---------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=_unspecialized("n", "i", "j", "t", "sizes"))
def _bsa_fwd_kernel(
    Q, K, V, Out, Lse,
    KvNum, KvIdx, TileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_jb, stride_jh, stride_jq, stride_jk,
    stride_tt, stride_tr, stride_tc,
    H, q_len, kv_len, q_block, kv_block,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """Forward of block-sparse attention for one (query tile, batch*head).

    Q: (B, Sq, H, D); K, V: (B, Sk, H, D); Out: (B, Sq, H, D) in the input dtype;
    Lse: fp32 (B, H, Sq) natural log. ``qk_scale = sm_scale * log2(e)``.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")

    # Data strides are multiples of STRIDE_ALIGN (see _aligned): lets loads vectorize.
    stride_qb = _aligned(stride_qb, STRIDE_ALIGN)
    stride_qs = _aligned(stride_qs, STRIDE_ALIGN)
    stride_qh = _aligned(stride_qh, STRIDE_ALIGN)
    stride_kb = _aligned(stride_kb, STRIDE_ALIGN)
    stride_ks = _aligned(stride_ks, STRIDE_ALIGN)
    stride_kh = _aligned(stride_kh, STRIDE_ALIGN)
    stride_vb = _aligned(stride_vb, STRIDE_ALIGN)
    stride_vs = _aligned(stride_vs, STRIDE_ALIGN)
    stride_vh = _aligned(stride_vh, STRIDE_ALIGN)
    stride_ob = _aligned(stride_ob, STRIDE_ALIGN)
    stride_os = _aligned(stride_os, STRIDE_ALIGN)
    stride_oh = _aligned(stride_oh, STRIDE_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tiles_per_block = tl.cdiv(q_block, BLOCK_M)
    qblk = pid_m // tiles_per_block
    r_in = (pid_m % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * q_block + r_in
    row_ok = (r_in < q_block) & (rows < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    n_visit = tl.load(KvNum + b * stride_nb + h * stride_nh + qblk * stride_nq)
    list_base = b * stride_ib + h * stride_ih + qblk * stride_iq
    tile_base = b * stride_jb + h * stride_jh + qblk * stride_jq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_visit):
        kblk = tl.load(KvIdx + list_base + it)
        tile_id = tl.load(TileIds + tile_base + it * stride_jk)
        for n0 in range(0, kv_block, BLOCK_N):
            c_in = n0 + tl.arange(0, BLOCK_N)
            cols = kblk * kv_block + c_in
            col_ok = (c_in < kv_block) & (cols < kv_len)
            kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_ks + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            keep = row_ok[:, None] & col_ok[None, :]
            keep = _tile_keep(keep, Tiles, tile_id, stride_tt, r_in[:, None] * stride_tr + c_in[None, :] * stride_tc)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing attended so far keeps -inf; shift by 0 so exp2 gives 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=_unspecialized("n", "i", "j", "t", "sizes", "scales"))
def _bsa_fwd_quant_kernel(
    QI, QS, KI, KS, V, VS, Out, Lse,
    KvNum, KvIdx, TileIds, Tiles,
    stride_qib, stride_qih, stride_qis,
    stride_qsb, stride_qsh,
    stride_kib, stride_kih, stride_kis,
    stride_ksb, stride_ksh,
    stride_vb, stride_vs, stride_vh,
    stride_vsb, stride_vsh,
    stride_ob, stride_os, stride_oh,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_jb, stride_jh, stride_jq, stride_jk,
    stride_tt, stride_tr, stride_tc,
    H, q_len, kv_len, q_block, kv_block,
    p_scale_inv,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT_Q_BLOCK: tl.constexpr, QUANT_K_BLOCK: tl.constexpr,
    PV_INT8: tl.constexpr, PV_DTYPE: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """INT8 forward (inference) for one (query tile, batch*head).

    QI: int8 (B, H, Sq, D), QS: fp32 (B, H, ceil(Sq / QUANT_Q_BLOCK)) with
    ``sm_scale * log2(e)`` folded in; KI: int8 (B, H, Sk, D) (smoothed), KS: fp32
    (B, H, ceil(Sk / QUANT_K_BLOCK)). For ``qk="int4"`` QI/KI hold INT4-range values
    (|x| <= 7) in int8 storage: the kernel is the same.
    V: (B, Sk, H, D) float (cast to PV_DTYPE) when not PV_INT8, else int8 (B, H, Sk, D)
    with VS: fp32 (B, H, D) per channel. Out: (B, Sq, H, D); Lse: fp32 (B, H, Sq).

    Scores are ``int32(QI . KI^T) * QS[row // QUANT_Q_BLOCK] * KS[col // QUANT_K_BLOCK]``
    in the log2 domain, so tiles need not match the quantization blocks. With
    PV_INT8, P (already relative to the running row max, so in [0, 1]) is stored as
    ``round(P * p_scale_inv)`` and multiplied by V in int8 with int32 accumulation.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 32, "int8 tl.dot needs K >= 32 along the key axis")
    tl.static_assert(BLOCK_D >= 32, "int8 tl.dot needs K >= 32 along the head dimension")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    tl.static_assert((QUANT_Q_BLOCK & (QUANT_Q_BLOCK - 1)) == 0, "quantization blocks are powers of two")
    tl.static_assert((QUANT_K_BLOCK & (QUANT_K_BLOCK - 1)) == 0, "quantization blocks are powers of two")

    # Data strides are multiples of STRIDE_ALIGN (see _aligned): lets loads vectorize.
    stride_qib = _aligned(stride_qib, STRIDE_ALIGN)
    stride_qih = _aligned(stride_qih, STRIDE_ALIGN)
    stride_qis = _aligned(stride_qis, STRIDE_ALIGN)
    stride_kib = _aligned(stride_kib, STRIDE_ALIGN)
    stride_kih = _aligned(stride_kih, STRIDE_ALIGN)
    stride_kis = _aligned(stride_kis, STRIDE_ALIGN)
    stride_vb = _aligned(stride_vb, STRIDE_ALIGN)
    stride_vs = _aligned(stride_vs, STRIDE_ALIGN)
    stride_vh = _aligned(stride_vh, STRIDE_ALIGN)
    stride_ob = _aligned(stride_ob, STRIDE_ALIGN)
    stride_os = _aligned(stride_os, STRIDE_ALIGN)
    stride_oh = _aligned(stride_oh, STRIDE_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tiles_per_block = tl.cdiv(q_block, BLOCK_M)
    qblk = pid_m // tiles_per_block
    r_in = (pid_m % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * q_block + r_in
    row_ok = (r_in < q_block) & (rows < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    qi = tl.load(QI + b.to(tl.int64) * stride_qib + h.to(tl.int64) * stride_qih
                 + rows.to(tl.int64)[:, None] * stride_qis + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0)
    q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + rows // QUANT_Q_BLOCK, mask=row_ok, other=0.0)
    ki_base = KI + b.to(tl.int64) * stride_kib + h.to(tl.int64) * stride_kih
    ks_base = KS + b * stride_ksb + h * stride_ksh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    n_visit = tl.load(KvNum + b * stride_nb + h * stride_nh + qblk * stride_nq)
    list_base = b * stride_ib + h * stride_ih + qblk * stride_iq
    tile_base = b * stride_jb + h * stride_jh + qblk * stride_jq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_visit):
        kblk = tl.load(KvIdx + list_base + it)
        tile_id = tl.load(TileIds + tile_base + it * stride_jk)
        for n0 in range(0, kv_block, BLOCK_N):
            c_in = n0 + tl.arange(0, BLOCK_N)
            cols = kblk * kv_block + c_in
            col_ok = (c_in < kv_block) & (cols < kv_len)
            kt = tl.load(ki_base + cols.to(tl.int64)[None, :] * stride_kis + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0)
            k_scale = tl.load(ks_base + cols // QUANT_K_BLOCK, mask=col_ok, other=0.0)
            s = tl.dot(qi, kt).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
            keep = row_ok[:, None] & col_ok[None, :]
            keep = _tile_keep(keep, Tiles, tile_id, stride_tt, r_in[:, None] * stride_tr + c_in[None, :] * stride_tc)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PV_INT8:
                v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0)
                # p >= 0, so adding 0.5 and truncating rounds half away from zero.
                p_int = (p * p_scale_inv + 0.5).to(tl.int8)
                pv = tl.dot(p_int, v).to(tl.float32)
            else:
                v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                pv = tl.dot(p.to(PV_DTYPE), v.to(PV_DTYPE))
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    if PV_INT8:
        v_scale = tl.load(VS + b * stride_vsb + h * stride_vsh + offs_d, mask=d_ok, other=0.0)
        acc = acc * (v_scale / p_scale_inv)[None, :]
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


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
    # Data strides are multiples of STRIDE_ALIGN (see _aligned): lets loads vectorize.
    stride_ob = _aligned(stride_ob, STRIDE_ALIGN)
    stride_os = _aligned(stride_os, STRIDE_ALIGN)
    stride_oh = _aligned(stride_oh, STRIDE_ALIGN)
    stride_gb = _aligned(stride_gb, STRIDE_ALIGN)
    stride_gs = _aligned(stride_gs, STRIDE_ALIGN)
    stride_gh = _aligned(stride_gh, STRIDE_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    offs_d = tl.arange(0, BLOCK_D)
    msk = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                 + rows.to(tl.int64)[:, None] * stride_gs + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + pid_bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0)
    tl.store(Delta + pid_bh.to(tl.int64) * q_len + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=_unspecialized("n", "i", "j", "t", "sizes", key_side=True))
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    QNum, QIdx, QTileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dkb, stride_dks, stride_dkh,
    stride_nb, stride_nh, stride_nk,
    stride_ib, stride_ih, stride_ik,
    stride_jb, stride_jh, stride_jk, stride_jq,
    stride_tt, stride_tr, stride_tc,
    H, q_len, kv_len, q_block, kv_block,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """dK, dV for one (key tile, batch*head), walking the query blocks that visit it.

    Q, DOut: (B, Sq, H, D); K, V: (B, Sk, H, D); Lse, Delta: fp32 (B, H, Sq);
    QNum: int32 (Bm, Hm, Kb), QIdx / QTileIds: int32 (Bm, Hm, Kb, Qmax) (the mask's
    transposed layout); DK, DV: (B, Sk, H, D) with DK and DV sharing strides.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")

    # Data strides are multiples of STRIDE_ALIGN (see _aligned): lets loads vectorize.
    stride_qb = _aligned(stride_qb, STRIDE_ALIGN)
    stride_qs = _aligned(stride_qs, STRIDE_ALIGN)
    stride_qh = _aligned(stride_qh, STRIDE_ALIGN)
    stride_kb = _aligned(stride_kb, STRIDE_ALIGN)
    stride_ks = _aligned(stride_ks, STRIDE_ALIGN)
    stride_kh = _aligned(stride_kh, STRIDE_ALIGN)
    stride_vb = _aligned(stride_vb, STRIDE_ALIGN)
    stride_vs = _aligned(stride_vs, STRIDE_ALIGN)
    stride_vh = _aligned(stride_vh, STRIDE_ALIGN)
    stride_gb = _aligned(stride_gb, STRIDE_ALIGN)
    stride_gs = _aligned(stride_gs, STRIDE_ALIGN)
    stride_gh = _aligned(stride_gh, STRIDE_ALIGN)
    stride_dkb = _aligned(stride_dkb, STRIDE_ALIGN)
    stride_dks = _aligned(stride_dks, STRIDE_ALIGN)
    stride_dkh = _aligned(stride_dkh, STRIDE_ALIGN)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tiles_per_block = tl.cdiv(kv_block, BLOCK_N)
    kblk = pid_n // tiles_per_block
    c_in = (pid_n % tiles_per_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kblk * kv_block + c_in
    col_ok = (c_in < kv_block) & (cols < kv_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_msk = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=kv_msk, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=kv_msk, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    row_base = pid_bh.to(tl.int64) * q_len

    n_visit = tl.load(QNum + b * stride_nb + h * stride_nh + kblk * stride_nk)
    list_base = b * stride_ib + h * stride_ih + kblk * stride_ik
    tile_base = b * stride_jb + h * stride_jh + kblk * stride_jk

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_visit):
        qblk = tl.load(QIdx + list_base + it)
        tile_id = tl.load(QTileIds + tile_base + it * stride_jq)
        for m0 in range(0, q_block, BLOCK_M):
            r_in = m0 + tl.arange(0, BLOCK_M)
            rows = qblk * q_block + r_in
            row_ok = (r_in < q_block) & (rows < q_len)
            q_msk = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :], mask=q_msk, other=0.0)
            do = tl.load(do_base + rows.to(tl.int64)[:, None] * stride_gs + offs_d[None, :], mask=q_msk, other=0.0)
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("-inf"))
            # Rows that attend nothing (lse = -inf) must get P = 0: use +inf as their shift.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            # Transposed scores (BLOCK_N, BLOCK_M): key rows, query columns.
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            keep = col_ok[:, None] & row_ok[None, :]
            keep = _tile_keep(keep, Tiles, tile_id, stride_tt, c_in[:, None] * stride_tc + r_in[None, :] * stride_tr)
            pt = tl.where(keep, tl.math.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= sm_scale
    out_off = (b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
               + cols.to(tl.int64)[:, None] * stride_dks + offs_d[None, :])
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit(do_not_specialize=_unspecialized("n", "i", "j", "t", "sizes"))
def _bsa_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    KvNum, KvIdx, TileIds, Tiles,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_jb, stride_jh, stride_jq, stride_jk,
    stride_tt, stride_tr, stride_tc,
    H, q_len, kv_len, q_block, kv_block,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """dQ for one (query tile, batch*head), walking the key blocks the mask lists.

    Shapes as in the forward; DQ: (B, Sq, H, D) in the input dtype.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 query rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 key columns")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")

    # Data strides are multiples of STRIDE_ALIGN (see _aligned): lets loads vectorize.
    stride_qb = _aligned(stride_qb, STRIDE_ALIGN)
    stride_qs = _aligned(stride_qs, STRIDE_ALIGN)
    stride_qh = _aligned(stride_qh, STRIDE_ALIGN)
    stride_kb = _aligned(stride_kb, STRIDE_ALIGN)
    stride_ks = _aligned(stride_ks, STRIDE_ALIGN)
    stride_kh = _aligned(stride_kh, STRIDE_ALIGN)
    stride_vb = _aligned(stride_vb, STRIDE_ALIGN)
    stride_vs = _aligned(stride_vs, STRIDE_ALIGN)
    stride_vh = _aligned(stride_vh, STRIDE_ALIGN)
    stride_gb = _aligned(stride_gb, STRIDE_ALIGN)
    stride_gs = _aligned(stride_gs, STRIDE_ALIGN)
    stride_gh = _aligned(stride_gh, STRIDE_ALIGN)
    stride_dqb = _aligned(stride_dqb, STRIDE_ALIGN)
    stride_dqs = _aligned(stride_dqs, STRIDE_ALIGN)
    stride_dqh = _aligned(stride_dqh, STRIDE_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tiles_per_block = tl.cdiv(q_block, BLOCK_M)
    qblk = pid_m // tiles_per_block
    r_in = (pid_m % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * q_block + r_in
    row_ok = (r_in < q_block) & (rows < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_msk = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :], mask=q_msk, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                 + rows.to(tl.int64)[:, None] * stride_gs + offs_d[None, :], mask=q_msk, other=0.0)
    row_base = pid_bh.to(tl.int64) * q_len
    lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    n_visit = tl.load(KvNum + b * stride_nb + h * stride_nh + qblk * stride_nq)
    list_base = b * stride_ib + h * stride_ih + qblk * stride_iq
    tile_base = b * stride_jb + h * stride_jh + qblk * stride_jq

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_visit):
        kblk = tl.load(KvIdx + list_base + it)
        tile_id = tl.load(TileIds + tile_base + it * stride_jk)
        for n0 in range(0, kv_block, BLOCK_N):
            c_in = n0 + tl.arange(0, BLOCK_N)
            cols = kblk * kv_block + c_in
            col_ok = (c_in < kv_block) & (cols < kv_len)
            kv_msk = d_ok[:, None] & col_ok[None, :]
            kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_ks + offs_d[:, None], mask=kv_msk, other=0.0)
            vt = tl.load(v_base + cols.to(tl.int64)[None, :] * stride_vs + offs_d[:, None], mask=kv_msk, other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            keep = row_ok[:, None] & col_ok[None, :]
            keep = _tile_keep(keep, Tiles, tile_id, stride_tt, r_in[:, None] * stride_tr + c_in[None, :] * stride_tc)
            p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows.to(tl.int64)[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_msk)


# ---------------------------------------------------------------------------- launchers


def _layout_strides(t: torch.Tensor, dims: int = 3) -> tuple[int, ...]:
    """Strides of a layout tensor's leading dims; size-1 batch/head dims broadcast (stride 0)."""
    return tuple(0 if (i < 2 and t.shape[i] == 1) else t.stride(i) for i in range(dims))


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a (B, S, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _tile_args(tile_ids: Optional[torch.Tensor], tiles: Optional[torch.Tensor], like: torch.Tensor):
    """(tile_ids, its 4 strides, tiles, its 3 strides).

    A mask without tiles reads tile id -1 (full block) everywhere from a one-element
    tensor with zero strides; ``tiles`` is then a placeholder that is never read.
    """
    if tiles is None:
        no_ids = torch.full((1,), -1, dtype=torch.int32, device=like.device)
        no_tiles = torch.zeros((1,), dtype=torch.uint8, device=like.device)
        return no_ids, (0, 0, 0, 0), no_tiles, (0, 0, 0)
    if tiles.dtype == torch.bool:
        tiles = tiles.view(torch.uint8)
    return tile_ids, _layout_strides(tile_ids, 4), tiles, tuple(tiles.stride())


def _dot_precision(dtype: torch.dtype) -> str:
    """Input precision of ``tl.dot`` for ``dtype`` inputs: "tf32" (fp16 / bf16 ignore it).

    fp32 inputs multiply on the tensor cores with TF32 operands (10-bit mantissa) and
    fp32 accumulation, as torch does for fp32 matmuls with
    ``torch.backends.cuda.matmul.allow_tf32 = True``: expect relative errors around 1e-3
    rather than fp32's 1e-6; use ``backend="torch"`` when exact fp32 products matter.
    Why not exact fp32: "ieee" compiles to FMA loops without tensor cores, and "tf32x3"
    (three TF32 products, near-fp32 accuracy) needs so many registers that every
    head dim above 64 spills even at 32 x 16 tiles (measured with :mod:`.gpu_check`).
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
                      pv_int8: bool = False, quant_blocks: tuple[int, int] = (128, 64),
                      has_dlse: bool = True, strides_aligned: int = 8) -> dict:
    """Compile-time arguments of ``kernel`` (a key of :data:`KERNELS`) for one launch.

    The launchers and the ahead-of-time check both build them here, so the check compiles
    what the launchers run. ``dtype`` is the input (q) dtype; ``quant_blocks`` are
    ``QuantConfig.q_block, k_block``; ``strides_aligned`` is :func:`stride_align` of the
    data tensors.
    """
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=tuning.padded_head_dim(head_dim), BLOCK_M=tiles.block_m,
                STRIDE_ALIGN=strides_aligned)
    if kernel == "bwd_preprocess":
        meta["HAS_DLSE"] = has_dlse
        return meta
    meta["BLOCK_N"] = tiles.block_n
    if kernel == "fwd_quant":
        meta.update(QUANT_Q_BLOCK=quant_blocks[0], QUANT_K_BLOCK=quant_blocks[1], PV_INT8=pv_int8,
                    PV_DTYPE=tuning.triton_dtype(pv_dtype_for(dtype)))
    else:
        meta["DOT_PRECISION"] = _dot_precision(dtype)
    return meta


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    tile_ids: Optional[torch.Tensor], tiles: Optional[torch.Tensor],
    q_block: int, kv_block: int, sm_scale: float,
    out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Run the forward kernel, writing ``out`` (B, Sq, H, D) and ``lse`` fp32 (B, H, Sq).

    q: (B, Sq, H, D), k, v: (B, Sk, H, D), last dim contiguous; layout tensors as in
    :class:`~sparsegen.kernels.BlockSparseMask` (``tiles`` bool or uint8, any strides).
    """
    bsz, sq, nh, d = q.shape
    cfg = tuning.select("fwd", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tid, tid_str, tiles_a, tiles_str = _tile_args(tile_ids, tiles, q)
    grid = (triton.cdiv(q_block, cfg.block_m) * kv_num_blocks.shape[2], bsz * nh)
    _bsa_fwd_kernel[grid](
        q, k, v, out, lse,
        kv_num_blocks, kv_indices, tid, tiles_a,
        *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out),
        *_layout_strides(kv_num_blocks), *_layout_strides(kv_indices), *tid_str, *tiles_str,
        nh, sq, k.shape[1], q_block, kv_block,
        sm_scale * _LOG2E,
        **kernel_constexprs("fwd", q.dtype, d, cfg, strides_aligned=stride_align(q, k, v, out)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_forward_quant(
    q_int: torch.Tensor, q_scale: torch.Tensor, k_int: torch.Tensor, k_scale: torch.Tensor,
    v: torch.Tensor, v_scale: Optional[torch.Tensor],
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    tile_ids: Optional[torch.Tensor], tiles: Optional[torch.Tensor],
    q_block: int, kv_block: int,
    quant_q_block: int, quant_k_block: int, p_scale_inv: int,
    out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Run the INT8 forward kernel.

    q_int: int8 (B, H, Sq, D), q_scale fp32 (B, H, nQ); k_int: int8 (B, H, Sk, D),
    k_scale fp32 (B, H, nK) (from ``quantize_qk``); v: float (B, Sk, H, D) with
    ``v_scale=None`` (P·V in :func:`pv_dtype_for` of out's dtype), or int8 (B, H, Sk, D) with ``v_scale`` fp32
    (B, H, D) (INT8 P·V). Writes out (B, Sq, H, D) and lse fp32 (B, H, Sq).
    """
    bsz, nh, sq, d = q_int.shape
    pv_int8 = v_scale is not None
    cfg = tuning.select("fwd_quant", q_int.device, out.dtype, d, q_block=q_block, kv_block=kv_block,
                        pv_int8=pv_int8)
    tid, tid_str, tiles_a, tiles_str = _tile_args(tile_ids, tiles, q_int)
    if pv_int8:
        v_str = (v.stride(0), v.stride(2), v.stride(1))  # (B, H, Sk, D): batch, seq, head strides
        vs, vs_str = v_scale, (v_scale.stride(0), v_scale.stride(1))
    else:
        v_str = _bsh(v)
        vs, vs_str = q_scale, (0, 0)  # placeholder, never read
    grid = (triton.cdiv(q_block, cfg.block_m) * kv_num_blocks.shape[2], bsz * nh)
    _bsa_fwd_quant_kernel[grid](
        q_int, q_scale, k_int, k_scale, v, vs, out, lse,
        kv_num_blocks, kv_indices, tid, tiles_a,
        q_int.stride(0), q_int.stride(1), q_int.stride(2),
        q_scale.stride(0), q_scale.stride(1),
        k_int.stride(0), k_int.stride(1), k_int.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        *v_str, *vs_str, *_bsh(out),
        *_layout_strides(kv_num_blocks), *_layout_strides(kv_indices), *tid_str, *tiles_str,
        nh, sq, k_int.shape[2], q_block, kv_block,
        float(p_scale_inv),
        **kernel_constexprs("fwd_quant", out.dtype, d, cfg, pv_int8=pv_int8,
                            quant_blocks=(quant_q_block, quant_k_block),
                            strides_aligned=stride_align(q_int, k_int, v, out)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, tile_ids: Optional[torch.Tensor],
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor, q_tile_ids: Optional[torch.Tensor],
    tiles: Optional[torch.Tensor],
    q_block: int, kv_block: int, sm_scale: float,
    delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
) -> None:
    """Run the three backward kernels.

    grad_out, q, out, dq: (B, Sq, H, D); k, v, dk, dv: (B, Sk, H, D) (dk, dv share
    strides); lse, delta (workspace), grad_lse (or None): fp32 (B, H, Sq) contiguous.
    Layouts: forward (``kv_*``) and transposed (``q_*``, from ``BlockSparseMask.transposed``).
    """
    bsz, sq, nh, d = q.shape
    sk = k.shape[1]
    align = stride_align(q, k, v, out, grad_out, dq, dk, dv)
    prep = tuning.select("bwd_preprocess", q.device, q.dtype, d)
    _bsa_bwd_preprocess_kernel[(triton.cdiv(sq, prep.block_m), bsz * nh)](
        out, grad_out, grad_lse if grad_lse is not None else lse, delta,
        *_bsh(out), *_bsh(grad_out),
        nh, sq,
        **kernel_constexprs("bwd_preprocess", q.dtype, d, prep, has_dlse=grad_lse is not None, strides_aligned=align),
        num_warps=prep.num_warps, num_stages=prep.num_stages,
    )
    kvc = tuning.select("bwd_dkdv", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tid, tid_str, tiles_a, tiles_str = _tile_args(q_tile_ids, tiles, q)
    grid = (triton.cdiv(kv_block, kvc.block_n) * q_num_blocks.shape[2], bsz * nh)
    _bsa_bwd_dkdv_kernel[grid](
        q, k, v, grad_out, lse, delta, dk, dv,
        q_num_blocks, q_indices, tid, tiles_a,
        *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(grad_out), *_bsh(dk),
        *_layout_strides(q_num_blocks), *_layout_strides(q_indices), *tid_str, *tiles_str,
        nh, sq, sk, q_block, kv_block,
        sm_scale, sm_scale * _LOG2E,
        **kernel_constexprs("bwd_dkdv", q.dtype, d, kvc, strides_aligned=align),
        num_warps=kvc.num_warps, num_stages=kvc.num_stages,
    )
    qc = tuning.select("bwd_dq", q.device, q.dtype, d, q_block=q_block, kv_block=kv_block)
    tid, tid_str, tiles_a, tiles_str = _tile_args(tile_ids, tiles, q)
    grid = (triton.cdiv(q_block, qc.block_m) * kv_num_blocks.shape[2], bsz * nh)
    _bsa_bwd_dq_kernel[grid](
        q, k, v, grad_out, lse, delta, dq,
        kv_num_blocks, kv_indices, tid, tiles_a,
        *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(grad_out), *_bsh(dq),
        *_layout_strides(kv_num_blocks), *_layout_strides(kv_indices), *tid_str, *tiles_str,
        nh, sq, sk, q_block, kv_block,
        sm_scale, sm_scale * _LOG2E,
        **kernel_constexprs("bwd_dq", q.dtype, d, qc, strides_aligned=align),
        num_warps=qc.num_warps, num_stages=qc.num_stages,
    )


# Kernel names used by :mod:`.tuning` and :mod:`.gpu_check`.
KERNELS = {
    "fwd": _bsa_fwd_kernel,
    "fwd_quant": _bsa_fwd_quant_kernel,
    "bwd_preprocess": _bsa_bwd_preprocess_kernel,
    "bwd_dkdv": _bsa_bwd_dkdv_kernel,
    "bwd_dq": _bsa_bwd_dq_kernel,
}
