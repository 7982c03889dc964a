"""The CPU path of block-sparse attention: gather visited key blocks, batched dense attention.

How it works. Query blocks are grouped by what their key set looks like
(number of visited key blocks, whether the last, partial key block is among them,
whether any visited block carries a token tile). Inside a group every query block
attends to the same number of keys, so the visited key/value tokens are gathered
into a reused workspace (``index_select(out=...)``) and one batched fused attention
call (PyTorch's flash kernel for CPU, which also returns the log-sum-exp) serves the
whole group. Memory is proportional to the visited blocks of one chunk of a group,
never to Sq x Sk.

The backward pass recomputes probabilities per group from the saved log-sum-exp
(as FlashAttention does) and also propagates a gradient flowing into the LSE, which
merges of partial attentions (text tokens, ring attention) need.

Quantized attention (``quant=``) runs the exact integer arithmetic of the INT8 kernel
(same quantizer, integer Q·K products, P and V formats) with plain matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._alloc import new_empty
from .mask import BlockSparseMask
from .quant import LOG2E, PVFormat, QuantConfig, quantize_qk, quantize_v, round_half_away

__all__ = ["torch_block_sparse_attention"]

# Elements per gathered K (and V) workspace chunk: large enough to amortise the
# per-call overhead of the fused kernel, small enough to stay far from S x S.
_WORKSPACE_ELEMENTS = 1 << 23


@dataclass
class _Group:
    rows: torch.Tensor        # long (G,): layout row = layout_bh * Qb + q_block
    kv_blocks: torch.Tensor   # long (G, c): visited key blocks, ascending
    tile_ids: Optional[torch.Tensor]  # long (G, c) or None: -1 full, else tile index
    keys: int                 # tokens gathered per row (c * kv_block_size minus the ragged tail)


def _plan(mask: BlockSparseMask) -> list[_Group]:
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
        groups.append(_Group(rows, idx[rows, :c].contiguous(), tid[rows, :c].contiguous() if tile else None, keys))
    cache[key] = groups
    return groups


def _expand_rows(rows: torch.Tensor, mask: BlockSparseMask, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map layout rows to (bh, q_block) of the real batch and heads (broadcast dims repeat)."""
    bm, hm, qb = mask.kv_num_blocks.shape
    lbh, qi = rows // qb, rows % qb
    lb, lh = lbh // hm, lbh % hm
    bs = torch.arange(batch) if bm == 1 else None
    hs = torch.arange(heads) if hm == 1 else None
    b_all = lb[:, None] if bs is None else bs[None, :].expand(len(rows), batch)
    h_all = lh[:, None] if hs is None else hs[None, :].expand(len(rows), heads)
    # Cartesian product over the broadcast dims, row-major (row, b, h).
    b_all = b_all[:, :, None].expand(-1, b_all.shape[1], h_all.shape[1])
    h_all = h_all[:, None, :].expand(-1, b_all.shape[1], h_all.shape[1])
    bh = (b_all * heads + h_all).reshape(len(rows), -1)
    rep = bh.shape[1]
    return bh, qi[:, None].expand(-1, rep)


def _token_index(kv_blocks: torch.Tensor, kv_block_size: int, keys: int) -> torch.Tensor:
    """(G, c) block ids -> (G, keys) token ids (ragged tail of the last block dropped)."""
    ar = torch.arange(kv_block_size, device=kv_blocks.device)
    tok = (kv_blocks[:, :, None] * kv_block_size + ar).reshape(kv_blocks.shape[0], -1)
    return tok[:, :keys]


def _tile_bias(mask: BlockSparseMask, tile_ids: torch.Tensor, keys: int, dtype, device) -> torch.Tensor:
    """(G, c) tile ids -> additive bias (G, 1, q_block_size, keys): 0 attend, -inf skip."""
    tiles = mask.tiles.to(device)
    ones = torch.ones(1, mask.q_block_size, mask.kv_block_size, dtype=torch.bool, device=device)
    table = torch.cat([tiles, ones], 0)  # index -1 -> the all-ones tile
    t = table[tile_ids.to(device)]       # (G, c, qbs, kbs)
    allowed = t.permute(0, 2, 1, 3).reshape(tile_ids.shape[0], mask.q_block_size, -1)[:, :, :keys]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None]


class _Runner:
    """Shared state of one call: inputs flattened to (B*H, S, D), the plan, chunking."""

    def __init__(self, q, k, v, mask: BlockSparseMask, scale: float, quant: Optional[QuantConfig]):
        self.b, self.sq, self.h, self.d = q.shape
        self.sk = k.shape[1]
        self.mask = mask
        self.scale = scale
        self.quant = quant
        self.qbs, self.kbs = mask.q_block_size, mask.kv_block_size
        self.qb = mask.num_q_blocks
        self.device = q.device
        self.groups = _plan(mask)

    def chunks(self, group: _Group, width: int):
        """Yield (bh (n,), q_block (n,), layout index into group (n,)) chunks of expanded rows."""
        bh, qi = _expand_rows(group.rows, self.mask, self.b, self.h)
        g, rep = bh.shape
        order = torch.arange(g)[:, None].expand(g, rep).reshape(-1)
        bh, qi = bh.reshape(-1), qi.reshape(-1)
        per = max(1, _WORKSPACE_ELEMENTS // max(1, group.keys * width))
        for s in range(0, bh.numel(), per):
            e = min(s + per, bh.numel())
            yield bh[s:e], qi[s:e], order[s:e]


def _flat_bhsd(x: torch.Tensor, pad_to: int) -> torch.Tensor:
    """(B, S, H, D) -> contiguous (B*H*pad_to, D), zero padded along S."""
    b, s, h, d = x.shape
    t = x.transpose(1, 2)
    if pad_to != s:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad_to - s))
    return t.reshape(b * h * pad_to, d).contiguous()


def _forward(q, k, v, mask: BlockSparseMask, scale: float, quant: Optional[QuantConfig]):
    r = _Runner(q, k, v, mask, scale, quant)
    b, h, d, sk = r.b, r.h, r.d, r.sk
    sq_pad = r.qb * r.qbs
    if quant is not None:
        return _forward_quant(r, q, k, v)
    qf = _flat_bhsd(q, sq_pad)
    kf = _flat_bhsd(k, sk)
    vf = _flat_bhsd(v, sk)
    out = new_empty((b * h * sq_pad, d), dtype=q.dtype, device=q.device)
    lse = new_empty((b * h * sq_pad,), dtype=torch.float32, device=q.device)
    cpu = q.device.type == "cpu"
    ar_q = torch.arange(r.qbs, device=q.device)
    ws_k = ws_v = None
    for grp in r.groups:
        tok_all = _token_index(grp.kv_blocks, r.kbs, grp.keys).to(q.device)
        for bh, qi, gi in r.chunks(grp, d):
            n = bh.numel()
            bh_d, qi_d, gi_d = bh.to(q.device), qi.to(q.device), gi.to(q.device)
            kv_tok = (tok_all[gi_d] + (bh_d * sk)[:, None]).reshape(-1)
            need = kv_tok.numel() * d
            if ws_k is None or ws_k.numel() < need:
                ws_k = torch.empty(need, dtype=k.dtype, device=q.device)
                ws_v = torch.empty(need, dtype=v.dtype, device=q.device)
            kc = ws_k[:need].view(-1, d)
            vc = ws_v[:need].view(-1, d)
            torch.index_select(kf, 0, kv_tok, out=kc)
            torch.index_select(vf, 0, kv_tok, out=vc)
            q_tok = ((bh_d * sq_pad + qi_d * r.qbs)[:, None] + ar_q).reshape(-1)
            qc = qf.index_select(0, q_tok).view(n, 1, r.qbs, d)
            kc4 = kc.view(n, 1, grp.keys, d)
            vc4 = vc.view(n, 1, grp.keys, d)
            bias = None
            if grp.tile_ids is not None:
                bias = _tile_bias(mask, grp.tile_ids[gi], grp.keys, q.dtype, q.device)
            if cpu:
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qc, kc4, vc4, 0.0, False, attn_mask=bias, scale=scale)
            else:
                o, l = _math_attention(qc, kc4, vc4, bias, scale)
            o = o.reshape(n * r.qbs, d)
            l = l.reshape(n * r.qbs).float()
            if bias is not None:
                empty = ~torch.isfinite(l)
                if bool(empty.any()):
                    o = torch.where(empty[:, None], torch.zeros_like(o), o)
                    l = torch.where(empty, torch.full_like(l, float("-inf")), l)
            out.index_copy_(0, q_tok, o.to(out.dtype))
            lse.index_copy_(0, q_tok, l)
    out = out.view(b, h, sq_pad, d)[:, :, : r.sq].transpose(1, 2)
    lse = lse.view(b, h, sq_pad)[:, :, : r.sq]
    return out, lse


def _math_attention(qc, kc, vc, bias, scale):
    """Plain fp32 attention for one chunk (non-CPU devices): returns out, lse."""
    s = torch.matmul(qc.float(), kc.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isneginf(lse[..., None]), 0))
    return torch.matmul(p, vc.float()).to(qc.dtype), lse


def _forward_quant(r: _Runner, q, k, v):
    """INT8/INT4 emulation with the kernel's arithmetic (integer Q·K, exp2, P/V formats)."""
    cfg = r.quant
    b, h, d, sk = r.b, r.h, r.d, r.sk
    sq_pad = r.qb * r.qbs
    qz = quantize_qk(q, k, cfg, r.scale)
    # Per-token scales, flattened like the data.
    qs = qz.q_scale.repeat_interleave(cfg.q_block, -1)[..., : r.sq]
    ks = qz.k_scale.repeat_interleave(cfg.k_block, -1)[..., :sk]
    qi_f = torch.nn.functional.pad(qz.q_int.float(), (0, 0, 0, sq_pad - r.sq)).reshape(-1, d)
    qs_f = torch.nn.functional.pad(qs, (0, sq_pad - r.sq)).reshape(-1)
    ki_f = qz.k_int.float().reshape(-1, d)
    ks_f = ks.reshape(-1)
    if cfg.pv == PVFormat.INT8:
        v_int, v_scale = quantize_v(v)
        vf = v_int.float().reshape(-1, d)
    else:
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
        vf = v.transpose(1, 2).to(half).float().reshape(-1, d)
        v_scale = None
    out = new_empty((b * h * sq_pad, d), dtype=torch.float32, device=q.device)
    lse = new_empty((b * h * sq_pad,), dtype=torch.float32, device=q.device)
    ar_q = torch.arange(r.qbs, device=q.device)
    for grp in r.groups:
        tok_all = _token_index(grp.kv_blocks, r.kbs, grp.keys).to(q.device)
        for bh, qi, gi in r.chunks(grp, max(d, r.qbs)):
            n = bh.numel()
            bh_d, qi_d, gi_d = bh.to(q.device), qi.to(q.device), gi.to(q.device)
            kv_tok = (tok_all[gi_d] + (bh_d * sk)[:, None])
            q_tok = ((bh_d * sq_pad + qi_d * r.qbs)[:, None] + ar_q)
            # Integer products are exact in fp32 (|sum| <= 127 * 127 * D < 2**24).
            s = torch.matmul(qi_f[q_tok], ki_f[kv_tok].transpose(-1, -2))
            s = s * qs_f[q_tok][..., None] * ks_f[kv_tok][:, None, :]  # log2-domain logits
            if grp.tile_ids is not None:
                s = s + _tile_bias(r.mask, grp.tile_ids[gi], grp.keys, torch.float32, q.device)[:, 0]
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            p = torch.exp2(s - m)
            l = p.sum(-1, keepdim=True)
            if cfg.pv == PVFormat.INT8:
                p = round_half_away(p * cfg.p_scale_inv)
                o = torch.matmul(p, vf[kv_tok]) / cfg.p_scale_inv
                o = o * v_scale.reshape(b * h, d)[bh_d][:, None, :]
            else:
                o = torch.matmul(p.to(torch.float16).float(), vf[kv_tok])
            o = o / torch.where(l > 0, l, torch.ones_like(l))
            ll = torch.where(l > 0, (m + torch.log2(l)) / LOG2E, torch.full_like(l, float("-inf")))
            out.index_copy_(0, q_tok.reshape(-1), o.reshape(-1, d))
            lse.index_copy_(0, q_tok.reshape(-1), ll.reshape(-1))
    out = out.view(b, h, sq_pad, d)[:, :, : r.sq].transpose(1, 2).to(q.dtype)
    lse = lse.view(b, h, sq_pad)[:, :, : r.sq]
    return out, lse


def _backward(q, k, v, out, lse, grad_out, grad_lse, mask: BlockSparseMask, scale: float):
    """dq, dk, dv by recomputation per group (fp32 math), including the LSE's gradient."""
    r = _Runner(q, k, v, mask, scale, None)
    b, h, d, sk = r.b, r.h, r.d, r.sk
    sq_pad = r.qb * r.qbs
    qf = _flat_bhsd(q.float(), sq_pad)
    kf = _flat_bhsd(k.float(), sk)
    vf = _flat_bhsd(v.float(), sk)
    dof = _flat_bhsd(grad_out.float(), sq_pad)
    of = _flat_bhsd(out.float(), sq_pad)
    lse_f = torch.nn.functional.pad(lse.float(), (0, sq_pad - r.sq), value=float("-inf")).reshape(-1)
    delta = (dof * of).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.nn.functional.pad(grad_lse.float(), (0, sq_pad - r.sq)).reshape(-1)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    ar_q = torch.arange(r.qbs, device=q.device)
    for grp in r.groups:
        tok_all = _token_index(grp.kv_blocks, r.kbs, grp.keys).to(q.device)
        for bh, qi, gi in r.chunks(grp, max(d, r.qbs)):
            bh_d, qi_d, gi_d = bh.to(q.device), qi.to(q.device), gi.to(q.device)
            kv_tok = tok_all[gi_d] + (bh_d * sk)[:, None]
            q_tok = (bh_d * sq_pad + qi_d * r.qbs)[:, None] + ar_q
            qc, kc, vc, doc = qf[q_tok], kf[kv_tok], vf[kv_tok], dof[q_tok]
            s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
            if grp.tile_ids is not None:
                s = s + _tile_bias(mask, grp.tile_ids[gi], grp.keys, torch.float32, q.device)[:, 0]
            l = lse_f[q_tok][..., None]
            p = torch.exp(s - torch.where(torch.isneginf(l), torch.zeros_like(l), l))
            p = torch.where(torch.isneginf(l), torch.zeros_like(p), p)
            dv.index_add_(0, kv_tok.reshape(-1), torch.matmul(p.transpose(-1, -2), doc).reshape(-1, d))
            dp = torch.matmul(doc, vc.transpose(-1, -2))
            ds = p * (dp - delta[q_tok][..., None])
            dq.index_copy_(0, q_tok.reshape(-1), (torch.matmul(ds, kc) * scale).reshape(-1, d))
            dk.index_add_(0, kv_tok.reshape(-1), (torch.matmul(ds.transpose(-1, -2), qc) * scale).reshape(-1, d))

    def unflat(x, s_pad, s):
        return x.view(b, h, s_pad, d)[:, :, :s].transpose(1, 2)

    return (unflat(dq, sq_pad, r.sq).to(q.dtype), unflat(dk, sk, sk).to(k.dtype), unflat(dv, sk, sk).to(v.dtype))


class _TorchBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = _forward(q, k, v, mask, scale, None)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, grad_lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None


def torch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float,
    quant: Optional[QuantConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on any device with PyTorch ops (fast on CPU).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D); mask already checked against the shapes.
    Returns:
        out (B, Sq, H, D) in q's dtype, lse fp32 (B, H, Sq) (natural log).
    """
    if quant is not None:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ValueError("quantized attention is inference-only; run it under torch.no_grad() or use quant=None")
        return _forward(q, k, v, mask, scale, quant)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TorchBlockSparse.apply(q, k, v, mask, scale)
    return _forward(q, k, v, mask, scale, None)
