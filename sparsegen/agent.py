"""Agent attention: a few agent tokens gather from all keys, then broadcast to all queries.

    O = softmax(Q Aᵀ · s^k2) · (softmax(A Kᵀ · s) · V) + k_shortcut · V,   s = d^-0.5

Two small softmax attentions (M agents against N keys, N queries against M agents)
instead of one N x N: both run on the block-sparse engine with full masks, so INT8 and
the Triton kernels serve them, and the torch backend is differentiable.

Where the agents come from:

* **Pooled queries** (DiTs, :func:`pool_agents`): the mean of the queries over cells of
  the (t, h, w) token grid; ``ceil(F/ct) * ceil(H/ch) * ceil(W/cw)`` agents (cells at the
  grid's end may be partial and average their real tokens).
* **Token merging** (AgentSD on Stable Diffusion, :func:`bipartite_merge`): ToMe's
  bipartite soft matching over a 2-D token grid. One token per ``sy x sx`` window is a
  destination (the top-left one, or a seeded random one), the rest are sources; each
  source's most similar destination (cosine) is found, and the sources with the most
  similar matches are averaged into their destination. Merging ``ratio`` of the tokens
  gives the tokens attention runs on; merging ``agent_ratio`` gives the agents (both
  capped at the number of sources). The agent path is on only when the agents are
  fewer than half the merged tokens; e.g. 4,096 tokens (64 x 64, SD 1.5 at 512²),
  ``sx = sy = 4``: 256 destinations, 3,840 sources; ``ratio = 0.4`` merges 1,638 (2,458
  tokens remain), ``agent_ratio = 0.95`` would merge 3,891, capped at 3,840: 256 agents,
  and 2 x 256 < 2,458, so the agents are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .kernels import BlockSparseMask, block_sparse_attention

__all__ = ["agent_attention", "pool_agents", "pooled_agent_count", "bipartite_merge", "destination_partition",
           "TokenMerge",
           "DEFAULT_K_SCALE2", "DEFAULT_K_SHORTCUT"]

DEFAULT_K_SCALE2 = 0.3
DEFAULT_K_SHORTCUT = 0.075
# Block sizes of the full masks of the two attentions (64 is among the GPU gate's blocks).
_BLOCK = 64


def _full(q_len: int, kv_len: int, device) -> BlockSparseMask:
    return BlockSparseMask.full(q_len=q_len, kv_len=kv_len, q_block_size=_BLOCK, kv_block_size=_BLOCK, device=device)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, *,
                    k_scale2: float = DEFAULT_K_SCALE2, k_shortcut: float = DEFAULT_K_SHORTCUT,
                    backend="auto", quant=None, extra_keys: Optional[tuple] = None) -> torch.Tensor:
    """Agent attention of ``q`` over ``k``, ``v`` through ``agents``.

    Args:
        q, k, v: (B, N, H, D) (self-attention: the shortcut adds ``k_shortcut * v``).
        agents: (B, M, H, D), already projected (e.g. pooled queries).
        k_scale2: the broadcast attention's scale is ``(D ** -0.5) ** k_scale2``.
        k_shortcut: weight of the ``v`` shortcut.
        backend, quant: as :func:`~sparsegen.kernels.block_sparse_attention`, for both attentions.
        extra_keys: optional ``(k_extra (B, Nt, H, D), v_extra, valid bool (B, Nt) or None)``
            that the agents also attend (the text tokens of joint attention), merged
            exactly with the main keys through their log-sum-exps.

    Returns:
        (B, N, H, D) in q's dtype. No N x N matrix is formed.

    Raises:
        ValueError: shapes that do not match, or k and q of different lengths.

    Example::

        >>> q = k = v = torch.randn(1, 1000, 2, 64)
        >>> out = agent_attention(q, k, v, q[:, ::16])          # 63 agents
        >>> out.shape
        torch.Size([1, 1000, 2, 64])
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("agents", agents)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (batch, tokens, heads, head_dim) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"agent attention is self-attention: q, k, v must share one shape; got {tuple(q.shape)=}, "
                         f"{tuple(k.shape)=}, {tuple(v.shape)=}")
    b, n, h, d = q.shape
    if agents.shape[0] != b or agents.shape[2:] != q.shape[2:] or agents.shape[1] < 1:
        raise ValueError(f"agents must be (batch={b}, M >= 1, heads={h}, head_dim={d}); got {tuple(agents.shape)=}")
    agents = agents.to(q.dtype)
    m = agents.shape[1]
    scale = d ** -0.5
    # 1. Agents gather from every key.
    gathered = block_sparse_attention(agents, k, v, _full(m, n, q.device), scale=scale, backend=backend, quant=quant,
                                      return_lse=extra_keys is not None)
    if extra_keys is not None:
        from .joint import _attend_text_keys, merge_partial_attention

        out_a, lse_a = gathered
        kt, vt, valid = extra_keys
        out_t, lse_t = _attend_text_keys(agents, kt, vt, valid)
        gathered, _ = merge_partial_attention(out_a, lse_a, out_t, lse_t)
    # 2. Every query reads the agents.
    out = block_sparse_attention(q, agents, gathered, _full(n, m, q.device), scale=scale ** k_scale2,
                                 backend=backend, quant=quant)
    return out + k_shortcut * v


def pooled_agent_count(grid: Sequence[int], cell: Sequence[int]) -> int:
    """Agents :func:`pool_agents` makes: ``prod(ceil(grid[i] / cell[i]))``."""
    return math.prod(-(-g // c) for g, c in zip(grid, cell))


def pool_agents(x: torch.Tensor, *, grid: Sequence[int], cell: Sequence[int]) -> torch.Tensor:
    """Mean of the tokens of ``x`` over (t, h, w) cells of the token grid.

    Args:
        x: (B, S, H, D), S = F * Hg * Wg tokens in row-major (F, Hg, Wg) order.
        grid: (F, Hg, Wg); cell: (ct, ch, cw), each >= 1.

    Returns:
        (B, M, H, D) with M = :func:`pooled_agent_count`, cells in row-major order.
    """
    f, hg, wg = (int(g) for g in grid)
    ct, ch, cw = (int(c) for c in cell)
    if min(ct, ch, cw) < 1:
        raise ValueError(f"agent cell must be three ints >= 1, got {tuple(cell)}")
    b, s, h, d = x.shape
    if s != f * hg * wg:
        raise ValueError(f"x has {s} tokens but grid {tuple(grid)} holds {f * hg * wg}")
    nf, nh, nw = -(-f // ct), -(-hg // ch), -(-wg // cw)
    xf = x.float().reshape(b, f, hg, wg, h * d)
    # Pad to whole cells with zeros and divide by each cell's real token count.
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nw * cw - wg, 0, nh * ch - hg, 0, nf * ct - f))
    sums = xf.view(b, nf, ct, nh, ch, nw, cw, h * d).sum((2, 4, 6))
    counts = torch.ones(f, hg, wg, device=x.device)
    counts = torch.nn.functional.pad(counts, (0, nw * cw - wg, 0, nh * ch - hg, 0, nf * ct - f))
    counts = counts.view(nf, ct, nh, ch, nw, cw).sum((1, 3, 5))
    return (sums / counts[None, ..., None]).reshape(b, nf * nh * nw, h, d).to(x.dtype)


@dataclass
class TokenMerge:
    """The result of :func:`bipartite_merge` for one (B, N, C) input.

    Attributes:
        num_tokens: N; num_merged: tokens attention runs on (N - r);
        num_agents: agents (N - agent_r), or 0 when the agent path is off;
        agents_active: whether agents are fewer than half the merged tokens.
    """

    num_tokens: int
    num_merged: int
    num_agents: int
    agents_active: bool
    _src_idx: torch.Tensor          # (1, Ns) positions of the sources
    _dst_idx: torch.Tensor          # (1, Nd) positions of the destinations
    _order: torch.Tensor            # (B, Ns) sources by decreasing best similarity
    _best: torch.Tensor             # (B, Ns) each source's best destination (index into dst)
    _r: int
    _agent_r: int

    def _split(self, x):
        c = x.shape[-1]
        src = x.gather(1, self._src_idx[..., None].expand(x.shape[0], -1, c))
        dst = x.gather(1, self._dst_idx[..., None].expand(x.shape[0], -1, c))
        return src, dst

    def _merge(self, x, r):
        src, dst = self._split(x)
        b, ns, c = src.shape
        kept = self._order[:, r:]
        merged = self._order[:, :r]
        unm = src.gather(1, kept[..., None].expand(b, ns - r, c))
        moved = src.gather(1, merged[..., None].expand(b, r, c))
        target = self._best.gather(1, merged)
        dst = dst.scatter_reduce(1, target[..., None].expand(b, r, c), moved, reduce="mean", include_self=True)
        return torch.cat([unm, dst], 1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): unmerged sources, then destinations (with their merged sources averaged in)."""
        return self._merge(x, self._r)

    def agents(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, N, C) -> (B, N - agent_r, C) agent tokens, or None when the agent path is off."""
        return self._merge(x, self._agent_r) if self.agents_active else None

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every merged source takes its destination's value."""
        b, _, c = y.shape
        ns = self._src_idx.shape[1]
        unm, dst = y[:, :ns - self._r], y[:, ns - self._r:]
        src = torch.empty(b, ns, c, dtype=y.dtype, device=y.device)
        src.scatter_(1, self._order[:, self._r:, None].expand(b, ns - self._r, c), unm)
        merged = self._order[:, :self._r]
        src.scatter_(1, merged[..., None].expand(b, self._r, c),
                     dst.gather(1, self._best.gather(1, merged)[..., None].expand(b, self._r, c)))
        out = torch.empty(b, self.num_tokens, c, dtype=y.dtype, device=y.device)
        out.scatter_(1, self._src_idx[..., None].expand(b, ns, c), src)
        out.scatter_(1, self._dst_idx[..., None].expand(b, dst.shape[1], c), dst)
        return out


def destination_partition(height: int, width: int, sx: int, sy: int, generator: Optional[torch.Generator] = None,
                          device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(source positions (1, Ns), destination positions (1, Nd)) of a ``height x width`` grid:
    one destination per full ``sy x sx`` window (its top-left token, or a random one drawn
    from ``generator``), every other token a source."""
    hs, ws = height // sy, width // sx
    if generator is None:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hs, ws), generator=generator)
    is_dst = torch.zeros(height, width, dtype=torch.bool)
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    is_dst[rows, cols] = True
    flat = is_dst.reshape(-1)
    return (~flat).nonzero()[:, 0][None].to(device), flat.nonzero()[:, 0][None].to(device)


def bipartite_merge(metric: torch.Tensor, *, height: int, width: int, sx: int = 2, sy: int = 2, ratio: float = 0.5,
                    agent_ratio: float = 0.8, generator: Optional[torch.Generator] = None,
                    partition: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> TokenMerge:
    """ToMe's bipartite soft matching over a ``height x width`` token grid (AgentSD's agents).

    Args:
        metric: (B, N, C) features compared by cosine similarity, N = height * width row-major.
        sx, sy: destination windows; one destination per full ``sy x sx`` window (rows
            and columns past the last full window are sources).
        ratio: share of N merged away for the attention tokens (r = int(N * ratio)).
        agent_ratio: share of N merged away for the agents (agent_r = int(N * agent_ratio)).
        generator: None for the top-left token of each window (deterministic), or a
            seeded generator for a random one per window.
        partition: the sources and destinations from :func:`destination_partition`
            (computed here when None; pass it to reuse one across calls).

    Returns:
        a :class:`TokenMerge` (``merge``, ``agents``, ``unmerge`` and the counts).
    """
    b, n, _ = metric.shape
    if n != height * width:
        raise ValueError(f"metric has {n} tokens but the grid {height} x {width} holds {height * width}")
    if min(sx, sy) < 1 or not (0 <= ratio < 1) or not (0 <= agent_ratio < 1):
        raise ValueError(f"need sx, sy >= 1 and ratios in [0, 1); got {sx=}, {sy=}, {ratio=}, {agent_ratio=}")
    if partition is None:
        partition = destination_partition(height, width, sx, sy, generator, metric.device)
    src_idx, dst_idx = partition
    ns = src_idx.shape[1]
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = unit.gather(1, src_idx[..., None].expand(b, -1, unit.shape[-1]))
        d = unit.gather(1, dst_idx[..., None].expand(b, -1, unit.shape[-1]))
        best_score, best = (a @ d.transpose(1, 2)).max(-1)
        order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    r = min(ns, int(n * ratio))
    agent_r = min(ns, int(n * agent_ratio))
    active = (n - agent_r) * 2 < (n - r)
    return TokenMerge(num_tokens=n, num_merged=n - r, num_agents=(n - agent_r) if active else 0, agents_active=active,
                      _src_idx=src_idx, _dst_idx=dst_idx, _order=order, _best=best, _r=r, _agent_r=agent_r)
