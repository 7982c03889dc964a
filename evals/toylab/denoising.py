"""One-call denoising: noise generator videos as in training and predict the clean video.

The transformer sees the noised video once (no sampler, no guidance), so the PSNR of its
prediction against the clean video says what the model (with whatever attention is
patched into it) recovers at each noise level, independently of the sampler
(``evals/toy_checks.py`` at the training length, ``evals/length_lora.py`` at longer ones).

Videos are float arrays (N, F, H, W, 3) in [0, 1], as ``sparsegen.toy.generate`` returns.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsegen.toy import pipeline as toy
from toylab.metrics import psnr

__all__ = ["DENOISING_SIGMAS", "denoising_check", "one_call_prediction"]

DENOISING_SIGMAS = (0.2, 0.5, 0.8, 0.95, 1.0)


@torch.no_grad()
def denoising_check(pipe, real: np.ndarray, prompts, *, seed: int, sigmas=DENOISING_SIGMAS):
    """One-call clean-video predictions from noised real videos.

    Args:
        real: (N, F, H, W, 3) generator videos in [0, 1]; prompts: their N prompts.
    Returns:
        ({sigma: mean PSNR in dB of the prediction against ``real``}, {sigma: (N, F, H, W, 3) predictions}).
    """
    scores, predictions = {}, {}
    for sigma in sigmas:
        pred = one_call_prediction(pipe, real, prompts, seed=seed, sigma=sigma)
        predictions[sigma] = pred
        scores[sigma] = float(np.mean([psnr(p, r) for p, r in zip(pred, real)]))
    return scores, predictions


@torch.no_grad()
def one_call_prediction(pipe, real: np.ndarray, prompts, *, seed: int, sigma) -> np.ndarray:
    """Noise ``real`` as in training and predict the clean video in one conditional call.

    Args:
        real: (N, F, H, W, 3) generator videos in [0, 1]; prompts: their N prompts.
        sigma: one noise level, or a sequence of one level per latent frame (the
            transformer then gets one timestep per token).
    Returns:
        (N, F, H, W, 3) predicted videos in [0, 1].
    """
    codec, transformer = pipe.vae, pipe.transformer
    video = torch.from_numpy(real).permute(0, 4, 1, 2, 3).float() * 2.0 - 1.0  # (N, 3, F, H, W) in [-1, 1]
    x0 = codec.video_to_latents(video)
    # The noise the model was trained with (its frame correlation, if any).
    noise = toy.frame_correlated_noise(x0.shape, torch.Generator().manual_seed(seed), pipe.toy_frame_noise_correlation)
    embeds = toy.encode_prompt(pipe, list(prompts))
    levels = (torch.full((len(prompts),), float(sigma)) if np.ndim(sigma) == 0
              else torch.tensor(sigma, dtype=torch.float32).expand(len(prompts), -1))
    s = toy.broadcast_levels(levels)
    noisy = (1.0 - s) * x0 + s * noise
    output = transformer(noisy, toy.transformer_timestep(levels, tuple(x0.shape[2:])), embeds, return_dict=False)[0]
    x0_pred = toy.clean_latents(output, noisy, levels, pipe.scheduler.config.prediction_type)
    pred = codec.unpack(codec.denormalize(x0_pred)).clamp(-1, 1)
    return ((pred + 1.0) / 2.0).permute(0, 2, 3, 4, 1).numpy()
