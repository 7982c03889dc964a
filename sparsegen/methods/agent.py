"""Agent attention as a method, training-free, for video DiTs, FLUX and Stable Diffusion.

``agents="pool"`` (DiTs): the agents of each call are the video queries pooled over
``agent_cell`` cells of the (t, h, w) token grid (:func:`sparsegen.agent.pool_agents`);
every video query then reads them (:func:`sparsegen.agent.agent_attention`). In joint
models the agents gather from the text keys too (merged exactly by log-sum-exp), and
text queries stay dense.

``agents="tome"`` (AgentSD, images without text in their self-attention: Stable
Diffusion / SDXL): ToMe's bipartite matching (:func:`sparsegen.agent.bipartite_merge`,
keys as the similarity metric) merges ``ratio`` of the tokens for attention and
``agent_ratio`` of them into the agents; agent attention runs over the merged tokens and
its output is unmerged. Merging q, k, v by averaging equals AgentSD's merging of the
block input before the (affine) projections, and unmerging after the output
projection equals unmerging before it; the one difference is the similarity metric
(AgentSD compares the block's input, here the keys, as ToMe does for ViTs). After the
``agent_steps`` share of the steps, attention runs over the merged tokens without agents
(AgentSD's "ToMe only"), and when the agents would not be fewer than half the merged
tokens the agent path switches itself off the same way. ``AgentConfig.preset("agentsd")``
holds the published settings.

Only the highest-resolution attention level of a UNet uses agents by default
(``max_downsample``: SD 1.5's level 1 (4,096 tokens at 512²), SDXL's level 2, since its
first level holds no attention); DiTs have one level.

Schedule (AgentSD's rule, on top of the shared ``dense_steps`` / ``dense_layers``): only
the first ``agent_steps`` share of the denoising steps uses agents, later steps run the
model's own attention; ``layers`` restricts agents to chosen layers. No training-free DiT
result is published, so ``sparsegen.calibrate(pipe, "agent", max_rel_error=...)`` picks
the layers whose agent output stays within a relative error of exact attention on one
prompt (:func:`sparsegen.calibration.calibrate_agent_layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..agent import DEFAULT_K_SCALE2, DEFAULT_K_SHORTCUT, agent_attention, pool_agents, pooled_agent_count
from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod, check_int, config_error

__all__ = ["AgentConfig", "AgentMethod"]


@dataclass(frozen=True)
class AgentConfig(MethodConfig):
    """Agent attention with pooled-query agents.

    Args:
        agents: ``"pool"`` (pooled queries, any grid, text allowed) or ``"tome"``
            (AgentSD's token merging; one-frame grids without text tokens).
        agent_cell: ("pool") (t, h, w) cell of the token grid pooled into one agent; a grid of
            (F, H, W) tokens gets ``ceil(F/t) * ceil(H/h) * ceil(W/w)`` agents.
        k_scale2: the broadcast attention's scale is ``(head_dim ** -0.5) ** k_scale2``.
        k_shortcut: weight of the value shortcut.
        agent_steps: share of the denoising steps, from the first, that use agents
            (AgentSD: 20 of 50 = 0.4); the rest run the model's own attention. When the
            number of steps is unknown (a bare transformer without ``set_step(i, n)``),
            every step uses agents.
        layers: indices of the layers that use agents (None: every layer not in
            ``dense_layers``); ``sparsegen.calibrate(pipe, "agent", ...)`` chooses them.
        max_downsample: UNets: levels with at most this downsampling use agents (None:
            only the highest-resolution level with attention). DiTs have one level.
        ratio, agent_ratio, sx, sy: ("tome") share of tokens merged away for attention
            and for the agents, and the destination windows (AgentSD: 0.4, 0.95, 4, 4).
        tome_seed: ("tome") None for the top-left destination of each window, or a seed
            for a random one.
        quant: None or ``"int8"`` for both attentions.
        layer_errors: per-layer relative error measured by the calibration that chose
            ``layers`` (for the record; not used).
        (and the shared schedule options of :class:`MethodConfig`)
    """

    method: ClassVar[str] = "agent"
    presets: ClassVar = {
        # AgentSD on SD 1.5 (512², 50 PLMS steps): steps 0-19 ToMe + agents, later ToMe only.
        "agentsd": dict(agents="tome", ratio=0.4, agent_ratio=0.95, sx=4, sy=4, agent_steps=0.4),
    }
    agents: str = "pool"
    agent_cell: tuple[int, int, int] = (1, 4, 4)
    k_scale2: float = DEFAULT_K_SCALE2
    k_shortcut: float = DEFAULT_K_SHORTCUT
    agent_steps: float = 0.4
    layers: Optional[tuple[int, ...]] = None
    max_downsample: Optional[int] = None
    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    tome_seed: Optional[int] = None
    quant: Optional[str] = None
    layer_errors: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        cell = self.agent_cell
        if isinstance(cell, list):
            cell = tuple(cell)
        if not (isinstance(cell, tuple) and len(cell) == 3):
            raise config_error(name, "agent_cell", self.agent_cell, "must be three ints >= 1 (frames, height, width)")
        for c in cell:
            check_int(name, "agent_cell", c, low=1, what="each of (frames, height, width)")
        object.__setattr__(self, "agent_cell", cell)
        for f in ("k_scale2", "k_shortcut", "agent_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise config_error(name, f, v, "must be a finite number >= 0")
        if self.agent_steps > 1:
            raise config_error(name, "agent_steps", self.agent_steps, "is a share of the steps, in [0, 1]")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise config_error(name, "layers", self.layers, "must be None or a list of layer indices >= 0")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if self.agents not in ("pool", "tome"):
            raise config_error(name, "agents", self.agents, "must be 'pool' (pooled queries) or 'tome' (AgentSD)")
        for f in ("ratio", "agent_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise config_error(name, f, v, "must be a share of the tokens in [0, 1)")
        for f in ("sx", "sy"):
            check_int(name, f, getattr(self, f), low=1)
        if self.max_downsample is not None:
            check_int(name, "max_downsample", self.max_downsample, low=1)
        if self.tome_seed is not None:
            check_int(name, "tome_seed", self.tome_seed)
        if self.quant not in (None, "int8"):
            raise config_error(name, "quant", self.quant, "must be None or 'int8'")
        if self.layer_errors is not None:
            object.__setattr__(self, "layer_errors", tuple(float(e) for e in self.layer_errors))

    def layer_is_dense(self, layer: int) -> bool:
        return super().layer_is_dense(layer) or (self.layers is not None and layer not in self.layers)

    def step_is_dense(self, step: Optional[int], num_steps: Optional[int]) -> bool:
        if super().step_is_dense(step, num_steps):
            return True
        if self.agents == "tome":  # later steps merge tokens without agents (the method reads the step)
            return False
        return self.step_uses_agents(step, num_steps) is False

    def step_uses_agents(self, step: Optional[int], num_steps: Optional[int]) -> bool:
        return step is None or num_steps is None or step < math.ceil(self.agent_steps * num_steps)

    def num_agents(self, grid) -> int:
        return pooled_agent_count(grid, self.agent_cell)


class AgentMethod(SparseAttentionMethod):
    config_cls = AgentConfig
    # Agents attend the text keys of joint attention themselves (sparsegen.joint).
    attends_text = True

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        # Only AgentSD's mode reads the step (its later steps merge tokens without agents).
        self.uses_step = config.agents == "tome"

    def runs_dense(self, call: AttentionCall) -> bool:
        limit = self.config.max_downsample
        return call.level > 0 if limit is None else call.downsample > limit

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        if self.config.agents == "tome":
            if geometry.frames != 1:
                raise ValueError(f"agents='tome' (AgentSD) merges tokens of one image; the token grid {geometry.grid} "
                                 "has several frames: use agents='pool'")
            return
        m = self.config.num_agents(geometry.grid)
        if m * 2 > geometry.num_tokens:
            raise ValueError(
                f"agent attention with agent_cell={self.config.agent_cell} makes {m} agents for the token grid "
                f"{geometry.grid} ({geometry.num_tokens} tokens); agents must be at most half the tokens to save "
                "work: use a larger agent_cell"
            )

    def attention(self, q, k, v, call: AttentionCall, *, text: Optional[tuple] = None):
        """Agent attention of the video queries; returns (out (B, N, H, D), None): the
        output is not a softmax over keys, so it has no LSE to merge."""
        cfg = self.config
        if cfg.agents == "tome":
            if text is not None:
                raise ValueError("agents='tome' (AgentSD) serves self-attention over image tokens only; this model "
                                 "attends text tokens jointly: use agents='pool'")
            return self._tome_attention(q, k, v, call), None
        agents = pool_agents(q, grid=call.geometry.grid, cell=cfg.agent_cell)
        m = agents.shape[1]
        call.stats["density"] = m / call.geometry.num_tokens * 2  # two (N x M) attentions against one N x N
        out = agent_attention(q, k, v, agents, k_scale2=cfg.k_scale2, k_shortcut=cfg.k_shortcut,
                              backend=call.backend, quant=cfg.quant, extra_keys=text)
        return out, None

    def _tome_attention(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        """AgentSD: merge tokens, agent attention (or plain attention) over them, unmerge."""
        from ..agent import bipartite_merge, destination_partition
        from ..kernels import BlockSparseMask, block_sparse_attention

        cfg = self.config
        b, n, h, d = q.shape
        _, height, width = call.geometry.grid
        gen = None if cfg.tome_seed is None else torch.Generator().manual_seed(cfg.tome_seed)
        partition = self.cached(("tome-partition", height, width, str(q.device)),
                                lambda: destination_partition(height, width, cfg.sx, cfg.sy, gen, q.device))
        merge = bipartite_merge(k.reshape(b, n, h * d), height=height, width=width, sx=cfg.sx, sy=cfg.sy,
                                ratio=cfg.ratio, agent_ratio=cfg.agent_ratio, partition=partition)
        qm, km, vm = (merge.merge(t.reshape(b, n, h * d)).view(b, -1, h, d) for t in (q, k, v))
        nm = qm.shape[1]
        if merge.agents_active and cfg.step_uses_agents(call.step, call.num_steps):
            agents = merge.agents(q.reshape(b, n, h * d)).view(b, -1, h, d)
            out = agent_attention(qm, km, vm, agents, k_scale2=cfg.k_scale2, k_shortcut=cfg.k_shortcut,
                                  backend=call.backend, quant=cfg.quant)
            call.stats["density"] = 2 * agents.shape[1] * nm / (n * n)
        else:
            full = BlockSparseMask.full(q_len=nm, kv_len=nm, q_block_size=64, kv_block_size=64).to(q.device)
            out = block_sparse_attention(qm, km, vm, full, backend=call.backend, quant=cfg.quant)
            call.stats["density"] = (nm / n) ** 2
        return merge.unmerge(out.reshape(b, nm, h * d)).view(b, n, h, d)
