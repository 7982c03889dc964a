"""Self-attention over video tokens plus optional text tokens, for any method.

Joint attention attends over one sequence ``[video, text]`` (HunyuanVideo) or
``[text, video]`` (CogVideoX); in either order::

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


# Video queries per chunk of the video->text attention: bounds its (B, H, chunk, Nt)
# score tensor (HunyuanVideo: Nv ~ 120k video tokens, Nt = 256 text tokens).
_TEXT_QUERY_CHUNK = 8192


def _attend_text_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor]):
    """Dense attention of many queries over a few keys, with padded keys masked.

    Args:
        q: (B, Nq, H, D); k, v: (B, Nk, H, D); key_valid: bool (B, Nk) or None.
    Returns:
        out (B, Nq, H, D) in q's dtype and lse fp32 (B, H, Nq) (-inf and out 0 where no key is valid).

    Plain tensor operations, no host reads: the validity masks the scores instead of
    slicing the keys per sample.
    """
    scale = q.shape[-1] ** -0.5
    kh, vh = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # (B, H, Nk, D)
    bias = None
    if key_valid is not None:
        bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=q.device).masked_fill(
            ~key_valid, float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[1], _TEXT_QUERY_CHUNK):
        qh = q[:, start:start + _TEXT_QUERY_CHUNK].transpose(1, 2).float()
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
        outs.append(torch.matmul(p, vh).transpose(1, 2).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def sparse_self_attention(
    method: SparseAttentionMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    *,
    text_tokens: int = 0,
    text_key_valid: Optional[torch.Tensor] = None,
    text_first: bool = False,
) -> torch.Tensor:
    """Self-attention with the method's sparsity on video tokens and dense text.

    Args:
        q, k, v: (B, Nv + Nt, H, D), video tokens first (Nv = call.geometry.num_tokens),
            or text tokens first with ``text_first``.
        text_tokens: Nt (0 for video-only self-attention).
        text_key_valid: bool (B, Nt), True for text tokens that may be attended
            (None: all). Padded text *queries* still attend to every valid key, as the
            dense model does.
        text_first: the sequence is ``[text, video]``.
    Returns:
        out (B, Nv + Nt, H, D), in the input's order.
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
    video = slice(text_tokens, None) if text_first else slice(0, nv)
    text = slice(0, text_tokens) if text_first else slice(nv, None)
    qv, kv, vv = q[:, video], k[:, video], v[:, video]
    if getattr(method, "attends_text", False):
        # The method attends the text keys itself (agent attention: its agents gather from them).
        out_v, _ = method.attention(qv, kv, vv, call, text=(k[:, text], v[:, text], text_key_valid))
    else:
        out_vv, lse_vv = method.attention(qv, kv, vv, call)
        out_vt, lse_vt = _attend_text_keys(qv, k[:, text], v[:, text], text_key_valid)
        out_v, _ = merge_partial_attention(out_vv, lse_vv, out_vt, lse_vt)
    # Text queries: dense over every video key and every valid text key.
    key_mask = None
    if text_key_valid is not None:
        video_ok = torch.ones(q.shape[0], nv, dtype=torch.bool, device=q.device)
        parts = [text_key_valid, video_ok] if text_first else [video_ok, text_key_valid]
        key_mask = torch.cat(parts, 1)[:, None, None, :]
    out_t = torch.nn.functional.scaled_dot_product_attention(
        q[:, text].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
    ).transpose(1, 2).to(q.dtype)
    return torch.cat([out_t, out_v] if text_first else [out_v, out_t], 1)
