"""Agent attention as a method, training-free, for video DiTs.

The agents of each call are the video queries pooled over ``agent_cell`` cells of the
(t, h, w) token grid (:func:`sparsegen.agent.pool_agents`); every video query then reads
them (:func:`sparsegen.agent.agent_attention`). In joint models the agents gather from
the text keys too (merged exactly by log-sum-exp), and text queries stay dense.

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
        agent_cell: (t, h, w) cell of the token grid pooled into one agent; a grid of
            (F, H, W) tokens gets ``ceil(F/t) * ceil(H/h) * ceil(W/w)`` agents.
        k_scale2: the broadcast attention's scale is ``(head_dim ** -0.5) ** k_scale2``.
        k_shortcut: weight of the value shortcut.
        agent_steps: share of the denoising steps, from the first, that use agents
            (AgentSD: 20 of 50 = 0.4); the rest run the model's own attention. When the
            number of steps is unknown (a bare transformer without ``set_step(i, n)``),
            every step uses agents.
        layers: indices of the layers that use agents (None: every layer not in
            ``dense_layers``); ``sparsegen.calibrate(pipe, "agent", ...)`` chooses them.
        quant: None or ``"int8"`` for both attentions.
        layer_errors: per-layer relative error measured by the calibration that chose
            ``layers`` (for the record; not used).
        (and the shared schedule options of :class:`MethodConfig`)
    """

    method: ClassVar[str] = "agent"
    agent_cell: tuple[int, int, int] = (1, 4, 4)
    k_scale2: float = DEFAULT_K_SCALE2
    k_shortcut: float = DEFAULT_K_SHORTCUT
    agent_steps: float = 0.4
    layers: Optional[tuple[int, ...]] = None
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
        if self.quant not in (None, "int8"):
            raise config_error(name, "quant", self.quant, "must be None or 'int8'")
        if self.layer_errors is not None:
            object.__setattr__(self, "layer_errors", tuple(float(e) for e in self.layer_errors))

    def layer_is_dense(self, layer: int) -> bool:
        return super().layer_is_dense(layer) or (self.layers is not None and layer not in self.layers)

    def step_is_dense(self, step: Optional[int], num_steps: Optional[int]) -> bool:
        if super().step_is_dense(step, num_steps):
            return True
        return step is not None and num_steps is not None and step >= math.ceil(self.agent_steps * num_steps)

    def num_agents(self, grid) -> int:
        return pooled_agent_count(grid, self.agent_cell)


class AgentMethod(SparseAttentionMethod):
    config_cls = AgentConfig
    # Agents attend the text keys of joint attention themselves (sparsegen.joint).
    attends_text = True

    def check_geometry(self, geometry: AttentionGeometry) -> None:
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
        agents = pool_agents(q, grid=call.geometry.grid, cell=cfg.agent_cell)
        m = agents.shape[1]
        call.stats["density"] = m / call.geometry.num_tokens * 2  # two (N x M) attentions against one N x N
        out = agent_attention(q, k, v, agents, k_scale2=cfg.k_scale2, k_shortcut=cfg.k_shortcut,
                              backend=call.backend, quant=cfg.quant, extra_keys=text)
        return out, None
