"""Build and load the toy model as a real ``diffusers.WanPipeline``, fully offline.

Shipped files (``sparsegen/assets/toy_wan``)::

    transformer/      WanTransformer3DModel config + fp16 safetensors (EMA weights)
    prompt_encoder/   ToyPromptEncoder config + safetensors
    vae/config.json   PixelShuffleVideoCodec config (scale factors, latent statistics)
    scheduler/        UniPCMultistepScheduler config (flow matching, shift FLOW_SHIFT)
    noise_prior.json  share of the initial noise common to all latent frames (frame_correlated_noise)
    sampling.json     how ``generate`` samples this model by default (SAMPLERS)
    README.md         model card; loss_curve.png; training_summary.json

Example::

    >>> import sparsegen.toy as toy
    >>> pipe = toy.load_pipeline()
    >>> video = toy.generate(pipe, ["a red circle moving right over a striped background"], seed=0)
    >>> video.shape   # (B, F, H, W, 3), float32 in [0, 1]
    (1, 17, 32, 32, 3)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from .codec import PixelShuffleVideoCodec
from .data import DEFAULT_SIZE_PX
from .text import ToyPromptEncoder

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_wan"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024  # shipped transformer weights must stay below this

# Default generation settings (the training size; see the model card).
DEFAULT_NUM_FRAMES = 17  # 5 latent frames of 8 x 8 tokens = 320 video tokens
DEFAULT_HEIGHT = DEFAULT_SIZE_PX  # 32: the data generator's default frame size
DEFAULT_WIDTH = DEFAULT_SIZE_PX
DEFAULT_NUM_INFERENCE_STEPS = 20
# Measured on 48 prompts with noise seeds apart from the evaluation's (evals/RESULTS.md): at
# 2.0 the shipped model follows direction and background more often than at 1.0 or 4.0
# (4.0 oversaturates its objects into fragments); colour is followed at all three.
DEFAULT_GUIDANCE_SCALE = 2.0
FLOW_SHIFT = 3.0  # sigma shift used both to sample training noise levels and at inference
# What the transformer's output means, in diffusers' scheduler terms: "sample" = the clean
# latents x0 (the shipped model), "flow_prediction" = the velocity noise - x0. A token
# carries 192 pixel values, as many as the model width; predicting the clean video
# (which lies near a low-dimensional set) trains far better there than predicting the
# velocity, which contains the full-rank noise.
PREDICTION_TYPES = ("sample", "flow_prediction")
DEFAULT_PREDICTION_TYPE = "sample"

# This model's preset of each method: options that suit its 320-token grid (5 x 8 x 8);
# the methods' own defaults assume real models' 128-token blocks, which would leave 3
# query blocks here. The first 5 of 20 steps run dense, as published presets keep the
# first quarter or so of the steps dense. `sparsegen generate` starts from them; an
# option the user gives overrides that field only.
# VMoBA partitions of the 5 x 8 x 8 grid (1D: one latent frame; 2D: 2 x 4 tokens over
# all frames; 3D: 1 x 4 x 4) with 16-token kernel blocks.
VMOBA_BLOCKS = dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16)
PRESETS: dict[str, dict] = {
    "radial": dict(block_size=64, dense_steps=5),
    "gna": dict(kernel_size=(3, 5, 5), block_size=16, dense_steps=5),
    "vmoba": dict(VMOBA_BLOCKS, top_k=(2, 3, 8), dense_steps=5),
}
# Named presets of this model (``sparsegen generate --method M --preset NAME``), beside the
# methods' own. "long": for videos several times the 17 frames the model was trained on,
# each latent frame attends whole frames within one frame of it (a 3 x 8 x 8 window, one
# 64-token block per frame: no partial blocks), every layer sparse, 1 dense warm-up
# step per stage; local attention is what keeps the cost linear in the length
# (README "Quickstart": 129 frames).
NAMED_PRESETS: dict[str, dict[str, dict]] = {
    "gna": {"long": dict(kernel_size=(3, 8, 8), tile=(1, 8, 8), block_size=64, dense_steps=1, dense_layers=0)},
}

SPATIAL_FACTOR = 4  # codec: 4 x 4 pixels per latent cell
TEMPORAL_FACTOR = 4  # codec: 4 frames per latent frame (after the first)
TEXT_DIM = 64

# diffusers' own Wan transformer at small size. Token grid at the default size:
# 5 latent frames x 8 x 8 = 320 tokens; head_dim 32 splits into rotary dims
# t = 12, h = 10, w = 10. Patch size 1: each token carries one codec cell
# (3 x 4 x 4 x 4 = 192 values), no more than the model width (6 x 32 = 192), so the
# output layer can express any velocity. (A 2 x 2 patch would give 768 values per
# token through a 192-wide model: most of the target would be unreachable.)
TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=3 * TEMPORAL_FACTOR * SPATIAL_FACTOR**2,
    out_channels=3 * TEMPORAL_FACTOR * SPATIAL_FACTOR**2,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=576,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
PROMPT_ENCODER_CONFIG: dict = dict(text_dim=TEXT_DIM, num_heads=2)


def check_prediction_type(prediction_type: str) -> None:
    """Raise ValueError unless ``prediction_type`` is one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


def make_scheduler(prediction_type: str = DEFAULT_PREDICTION_TYPE) -> UniPCMultistepScheduler:
    """The flow-matching UniPC solver Wan ships with, at this model's shift, reading the
    transformer output as ``prediction_type`` (see PREDICTION_TYPES)."""
    check_prediction_type(prediction_type)
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def clean_latents(model_output: torch.Tensor, noisy: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """The clean latents x0 a transformer output stands for.

    Args:
        model_output, noisy: (B, C, T, H, W); ``noisy = (1 - sigma) x0 + sigma noise``.
        sigma: float, (B,) noise levels, or (B, T) levels per latent frame.
        prediction_type: what ``model_output`` is (PREDICTION_TYPES).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    s = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device)
    return noisy - broadcast_levels(s if s.ndim == 2 else s.reshape(-1)) * model_output


def broadcast_levels(sigma: torch.Tensor) -> torch.Tensor:
    """(B,) levels per video -> (B, 1, 1, 1, 1); (B, T) levels per latent frame -> (B, 1, T, 1, 1),
    to scale latents (B, C, T, H, W)."""
    return sigma[:, None, :, None, None] if sigma.ndim == 2 else sigma.view(-1, 1, 1, 1, 1)


def transformer_timestep(sigma: torch.Tensor, latent_grid: tuple[int, int, int]) -> torch.Tensor:
    """The transformer's timestep for (B,) levels per video, ``1000 * sigma``, or for (B, T)
    levels per latent frame, one per token (``token_timesteps``)."""
    return 1000.0 * sigma if sigma.ndim == 1 else token_timesteps(sigma, latent_grid)


def token_timesteps(sigma: torch.Tensor, latent_grid: tuple[int, int, int]) -> torch.Tensor:
    """The transformer's timestep input for per-frame levels.

    Args:
        sigma: (B, T) levels per latent frame; latent_grid: (T, H, W) tokens (patch size 1).
    Returns:
        (B, T * H * W) timesteps ``1000 * sigma`` in the transformer's token order
        (frame-major: token ``t * H * W + h * W + w``).
    """
    frames, height, width = latent_grid
    if sigma.ndim != 2 or sigma.shape[1] != frames:
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} must be (batch, {frames}) for {frames} latent frames")
    return (sigma * 1000.0).repeat_interleave(height * width, dim=1)


# Share of the initial noise's variance that all latent frames of a video have in common
# (the rest is drawn per frame; each element stays standard normal). The shipped model
# trained with independent frames (0). Written to the asset directory (NOISE_PRIOR_FILE)
# with the model it was trained with, so generation draws the same kind of noise. A
# shared part (0.5) was tried to make objects emerge at one place in every frame and
# leave their motion to the prompt; it did not (evals/RESULTS.md).
DEFAULT_FRAME_NOISE_CORRELATION = 0.0
NOISE_PRIOR_FILE = "noise_prior.json"


def check_frame_noise_correlation(correlation: float) -> None:
    """Raise ValueError unless ``correlation`` is a share of variance in [0, 1)."""
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not 0.0 <= correlation < 1.0:
        raise ValueError(f"frame_noise_correlation={correlation!r} must be a number in [0, 1) "
                         "(the share of noise variance the latent frames of a video have in common)")


def frame_correlated_noise(shape, generator: torch.Generator | None = None, correlation: float = 0.0) -> torch.Tensor:
    """Standard normal noise of ``shape`` (..., C, T, H, W) whose T latent frames share
    ``correlation`` of their variance: ``sqrt(c) * shared + sqrt(1 - c) * own``, where
    ``shared`` (..., C, 1, H, W) is one draw for all frames. ``correlation=0`` is plain
    ``torch.randn(shape)`` (same numbers for the same generator state)."""
    check_frame_noise_correlation(correlation)
    noise = torch.randn(tuple(shape), generator=generator)
    if correlation > 0.0:
        shared = torch.randn((*shape[:-3], 1, *shape[-2:]), generator=generator)
        noise = correlation**0.5 * shared + (1.0 - correlation) ** 0.5 * noise
    return noise


def load_frame_noise_correlation(path=None) -> float:
    """The noise prior a model in ``path`` was trained with (0 for models exported
    before the prior existed, which trained on independent frames)."""
    file = _asset_dir(path) / NOISE_PRIOR_FILE
    if not file.is_file():
        return 0.0
    try:
        correlation = json.loads(file.read_text())["frame_noise_correlation"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{file} must be JSON like {{\"frame_noise_correlation\": 0.0}} (the noise prior the "
                         "model was trained with); re-export the model or fix the file") from None
    check_frame_noise_correlation(correlation)
    return float(correlation)


# How ``generate`` samples: "joint" = all latent frames together, as WanPipeline does;
# "first-frame" = a video as WanPipeline makes it, then its later latent frames again as a
# continuation of its first one (generate_from_first_frame). A model's asset directory names
# its default in SAMPLING_FILE (models trained to continue a first frame: "first-frame");
# without the file, "joint".
SAMPLERS = ("joint", "first-frame")
SAMPLING_FILE = "sampling.json"
SAMPLER_WORDS = {"joint": "all latent frames sampled together, as `WanPipeline` does",
                 "first-frame": "sampled in two stages: a video as `WanPipeline` makes it, then its later latent "
                                "frames again as a continuation of its first one (`toy.generate_from_first_frame`)"}


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {list(SAMPLERS)}")


def load_default_sampler(path=None) -> str:
    """The sampler a model in ``path`` is meant for ("joint" when it names none)."""
    file = _asset_dir(path) / SAMPLING_FILE
    if not file.is_file():
        return "joint"
    try:
        sampler = json.loads(file.read_text())["sampler"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{file} must be JSON like {{\"sampler\": \"joint\"}} (one of {list(SAMPLERS)}); "
                         "re-export the model or fix the file") from None
    check_sampler(sampler)
    return sampler


def new_transformer(seed: int = 0) -> WanTransformer3DModel:
    """Untrained transformer with the shipped architecture (diffusers' default init)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def new_prompt_encoder(seed: int = 0) -> ToyPromptEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ToyPromptEncoder(**PROMPT_ENCODER_CONFIG)


def _asset_dir(path) -> Path:
    path = ASSET_DIR if path is None else Path(path)
    if not (path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy model at {str(path)!r} (expected transformer/config.json there); "
            "train one with `python evals/train_toy.py` or pass the directory that holds it"
        )
    return path


def load_transformer(path=None, *, device="cpu", dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """The trained WanTransformer3DModel from ``path`` (default: the shipped assets)."""
    model = WanTransformer3DModel.from_pretrained(_asset_dir(path) / "transformer", torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def load_prompt_encoder(path=None, *, device="cpu") -> ToyPromptEncoder:
    model = ToyPromptEncoder.from_pretrained(_asset_dir(path) / "prompt_encoder", local_files_only=True)
    return model.to(device).eval()


def load_codec(path=None) -> PixelShuffleVideoCodec:
    config = json.loads((_asset_dir(path) / "vae" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return PixelShuffleVideoCodec(**config).eval()


def build_pipeline(transformer, codec, prompt_encoder=None, scheduler=None, frame_noise_correlation: float = 0.0,
                   sampler: str = "joint") -> WanPipeline:
    """Assemble a WanPipeline from parts (no text encoder: prompts go through
    ``encode_prompt``). The prompt encoder rides along as ``pipe.toy_prompt_encoder``, the
    model's noise prior (see ``frame_correlated_noise``) as ``pipe.toy_frame_noise_correlation``
    and its default sampler (SAMPLERS) as ``pipe.toy_sampler``."""
    check_frame_noise_correlation(frame_noise_correlation)
    check_sampler(sampler)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=codec, scheduler=scheduler or make_scheduler(), transformer=transformer
    )
    pipe.toy_prompt_encoder = prompt_encoder
    pipe.toy_frame_noise_correlation = float(frame_noise_correlation)
    pipe.toy_sampler = sampler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(device="cpu", dtype: torch.dtype = torch.float32, path=None) -> WanPipeline:
    """The shipped toy model as a ``diffusers.WanPipeline``, built offline.

    Args:
        device: where the transformer and codec run.
        dtype: transformer dtype (weights are stored in fp16 and cast).
        path: an asset directory laid out like ``sparsegen/assets/toy_wan``; default
            the shipped one.

    Raises:
        FileNotFoundError: if ``path`` holds no toy model.
    """
    path = _asset_dir(path)
    transformer = load_transformer(path, device=device, dtype=dtype)
    codec = load_codec(path).to(device)
    scheduler = UniPCMultistepScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    return build_pipeline(transformer, codec, load_prompt_encoder(path), scheduler, load_frame_noise_correlation(path),
                          load_default_sampler(path))


def encode_prompt(pipe_or_none, prompts: list[str]) -> torch.Tensor:
    """Prompts of the toy grammar -> ``prompt_embeds`` (B, MAX_PROMPT_TOKENS, TEXT_DIM).

    Uses ``pipe.toy_prompt_encoder`` when a pipeline from ``load_pipeline`` is given
    (and returns embeddings on its transformer's device and dtype), else the shipped
    encoder on CPU in float32. The empty prompt "" is the unconditional input (pass it
    as ``negative_prompt_embeds``).

    Raises:
        TypeError: if ``prompts`` is not a list of str.
        ValueError: if a prompt uses words outside the toy vocabulary.
    """
    encoder = getattr(pipe_or_none, "toy_prompt_encoder", None) if pipe_or_none is not None else None
    if encoder is None:
        if pipe_or_none is not None and not isinstance(pipe_or_none, WanPipeline):
            raise TypeError(f"pipe_or_none must be a WanPipeline from load_pipeline or None, got {type(pipe_or_none).__name__}")
        encoder = load_prompt_encoder()
    with torch.no_grad():
        embeds = encoder.encode(list(prompts) if isinstance(prompts, tuple) else prompts)
    if pipe_or_none is not None and getattr(pipe_or_none, "transformer", None) is not None:
        embeds = embeds.to(device=pipe_or_none.transformer.device, dtype=pipe_or_none.transformer.dtype)
    return embeds


def generate(
    pipe: WanPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    num_frames: int = DEFAULT_NUM_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    sampler: str | None = None,
    **pipe_kwargs,
) -> np.ndarray:
    """Run ``pipe`` on toy prompts; returns frames (B, F, H, W, 3) float32 in [0, 1].

    The noise of prompt ``i`` comes from ``torch.Generator().manual_seed(seed + i)``, so
    a prompt's video does not depend on the other prompts in the batch; it follows the
    model's noise prior (``pipe.toy_frame_noise_correlation``, see ``frame_correlated_noise``).
    ``sampler`` (SAMPLERS) defaults to the model's own (``pipe.toy_sampler``); with
    "first-frame" (``generate_from_first_frame``) the only pipeline option passed on is
    ``callback_on_step_end``, called after every step of both stages.
    """
    sampler = getattr(pipe, "toy_sampler", "joint") if sampler is None else sampler
    check_sampler(sampler)
    two_stage = sampler == "first-frame"
    if two_stage:
        unsupported = sorted(set(pipe_kwargs) - {"callback_on_step_end"})
        if unsupported:
            raise TypeError(f"two-stage sampling (sampler='first-frame') takes no pipeline options {unsupported}; "
                            "pass sampler='joint' to use them")
    embeds, negative = _guided_prompt_embeds(pipe, prompts, guidance_scale)
    size = dict(num_frames=num_frames, height=height, width=width)
    noise = initial_noise(pipe, len(prompts), seed=seed, **size)
    out = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=noise,
        output_type="latent" if two_stage else "np",
        **size,
        **pipe_kwargs,
    )
    if not two_stage:
        return np.asarray(out.frames, dtype=np.float32)
    return _continue_first_frame(pipe, out.frames[:, :, :1], noise, embeds, negative, num_inference_steps,
                                 guidance_scale, pipe_kwargs.get("callback_on_step_end"))


def _guided_prompt_embeds(pipe: WanPipeline, prompts: list[str], guidance_scale: float):
    """(prompt_embeds, negative_prompt_embeds or None without guidance) for a list of prompts."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str; wrap a single prompt in a list")
    negative = encode_prompt(pipe, [""] * len(prompts)) if guidance_scale > 1.0 else None
    return encode_prompt(pipe, prompts), negative


def initial_noise(pipe: WanPipeline, count: int, *, seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Initial latents (count, C, T, H/s, W/s) on the transformer's device; video ``i`` from
    ``torch.Generator().manual_seed(seed + i)`` following the model's noise prior."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    # Drawn on CPU so a seed gives the same video on every device.
    shape = (
        pipe.transformer.config.in_channels,
        (num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
        height // pipe.vae_scale_factor_spatial,
        width // pipe.vae_scale_factor_spatial,
    )
    correlation = getattr(pipe, "toy_frame_noise_correlation", 0.0)
    return torch.stack([frame_correlated_noise(shape, g, correlation) for g in generators]).to(pipe.transformer.device)


def generate_from_first_frame(pipe: WanPipeline, prompts: list[str], **options) -> np.ndarray:
    """Two-stage sampling: a video as ``generate(sampler="joint")`` makes it, then its
    later latent frames sampled again as a continuation of its first one; the same as
    ``generate(..., sampler="first-frame")``, with ``generate``'s options.

    The second stage is image-to-video sampling as in Wan 2.2 TI2V: latent frame 0 is held
    at the first stage's clean result with timestep 0 for its tokens, the other frames
    start from the same initial noise and are denoised with the scheduler, one timestep
    per token. Meant for models trained with ``first_frame_probability`` > 0 (the model
    card says so); others never saw a clean frame next to noisy ones.
    ``callback_on_step_end(pipe, step, timestep, {})`` is called after every step of both
    stages (in the second its return value is not used).

    Returns:
        frames (B, F, H, W, 3) float32 in [0, 1], like ``generate``.
    """
    return generate(pipe, prompts, sampler="first-frame", **options)


@torch.no_grad()
def _continue_first_frame(pipe, first, noise, embeds, negative, num_inference_steps, guidance_scale, callback):
    """The second stage: latents (B, C, T, h, w) whose frame 0 is ``first`` (B, C, 1, h, w),
    the later frames denoised from ``noise``; returns decoded frames (B, F, H, W, 3)."""
    frame_levels = torch.ones(noise.shape[2], device=noise.device)
    frame_levels[0] = 0.0  # the first frame is given clean

    def condition(latents):
        return torch.cat([first, latents[:, :, 1:]], dim=2)

    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise
    for step, t in enumerate(scheduler.timesteps):
        model_input = condition(latents).to(pipe.transformer.dtype)
        timestep = token_timesteps((frame_levels * t / 1000.0).expand(noise.shape[0], -1), tuple(noise.shape[2:]))
        prediction = pipe.transformer(model_input, timestep, embeds, return_dict=False)[0]
        if negative is not None:
            unconditional = pipe.transformer(model_input, timestep, negative, return_dict=False)[0]
            prediction = unconditional + guidance_scale * (prediction - unconditional)
        latents = scheduler.step(prediction.float(), t, latents, return_dict=False)[0]
        if callback is not None:
            callback(pipe, step, t, {})
    video = pipe.vae.decode(pipe.vae.denormalize(condition(latents).float()), return_dict=False)[0]
    return ((video.clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 4, 1).cpu().numpy().astype(np.float32)
