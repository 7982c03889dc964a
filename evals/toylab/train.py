"""Train the toy Wan model with flow matching on procedural videos, on CPU.

Rectified flow, as diffusers' flow-matching schedulers expect: for clean latents
``x0``, noise ``n`` and noise level ``sigma`` in (0, 1),

    x_sigma = (1 - sigma) * x0 + sigma * n,    target velocity  v = n - x0,

and the transformer gets ``timestep = 1000 * sigma``. With ``prediction_type="sample"``
the transformer outputs the clean latents ``x0_hat`` and the loss is still taken on the
velocity it implies, ``(x_sigma - x0_hat) / max(sigma, MIN_SIGMA_FOR_VELOCITY)``, so both
prediction types minimise the same objective. Noise levels are drawn as
``sigma = shift(u)``, ``u ~ U(0, 1)``, with the same shift (FLOW_SHIFT) the
inference scheduler uses; optionally (``per_frame_sigma_probability``) a share of the
videos get an independent level for each latent frame, as in diffusion forcing, so
that frames left nearly pure noise next to cleaner ones must be predicted from the
prompt's motion rather than copied from the input; and (``first_frame_probability``) a
share get their first latent frame nearly clean, as image-to-video models train (the
shipped recipe: half of the videos, with their later frames near pure noise). The
prompt encoder trains jointly; with probability ``uncond_probability`` a prompt is
replaced by "" so classifier-free guidance works.

Every random draw is a function of (config.seed, step), so a run resumed from a
checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from sparsegen.toy import pipeline as toy_pipeline
from sparsegen.toy.codec import PixelShuffleVideoCodec
from sparsegen.toy.data import SEED_RANGE_SIZE, SEED_RANGES, render_batch

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
NUM_VALIDATION_VIDEOS = 32
NUM_STATISTICS_VIDEOS = 256
# Validation noise levels: fixed quantiles of the training distribution, so the
# validation loss estimates the training objective with low variance.
NUM_VALIDATION_LEVELS = 8
# The velocity implied by a clean-latent prediction divides by sigma. Below this level the
# loss weight of the clean-latent error (1 / sigma^2) is held at 1 / 0.2^2 = 25: with the
# exact weight (up to 400 at sigma 0.05) the few low-noise samples of a batch dominated
# the gradient and the loss spiked; the low noise levels are the easy ones.
MIN_SIGMA_FOR_VELOCITY = 0.2
MIXED_PRECISION_MODES = ("no", "bf16")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved with the model)."""

    steps: int = 2700
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    uncond_probability: float = 0.1
    seed: int = 0
    num_frames: int = toy_pipeline.DEFAULT_NUM_FRAMES
    height: int = toy_pipeline.DEFAULT_HEIGHT
    width: int = toy_pipeline.DEFAULT_WIDTH
    validate_every: int = 100
    log_every: int = 10
    checkpoint_minutes: float = 5.0
    threads: int = 2
    prediction_type: str = toy_pipeline.DEFAULT_PREDICTION_TYPE
    # "bf16": the training step's forward and backward run under CPU bfloat16 autocast
    # (about 1.2x faster per step on 2 cores); weights, optimizer, EMA and validation stay fp32.
    mixed_precision: str = "bf16"
    # Share of the noise variance common to all latent frames of a video
    # (toy_pipeline.frame_correlated_noise); generation draws the same noise.
    frame_noise_correlation: float = toy_pipeline.DEFAULT_FRAME_NOISE_CORRELATION
    # Probability that a training video's latent frames each get their own noise level
    # (per_frame_sigmas); otherwise the whole video shares one. Validation and generation
    # always use one level per video.
    per_frame_sigma_probability: float = 0.0
    # Probability that a training video's first latent frame is shown nearly clean (level
    # drawn from [0, FIRST_FRAME_MAX_SIGMA]), as image-to-video models train
    # (first_frame_sigmas): the later frames must continue the first one, and only the
    # prompt says which way. Such models generate in two stages (default_sampler).
    first_frame_probability: float = 0.5
    # In those first-frame videos, the later frames' level is moved into [this, 1]
    # (floor + (1 - floor) * level): near pure noise the later frames show no motion to
    # copy, so only the prompt's direction word can place the objects. 0 keeps the level.
    first_frame_later_min_sigma: float = 0.9

    def __post_init__(self):
        for name in ("steps", "batch_size", "validate_every", "log_every", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.steps * self.batch_size >= SEED_RANGE_SIZE:
            raise ValueError(f"steps * batch_size = {self.steps * self.batch_size} exceeds the training seed range")
        if not 0.0 <= self.uncond_probability < 1.0:
            raise ValueError(f"uncond_probability={self.uncond_probability} must be in [0, 1)")
        toy_pipeline.check_prediction_type(self.prediction_type)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1)")
        training_precision(self.mixed_precision)  # raises on an unknown mode
        toy_pipeline.check_frame_noise_correlation(self.frame_noise_correlation)
        for name in ("per_frame_sigma_probability", "first_frame_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.first_frame_later_min_sigma < 1.0:
            raise ValueError(f"first_frame_later_min_sigma={self.first_frame_later_min_sigma} must be in [0, 1)")


# Fields added after the first checkpoints were written, with the value those older
# runs trained with; a resumed old checkpoint reads as that, not as another setting.
LATER_CONFIG_FIELDS = {"frame_noise_correlation": 0.0, "per_frame_sigma_probability": 0.0, "first_frame_probability": 0.0,
                       "first_frame_later_min_sigma": 0.0}
FIRST_FRAME_MAX_SIGMA = 0.1


def shifted_sigma(u: torch.Tensor, shift: float = toy_pipeline.FLOW_SHIFT) -> torch.Tensor:
    """Map u in [0, 1] to a noise level with the flow-matching time shift."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def per_frame_sigmas(sigma: torch.Tensor, latent_frames: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Noise levels per latent frame: with ``probability`` a video's frames get independent
    levels from the training distribution, otherwise all repeat the video's ``sigma``.

    Args:
        sigma: (B,) the videos' levels. Returns: (B, latent_frames).
    """
    chosen = torch.rand(sigma.shape[0], generator=generator) < probability
    own = shifted_sigma(torch.rand(sigma.shape[0], latent_frames, generator=generator))
    return torch.where(chosen[:, None], own, sigma[:, None].expand(-1, latent_frames))


def first_frame_sigmas(sigma: torch.Tensor, probability: float, generator: torch.Generator,
                       later_min_sigma: float = 0.0) -> torch.Tensor:
    """Show chosen videos' first latent frame nearly clean.

    Args:
        sigma: (B, T) levels per latent frame. Returns: (B, T), where with ``probability``
        a video's frame 0 is replaced by a level drawn uniformly from [0, FIRST_FRAME_MAX_SIGMA]
        and its later frames' levels s become ``later_min_sigma + (1 - later_min_sigma) * s``.
    """
    chosen = torch.rand(sigma.shape[0], generator=generator) < probability
    first = FIRST_FRAME_MAX_SIGMA * torch.rand(sigma.shape[0], generator=generator)
    sigma = sigma.clone()
    later = later_min_sigma + (1.0 - later_min_sigma) * sigma[:, 1:]
    sigma[:, 1:] = torch.where(chosen[:, None], later, sigma[:, 1:])
    sigma[:, 0] = torch.where(chosen, first, sigma[:, 0])
    return sigma


def default_sampler(config: dict) -> str:
    """A trained model's default sampler (toy_pipeline.SAMPLERS): models trained to
    continue a first frame generate in two stages."""
    return "first-frame" if config.get("first_frame_probability", 0.0) > 0.0 else "joint"


def training_precision(mixed_precision: str):
    """The autocast context the training step runs in (a no-op for "no")."""
    if mixed_precision not in MIXED_PRECISION_MODES:
        raise ValueError(f"mixed_precision={mixed_precision!r} must be one of {list(MIXED_PRECISION_MODES)}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def measure_latent_statistics(config: TrainConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of raw codec latents over NUM_STATISTICS_VIDEOS videos.

    The codec's channels are (colour, frame, row, col) rearrangements of pixels, so the
    statistics are those of the three colour channels, repeated over each colour's block.
    """
    seeds = range(SEED_RANGES["statistics"], SEED_RANGES["statistics"] + NUM_STATISTICS_VIDEOS)
    video, _, _ = render_batch(seeds, num_frames=config.num_frames, height=config.height, width=config.width)
    per_colour_mean = video.mean(dim=(0, 2, 3, 4))
    per_colour_std = video.std(dim=(0, 2, 3, 4))
    block = toy_pipeline.TEMPORAL_FACTOR * toy_pipeline.SPATIAL_FACTOR**2
    mean = per_colour_mean.repeat_interleave(block).tolist()
    std = per_colour_std.repeat_interleave(block).tolist()
    return mean, std


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.final_lr_fraction + (1.0 - config.final_lr_fraction) * cosine)


def flow_matching_loss(transformer, prompt_encoder, codec, videos, prompts, sigma, noise, prediction_type):
    """Mean squared error of the predicted velocity (for ``prediction_type="sample"``, of
    the velocity implied by the predicted clean latents).

    Args:
        videos: (B, 3, F, H, W) in [-1, 1]; prompts: B strings; sigma: (B,) in (0, 1), or
            (B, T) one level per latent frame; noise: (B, z_dim, T, H/s, W/s) standard
            normal; prediction_type: what the transformer outputs
            (``toy_pipeline.PREDICTION_TYPES``).
    """
    x0 = codec.video_to_latents(videos)
    s = toy_pipeline.broadcast_levels(sigma)
    noisy = (1.0 - s) * x0 + s * noise
    embeds = prompt_encoder.encode(prompts)
    timestep = toy_pipeline.transformer_timestep(sigma, tuple(x0.shape[2:]))
    output = transformer(noisy, timestep, embeds, return_dict=False)[0].float()
    if prediction_type == "sample":
        velocity = (noisy - output) / s.clamp(min=MIN_SIGMA_FOR_VELOCITY)
    else:
        velocity = output
    return torch.nn.functional.mse_loss(velocity, (noise - x0).float())


class _Validation:
    """A fixed validation batch: videos, noise and noise levels drawn once."""

    def __init__(self, config: TrainConfig, codec: PixelShuffleVideoCodec):
        seeds = range(SEED_RANGES["validation"], SEED_RANGES["validation"] + NUM_VALIDATION_VIDEOS)
        self.videos, self.prompts, _ = render_batch(seeds, num_frames=config.num_frames, height=config.height, width=config.width)
        generator = torch.Generator().manual_seed(config.seed + 12345)
        latent_shape = codec.pack(self.videos[:1]).shape[1:]
        self.noise = toy_pipeline.frame_correlated_noise((NUM_VALIDATION_VIDEOS, *latent_shape), generator,
                                                         config.frame_noise_correlation)
        levels = (torch.arange(NUM_VALIDATION_LEVELS) + 0.5) / NUM_VALIDATION_LEVELS
        self.sigma = shifted_sigma(levels.repeat(NUM_VALIDATION_VIDEOS // NUM_VALIDATION_LEVELS + 1)[:NUM_VALIDATION_VIDEOS])

    @torch.no_grad()
    def loss(self, transformer, prompt_encoder, codec, prediction_type: str, chunk: int = 8) -> float:
        total = 0.0
        for start in range(0, NUM_VALIDATION_VIDEOS, chunk):
            sl = slice(start, min(start + chunk, NUM_VALIDATION_VIDEOS))
            loss = flow_matching_loss(transformer, prompt_encoder, codec, self.videos[sl], self.prompts[sl], self.sigma[sl], self.noise[sl], prediction_type)
            total += loss.item() * (sl.stop - sl.start)
        return total / NUM_VALIDATION_VIDEOS


def _ema_update(ema_module, module, decay):
    with torch.no_grad():
        for e, p in zip(ema_module.parameters(), module.parameters()):
            e.lerp_(p, 1.0 - decay)


def _save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, out_dir, run_dir, *, resume: bool = False, command: str | None = None, benchmark_steps: int | None = None) -> dict:
    """Train and export the toy model.

    Args:
        config: the run's settings.
        out_dir: where the final assets go (layout of ``sparsegen/assets/toy_wan``).
        run_dir: checkpoint and JSONL log.
        resume: continue from ``run_dir/checkpoint.pt`` if it exists.
        command: the command line to record in the summary.
        benchmark_steps: if given, run only that many steps, print the throughput and
            return without writing anything.

    Returns:
        the training summary (also written to ``out_dir/training_summary.json``).
    """
    torch.set_num_threads(config.threads)
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT_NAME

    state = torch.load(checkpoint_path, weights_only=False) if resume and checkpoint_path.is_file() else None
    if state is not None:
        saved = TrainConfig(**{**LATER_CONFIG_FIELDS, **state["config"]})
        # Thread count and checkpoint interval do not change what is trained.
        runtime_only = {"threads", "checkpoint_minutes"}
        if {k: v for k, v in dataclasses.asdict(saved).items() if k not in runtime_only} != {
            k: v for k, v in dataclasses.asdict(config).items() if k not in runtime_only
        }:
            raise ValueError(f"checkpoint {checkpoint_path} was made with a different config: {saved} vs {config}")
        mean, std = state["latents_mean"], state["latents_std"]
    else:
        mean, std = measure_latent_statistics(config)
    codec = PixelShuffleVideoCodec(
        scale_factor_spatial=toy_pipeline.SPATIAL_FACTOR,
        scale_factor_temporal=toy_pipeline.TEMPORAL_FACTOR,
        latents_mean=mean,
        latents_std=std,
    )
    transformer = toy_pipeline.new_transformer(config.seed).train()
    prompt_encoder = toy_pipeline.new_prompt_encoder(config.seed).train()
    ema_transformer = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_encoder = copy.deepcopy(prompt_encoder).eval().requires_grad_(False)
    params = list(transformer.parameters()) + list(prompt_encoder.parameters())
    # No weight decay on norms, biases, embeddings' modulation tables (1-D parameters).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.99),
    )
    history = {"train": [], "validation": []}
    start_step, elapsed = 0, 0.0
    if state is not None:
        transformer.load_state_dict(state["transformer"])
        prompt_encoder.load_state_dict(state["prompt_encoder"])
        ema_transformer.load_state_dict(state["ema_transformer"])
        ema_encoder.load_state_dict(state["ema_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_step, elapsed = state["history"], state["step"], state["elapsed_seconds"]
        print(f"resumed at step {start_step} ({elapsed / 60:.1f} min of training so far)", flush=True)

    validation = _Validation(config, codec) if benchmark_steps is None else None
    num_params = sum(p.numel() for p in transformer.parameters())
    log = open(run_dir / LOG_NAME, "a") if benchmark_steps is None else None
    last_checkpoint = time.monotonic()
    session_start = time.monotonic()
    end_step = config.steps if benchmark_steps is None else min(config.steps, start_step + benchmark_steps)
    tic = time.monotonic()
    for step in range(start_step, end_step):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        rng = np.random.default_rng([config.seed, step])
        seeds = range(SEED_RANGES["train"] + step * config.batch_size, SEED_RANGES["train"] + (step + 1) * config.batch_size)
        videos, prompts, _ = render_batch(seeds, num_frames=config.num_frames, height=config.height, width=config.width)
        prompts = ["" if rng.random() < config.uncond_probability else p for p in prompts]
        sigma = shifted_sigma(torch.rand(config.batch_size, generator=generator))
        noise = toy_pipeline.frame_correlated_noise(codec.pack(videos).shape, generator, config.frame_noise_correlation)
        # Drawn last, only when asked for: runs without them keep their random stream.
        if config.per_frame_sigma_probability > 0.0 or config.first_frame_probability > 0.0:
            sigma = per_frame_sigmas(sigma, noise.shape[2], config.per_frame_sigma_probability, generator)
        if config.first_frame_probability > 0.0:
            sigma = first_frame_sigmas(sigma, config.first_frame_probability, generator, config.first_frame_later_min_sigma)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with training_precision(config.mixed_precision):
            loss = flow_matching_loss(transformer, prompt_encoder, codec, videos, prompts, sigma, noise, config.prediction_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        # EMA with a warm-up, so early weights do not dominate a short run.
        ema = min(config.ema_decay, (1.0 + step) / (10.0 + step))
        _ema_update(ema_transformer, transformer, ema)
        _ema_update(ema_encoder, prompt_encoder, ema)

        now = time.monotonic()
        done = step + 1
        history["train"].append([done, loss.item()])
        if benchmark_steps is not None:
            continue
        if done % config.log_every == 0 or done == config.steps:
            record = {
                "step": done, "loss": round(loss.item(), 5), "grad_norm": round(float(grad_norm), 4),
                "lr": learning_rate(config, step), "elapsed_min": round((elapsed + now - session_start) / 60, 2),
            }
            if done % config.validate_every == 0 or done == config.steps:
                record["val_loss_ema"] = round(validation.loss(ema_transformer, ema_encoder, codec, config.prediction_type), 5)
                history["validation"].append([done, record["val_loss_ema"]])
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if now - last_checkpoint > config.checkpoint_minutes * 60 or done == config.steps:
            _save_atomic(
                {
                    "config": dataclasses.asdict(config), "step": done, "history": history,
                    "elapsed_seconds": elapsed + time.monotonic() - session_start,
                    "latents_mean": mean, "latents_std": std,
                    "transformer": transformer.state_dict(), "prompt_encoder": prompt_encoder.state_dict(),
                    "ema_transformer": ema_transformer.state_dict(), "ema_encoder": ema_encoder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                },
                checkpoint_path,
            )
            last_checkpoint = time.monotonic()

    if benchmark_steps is not None:
        seconds = (time.monotonic() - tic) / max(1, end_step - start_step)
        result = {"seconds_per_step": seconds, "samples_per_second": config.batch_size / seconds,
                  "transformer_parameters": num_params,
                  "projected_minutes": seconds * config.steps / 60}
        print(json.dumps(result), flush=True)
        return result

    elapsed += time.monotonic() - session_start
    summary = {
        "command": command,
        "config": dataclasses.asdict(config),
        "steps_done": end_step,
        "training_wall_minutes": round(elapsed / 60, 2),
        "transformer_parameters": num_params,
        "prompt_encoder_parameters": sum(p.numel() for p in prompt_encoder.parameters()),
        "final_train_loss_mean_last_100": float(np.mean([l for _, l in history["train"][-100:]])),
        "final_validation_loss_ema": history["validation"][-1][1] if history["validation"] else None,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {config.threads} threads",
        "python": sys.version.split()[0],
    }
    export(out_dir, ema_transformer, ema_encoder, codec, history, summary)
    return summary


def _precision_words(config: dict) -> str:
    # Summaries written before mixed_precision existed trained in fp32.
    if config.get("mixed_precision", "no") == "bf16":
        return "forward and backward under bfloat16 autocast (weights, optimizer and EMA in fp32)"
    return "fp32"


def export(out_dir, transformer, prompt_encoder, codec, history, summary):
    """Write the asset directory: fp16 transformer, prompt encoder, codec and scheduler
    configs, training summary, loss curve and model card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(transformer).to(torch.float16).save_pretrained(out_dir / "transformer", safe_serialization=True)
    prompt_encoder.save_pretrained(out_dir / "prompt_encoder", safe_serialization=True)
    codec.save_config(out_dir / "vae")
    toy_pipeline.make_scheduler(summary["config"]["prediction_type"]).save_pretrained(out_dir / "scheduler")
    # The noise generation must draw, read back by toy_pipeline.load_frame_noise_correlation.
    noise_prior = {"frame_noise_correlation": summary["config"]["frame_noise_correlation"]}
    (out_dir / toy_pipeline.NOISE_PRIOR_FILE).write_text(json.dumps(noise_prior, indent=2) + "\n")
    (out_dir / toy_pipeline.SAMPLING_FILE).write_text(json.dumps({"sampler": default_sampler(summary["config"])}) + "\n")
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "loss_history.json").write_text(json.dumps(_downsample_history(history)) + "\n")
    plot_loss_curve(history, out_dir / "loss_curve.png", title=f"toy Wan, {summary['training_wall_minutes']} min on CPU")
    write_model_card(out_dir)


def _downsample_history(history, every: int = 10):
    """Train loss averaged over windows of ``every`` steps; validation kept as is."""
    train = history["train"]
    windows = [train[i : i + every] for i in range(0, len(train), every)]
    return {
        "train": [[w[-1][0], float(np.mean([l for _, l in w]))] for w in windows],
        "validation": history["validation"],
    }


def plot_loss_curve(history, path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    down = _downsample_history(history)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps, losses = zip(*down["train"])
    ax.plot(steps, losses, lw=1, label="train loss (mean of 10 steps)")
    if down["validation"]:
        vsteps, vlosses = zip(*down["validation"])
        ax.plot(vsteps, vlosses, "o-", ms=3, label="validation loss, EMA weights")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE (velocity)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _predicts_clean_latents(config: dict) -> bool:
    # Summaries written before prediction_type existed are velocity models.
    return config.get("prediction_type", "flow_prediction") == "sample"


def _noise_sentence(config: dict) -> str:
    # Summaries written before the noise prior existed trained on independent frames.
    correlation = config.get("frame_noise_correlation", 0.0)
    if correlation == 0.0:
        sentence = "The noise is independent across latent frames."
    else:
        sentence = (
            f"The noise is correlated across latent frames: {correlation} of its variance is one draw "
            f"shared by all latent frames of a video (`sqrt({correlation}) shared + sqrt({1 - correlation:g}) "
            "per-frame`, unit variance per element), and generation draws its initial noise the "
            "same way (`noise_prior.json`)."
        )
    per_frame = config.get("per_frame_sigma_probability", 0.0)
    if per_frame > 0.0:
        sentence += (
            f" With probability {per_frame} a training video's latent frames each get their own "
            "noise level from the same distribution (the transformer takes one timestep per token), "
            "so some frames must be predicted from cleaner neighbours and the prompt; validation "
            "and generation use one level per video."
        )
    first_frame = config.get("first_frame_probability", 0.0)
    later_min = config.get("first_frame_later_min_sigma", 0.0)
    later_words = ("frames keep the video's level" if later_min == 0.0 else
                   f"frames' level s is moved to {later_min:g} + {1 - later_min:g} s (near pure noise, "
                   "so only the prompt tells which way the objects go)")
    if first_frame > 0.0:
        sentence += (
            f" With probability {first_frame} a training video's first latent frame is shown nearly "
            f"clean (noise level at most {FIRST_FRAME_MAX_SIGMA}, one timestep per token) while the later "
            + later_words + ", as image-to-video models train, so the model can continue a "
            "given first frame (`sparsegen.toy.generate_from_first_frame`)."
        )
    return textwrap.fill(sentence, width=88)


def _prediction_words(config: dict) -> str:
    return "the clean latents" if _predicts_clean_latents(config) else "the velocity"


def _prediction_paragraph(config: dict) -> str:
    if not _predicts_clean_latents(config):
        return "The transformer predicts the velocity."
    return textwrap.fill(
        "The transformer predicts the clean latents x0_hat; the loss is the squared error of "
        "the velocity they imply, (x_sigma - x0_hat) / max(sigma, "
        f"{MIN_SIGMA_FOR_VELOCITY}). A token carries 192 pixel values, as many as the model "
        "width: clean videos lie near a low-dimensional set that a narrow model can represent, "
        "while the velocity contains the full-rank noise (a velocity-predicting model of this "
        "size gave noise-like samples, see evals/RESULTS.md). The cap on 1 / sigma keeps the "
        "few low-noise samples of a batch from dominating the gradient.",
        width=88,
    )


def write_model_card(asset_dir, *, note: str | None = None) -> Path:
    """Write ``asset_dir/README.md`` (the model card) from the files the export wrote.

    Args:
        asset_dir: an exported asset directory (``training_summary.json``,
            ``loss_history.json``, weights).
        note: an optional remark printed under the wall time (e.g. that the machine was shared).

    Returns:
        the path of the card.

    Raises:
        FileNotFoundError: if the directory holds no training summary.
    """
    asset = Path(asset_dir)
    if not (asset / "training_summary.json").is_file():
        raise FileNotFoundError(f"no training_summary.json in {str(asset)!r}; export a trained model there first")
    s = json.loads((asset / "training_summary.json").read_text())
    c = s["config"]
    size_mb = (asset / "transformer" / toy_pipeline.WEIGHTS_FILE).stat().st_size / 2**20
    enc_mb = (asset / "prompt_encoder" / toy_pipeline.WEIGHTS_FILE).stat().st_size / 2**20
    hist = json.loads((asset / "loss_history.json").read_text())
    first_val = hist["validation"][0] if hist["validation"] else [None, float("nan")]
    text = textwrap.dedent(f"""\
    # toy_wan: a small text-to-video Wan model trained on procedural videos
    
    A tiny instance of diffusers' own `WanTransformer3DModel`, trained from scratch on CPU with
    flow matching on the procedural videos of `sparsegen.toy.data`. It exists so that sparse
    attention methods can be measured on a model whose attention has real structure, on
    machines where no pretrained video model can be downloaded. It is the default model of
    `sparsegen generate`.
    
    ```python
    import sparsegen.toy as toy
    pipe = toy.load_pipeline()                       # a diffusers.WanPipeline, built offline
    video = toy.generate(pipe, ["two red circles moving right over a striped background"], seed=0)
    video.shape                                      # (1, 17, 32, 32, 3), float32 in [0, 1]
    ```
    
    ## Files
    
    | path | what |
    |---|---|
    | `transformer/` | `WanTransformer3DModel` config + weights (fp16 safetensors, {size_mb:.1f} MB; EMA of the training weights) |
    | `prompt_encoder/` | `ToyPromptEncoder` (word + position embeddings, one transformer encoder layer; {s['prompt_encoder_parameters']:,} parameters, {enc_mb:.2f} MB), trained jointly; stands in for UMT5 |
    | `vae/config.json` | `PixelShuffleVideoCodec`: a lossless direct latent space instead of a VAE (see below), with per-channel latent statistics |
    | `scheduler/` | `UniPCMultistepScheduler` (Wan's solver), flow sigmas with shift 3.0, reading the transformer output as {_prediction_words(c)} (`prediction_type="{c.get('prediction_type', 'flow_prediction')}"`) |
    | `noise_prior.json` | share of the initial noise's variance common to all latent frames ({c.get('frame_noise_correlation', 0.0)}); `toy.generate` draws the noise this way |
    | `sampling.json` | how `toy.generate` samples this model by default: `"{default_sampler(c)}"` ({toy_pipeline.SAMPLER_WORDS[default_sampler(c)]}) |
    | `training_summary.json` | the training command, config, wall time, final losses, versions |
    | `loss_history.json`, `loss_curve.png` | training loss (mean of 10 steps) and validation loss of the EMA weights |
    
    ## Architecture
    
    `WanTransformer3DModel` with patch size (1, 1, 1), 6 layers, 6 heads x 32 dims (width
    192), FFN 576, text dim 64, RMS q/k norm across heads, cross-attention norm, rotary
    position embedding (head dims split t = 12, h = 10, w = 10):
    {s['transformer_parameters']:,} parameters.
    
    Latent space (`sparsegen/toy/codec.py`): no learned autoencoder. A video is rearranged
    losslessly, in the causal frame layout of Wan's VAE: frame 0 alone, then groups of 4
    frames; each 4 x 4 pixel patch of the 4 stacked frames becomes 3 x 4 x 16 = 192
    channels. A 17-frame 32 x 32 video is 5 latent frames of 8 x 8 cells, one token per
    cell: **5 x 8 x 8 = 320 video tokens** (64 per latent frame). One token carries 192
    values, the model's width, so the output layer can express any velocity (a 2 x 2
    patchify would put 768 values through a 192-wide model and leave most of the
    target unreachable).
    Latents are normalised per channel with statistics measured on 256 training-distribution
    videos. 33 frames give 9 x 8 x 8 = 576 tokens, 65 frames 17 x 8 x 8 = 1088.
    
    ## Data
    
    `sparsegen/toy/data.py`, deterministic by seed; seed ranges for training, validation,
    statistics and evaluation are disjoint. Prompts follow one grammar:
    
        <a|two|three> <red|green|blue|yellow> <circle|square|triangle>[s] moving <left|right|up|down>
            over a <striped|checkered|dotted|plain> background[, camera panning <left|right|up|down>]
    
    1 to 3 objects of one colour and class (radius 3-4.5 px at 32 x 32, darker outline, shaded centre)
    move at 0.4-0.8 px/frame in the named direction and occlude each other in drawing
    order; grey low-saturation textured backgrounds; half the videos have a camera pan
    (the background drifts). 17 frames at 32 x 32. Each video carries its ground truth
    (positions, velocities, visibility, colour, camera motion).
    
    ## Training
    
    ```
    {s['command']}
    ```
    
    (`evals/train_toy.py`; `--resume` continues from the checkpoint in
    `evals/out/toy_train`.) Rectified flow: `x_sigma = (1 - sigma) x0 + sigma noise`, target
    velocity `noise - x0`, `timestep = 1000 sigma`, sigma drawn uniformly then shifted with
    the inference flow shift 3.0. NOISE_SENTENCE

    PREDICTION_PARAGRAPH

    {c['steps']} steps of batch {c['batch_size']} (fresh videos every step: {c['steps'] * c['batch_size']:,}
    videos, none seen twice), AdamW (lr {c['learning_rate']}, betas 0.9/0.99, weight decay {c['weight_decay']} on matrices),
    {c['warmup_steps']} warm-up steps then cosine decay to {c['final_lr_fraction']} of the peak, gradient clipping {c['grad_clip']},
    EMA {c['ema_decay']} (exported), prompts dropped to "" with probability {c['uncond_probability']} (classifier-free
    guidance), {c['threads']} CPU threads, {_precision_words(c)}.
    
    - Wall time: **{s['training_wall_minutes']} min** ({s['machine']}; from `training_summary.json`).
    NOTE_LINE
    - Final training loss (mean of the last 100 steps): {s['final_train_loss_mean_last_100']:.3f};
      validation loss of the EMA weights (32 fixed videos, fixed noise and noise levels):
      {first_val[1] if first_val else float('nan'):.3f} at step {first_val[0] if first_val else '-'} -> **{s['final_validation_loss_ema']:.3f}** at step {s['steps_done']}.
    
    ![loss curve](loss_curve.png)
    
    ## Evaluation
    
    - Prompt following and attention locality against the generator's ground truth and a
      random-initialisation baseline: `python evals/toy_checks.py`, results in
      `evals/results/toy.md`.
    - Every sparse method against dense attention (PSNR, SSIM, per-layer attention error,
      density sweeps, 2x and 4x length): `python evals/quality.py`, results in
      `evals/results/quality.md`.
    
    Default generation settings: 17 frames, 32 x 32, 20 steps, guidance {toy_pipeline.DEFAULT_GUIDANCE_SCALE}, sampler `"{default_sampler(c)}"`.
    
    ## Limitations
    
    - Tiny and briefly trained (see `evals/results/toy.md`): sampled in two stages, its
      videos have the prompt's colour and, well above chance, its direction of motion
      (reversing the direction word with the same noise reverses the motion in about half
      of the prompts), with rough, fragmented coloured objects along jittery tracks; the
      background texture is followed only somewhat above chance and the count not at all.
      Sampled with all frames together (`sampler="joint"`) the initial noise, not the
      prompt, sets the direction. It is an instrument for comparing attention methods
      against dense attention, not a video generator.
    - Trained only at 17 frames, 32 x 32. Longer videos (33, 65 frames) rely on the rotary
      embedding extrapolating in time; dense and sparse are compared there against each
      other, not against ground truth.
    - 320 tokens at the training size: sparse methods need small blocks (16-64 tokens) to
      be sparse at all, and the measured CPU times say nothing about GPU speedups at real
      model sizes. Radial attention's frame decimation leaves only the diagonal frames
      and the sink at 64 tokens per frame.
    - Closed vocabulary (29 words): prompts outside the grammar are rejected with an error.
    - No learned autoencoder: the latent space is a lossless pixel rearrangement, so the
      transformer also has to model pixel-level detail that a VAE would absorb.
    - Weights are stored in fp16 and cast to the requested dtype on load.
    """)
    text = text.replace("NOTE_LINE\n", f"  {note}\n" if note else "")
    text = text.replace("PREDICTION_PARAGRAPH", _prediction_paragraph(c))
    text = text.replace("NOISE_SENTENCE", _noise_sentence(c))
    path = asset / "README.md"
    path.write_text(text)
    return path
