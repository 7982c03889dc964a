"""Dense attention forward in the shape of Triton's fused-attention tutorial: the GPU gate's yardstick.

Not a backend. The ahead-of-time gate (:mod:`.gpu_check`) compiles this kernel in the
same run, for the same architecture, dtype and head dim as each block-sparse forward
build, and compares the SASS instructions of the two inner loops per unit of work: a
block-sparse loop is as fast as it can be when a visited tile costs what a tile of
this dense loop costs. Its shape is the tutorial's: 128 x 64 tiles, 8 warps, K and V
through pointers advanced by ``BLOCK_N`` rows per iteration, no masks, the scale inside
the exponent's fused multiply-add. The INT8 variants do the block-sparse kernel's INT8
arithmetic (scores ``int32(Q·K^T) * QS[row] * KS[tile]``, P·V in half precision or
INT8) in the same loop shape.

Layouts as in :mod:`.triton_attention`: float q, k, v, out (B, S, H, D); INT8 q, k (and
v) (B, H, S, D) passed as (batch, seq, head) strides; lse fp32 (B, H, Sq). ``q_len`` must
be a multiple of ``BLOCK_M`` and ``kv_len`` of ``BLOCK_N`` (the loop has no masks).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .triton_attention import _base, pv_dtype_for, stride_align

__all__ = ["REFERENCE_TILES", "dense_constexprs", "launch_dense_forward"]

# The tutorial's forward tile on Ampere and Hopper: 128 query rows, 64 keys, 8 warps.
REFERENCE_TILES = (128, 64, 8)


@triton.jit(do_not_specialize=["H", "q_len", "kv_len", "stride_qsb", "stride_qsh", "stride_ksb", "stride_ksh",
                               "stride_vsb", "stride_vsh"])
def _dense_fwd_kernel(
    Q, QS, K, KS, V, VS, Out, Lse,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    H, q_len, kv_len,
    qk_scale, p_scale_inv,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, PV_DTYPE: tl.constexpr,
    QUANT_Q_BLOCK: tl.constexpr, QUANT_K_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """Dense attention for one (query tile of BLOCK_M rows, batch*head); shapes in the module docstring.

    Data strides carry the same alignment hint as the block-sparse kernels' (``STRIDE_ALIGN``),
    so a head dim of 72 loads in 16-byte vectors here too.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dimension")
    tl.static_assert(not QK_INT8 or QUANT_K_BLOCK % BLOCK_N == 0, "one K scale per key tile")
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base, stride_qs = _base(Q, b, h, stride_qb, stride_qs, stride_qh, STRIDE_ALIGN)
    k_base, stride_ks = _base(K, b, h, stride_kb, stride_ks, stride_kh, STRIDE_ALIGN)
    v_base, stride_vs = _base(V, b, h, stride_vb, stride_vs, stride_vh, STRIDE_ALIGN)
    out_base, stride_os = _base(Out, b, h, stride_ob, stride_os, stride_oh, STRIDE_ALIGN)
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=d_ok[None, :], other=0)
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
    if QK_INT8:
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + rows // QUANT_Q_BLOCK)
        ks_ptr = KS + b * stride_ksb + h * stride_ksh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        if HEAD_DIM == BLOCK_D:
            kt = tl.load(k_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0)
        if QK_INT8:
            qk = tl.dot(q, kt).to(tl.float32)
            row_scale = q_scale * tl.load(ks_ptr + start_n // QUANT_K_BLOCK)
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
            p = tl.math.exp2(qk * row_scale[:, None] - m_ij[:, None])
        else:
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0)
        if PV_INT8:
            acc = acc * alpha[:, None] + tl.dot((p * p_scale_inv + 0.5).to(tl.int8), v).to(tl.float32)
        else:
            acc = tl.dot(p.to(PV_DTYPE), v.to(PV_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    if PV_INT8:
        acc = acc * (tl.load(VS + b * stride_vsb + h * stride_vsh + offs_d, mask=d_ok, other=0.0) / p_scale_inv)[None, :]
    acc = acc / l_i[:, None]
    tl.store(out_base + rows[:, None] * stride_os + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=d_ok[None, :])
    tl.store(Lse + bh.to(tl.int64) * q_len + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


def dense_constexprs(kind: str, dtype: torch.dtype, head_dim: int, *, pv_int8: bool = False,
                     quant_blocks: tuple[int, int] = (128, 64), strides_aligned: int = 8) -> dict:
    """Compile-time arguments of the yardstick for a forward build of ``kind`` ("fwd" or "fwd_quant")."""
    bm, bn, _ = REFERENCE_TILES
    quant = kind == "fwd_quant"
    return dict(HEAD_DIM=head_dim, BLOCK_D=tuning.padded_head_dim(head_dim), BLOCK_M=bm, BLOCK_N=bn,
                QK_INT8=quant, PV_INT8=quant and pv_int8,
                PV_DTYPE=tuning.triton_dtype(pv_dtype_for(dtype) if quant else dtype),
                QUANT_Q_BLOCK=quant_blocks[0], QUANT_K_BLOCK=quant_blocks[1],
                DOT_PRECISION="tf32", STRIDE_ALIGN=strides_aligned)


def launch_dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                         out: torch.Tensor, lse: torch.Tensor, *, num_stages: int = 2,
                         quant: Optional[tuple] = None) -> None:
    """Run the yardstick (tests check it against the reference attention in the interpreter).

    Float: q (B, Sq, H, D), k, v (B, Sk, H, D). With ``quant = (q_scale, k_scale, v_scale,
    q_block, k_block, p_scale_inv)`` q, k are int8 (B, H, S, D) from ``quantize_qk`` and v
    is float (B, Sk, H, D) with ``v_scale=None``, or int8 (B, H, Sk, D) with ``v_scale`` fp32
    (B, H, D). Writes out (B, Sq, H, D) and lse fp32 (B, H, Sq).
    """
    bm, bn, warps = REFERENCE_TILES
    b, h, d = out.shape[0], out.shape[2], out.shape[3]
    sq = out.shape[1]
    if quant is None:
        qs = ks = vs = lse
        q_str, k_str, v_str = (q.stride(0), q.stride(1), q.stride(2)), (k.stride(0), k.stride(1), k.stride(2)), \
            (v.stride(0), v.stride(1), v.stride(2))
        scale_str = (0,) * 6
        sk, meta = k.shape[1], dense_constexprs("fwd", q.dtype, d, strides_aligned=stride_align(q, k, v, out))
        p_inv = 1.0
    else:
        qs, ks, vs, q_blk, k_blk, p_inv = quant
        pv_int8 = vs is not None
        q_str, k_str = (q.stride(0), q.stride(2), q.stride(1)), (k.stride(0), k.stride(2), k.stride(1))
        v_str = (v.stride(0), v.stride(2), v.stride(1)) if pv_int8 else (v.stride(0), v.stride(1), v.stride(2))
        scale_str = (qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1),
                     *((vs.stride(0), vs.stride(1)) if pv_int8 else (0, 0)))
        vs = vs if pv_int8 else lse
        sk, meta = k.shape[2], dense_constexprs("fwd_quant", out.dtype, d, pv_int8=pv_int8, quant_blocks=(q_blk, k_blk),
                                                strides_aligned=stride_align(q, k, v, out))
    if sq % bm or sk % bn:
        raise ValueError(f"the dense yardstick has no masks: q_len={sq} must be a multiple of {bm} and "
                         f"kv_len={sk} of {bn}")
    _dense_fwd_kernel[(sq // bm, b * h)](
        q, qs, k, ks, v, vs, out, lse,
        *q_str, *k_str, *v_str, out.stride(0), out.stride(1), out.stride(2), *scale_str,
        h, sq, sk, sm_scale * 1.4426950408889634, float(p_inv),
        **meta, num_warps=warps, num_stages=num_stages, **tuning.LAUNCH_OPTIONS,
    )
