"""Theoretical FLOPs: attention of any block-sparse mask, and whole transformer passes.

Conventions (VMoBA's, which published the numbers reproduced here): a matmul of
(m x n) . (n x p) counts ``2 m n p`` FLOPs; softmax, norms and element-wise work are not
counted. One transformer layer of a Wan2.1-style DiT, S video tokens, width d, FFN
width f, T text tokens::

    self-attention   q, k, v, out projections      4 * 2 S d d
                     Q K^T and P V                 2 * 2 S S d     <- replaced by sparse methods
    cross-attention  q, out projections            2 * 2 S d d
                     k, v projections (text)       2 * 2 T d d
                     Q K^T and P V (T keys)        2 * 2 S T d
    FFN              up and down                   2 * 2 S d f

Wan2.1-1.3B (30 layers, d = 1536 = 12 heads x 128, f = 8960, 300 text tokens), batch 1:
67.73 T FLOPs at 13,440 tokens, 705.02 T at 55,296, 724.97 T at 56,160 with full
attention. MoBA-style attention with chunk size ``c`` and top-k costs the gating
``2 S d (S / c)`` plus Q K^T and P V over ``c k`` keys; VMoBA cycles layers through 7,
40 and 60 blocks with ``k = 0.18 x blocks``: 40.48 T at 13,440 and 248.39 T at 56,160.
``sparsegen flops --paper`` prints these next to the published values. Methods with a
static mask are counted from the mask itself (every visited block in full), e.g.
``sparsegen flops --latent 30,48,80 --method gna --kernel-size 18,24,24 --stride 16,8,8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .kernels import BlockSparseMask

__all__ = [
    "TransformerSpec",
    "MODELS",
    "PUBLISHED",
    "matmul_flops",
    "dense_attention_flops",
    "moba_attention_flops",
    "vmoba_attention_flops",
    "mask_attention_flops",
    "agent_attention_flops",
    "transformer_flops",
    "method_mask",
    "method_transformer_flops",
    "paper_table",
]

TERA = 1e12


@dataclass(frozen=True)
class TransformerSpec:
    """Sizes of a DiT with self-attention, text cross-attention and an FFN per layer."""

    name: str
    num_layers: int
    dim: int
    ffn_dim: int
    text_tokens: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


MODELS = {
    "wan2.1-1.3b": TransformerSpec("wan2.1-1.3b", num_layers=30, dim=1536, ffn_dim=8960, text_tokens=300, heads=12),
}

# VMoBA's published theoretical FLOPs (Wan2.1-1.3B, one forward pass, batch 1), in TFLOPs.
PUBLISHED = {
    ("full", 13440): 67.73,
    ("full", 55296): 705.02,
    ("full", 56160): 724.97,
    ("vmoba", 13440): 40.48,
    ("vmoba", 56160): 248.39,
}
# VMoBA's FLOPs setting: blocks per layer kind (1D, 2D, 3D) and the selected share of blocks.
VMOBA_FLOPS_BLOCKS = (7, 40, 60)
VMOBA_FLOPS_TOPK_RATIO = 0.18


def matmul_flops(m: float, n: float, p: float) -> float:
    """FLOPs of an (m x n) . (n x p) matmul: 2 m n p."""
    return 2.0 * m * n * p


def dense_attention_flops(q_len: int, kv_len: int, dim: int) -> float:
    """Q K^T and P V of dense attention over all heads (``dim`` = heads x head_dim)."""
    return matmul_flops(q_len, dim, kv_len) + matmul_flops(q_len, kv_len, dim)


def moba_attention_flops(num_tokens: int, dim: int, *, num_blocks: float, topk: float) -> float:
    """MoBA-style attention: gating against block means plus attention over ``topk`` blocks.

    ``2 S d B`` (scores of every query against B block means) + ``2 x 2 S (c k) d`` with
    chunk ``c = S / B``. ``topk`` may be fractional (an average).
    """
    if num_blocks <= 0 or topk < 0:
        raise ValueError(f"num_blocks must be > 0 and topk >= 0, got num_blocks={num_blocks}, topk={topk}")
    chunk = num_tokens / num_blocks
    return matmul_flops(num_tokens, dim, num_blocks) + 2 * matmul_flops(num_tokens, chunk * topk, dim)


def vmoba_attention_flops(num_tokens: int, dim: int, *, layer: int,
                          blocks: Sequence[float] = VMOBA_FLOPS_BLOCKS,
                          topk_ratio: float = VMOBA_FLOPS_TOPK_RATIO) -> float:
    """Self-attention FLOPs of VMoBA layer ``layer`` (its kind is ``layer % 3``: 1D, 2D, 3D)."""
    b = blocks[layer % len(blocks)]
    return moba_attention_flops(num_tokens, dim, num_blocks=b, topk=topk_ratio * b)


def mask_attention_flops(mask: BlockSparseMask, *, head_dim: int, heads: Optional[int] = None,
                         batch: Optional[int] = None, count: str = "computed") -> float:
    """Q K^T and P V FLOPs of attention restricted to a block-sparse mask.

    Args:
        mask: the layout (its batch / head dims may be 1: broadcast).
        head_dim: D.
        heads, batch: sizes of the attention when the mask broadcasts over them
            (default: the mask's own sizes).
        count: ``"computed"``: every visited block in full (what a block-sparse kernel
            does; ragged last blocks count their real tokens); ``"attended"``: only the
            token pairs the mask allows (partial blocks count their tile). A mask over a
            padded token order cannot tell padding rows of full blocks from real ones:
            count those from the method (:func:`method_transformer_flops` does).

    Returns:
        FLOPs = 4 x D x (token pairs).
    """
    if count not in ("computed", "attended"):
        raise ValueError(f"count={count!r} must be 'computed' or 'attended'")
    bm, hm = mask.kv_num_blocks.shape[:2]
    batch = bm if batch is None else batch
    heads = hm if heads is None else heads
    if bm not in (1, batch) or hm not in (1, heads):
        raise ValueError(f"mask batch/heads ({bm}, {hm}) must be 1 or equal batch={batch}, heads={heads}")
    rep = (batch // bm) * (heads // hm)
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    qb, kb = mask.num_q_blocks, mask.num_kv_blocks
    dev = mask.device
    rows = (mask.q_len - torch.arange(qb, device=dev) * qbs).clamp(max=qbs).double()           # (Qb,)
    cols = (mask.kv_len - torch.arange(kb, device=dev) * kbs).clamp(max=kbs).double()          # (Kb,)
    kmax = mask.kv_indices.shape[-1]
    valid = torch.arange(kmax, device=dev) < mask.kv_num_blocks[..., None].long()
    idx = mask.kv_indices.long().clamp(max=kb - 1)
    pair = rows.view(1, 1, -1, 1) * cols[idx]                                                   # (B, H, Qb, K)
    if count == "attended" and mask.tile_ids is not None:
        tid = mask.tile_ids.long()
        part = valid & (tid >= 0)
        if bool(part.any()):
            ar_q = torch.arange(qbs, device=dev)
            ar_k = torch.arange(kbs, device=dev)
            qi = torch.arange(qb, device=dev).view(1, 1, -1, 1).expand_as(idx)
            sel_t, sel_q, sel_k = tid[part], qi[part], idx[part]
            in_q = (sel_q[:, None] * qbs + ar_q[None, :]) < mask.q_len                           # (P, qbs)
            in_k = (sel_k[:, None] * kbs + ar_k[None, :]) < mask.kv_len                          # (P, kbs)
            sums = torch.empty(sel_t.numel(), dtype=torch.float64, device=dev)
            step = max(1, (1 << 24) // (qbs * kbs))  # bound the temporary to ~16M elements
            for s in range(0, sel_t.numel(), step):
                t = mask.tiles[sel_t[s:s + step]] & in_q[s:s + step, :, None] & in_k[s:s + step, None, :]
                sums[s:s + step] = t.flatten(1).sum(1).double()
            pair = pair.clone()
            pair[part] = sums
    total = float((pair * valid).sum()) * rep
    return 4.0 * head_dim * total


def agent_attention_flops(num_tokens: int, dim: int, *, agents: int) -> float:
    """Agent attention over all heads (``dim`` = heads x head_dim): the agents attend every
    key, then every query attends the agents, two dense attentions of A x S and S x A:
    ``8 S A d``. (Pooling the agents and the value shortcut are not matmuls.)"""
    return dense_attention_flops(agents, num_tokens, dim) + dense_attention_flops(num_tokens, agents, dim)


AttentionFlops = Union[None, float, Sequence[float], Callable[[int], float]]


def transformer_flops(spec: TransformerSpec, num_tokens: int, *, self_attention: AttentionFlops = None) -> dict:
    """FLOPs of one forward pass (batch 1), with the self-attention core optionally replaced.

    Args:
        spec: model sizes (e.g. ``MODELS["wan2.1-1.3b"]``).
        num_tokens: S, video tokens.
        self_attention: FLOPs of Q K^T + P V per layer: None (dense), a number (every
            layer), a sequence (one per layer) or a function ``layer -> FLOPs``.

    Returns:
        dict with ``total`` and the parts ``projections``, ``self_attention``,
        ``cross_attention``, ``ffn`` (FLOPs, summed over layers).
    """
    s, d, f, t = num_tokens, spec.dim, spec.ffn_dim, spec.text_tokens
    if s <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if self_attention is None:
        per_layer = [dense_attention_flops(s, s, d)] * spec.num_layers
    elif callable(self_attention):
        per_layer = [float(self_attention(layer)) for layer in range(spec.num_layers)]
    elif isinstance(self_attention, (int, float)):
        per_layer = [float(self_attention)] * spec.num_layers
    else:
        per_layer = [float(x) for x in self_attention]
        if len(per_layer) != spec.num_layers:
            raise ValueError(f"self_attention has {len(per_layer)} entries but {spec.name} has {spec.num_layers} layers")
    L = spec.num_layers
    projections = L * 4 * matmul_flops(s, d, d)
    cross = L * (2 * matmul_flops(s, d, d) + 2 * matmul_flops(t, d, d) + dense_attention_flops(s, t, d))
    ffn = L * 2 * matmul_flops(s, d, f)
    attn = sum(per_layer)
    return {"total": projections + attn + cross + ffn, "projections": projections, "self_attention": attn,
            "cross_attention": cross, "ffn": ffn}


def vmoba_transformer_flops(spec: TransformerSpec, num_tokens: int, *, blocks: Sequence[float] = VMOBA_FLOPS_BLOCKS,
                            topk_ratio: float = VMOBA_FLOPS_TOPK_RATIO) -> dict:
    """Whole-model FLOPs with VMoBA self-attention (layer kinds cycling 1D, 2D, 3D)."""
    return transformer_flops(spec, num_tokens, self_attention=lambda layer: vmoba_attention_flops(
        num_tokens, spec.dim, layer=layer, blocks=blocks, topk_ratio=topk_ratio))


def _static_method(config, geometry):
    method = config.make_method()
    if not method.has_static_mask:
        raise ValueError(f"method {config.method!r} has no static mask to count (it selects blocks per call); "
                         "use --method vmoba for VMoBA's theoretical FLOPs")
    method.check_geometry(geometry)
    return method


def method_mask(config, geometry) -> BlockSparseMask:
    """The static block mask a method uses for one token grid.

    Args:
        config: a method config (e.g. ``RadialConfig(decay_factor=0.2)``,
            ``GNAConfig(kernel_size=(18, 24, 24), stride=(16, 8, 8))``).
        geometry: an :class:`~sparsegen.methods.AttentionGeometry` (frames, height, width).

    Returns:
        the method's mask (GNA's is over its tiled, padded token order).

    Raises:
        ValueError: the method builds its sparsity per call (VMoBA, whose FLOPs are
            :func:`vmoba_attention_flops`) or cannot serve the geometry.
    """
    return _static_method(config, geometry).static_mask(geometry)


def method_transformer_flops(spec: TransformerSpec, config, geometry) -> dict:
    """Whole-model FLOPs of one pass with a method's self-attention on its sparse layers
    (``dense_layers`` and, for agent attention, ``layers`` stay dense).

    * radial, GNA: each sparse layer restricted to the method's static mask;
    * agent (pooled agents): :func:`agent_attention_flops` with the config's agent count;
    * PARO: each (layer, head) restricted to the plan's calibrated mask, averaged over the
      plan's step buckets weighted by the share of the steps each covers (``buckets``
      holds each one's total); the plan must be for ``spec``'s layers, heads and ``geometry``.

    Returns:
        :func:`transformer_flops` parts plus ``method``, ``density`` (the sparse layers'
        self-attention FLOPs / dense; for static masks: visited blocks / all blocks) and
        ``attended_self_attention`` (FLOPs of the token pairs the masks allow, summed over
        layers). ``self_attention`` counts every visited block in full, padding included:
        what a block-sparse kernel computes.

    Raises:
        ValueError: VMoBA (per-call selection: :func:`vmoba_transformer_flops`), AgentSD's
            token merging, a geometry the method cannot serve, a plan for another model.
    """
    s, layers = geometry.num_tokens, range(spec.num_layers)
    dense = dense_attention_flops(s, s, spec.dim)

    def with_dense_layers(sparse_per_layer):
        return [dense if config.layer_is_dense(layer) else sparse_per_layer(layer) for layer in layers]

    extra = {}
    if config.method == "agent":
        if config.agents != "pool":
            raise ValueError("FLOPs are counted for pooled agents (agents='pool'); AgentSD's token merging ('tome') "
                             "changes the token count per step and is not counted")
        config.make_method().check_geometry(geometry)
        sparse = agent_attention_flops(s, spec.dim, agents=config.num_agents(geometry.grid))
        per_layer = attended = with_dense_layers(lambda layer: sparse)
        density = sparse / dense
        extra["agents"] = config.num_agents(geometry.grid)
    elif config.method == "paro":
        plan = config.plan
        if (plan.num_layers, plan.num_heads) != (spec.num_layers, spec.heads):
            raise ValueError(f"this PARO plan was made for {plan.describe_geometry()}, not for {spec.name} "
                             f"({spec.num_layers} layers x {spec.heads} heads)")
        plan.check_geometry(geometry.grid)
        buckets = []
        for b, (start, end) in enumerate(plan.buckets):
            per_bucket = with_dense_layers(lambda layer: mask_attention_flops(
                plan.layer_mask(b, layer), head_dim=spec.head_dim, batch=1))
            buckets.append((end - start, per_bucket))
        per_layer = attended = [sum(w * f[layer] for w, f in buckets) for layer in layers]
        sparse_layers = [layer for layer in layers if not config.layer_is_dense(layer)]
        density = sum(per_layer[layer] for layer in sparse_layers) / (dense * max(len(sparse_layers), 1))
        extra["buckets"] = [transformer_flops(spec, s, self_attention=f)["total"] for _, f in buckets]
    else:
        method = _static_method(config, geometry)
        mask = method.static_mask(geometry)
        sparse = mask_attention_flops(mask, head_dim=spec.head_dim, heads=spec.heads, batch=1)
        pairs = method.attended_pairs(geometry)
        if pairs is not None:
            # Masks over a padded token order (GNA's tiles) know the real pairs better than the mask does.
            pair_flops = 4.0 * spec.head_dim * spec.heads * pairs
        else:
            pair_flops = mask_attention_flops(mask, head_dim=spec.head_dim, heads=spec.heads, batch=1, count="attended")
        per_layer = with_dense_layers(lambda layer: sparse)
        attended = with_dense_layers(lambda layer: pair_flops)
        density = mask.density()
    out = transformer_flops(spec, s, self_attention=per_layer)
    out.update(method=config.method, density=density, attended_self_attention=sum(attended), **extra)
    return out


def paper_table(spec: TransformerSpec = MODELS["wan2.1-1.3b"]) -> list[dict]:
    """Our FLOPs for each published (method, tokens) pair, with the relative difference."""
    rows = []
    for (method, s), published in PUBLISHED.items():
        ours = (transformer_flops(spec, s) if method == "full" else vmoba_transformer_flops(spec, s))["total"] / TERA
        rows.append({"method": method, "tokens": s, "tflops": ours, "published_tflops": published,
                     "rel_diff": ours / published - 1.0})
    return rows
