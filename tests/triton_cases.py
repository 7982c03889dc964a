"""Inputs and masks shared by the Triton kernel tests (small shapes for the interpreter)."""

from __future__ import annotations

import torch

from sparsegen.kernels import BlockSparseMask


def qkv(b, sq, sk, h, d, dtype, seed, *, head_major=False):
    """Random q (B, Sq, H, D), k, v (B, Sk, H, D); ``head_major`` gives (B, H, S, D) storage viewed as (B, S, H, D)."""
    g = torch.Generator().manual_seed(seed)

    def make(s):
        if head_major:
            return torch.randn(b, h, s, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, s, h, d, generator=g).to(dtype)

    return make(sq), make(sk), make(sk)


def block_mask(b, h, sq, sk, qbs, kbs, density, seed):
    """Random block layout (per batch and head unless b or h is 1) with the diagonal forced on."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-sq // qbs), -(-sk // kbs)
    blocks = torch.rand(b, h, nq, nk, generator=g) < density
    blocks[..., torch.arange(nq), torch.arange(nq) * nk // nq] = True
    return BlockSparseMask.from_block_matrix(blocks, q_len=sq, kv_len=sk, q_block_size=qbs, kv_block_size=kbs)


def window_mask(b, h, sq, sk, qbs, kbs):
    """Per-(batch, head) banded token mask (window 13 + 9 * (b * H + h) tokens) plus two sink keys.

    Built with ``from_mask_mod``, so blocks the band crosses are partial (token tiles).
    """
    def mask_mod(bi, hi, qi, ki):
        w = 13 + 9 * (bi * h + hi)
        centre = qi * sk // sq
        return ((ki - centre).abs() <= w) | (ki < 2)

    return BlockSparseMask.from_mask_mod(mask_mod, q_len=sq, kv_len=sk, q_block_size=qbs, kv_block_size=kbs,
                                         batch=b, heads=h)


def eager_attention(q, k, v, mask, scale):
    """Plain masked attention in the inputs' dtype (softmax in fp32): the error budget.

    Returns out (B, Sq, H, D) and lse fp32 (B, H, Sq).
    """
    b, sq, h, _ = q.shape
    allowed = mask.to_dense().expand(b, h, sq, k.shape[1])
    s = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)) * scale
    s = s.float().masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(p.to(q.dtype), v.transpose(1, 2)).transpose(1, 2), lse


def mixed_mask(b, h, sq, sk, qbs, kbs, seed, *, density=0.5, partial_share=0.4):
    """Token-exact mask mixing full and partial blocks, per (batch, head), with the awkward rows on purpose.

    Visited blocks are random (``density``, the first key block always); ``partial_share`` of
    them carry a random token tile, never block (0, 0). Query block 1 visits only partial blocks, and its
    tokens 5-8 attend nothing (empty rows inside visited blocks).
    Built with ``from_dense``, so the tiles are exact. Returns (mask, token mask bool (b, h, sq, sk)).
    """
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-sq // qbs), -(-sk // kbs)
    blocks = torch.rand(b, h, nq, nk, generator=g) < density
    blocks[..., 0] = True
    tok = blocks.repeat_interleave(qbs, 2).repeat_interleave(kbs, 3)[..., :sq, :sk].clone()
    partial = (torch.rand(b, h, nq, nk, generator=g) < partial_share)
    partial[:, :, 0, 0] = False  # at least one full block in each layout
    if nq > 1:
        partial[:, :, 1] = True
    partial = partial.repeat_interleave(qbs, 2).repeat_interleave(kbs, 3)[..., :sq, :sk]
    tok &= ~partial | (torch.rand(b, h, sq, sk, generator=g) < 0.5)
    if nq > 1:
        tok[..., qbs + 5: qbs + 9, :] = False
    mask = BlockSparseMask.from_dense(tok, q_block_size=qbs, kv_block_size=kbs)
    return mask, tok
