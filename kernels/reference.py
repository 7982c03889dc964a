"""Dense masked attention in high precision: the oracle every backend is tested against.

Memory is O(Sq * Sk): for tests and small problems only. Fast code never imports this
module.
"""

from __future__ import annotations

from typing import Optional

import torch

from .mask import BlockSparseMask
from .quant import LOG2E, PVFormat, QuantConfig, quantize_qk, quantize_v, round_half_away

__all__ = ["reference_attention"]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[BlockSparseMask],
    *,
    scale: Optional[float] = None,
    quant: Optional[QuantConfig] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention computed densely in ``dtype``.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D).
        mask: token pairs to attend (``None``: all).
        quant: when given, Q and K (and V, P for ``pv="int8"``) go through the same
            quantize -> dequantize step as the fast backends; with ``pv="half"`` P and V
            are rounded to the input's half dtype.
    Returns:
        out: (B, Sq, H, D) in ``dtype``; lse: (B, H, Sq) natural-log log-sum-exp in ``dtype``
        (-inf for rows that attend nothing, whose output is 0).
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    sm_scale = d ** -0.5 if scale is None else float(scale)
    if quant is None:
        qq = q.to(dtype).transpose(1, 2)
        kk = k.to(dtype).transpose(1, 2)
        s = torch.matmul(qq, kk.transpose(-1, -2)) * sm_scale  # natural-log logits
    else:
        qz = quantize_qk(q, k, quant, sm_scale)
        qd = qz.q_int.to(dtype) * qz.q_scale.to(dtype).repeat_interleave(quant.q_block, -1)[..., :sq, None]
        kd = qz.k_int.to(dtype) * qz.k_scale.to(dtype).repeat_interleave(quant.k_block, -1)[..., :sk, None]
        s = torch.matmul(qd, kd.transpose(-1, -2)) / LOG2E  # back to natural-log logits
    if mask is not None:
        mask.check_compatible(b, h, sq, sk)
        allowed = mask.to(q.device).to_dense().expand(b, h, sq, sk)
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    vv = v.to(dtype).transpose(1, 2)
    if quant is not None and quant.pv == PVFormat.INT8:
        # P relative to the row max is in [0, 1]; fixed scale 1 / p_scale_inv.
        p = round_half_away(p * quant.p_scale_inv) / quant.p_scale_inv
        v_int, v_scale = quantize_v(v)
        vv = v_int.to(dtype) * v_scale.to(dtype)[:, :, None, :]
    elif quant is not None:
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
        p = p.to(half).to(dtype)
        vv = v.to(half).to(dtype).transpose(1, 2)
    out = torch.matmul(p, vv) / torch.where(l > 0, l, torch.ones_like(l))
    out = torch.where(empty, torch.zeros_like(out), out)
    lse = (m + torch.log(l)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
    return out.transpose(1, 2).contiguous(), lse
