"""Test helpers: derived tolerances, quantization quality metrics.

Tolerances are derived, never guessed: a fast result is compared against a
high-precision golden and must be at most twice as far from it as a plain same-dtype
eager computation is, plus a floor derived from rounding the golden to the output dtype
(for fp32, whose eager error can be ~0).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from .methods import MethodConfig, SparseAttentionMethod
from .methods.base import AttentionCall, AttentionGeometry

__all__ = ["assert_close_to_golden", "sqnr_db", "cosine", "relative_l1", "random_sweep_size", "rounding_floor",
           "FP32_GRADIENT_FACTOR", "CallRecorder", "RecordedCall", "QUANT_SQNR_FLOOR_DB"]

# The floor is measured at this magnitude: attention outputs are averages of values of
# order one, so rounding an output of size ~0.3 or more to the output dtype is the least
# disagreement two correct implementations can show (FlashAttention's tests use the
# same construction).
_FLOOR_MAGNITUDE = 0.3

# fp32 gradients: the eager error is itself a few units in the last place, and two
# correct fp32 backward passes that differ only in summation order and in recomputing
# P from the saved log-sum-exp land 0.5x-2.8x of each other's max error (measured over
# random block masks and the GNA gradient case). The ratio of two few-ulp maxima is
# noise, so fp32 gradient checks allow this factor; 16-bit checks and every forward
# check keep 2. A wrong gradient is off by orders of magnitude more than either.
FP32_GRADIENT_FACTOR = 4.0


# Output SQNR floors (dB) of quantized attention against unquantized fp64 attention on
# Gaussian inputs (the engine's accuracy bars). Measured (torch emulation, the quantized
# kernel tests): int8 37.6-39.4, int8-pv8 33.0-35.9, int4 13.1-14.0, int4-pv8 13.5 (INT4 is
# coarse by design). Floors sit 3.5-4 dB under the lowest.
QUANT_SQNR_FLOOR_DB = {"int8": 34.0, "int4": 9.5, "int8-pv8": 29.5, "int4-pv8": 9.5}


def rounding_floor(golden: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute floor of the oracle: twice the largest error of rounding ``golden`` (shifted
    to magnitude >= 0.3) to ``dtype``.

    Derived from the data and the output dtype, not a constant per dtype: one unit in the
    last place of ``0.3 + max|golden|`` in ``dtype`` (2^-8 of it in bf16, 2^-11 in fp16,
    2^-24 in fp32). It covers two correct results that round to neighbouring values.
    """
    g = golden.double()
    g = g[torch.isfinite(g)]
    if g.numel() == 0:
        return 0.0
    shifted = g.abs() + _FLOOR_MAGNITUDE
    return 2.0 * (shifted.to(dtype).double() - shifted).abs().max().item()


def assert_close_to_golden(
    actual: torch.Tensor,
    eager: torch.Tensor,
    golden: torch.Tensor,
    *,
    factor: float = 2.0,
    what: str = "",
) -> None:
    """Assert ``max|actual - golden| <= factor * max|eager - golden| + rounding_floor(golden, dtype)``.

    Args:
        actual: result of the code under test.
        eager: the same computation done plainly in ``actual``'s dtype (the error budget).
        golden: fp64 (or fp32) reference.
        factor: how many times the eager error the code under test may reach (2, as
            FlashAttention's tests).
        what: description of shape/dtype for the failure message.

    Non-finite values (e.g. -inf LSE of rows that attend nothing) must sit exactly where
    the golden's are.
    """
    if actual.shape != golden.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}")
    a, e, g = actual.double(), eager.double(), golden.double()
    finite = torch.isfinite(g)
    if not torch.equal(torch.isfinite(a), finite):
        bad = (torch.isfinite(a) != finite).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite pattern differs from golden at {bad}")
    if not torch.equal(a[~finite], g[~finite]):
        raise AssertionError(f"{what}: non-finite values differ from golden (e.g. +inf for -inf)")
    err = (a - g)[finite].abs().max().item() if finite.any() else 0.0
    budget = (e - g)[finite].abs().max().item() if finite.any() else 0.0
    floor = rounding_floor(golden, actual.dtype)
    tol = factor * budget + floor
    if not (err <= tol):
        raise AssertionError(
            f"{what}: max error {err:.3e} exceeds {factor} x eager error {budget:.3e} + rounding floor "
            f"{floor:.1e} (= {tol:.3e}); dtype={actual.dtype}, shape={tuple(actual.shape)}"
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


class RecordedCall(NamedTuple):
    """One sparse attention call: where it ran, its inputs and its output (copies)."""

    layer: int
    step: Optional[int]
    geometry: AttentionGeometry
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


class CallRecorder(SparseAttentionMethod):
    """A method that runs another one and keeps every call it serves, for tests.

    Pass it to ``sparsegen.apply`` like any method object; ``calls`` lists
    :class:`RecordedCall` in call order. Every capability (geometry checks, preparation,
    static masks) is the wrapped method's.

    Example::

        rec = CallRecorder("radial", block_size=32, backend="torch")
        with sparsegen.apply(pipe, rec):
            pipe(...)
        rec.calls[0].q.shape        # (B, N, H, D)
    """

    def __init__(self, method, **options):
        if not isinstance(method, SparseAttentionMethod):
            from .patching import make_config

            method = make_config(method, **options).make_method()
        elif options:
            raise TypeError(f"options {sorted(options)} cannot be added to a method object")
        super().__init__(method.config)
        self.inner = method
        self.has_static_mask = method.has_static_mask
        self.uses_step = True  # the recorded calls say where they ran
        self.calls: list[RecordedCall] = []

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        self.inner.check_geometry(geometry)

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        self.inner.prepare(geometry, device)

    def static_mask(self, geometry: AttentionGeometry, device="cpu"):
        return self.inner.static_mask(geometry, device)

    def attended_pairs(self, geometry: AttentionGeometry) -> Optional[int]:
        return self.inner.attended_pairs(geometry)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        out, lse = self.inner.attention(q, k, v, call)
        self.calls.append(RecordedCall(call.layer, call.step, call.geometry, q.detach().clone(), k.detach().clone(),
                                       v.detach().clone(), out.detach().clone()))
        return out, lse

    def clear_cache(self) -> None:
        self.inner.clear_cache()
