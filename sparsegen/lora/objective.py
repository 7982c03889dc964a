"""The flow-matching (rectified-flow) objective and its noise-level sampling.

For clean latents ``x0``, standard normal ``noise`` and a noise level ``sigma`` in (0, 1)::

    x_sigma = (1 - sigma) * x0 + sigma * noise        target velocity  v = noise - x0

the transformer gets ``timestep = sigma * num_train_timesteps`` (what diffusers'
flow-matching schedulers pass at inference) and the loss is the mean squared error of
the velocity. A model that predicts clean latents (scheduler ``prediction_type="sample"``,
like the built-in model) is scored on the velocity its prediction implies,
``(x_sigma - x0_hat) / sigma`` (its weight capped at low noise, see
MIN_SIGMA_FOR_VELOCITY), so both kinds of model minimise the same objective.

Noise levels are logit-normal (Esser et al. 2024, "Scaling rectified flow transformers"):
``sigma = shift(sigmoid(m + s * z))``, ``z ~ N(0, 1)``, which puts most training on the
middle noise levels where the velocity is hardest to predict, then moved by the same
flow shift the model's scheduler applies at inference, so training weights the noise
levels that inference visits. Wan 2.2's experts each serve a range of levels; sampling
is restricted to it exactly (inverse-CDF sampling of the truncated distribution).
"""

from __future__ import annotations

import torch

__all__ = ["sample_sigmas", "shift_sigma", "unshift_sigma", "add_noise", "flow_matching_loss",
           "MIN_SIGMA_FOR_VELOCITY"]

# A clean-latent prediction's implied velocity error is (x0 - x0_hat) / sigma: the
# clean-latent error weighted by 1 / sigma^2 (400 at sigma 0.05). Below this level the
# weight is held at 1 / 0.2^2 = 25, as for the built-in model's training: with the exact
# weight the few low-noise samples of a batch dominate the gradient and the loss spikes,
# and the low noise levels are the easy ones. Only the weight is capped; the target
# stays the clean latents (dividing the implied velocity by the capped level instead
# would move the optimum away from x0 below 0.2).
MIN_SIGMA_FOR_VELOCITY = 0.2
# Uniform draws are kept this far from 0 and 1 so the normal quantile stays finite.
_U_EPS = 1e-6


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift of diffusers' schedulers: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigma`."""
    return sigma / (shift - (shift - 1.0) * sigma)


def sample_sigmas(generator: torch.Generator, n: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  shift: float = 1.0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``n`` noise levels, fp32 (n,) on the CPU: logit-normal, shifted, restricted to [low, high].

    Each level is ``shift_sigma(sigmoid(logit_mean + logit_std * ndtri(u)))`` with ``u``
    uniform over the quantiles that map into [low, high]: the exact truncated distribution,
    one uniform draw per level (so a run's random stream does not depend on the range).

    Raises:
        ValueError: ``logit_std <= 0``, ``shift <= 0`` or an empty range.
    """
    if not logit_std > 0:
        raise ValueError(f"logit_std={logit_std} must be > 0")
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"noise-level range [{low}, {high}] must satisfy 0 <= low < high <= 1")

    def quantile(level: float) -> float:
        if level <= 0.0:
            return 0.0
        if level >= 1.0:
            return 1.0
        s = unshift_sigma(torch.tensor(level, dtype=torch.float64), shift)
        z = (torch.logit(s) - logit_mean) / logit_std
        return float(torch.special.ndtr(z))

    q_low, q_high = quantile(low), quantile(high)
    u = q_low + (q_high - q_low) * torch.rand(n, generator=generator, dtype=torch.float64)
    z = torch.special.ndtri(u.clamp(_U_EPS, 1.0 - _U_EPS))
    sigma = shift_sigma(torch.sigmoid(logit_mean + logit_std * z), shift)
    return sigma.clamp(low, high).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise`` for x0, noise (B, C, T, h, w) and sigma (B,)."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """Mean squared velocity error (a 0-dim fp32 tensor).

    Args:
        output: the transformer's output (B, C, T, h, w): the velocity
            (``prediction_type="flow_prediction"``) or the clean latents (``"sample"``).
        x0, noise: (B, C, T, h, w), the clean latents and the noise the input was made with
            (``add_noise(x0, noise, sigma)``).
        sigma: (B,) noise levels.
    """
    if prediction_type == "sample":
        # (x_sigma - x0_hat) / sigma - (noise - x0) = (x0 - x0_hat) / sigma, the weight capped.
        s = sigma.float().view(-1, *([1] * (x0.dim() - 1))).clamp(min=MIN_SIGMA_FOR_VELOCITY)
        error = (x0.float() - output.float()) / s
    elif prediction_type == "flow_prediction":
        error = output.float() - (noise - x0).float()
    else:
        raise ValueError(f"prediction_type={prediction_type!r} must be 'flow_prediction' or 'sample'")
    return error.square().mean()
