"""Self-attention over video tokens plus optional text tokens, for any method.

Joint attention (HunyuanVideo) attends over one sequence ``[video, text]``::

                 keys:  video (Nv)            text (Nt, padded tail masked)
    queries video   :   method's sparse mask  dense
    queries text    :   dense                 dense

Video queries get two partial results, merged exactly with their log-sum-exps:
``out = out_vv * exp(lse_vv - lse) + out_vt * exp(lse_vt - lse)``, ``lse = logaddexp``.
No dense (Nv + Nt)^2 matrix is ever formed. Everything here is differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import BlockSparseMask, block_sparse_attention
from .methods.base import AttentionCall, SparseAttentionMethod

__all__ = ["sparse_self_attention", "merge_partial_attention"]


def merge_partial_attention(out_a, lse_a, out_b, lse_b):
    """Merge two attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: (B, N, H, D); lse_a, lse_b: fp32 (B, H, N) natural log (-inf = no keys).
    Returns:
        (out (B, N, H, D) in out_a's dtype, lse (B, H, N)).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse


def _dense_with_lse(q, k, v, backend: str):
    """Dense attention with LSE through the engine (a full block mask), any lengths."""
    mask = BlockSparseMask.full(q_len=q.shape[1], kv_len=k.shape[1], q_block_size=128, kv_block_size=128,
                                device=q.device)
    return block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)


def sparse_self_attention(
    method: SparseAttentionMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    *,
    text_tokens: int = 0,
    text_key_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Self-attention with the method's sparsity on video tokens and dense text.

    Args:
        q, k, v: (B, Nv + Nt, H, D), video tokens first (Nv = call.geometry.num_tokens).
        text_tokens: Nt (0 for video-only self-attention).
        text_key_valid: bool (B, Nt), True for text tokens that may be attended
            (None: all). Padded text *queries* still attend to every valid key, as the
            dense model does.
    Returns:
        out (B, Nv + Nt, H, D).
    """
    nv = call.geometry.num_tokens
    if q.shape[1] != nv + text_tokens:
        raise ValueError(
            f"attention sequence has {q.shape[1]} tokens but the video grid {call.geometry.grid} gives "
            f"{nv} video tokens + {text_tokens} text tokens"
        )
    if text_tokens == 0:
        out, _ = method.attention(q, k, v, call)
        return out
    qv, kv, vv = q[:, :nv], k[:, :nv], v[:, :nv]
    out_vv, lse_vv = method.attention(qv, kv, vv, call)
    outs_v, outs_t = [], []
    for b in range(q.shape[0]):
        kt, vt = k[b:b + 1, nv:], v[b:b + 1, nv:]
        if text_key_valid is not None:
            n_valid = int(text_key_valid[b].sum())
            if not bool(text_key_valid[b, :n_valid].all()):
                # Only right padding keeps valid text contiguous; gather otherwise.
                idx = text_key_valid[b].nonzero().squeeze(1)
                kt, vt = kt[:, idx], vt[:, idx]
            else:
                kt, vt = kt[:, :n_valid], vt[:, :n_valid]
        if kt.shape[1] > 0:
            o_vt, lse_vt = _dense_with_lse(qv[b:b + 1], kt, vt, call.backend)
            o_v, _ = merge_partial_attention(out_vv[b:b + 1], lse_vv[b:b + 1], o_vt, lse_vt)
        else:
            o_v = out_vv[b:b + 1]
        outs_v.append(o_v)
        # Text queries: dense over all valid keys.
        keys = torch.cat([kv[b:b + 1], kt], 1)
        vals = torch.cat([vv[b:b + 1], vt], 1)
        o_t = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, nv:].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2)
        ).transpose(1, 2)
        outs_t.append(o_t)
    return torch.cat([torch.cat(outs_v, 0), torch.cat(outs_t, 0).to(q.dtype)], 1)
