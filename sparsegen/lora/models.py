"""What LoRA training needs from a pipeline: loading it, its latent space, its prompt
encoder, its transformer call and its training objective.

Served today: ``WanPipeline`` (Wan 2.1 and 2.2 text-to-video, and the built-in model,
which is a ``WanPipeline`` whose VAE is a lossless codec and whose text encoder is a small
prompt encoder). Other pipelines are refused with a message; a family is one more
entry in :data:`SUPPORTED_PIPELINES` plus its encode and call functions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

__all__ = ["SUPPORTED_PIPELINES", "Objective", "load_pipeline", "check_supported", "is_toy", "model_defaults", "objective_of",
           "check_geometry", "latent_shape", "encode_videos", "encode_prompts", "predict", "sample_video",
           "transformer_of"]

SUPPORTED_PIPELINES = ("WanPipeline",)
TOY_MODEL = "toy"
# Videos are encoded this many at a time while the cache is built (a real VAE on long
# videos needs its memory for one).
ENCODE_CHUNK = 1


def load_pipeline(model: str, *, device, dtype: torch.dtype):
    """The pipeline to train: ``"toy"`` (the built-in model) or a local diffusers folder.

    Raises:
        ValueError: a path that holds no pipeline, or a pipeline class train-lora does not serve.
    """
    if model == TOY_MODEL:
        from ..toy import pipeline as toy

        pipe = toy.load_pipeline(device=device, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        if not os.path.isdir(model) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ValueError(f"--model {model!r} is not a local folder and the hub is offline; pass a folder holding "
                             "a diffusers pipeline (model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {model!r}: cannot load a diffusers pipeline from it ({e})") from None
        pipe = pipe.to(device)
    check_supported(pipe, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_supported(pipe, label: str) -> None:
    """ValueError unless train-lora serves this pipeline class."""
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"train-lora serves {', '.join(SUPPORTED_PIPELINES)} (text-to-video); {label!r} is a {name}. "
                         "Pass a Wan text-to-video pipeline folder or 'toy'")


def is_toy(pipe) -> bool:
    """Whether ``pipe`` is the built-in model (its prompts go through its own small encoder)."""
    return getattr(pipe, "toy_prompt_encoder", None) is not None


def model_defaults(pipe) -> dict:
    """Frames, size, validation steps and guidance to use when the user gives none."""
    if is_toy(pipe):
        from ..generate import TOY_EXAMPLE_PROMPT
        from ..toy import pipeline as toy

        return {"frames": toy.DEFAULT_NUM_FRAMES, "height": toy.DEFAULT_HEIGHT, "width": toy.DEFAULT_WIDTH,
                "steps": toy.DEFAULT_NUM_INFERENCE_STEPS, "guidance": toy.DEFAULT_GUIDANCE_SCALE,
                "prompt": TOY_EXAMPLE_PROMPT, "fps": 8, "presets": toy.PRESETS}
    return {"frames": None, "height": None, "width": None, "steps": 30, "guidance": 5.0, "prompt": None,
            "fps": 16, "presets": {}}


def transformer_of(pipe, name: str) -> torch.nn.Module:
    """``pipe.<name>`` ("transformer" or "transformer_2"), or ValueError saying what exists."""
    module = getattr(pipe, name, None) if name in ("transformer", "transformer_2") else None
    if module is None:
        have = [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
        raise ValueError(f"--transformer {name!r}: {type(pipe).__name__} has {have}; choose one of them "
                         "(transformer_2 is Wan 2.2's low-noise expert)")
    if getattr(module.config, "image_dim", None) is not None:
        raise ValueError(f"pipe.{name} is an image-to-video transformer (image_dim set); train-lora trains "
                         "text-to-video models only")
    return module


@dataclasses.dataclass(frozen=True)
class Objective:
    """The model's own flow-matching objective, read from its scheduler and pipeline config.

    Attributes:
        prediction_type: "flow_prediction" (the transformer outputs the velocity
            noise - x0; Wan) or "sample" (it outputs the clean latents; the built-in model).
        shift: the flow shift the scheduler applies to its noise levels.
        num_train_timesteps: timestep = sigma * num_train_timesteps.
        sigma_low, sigma_high: the noise levels this transformer serves (Wan 2.2 splits them
            at ``boundary_ratio`` between its two experts; else [0, 1]).
    """

    prediction_type: str
    shift: float
    num_train_timesteps: int
    sigma_low: float = 0.0
    sigma_high: float = 1.0


def objective_of(pipe, transformer_name: str = "transformer") -> Objective:
    """Raises ValueError for a scheduler that is not flow matching."""
    cfg = pipe.scheduler.config
    sched = type(pipe.scheduler).__name__
    if sched.startswith("FlowMatch"):
        prediction_type = "flow_prediction"
        shift = float(cfg.get("shift", 1.0))
    elif cfg.get("use_flow_sigmas", False):
        prediction_type = cfg.get("prediction_type", "flow_prediction")
        shift = float(cfg.get("flow_shift", 1.0))
    else:
        raise ValueError(f"the pipeline's scheduler {sched} is not a flow-matching scheduler; train-lora trains with "
                         "the flow-matching loss (Wan and the built-in model use one)")
    if prediction_type not in ("flow_prediction", "sample"):
        raise ValueError(f"scheduler prediction_type={prediction_type!r}: train-lora knows 'flow_prediction' "
                         "(velocity) and 'sample' (clean latents)")
    low, high = 0.0, 1.0
    boundary = pipe.config.get("boundary_ratio", None) if hasattr(pipe, "config") else None
    if boundary is not None and getattr(pipe, "transformer_2", None) is not None:
        # WanPipeline runs `transformer` for t >= boundary * T and `transformer_2` below.
        low, high = (float(boundary), 1.0) if transformer_name == "transformer" else (0.0, float(boundary))
    return Objective(prediction_type, shift, int(cfg.get("num_train_timesteps", 1000)), low, high)


def latent_shape(pipe, transformer, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(channels, latent frames, latent height, latent width) of one video."""
    tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (transformer.config.in_channels, (frames - 1) // tf + 1, height // sf, width // sf)


def check_geometry(pipe, transformer, frames: int, height: int, width: int) -> None:
    """ValueError unless the pipeline can encode and the transformer patchify this size."""
    tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    _, ph, pw = (int(p) for p in transformer.config.patch_size)
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % tf:
        raise ValueError(f"--frames {frames}: this model needs 1 + {tf} * k frames (e.g. {1 + 4 * tf}, {1 + 8 * tf})")
    for name, value, unit in (("height", height, sf * ph), ("width", width, sf * pw)):
        if not isinstance(value, int) or value < unit or value % unit:
            raise ValueError(f"--{name} {value}: this model needs a multiple of {unit} pixels "
                             f"(VAE factor {sf} x patch {unit // sf})")


def _latent_stats(vae, device, dtype):
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_videos(pipe, videos: torch.Tensor) -> torch.Tensor:
    """Videos in [-1, 1] (B, 3, F, H, W) -> the latents the transformer sees (B, C, T, h, w),
    fp32: the VAE's mode, normalised with its ``latents_mean`` / ``latents_std`` exactly as
    ``WanPipeline`` undoes it before decoding."""
    vae = pipe.vae
    out = []
    for chunk in videos.split(ENCODE_CHUNK):
        raw = vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        mean, std = _latent_stats(vae, raw.device, torch.float32)
        out.append(((raw.float() - mean) / std).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ``prompt_embeds`` (B, L, D) on the CPU, in the encoder's dtype (the built-in
    model: its own encoder; Wan: ``pipe.encode_prompt`` with its text encoder).

    Raises:
        ValueError: a pipeline without a text encoder, or (built-in model) words outside its
            vocabulary.
    """
    if is_toy(pipe):
        from ..toy import pipeline as toy

        return toy.encode_prompt(pipe, list(prompts)).cpu()
    if getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder: train-lora encodes the captions with it once "
                         "(then caches them); use a pipeline folder that includes text_encoder/ and tokenizer/")
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                   device=pipe.text_encoder.device)
    return embeds.cpu()


def predict(model, noisy: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One transformer call (``model`` may be a DDP wrapper of it).

    Args:
        noisy: (B, C, T, h, w); timestep: (B,) in [0, num_train_timesteps]; embeds: (B, L, D).
    Returns:
        (B, C, T, h, w) in the transformer's output dtype.
    """
    return model(noisy, timestep, embeds, return_dict=False)[0]


@torch.no_grad()
def sample_video(pipe, *, prompt: str, embeds: Optional[torch.Tensor], negative: Optional[torch.Tensor],
                 frames: int, height: int, width: int, steps: int, guidance: float, seed: int) -> np.ndarray:
    """One video (F, H, W, 3) float32 in [0, 1] for validation.

    The built-in model samples the way ``sparsegen generate`` does (its own sampler); other
    pipelines are called with precomputed ``embeds`` / ``negative`` (B=1, L, D), so the
    text encoder need not stay loaded.
    """
    if is_toy(pipe):
        from ..toy import pipeline as toy

        return toy.generate(pipe, [prompt], seed=seed, num_frames=frames, height=height, width=width,
                            num_inference_steps=steps, guidance_scale=guidance)[0]
    dtype = pipe.transformer.dtype if pipe.transformer is not None else pipe.transformer_2.dtype
    device = pipe._execution_device
    kw = {}
    if guidance > 1.0 and negative is not None:
        kw["negative_prompt_embeds"] = negative.to(device=device, dtype=dtype)
    out = pipe(prompt_embeds=embeds.to(device=device, dtype=dtype), num_frames=frames, height=height, width=width,
               num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed), **kw)
    return np.asarray(out.frames[0], dtype=np.float32)
