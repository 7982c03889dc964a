"""Test helpers: derived tolerances, quantization quality metrics, poisoned outputs.

Tolerances are derived, never guessed: a fast result is compared against a
high-precision golden and must be at most ``factor`` times as far from it as a plain
same-dtype eager computation is (plus a small absolute floor for fp32, whose eager
error can be ~0).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

__all__ = ["assert_close_to_golden", "sqnr_db", "cosine", "relative_l1", "random_sweep_size", "poison_"]

# Absolute floor per dtype: the fast path may differ from eager by accumulation order.
_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def assert_close_to_golden(
    actual: torch.Tensor,
    eager: torch.Tensor,
    golden: torch.Tensor,
    *,
    factor: float = 4.0,
    what: str = "",
) -> None:
    """Assert ``max|actual - golden| <= factor * max|eager - golden| + floor(dtype)``.

    Args:
        actual: result of the code under test.
        eager: the same computation done plainly in the same dtype (the error budget).
        golden: fp64 (or fp32) reference.
        what: description of shape/dtype for the failure message.
    """
    if actual.shape != golden.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}")
    a, e, g = actual.double(), eager.double(), golden.double()
    finite = torch.isfinite(g)
    if not torch.equal(torch.isfinite(a), finite):
        bad = (torch.isfinite(a) != finite).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite pattern differs from golden at {bad}")
    err = (a - g)[finite].abs().max().item() if finite.any() else 0.0
    budget = (e - g)[finite].abs().max().item() if finite.any() else 0.0
    tol = factor * budget + _FLOOR.get(actual.dtype, 1e-5)
    if not (err <= tol):
        raise AssertionError(
            f"{what}: max error {err:.3e} exceeds {factor} x eager error {budget:.3e} + floor "
            f"{_FLOOR.get(actual.dtype, 1e-5):.1e} (= {tol:.3e}); dtype={actual.dtype}, shape={tuple(actual.shape)}"
        )


def quant_accuracy_inputs(n: int = 2048, d: int = 64, heads: int = 2, seed: int = 0):
    """q, k, v (1, n, heads, d) fp32 Gaussians, k with a per-channel bias (4 x a Gaussian per
    channel): the inputs of the SageAttention-style INT8 accuracy check."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, d, generator=g)
    k = torch.randn(1, n, heads, d, generator=g) + 4.0 * torch.randn(1, 1, heads, d, generator=g)
    v = torch.randn(1, n, heads, d, generator=g)
    return q, k, v


def sqnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - actual|^2)."""
    r = reference.double()
    noise = (actual.double() - r).pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(r.pow(2).sum().item() / noise)


def cosine(actual: torch.Tensor, reference: torch.Tensor) -> float:
    a, r = actual.double().flatten(), reference.double().flatten()
    return float(torch.dot(a, r) / (a.norm() * r.norm()).clamp_min(1e-300))


def relative_l1(actual: torch.Tensor, reference: torch.Tensor) -> float:
    r = reference.double()
    return float((actual.double() - r).abs().sum() / r.abs().sum().clamp_min(1e-300))


def random_sweep_size(default: int = 4) -> int:
    """Number of cases of seeded random sweeps (``SPARSEGEN_SWEEP`` overrides)."""
    return int(os.environ.get("SPARSEGEN_SWEEP", default))


def poison_(t: torch.Tensor, value: Optional[float] = None) -> torch.Tensor:
    """Fill a tensor with NaN (or ``value``) so unwritten elements fail comparisons."""
    return t.fill_(float("nan") if value is None else value)
