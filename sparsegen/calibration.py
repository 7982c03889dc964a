"""Calibration: run the dense pipeline with a recorder, turn its statistics into a plan.

``sparsegen.calibrate(pipe, "paro", density=0.5, **call_kwargs)`` makes a PARO plan
(:class:`~sparsegen.methods.paro.ParoPlan`) in two runs of the pipeline, both dense
(the recorder returns exact attention, so the run is the dense generation):

1. **Orders.** Per call, for each of the six orders of (F, H, W), a few query blocks of
   the reordered sequence (``sample_query_blocks``, evenly spaced) are attended over
   all keys; their post-softmax rows, cut into ``block_size`` x ``block_size`` blocks
   in that order, give two metrics per (layer, head, order), averaged over calls:

   * ``sparse_share``: share of blocks where at least 90% of the values are below 1e-3;
   * ``uniformity``: mean over blocks of max|p| / mean|p| (1 = flat, quantizes best).

   The order with the lowest cost ``w * (1 - sparse_share) + (1 - w) * uniformity /
   max_orders(uniformity)`` wins (``w = order_weight``). The paper's Eq. 3, as
   printed, takes the argmin of a score that *grows* with the share of sparse blocks,
   which would prefer the least sparse order; we read that as a sign error and reward
   sparsity. Both raw metrics and the cost are stored in the plan for auditing.

2. **Masks.** With each head's order fixed, every query row of every call is attended
   over all keys in streamed chunks (never a full S x S map), and the attention mass of
   every block of the reordered layout is summed per (step bucket, layer, head). Per
   bucket, one global threshold over all its layers and heads keeps the blocks with the
   most mass until ``density`` of them are kept; the diagonal block of every row is
   always kept (so every query block visits at least one block). The calibration run's
   first half of the steps gets one bucket per step (or ``first_half_buckets`` groups),
   the second half shares one bucket, as published.

Statistics stay on the device during the runs. Attention probabilities are those of the
video-video part (the softmax over video keys; text tokens of joint models are always
attended densely and are not part of a plan). Memory: the mask pass holds
``L * H * Qb * Kb`` fp32 values per bucket (CogVideoX-5B, 49 frames: about 0.6 GB per
bucket); group the first half's steps with ``first_half_buckets`` to hold fewer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from .kernels import BlockSparseMask, block_sparse_attention
from .kernels.mask import block_count
from .methods.base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod
from .methods.paro import ParoPlan, refuse_models_a_plan_cannot_serve
from .reorder import ORDERS, order_permutation

__all__ = ["calibrate", "calibrate_paro", "calibrate_agent_layers", "choose_orders", "select_block_masks", "step_buckets",
           "SMALL_VALUE", "SPARSE_BLOCK_SHARE"]

logger = logging.getLogger("sparsegen")

# A block is "sparse" when at least SPARSE_BLOCK_SHARE of its values are below SMALL_VALUE
# (the paper's metric).
SMALL_VALUE = 1e-3
SPARSE_BLOCK_SHARE = 0.9
# Elements of the (batch, heads, rows, keys) score chunk of the mask pass (256 MB in fp32).
_CHUNK_ELEMENTS = 1 << 26


def step_buckets(num_steps: int, first_half_buckets: Optional[int] = None) -> list[tuple[float, float]]:
    """Bucket edges as fractions of a ``num_steps`` schedule: the first ``num_steps // 2``
    steps one bucket each (or ``first_half_buckets`` groups of them), then one bucket for the rest.

    >>> step_buckets(4)
    [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    half = num_steps // 2
    groups = half if first_half_buckets is None else min(int(first_half_buckets), half)
    if first_half_buckets is not None and (isinstance(first_half_buckets, bool) or int(first_half_buckets) < 1):
        raise ValueError(f"first_half_buckets must be an int >= 1, got {first_half_buckets!r}")
    edges = sorted({round(i * half / groups) for i in range(groups + 1)} if groups else {0})
    bounds = [(edges[i] / num_steps, edges[i + 1] / num_steps) for i in range(len(edges) - 1)]
    start = edges[-1] / num_steps
    if start < 1.0:
        bounds.append((start, 1.0))
    return bounds


def choose_orders(sparse_share: torch.Tensor, uniformity: torch.Tensor, order_weight: float):
    """Per (layer, head) the index into ORDERS of the lowest-cost order, and the cost.

    Args:
        sparse_share, uniformity: f32 (L, H, 6), the metrics described in the module docstring.
    Returns:
        (long (L, H), cost f32 (L, H, 6)).
    """
    norm = uniformity / uniformity.amax(-1, keepdim=True).clamp_min(1e-12)
    cost = order_weight * (1.0 - sparse_share) + (1.0 - order_weight) * norm
    return cost.argmin(-1), cost


def select_block_masks(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the blocks with the most attention mass, one global threshold.

    Args:
        mass: f32 (L, H, Qb, Kb) attention mass per block (rows normalised per call).
        density: target share of kept blocks over all of ``mass``; the diagonal is kept
            in addition when it falls below the threshold (so the result may be denser
            when ``density`` is below 1 / Kb).
    Returns:
        bool (L, H, Qb, Kb).
    """
    layers, heads, qb, kb = mass.shape
    forced = torch.zeros(qb, kb, dtype=torch.bool, device=mass.device)
    idx = torch.arange(min(qb, kb), device=mass.device)
    forced[idx, idx] = True
    forced = forced.expand_as(mass)
    total = mass.numel()
    extra = max(0, round(density * total) - int(forced.sum()))
    keep = forced.clone().reshape(-1)
    if extra:
        scores = mass.masked_fill(forced, float("-inf")).reshape(-1)
        keep[torch.topk(scores, min(extra, total), sorted=False).indices] = True
    return keep.view_as(mass)


@dataclass(frozen=True)
class _RecorderConfig(MethodConfig):
    method: ClassVar[str] = "paro-calibration"


class _ParoRecorder(SparseAttentionMethod):
    """Returns exact attention and records PARO's statistics (orders pass or masks pass)."""

    config_cls = _RecorderConfig
    uses_step = True

    def __init__(self, *, block_size: int, sample_query_blocks: int = 16, masses: bool = False, orders=None,
                 first_half_buckets=None):
        super().__init__(_RecorderConfig())
        self.block_size = block_size
        self.sample_query_blocks = sample_query_blocks
        self.masses = masses  # False: the orders pass; True: the masks pass
        self.orders = orders  # masks pass: per layer, per head (None: "FHW" everywhere)
        self.first_half_buckets = first_half_buckets
        self.grid: Optional[tuple[int, int, int]] = None
        self.model_class: Optional[str] = None
        self.num_layers = 0
        self.num_heads: Optional[int] = None
        self.num_steps = 0
        self.metric_sums: dict[int, list] = {}   # layer -> [sparse (H, 6), uniformity (H, 6), samples]
        self.mass: dict[tuple[int, int], list] = {}  # (bucket, layer) -> [mass (H, Qb, Kb), rows per query row]
        self.buckets: Optional[list[tuple[float, float]]] = None

    # ---------------------------------------------------------------- hooks
    def check_model(self, *, model_class: str, num_layers: int, transformer_index: int,
                    multi_resolution: bool = False) -> None:
        refuse_models_a_plan_cannot_serve("PARO calibration", model_class, transformer_index, multi_resolution)
        self.model_class, self.num_layers = model_class, num_layers

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        if self.grid is not None and geometry.grid != self.grid:
            raise ValueError(f"calibration saw two token grids, {self.grid} and {geometry.grid}; a plan serves one: "
                             "calibrate each resolution and frame count separately")
        self.grid = geometry.grid

    def attention(self, q, k, v, call: AttentionCall):
        if self.num_heads is None:
            self.num_heads = q.shape[2]
        if call.num_steps:
            self.num_steps = max(self.num_steps, call.num_steps)
        with torch.no_grad():
            if self.masses:
                self._record_mass(q, k, call)
            else:
                self._record_orders(q, k, call)
        n = q.shape[1]
        full = BlockSparseMask.full(q_len=n, kv_len=n, q_block_size=self.block_size, kv_block_size=self.block_size)
        return block_sparse_attention(q, k, v, full.to(q.device), return_lse=True, backend="torch")

    # --------------------------------------------------------------- orders
    def _record_orders(self, q, k, call: AttentionCall) -> None:
        bs, grid = self.block_size, call.geometry.grid
        b, n, h, d = q.shape
        scale = d ** -0.5
        full_q = n // bs or 1
        count = min(self.sample_query_blocks, full_q)
        picks = sorted({int(i * full_q / count) for i in range(count)})
        kb = block_count(n, bs)
        sparse = torch.zeros(h, len(ORDERS), device=q.device)
        uniform = torch.zeros(h, len(ORDERS), device=q.device)
        for oi, order in enumerate(ORDERS):
            perm = order_permutation(grid, order).to(q.device)
            kr = k.index_select(1, perm).float()
            for i in picks:
                rows = perm[i * bs:min((i + 1) * bs, n)]
                s = torch.einsum("bqhd,bkhd->bhqk", q.index_select(1, rows).float(), kr) * scale
                p = torch.softmax(s, -1)
                p = torch.nn.functional.pad(p, (0, kb * bs - n), value=float("nan")).view(b, h, -1, kb, bs)
                real = ~torch.isnan(p)
                counts = real.sum((2, 4)).clamp_min(1)
                small = ((p < SMALL_VALUE) & real).sum((2, 4)) / counts
                mx = p.nan_to_num(float("-inf")).amax((2, 4))
                mean = p.nan_to_num(0.0).sum((2, 4)) / counts
                sparse[:, oi] += (small >= SPARSE_BLOCK_SHARE).float().mean((0, 2))
                uniform[:, oi] += (mx / mean.clamp_min(1e-30)).mean((0, 2))
        entry = self.metric_sums.setdefault(call.layer, [torch.zeros_like(sparse), torch.zeros_like(uniform), 0])
        entry[0] += sparse / len(picks)
        entry[1] += uniform / len(picks)
        entry[2] += 1

    def order_metrics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse_share, uniformity), f32 (L, H, 6) on the CPU, averaged over calls."""
        missing = [l for l in range(self.num_layers) if l not in self.metric_sums]
        if missing:
            raise RuntimeError(f"calibration saw no attention call of layers {missing}; did the pipeline run?")
        sp = torch.stack([self.metric_sums[l][0].cpu() / self.metric_sums[l][2] for l in range(self.num_layers)])
        un = torch.stack([self.metric_sums[l][1].cpu() / self.metric_sums[l][2] for l in range(self.num_layers)])
        return sp, un

    # ----------------------------------------------------------------- mass
    def _bucket(self, call: AttentionCall) -> int:
        total = call.num_steps or self.num_steps or 1
        if self.buckets is None:
            self.buckets = step_buckets(total, self.first_half_buckets)
        progress = 0.0 if call.step is None else call.step / total
        for i, (_, end) in enumerate(self.buckets):
            if progress < end:
                return i
        return len(self.buckets) - 1

    def _record_mass(self, q, k, call: AttentionCall) -> None:
        bs, grid = self.block_size, call.geometry.grid
        b, n, h, d = q.shape
        scale = d ** -0.5
        nb = block_count(n, bs)
        key = (self._bucket(call), call.layer)
        entry = self.mass.setdefault(key, [torch.zeros(h, nb, nb, device=q.device), 0])
        layer_orders = self.orders[call.layer] if self.orders is not None else ["FHW"] * h
        for order in sorted(set(layer_orders)):
            heads = torch.tensor([i for i, o in enumerate(layer_orders) if o == order], device=q.device)
            perm = order_permutation(grid, order).to(q.device)
            qr = q.index_select(1, perm).index_select(2, heads).float()
            kr = k.index_select(1, perm).index_select(2, heads).float()
            hh = len(heads)
            rows = max(bs, (_CHUNK_ELEMENTS // max(1, b * hh * n)) // bs * bs)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qr[:, r0:r1], kr) * scale, -1)
                p = torch.nn.functional.pad(p, (0, nb * bs - n)).view(b, hh, r1 - r0, nb, bs).sum(-1)
                q_blocks = block_count(r1 - r0, bs)
                p = torch.nn.functional.pad(p, (0, 0, 0, q_blocks * bs - (r1 - r0)))
                p = p.view(b, hh, q_blocks, bs, nb).sum((0, 3))
                entry[0].index_add_(0, heads, torch.nn.functional.pad(
                    p, (0, 0, r0 // bs, nb - r0 // bs - q_blocks)))
        entry[1] += b

    def block_masks(self, density: float) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        """bool (NB, L, H, Qb, Kb) on the CPU and the bucket bounds."""
        if self.buckets is None:
            raise RuntimeError("calibration saw no attention call; did the pipeline run?")
        masks = []
        for bi in range(len(self.buckets)):
            layers = []
            for l in range(self.num_layers):
                if (bi, l) not in self.mass:
                    raise RuntimeError(f"calibration saw no call of layer {l} in step bucket {self.buckets[bi]}")
                m, rows = self.mass[(bi, l)]
                layers.append(m / rows)
            masks.append(select_block_masks(torch.stack(layers), density).cpu())
        return torch.stack(masks), list(self.buckets)


def _prompts_of(call_kwargs: dict) -> tuple[str, ...]:
    p = call_kwargs.get("prompt")
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(str(x) for x in p)


def calibrate_paro(pipe, run: Callable[[], Any], *, density: float = 0.5, block_size: int = 64,
                   order_weight: float = 0.5, reorder: bool = True, first_half_buckets: Optional[int] = None,
                   sample_query_blocks: int = 16, prompts: Sequence[str] = ()) -> ParoPlan:
    """:func:`calibrate` with the pipeline's run given as a function (``run()`` generates).

    Useful when a pipeline is driven by a helper rather than called once (the built-in
    model's two-stage sampler). Arguments as :func:`calibrate`.
    """
    from .patching import apply

    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density=!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16 (64 is the published), got {block_size=!r}")
    if not 0 <= order_weight <= 1:
        raise ValueError(f"order_weight must be in [0, 1], got {order_weight=!r}")
    if isinstance(sample_query_blocks, bool) or not isinstance(sample_query_blocks, int) or sample_query_blocks < 1:
        raise ValueError(f"sample_query_blocks must be an int >= 1, got {sample_query_blocks=!r}")
    metrics = {}
    orders = None
    if reorder:
        rec = _ParoRecorder(block_size=block_size, sample_query_blocks=sample_query_blocks)
        with apply(pipe, rec):
            run()
        sparse_share, uniformity = rec.order_metrics()
        best, cost = choose_orders(sparse_share, uniformity, order_weight)
        orders = [[ORDERS[i] for i in row] for row in best.tolist()]
        metrics = {"sparse_share": sparse_share, "uniformity": uniformity, "cost": cost}
        for layer, row in enumerate(orders):
            for head, order in enumerate(row):
                logger.info("PARO layer %d head %d: order %s (sparse share %s, uniformity %s)", layer, head, order,
                            [round(x, 3) for x in sparse_share[layer, head].tolist()],
                            [round(x, 2) for x in uniformity[layer, head].tolist()])
    rec2 = _ParoRecorder(block_size=block_size, masses=True, orders=orders, first_half_buckets=first_half_buckets)
    with apply(pipe, rec2):
        run()
    masks, buckets = rec2.block_masks(float(density))
    if orders is None:
        orders = [["FHW"] * rec2.num_heads for _ in range(rec2.num_layers)]
    return ParoPlan(model_class=rec2.model_class, grid=rec2.grid, num_layers=rec2.num_layers, num_heads=rec2.num_heads,
                    block_size=block_size, orders=orders, masks=masks, buckets=buckets,
                    calibration_steps=rec2.num_steps or 1, density=float(density), prompts=tuple(prompts),
                    order_weight=float(order_weight), metrics=metrics)


_PARO_OPTIONS = ("density", "block_size", "order_weight", "reorder", "first_half_buckets", "sample_query_blocks")


def calibrate(pipe, method: str = "paro", **kwargs):
    """Calibrate a method on a pipeline: a PARO plan, or the layers for agent attention.

    Keyword arguments that are the calibration's own options (below) are taken out; every
    other one goes to ``pipe(...)`` as it is (``prompt=`` or ``prompt_embeds=``,
    ``height=``, ``width=``, ``num_frames=``, ``num_inference_steps=``, ``generator=``
    ...; a list of prompts runs as one batch).

    ``"paro"`` runs the dense pipeline twice (orders, then masks; see the module
    docstring) and returns a :class:`~sparsegen.methods.paro.ParoPlan`
    (``plan.save(dir)``, ``sparsegen.load_plan(dir)``, ``sparsegen.apply(pipe, "paro",
    plan=plan)``). Options:

    * ``density``: target share of visited blocks of every step bucket (0 < density <= 1; 0.5);
    * ``block_size``: query and key block size of the masks (64, as published);
    * ``order_weight``: weight of sparsity against uniformity when choosing orders (0.5);
    * ``reorder``: choose per-head orders (False: every head keeps "FHW", the ablation);
    * ``first_half_buckets``: group the first half's steps into this many buckets
      (default: one per step);
    * ``sample_query_blocks``: query blocks per call and order scored in the orders pass (16).

    ``"agent"`` runs the dense pipeline once and returns an
    :class:`~sparsegen.methods.agent.AgentConfig` whose ``layers`` are those whose agent
    output stays within ``max_rel_error`` (0.1) of exact attention; the other
    AgentConfig fields (``agent_cell``, ``agent_steps``, ...) are options too
    (:func:`calibrate_agent_layers`).

    Raises:
        ValueError: an unknown method, bad options, a pipeline sparsegen does not serve,
            or (PARO) calls at two token grids.

    Example::

        plan = sparsegen.calibrate(pipe, "paro", density=0.5, prompt="a cat", num_frames=49,
                                   num_inference_steps=50)
        plan.save("plans/cogvideox-49f")
        sparsegen.apply(pipe, "paro", plan="plans/cogvideox-49f", quant="int8")

        config = sparsegen.calibrate(pipe, "agent", max_rel_error=0.1, prompt="a cat", num_frames=49)
        sparsegen.apply(pipe, config)
    """
    if method not in ("paro", "agent"):
        raise ValueError(f"calibrate knows the methods 'paro' and 'agent' (got {method!r}); the other methods need "
                         "no calibration")
    if not callable(pipe) or isinstance(pipe, torch.nn.Module):
        raise TypeError("calibrate(pipe, ...) calls the pipeline; for a bare transformer use "
                        "sparsegen.calibration.calibrate_paro / calibrate_agent_layers with your own run function")
    if method == "paro":
        own = {k: kwargs.pop(k) for k in _PARO_OPTIONS if k in kwargs}
        return calibrate_paro(pipe, lambda: pipe(**kwargs), prompts=_prompts_of(kwargs), **own)
    from .methods.agent import AgentConfig

    names = {f.name for f in dataclasses.fields(AgentConfig)} - {"layers", "layer_errors", "version"}
    own = {k: kwargs.pop(k) for k in [*names, "max_rel_error"] if k in kwargs}
    return calibrate_agent_layers(pipe, lambda: pipe(**kwargs), **own)


class _AgentErrorRecorder(SparseAttentionMethod):
    """Returns exact attention and records, per layer, the relative L1 error of agent
    attention on the same q, k, v (video queries; text keys included)."""

    config_cls = _RecorderConfig
    attends_text = True

    def __init__(self, agent_config):
        super().__init__(_RecorderConfig())
        self.agent = agent_config.make_method()
        self.sums: dict[int, list] = {}  # layer -> [sum |agent - exact|, sum |exact|] (device)
        self.num_layers = 0

    def check_model(self, *, model_class: str, num_layers: int, transformer_index: int,
                    multi_resolution: bool = False) -> None:
        self.num_layers = max(self.num_layers, num_layers)

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        self.agent.check_geometry(geometry)

    def attention(self, q, k, v, call: AttentionCall, *, text=None):
        from .joint import _attend_text_keys, merge_partial_attention

        n = q.shape[1]
        full = BlockSparseMask.full(q_len=n, kv_len=n, q_block_size=64, kv_block_size=64).to(q.device)
        exact, lse = block_sparse_attention(q, k, v, full, return_lse=True, backend="torch")
        if text is not None:
            out_t, lse_t = _attend_text_keys(q, *text)
            exact, _ = merge_partial_attention(exact, lse, out_t, lse_t)
        with torch.no_grad():
            approx, _ = self.agent.attention(q, k, v, AttentionCall(geometry=call.geometry, backend="torch"), text=text)
            entry = self.sums.setdefault(call.layer, [torch.zeros((), device=q.device),
                                                      torch.zeros((), device=q.device)])
            entry[0] += (approx.float() - exact.float()).abs().sum()
            entry[1] += exact.float().abs().sum()
        return exact, None


def calibrate_agent_layers(pipe, run: Callable[[], Any], *, max_rel_error: float = 0.1, **agent_options):
    """An :class:`~sparsegen.methods.agent.AgentConfig` whose ``layers`` are those where agent
    attention stays within ``max_rel_error`` of exact attention.

    Runs the dense pipeline once (``run()``); in the steps where agents would run (the
    config's ``agent_steps`` and schedule), every patched layer's agent output is compared
    with exact attention on the same q, k, v: relative L1 error ``sum|agent - exact| /
    sum|exact|`` over that layer's calls.

    Args:
        max_rel_error: a layer uses agents only if its error is at most this.
        **agent_options: the other fields of the returned AgentConfig.
    """
    from .methods.agent import AgentConfig
    from .patching import apply

    if isinstance(max_rel_error, bool) or not isinstance(max_rel_error, (int, float)) or max_rel_error <= 0:
        raise ValueError(f"max_rel_error must be a number > 0, got {max_rel_error=!r}")
    probe = AgentConfig(**agent_options)
    rec = _AgentErrorRecorder(probe)
    schedule = {f: getattr(probe, f) for f in ("dense_steps", "dense_last_steps", "dense_layers")}
    rec.config = _ScheduledRecorderConfig(agent=probe, **schedule)
    with apply(pipe, rec):
        run()
    if not rec.sums:
        raise RuntimeError("calibration saw no attention call in the steps that would use agents; did the pipeline "
                           "run (with enough steps for agent_steps)?")
    errors = []
    for layer in range(rec.num_layers):
        e = rec.sums.get(layer)
        errors.append(float(e[0] / e[1].clamp_min(1e-30)) if e is not None else float("inf"))
    layers = tuple(i for i, e in enumerate(errors) if e <= max_rel_error)
    for i, e in enumerate(errors):
        logger.info("agent layer %d: relative error %.4f (%s)", i, e, "agents" if i in layers else "exact")
    return AgentConfig(**{**agent_options, "layers": layers, "layer_errors": tuple(errors)})


@dataclass(frozen=True)
class _ScheduledRecorderConfig(_RecorderConfig):
    """The recorder follows the agent config's schedule (steps and layers that would use agents)."""

    agent: Any = None

    def layer_is_dense(self, layer: int) -> bool:
        return self.agent.layer_is_dense(layer)

    def step_is_dense(self, step, num_steps) -> bool:
        return self.agent.step_is_dense(step, num_steps)
