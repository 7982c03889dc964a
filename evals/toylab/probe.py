"""Record the inputs of a pipeline's self-attention layers, and measure attention locality.

:func:`record_attention_inputs` patches a pipeline with a *recording* method through
``sparsegen.apply``: every self-attention call computes exact dense attention (so the
generation is the dense one) and keeps a copy of its q, k, v for the chosen denoising
steps. Those tensors are the "same inputs" on which sparse methods are compared with
dense attention layer by layer (``evals/quality.py``), and from which attention maps are
formed for the locality plot (``evals/toy_checks.py``). :func:`densities` reads back how
much attention a patched pipeline computed.

Example::

    >>> with record_attention_inputs(pipe, steps=[0, 10]) as records:
    ...     toy.generate(pipe, ["a red circle moving right over a plain background"])
    >>> rec = records[0]; rec.q.shape        # (B, N, H, D)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from sparsegen import apply
from sparsegen.methods.base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod

__all__ = ["AttentionRecord", "record_attention_inputs", "dense_attention", "attention_probabilities",
           "locality_profile", "LocalityProfile", "densities"]



@dataclass
class AttentionRecord:
    """q, k, v of one self-attention call (video tokens only), on CPU, float32.

    Attributes:
        q, k, v: (B, N, H, D), N = geometry.num_tokens, row-major (frame, row, column).
        layer: index of the layer among the self-attention layers.
        step: denoising step (0-based).
        call_index: 0 for the first call of this layer in this step (the conditional pass
            of classifier-free guidance), 1 for the second (unconditional), ...
        geometry: the token grid.
        num_layers: number of self-attention layers of the model.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layer: int
    step: int
    call_index: int
    geometry: AttentionGeometry
    num_layers: int = 1

    def call(self, backend: str = "torch") -> AttentionCall:
        """An AttentionCall that places a method's computation at this layer and step."""
        return AttentionCall(geometry=self.geometry, layer=self.layer, num_layers=self.num_layers, step=self.step,
                             total_heads=self.q.shape[2], backend=backend)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention.

    Args:
        q, k, v: (B, N, H, D).
    Returns:
        out (B, N, H, D) in q's dtype, lse fp32 (B, H, N) (natural log).
    """
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out.transpose(1, 2).to(q.dtype), lse


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)): (B, N, H, D) twice -> (B, H, N, N) float32."""
    qh, kh = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    return torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


@contextlib.contextmanager
def record_attention_inputs(pipe, *, steps=None, layers=None, max_calls_per_step: int = 2) -> Iterator[list]:
    """Patch ``pipe`` so every self-attention call is dense and its q, k, v are kept.

    Args:
        pipe: a diffusers pipeline (or transformer) sparsegen supports.
        steps: denoising steps to record (None: all).
        layers: self-attention layer indices to record (None: all).
        max_calls_per_step: per layer and step, how many calls to keep (2 keeps both
            halves of classifier-free guidance).

    Yields:
        the list that receives :class:`AttentionRecord` objects as the pipeline runs.
    """
    records: list[AttentionRecord] = []
    wanted_steps = None if steps is None else set(int(s) for s in steps)
    wanted_layers = None if layers is None else set(int(l) for l in layers)
    seen: dict = {}

    class _Recorder(SparseAttentionMethod):
        """Dense attention that keeps its inputs (a method object handed to apply; no name registered)."""

        uses_step = True  # records are kept per step

        def attention(self, q, k, v, call):
            step = -1 if call.step is None else call.step
            key = (call.layer, step)
            index = seen.get(key, 0)
            seen[key] = index + 1
            if ((wanted_steps is None or step in wanted_steps) and (wanted_layers is None or call.layer in wanted_layers)
                    and index < max_calls_per_step):
                records.append(AttentionRecord(
                    q.detach().float().cpu().clone(), k.detach().float().cpu().clone(), v.detach().float().cpu().clone(),
                    layer=call.layer, step=step, call_index=index, geometry=call.geometry,
                    num_layers=call.num_layers))
            call.stats["density"] = 1.0
            return dense_attention(q, k, v)

    handle = apply(pipe, _Recorder(MethodConfig()))
    try:
        yield records
    finally:
        handle.remove()


@dataclass
class LocalityProfile:
    """Attention mass against token distance, averaged over queries, heads and calls.

    Attributes:
        temporal_mass: (F,) share of attention mass on keys ``dt`` latent frames away.
        temporal_uniform: (F,) the same for uniform attention (share of keys at ``dt``).
        spatial_mass: (S,) share of mass on keys at Chebyshev distance ``ds`` tokens in
            the (row, column) plane (any frame).
        spatial_uniform: (S,) uniform baseline.
        local_mass: mass on the 3 x 3 x 3 neighbourhood (|dt| <= 1, |drow| <= 1, |dcol| <= 1).
        local_uniform: share of keys in that neighbourhood.
    """

    temporal_mass: np.ndarray
    temporal_uniform: np.ndarray
    spatial_mass: np.ndarray
    spatial_uniform: np.ndarray
    local_mass: float
    local_uniform: float

    @property
    def local_ratio(self) -> float:
        """local_mass / local_uniform: 1 for uniform attention, larger when attention is local."""
        return self.local_mass / self.local_uniform

    def mean_temporal_distance(self) -> tuple[float, float]:
        """(attention-weighted mean |dt|, the uniform baseline's)."""
        d = np.arange(len(self.temporal_mass))
        return float((d * self.temporal_mass).sum()), float((d * self.temporal_uniform).sum())

    def mean_spatial_distance(self) -> tuple[float, float]:
        d = np.arange(len(self.spatial_mass))
        return float((d * self.spatial_mass).sum()), float((d * self.spatial_uniform).sum())

    def to_dict(self) -> dict:
        mt, ut = self.mean_temporal_distance()
        ms, us = self.mean_spatial_distance()
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()} | {
            "local_ratio": self.local_ratio, "mean_temporal_distance": mt, "mean_temporal_distance_uniform": ut,
            "mean_spatial_distance": ms, "mean_spatial_distance_uniform": us}


def _distance_indices(geometry: AttentionGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    f, h, w = geometry.grid
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    diff = (grid[:, None, :] - grid[None, :, :]).abs()  # (N, N, 3)
    return diff[..., 0], torch.maximum(diff[..., 1], diff[..., 2])


def locality_profile(records: list[AttentionRecord]) -> LocalityProfile:
    """Average the attention maps of ``records`` (one geometry) by token distance.

    Raises:
        ValueError: if ``records`` is empty or mixes token grids.
    """
    if not records:
        raise ValueError("records is empty: record at least one attention call (check steps= and layers=)")
    geometry = records[0].geometry
    if any(r.geometry != geometry for r in records):
        raise ValueError(f"records mix token grids {sorted({r.geometry.grid for r in records})}; profile one at a time")
    dt, ds = _distance_indices(geometry)
    n = geometry.num_tokens
    local = ((dt <= 1) & (ds <= 1)).float()
    mass = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    for r in records:
        p = attention_probabilities(r.q, r.k).double()  # (B, H, N, N)
        mass += p.sum(dim=(0, 1))
        count += p.shape[0] * p.shape[1]
    mass /= count * n  # mean over calls, heads and queries of each key's mass; total 1
    uniform = torch.full((n, n), 1.0 / (n * n), dtype=torch.float64)
    t_bins, s_bins = geometry.frames, max(geometry.height, geometry.width)

    def by(dist, m, bins):
        return torch.zeros(bins, dtype=torch.float64).index_add_(0, dist.reshape(-1), m.reshape(-1)).numpy()

    return LocalityProfile(
        temporal_mass=by(dt, mass, t_bins), temporal_uniform=by(dt, uniform, t_bins),
        spatial_mass=by(ds, mass, s_bins), spatial_uniform=by(ds, uniform, s_bins),
        local_mass=float((mass * local).sum()), local_uniform=float((uniform * local).sum()),
    )


def densities(handle) -> dict:
    """Mean over steps of the per-step density (dense calls count 1), and over sparse calls only.

    Args:
        handle: a ``sparsegen.apply`` handle after a generation (its statistics are read
            back to the host here).
    Returns:
        {"effective_density": mean of ``handle.step_densities()`` (1.0 without steps),
        "sparse_call_density": mean density of the sparse calls, None if there were none}.
    """
    per_step = [d for _, d in handle.step_densities()]
    sparse_sum = float(sum(s["density_sum"] - s["dense_calls"] for s in handle.step_stats))
    sparse_calls = int(sum(s["sparse_calls"] for s in handle.step_stats))
    return {"effective_density": float(np.mean(per_step)) if per_step else 1.0,
            "sparse_call_density": sparse_sum / sparse_calls if sparse_calls else None}
