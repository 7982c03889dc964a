"""Make a video with a sparse-attention method, optionally against dense (the library
behind ``sparsegen generate``; its command line is :mod:`sparsegen.cli.generate`).

    >>> summary = generate_video(method="radial", options={"dense_steps": 2}, compare_dense=True, out="demo.mp4")
"""

from __future__ import annotations

import inspect
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["generate_video", "method_config", "psnr", "write_video", "DEFAULT_MODEL", "DEFAULT_METHOD"]

DEFAULT_MODEL = "toy"
DEFAULT_METHOD = "radial"


def method_config(method: str, *, preset: Optional[str] = None, options: Optional[dict] = None,
                  model_presets: Optional[dict] = None, model_named_presets: Optional[dict] = None, log=print):
    """The config of ``method``: a named preset (the model's own of that name in
    ``model_named_presets``, else the method's), or the model's own preset for the method
    (from ``model_presets``), with each field the user gave in ``options`` overriding that
    field only. Says what it combined through ``log``.

    Raises:
        ValueError: unknown method, preset or option, or an invalid value (the message
            names the field).
    """
    from .methods import config_class

    cfg_cls = config_class(method)
    options = dict(options or {})
    named = (model_named_presets or {}).get(method, {})
    if preset is not None and preset in named:
        base, source = dict(named[preset]), f"the built-in model's preset {preset!r}"
    elif preset is not None:
        base, source = dict(cfg_cls.presets.get(preset, {})), f"preset {preset!r}"
        if preset not in cfg_cls.presets:
            raise ValueError(f"method {method!r} has no preset {preset!r}; presets: "
                             f"{sorted(set(cfg_cls.presets) | set(named))}")
    elif model_presets and method in model_presets:
        base, source = dict(model_presets[method]), "the built-in model's preset"
    else:
        base, source = {}, ""
    cfg = cfg_cls.from_dict({"method": method, **base, **options})
    if source:
        kept = {k: v for k, v in base.items() if k not in options}
        words = ", ".join(f"{k}={v}" for k, v in kept.items()) or "nothing (every field overridden)"
        mine = (" and your " + ", ".join(f"{k}={v}" for k, v in options.items())) if options else ""
        log(f"[sparsegen] {method}: {source} ({words}){mine}")
    return cfg


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two videos with values in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def write_image(image: np.ndarray, path: str) -> str:
    """Write one (H, W, 3) float image in [0, 1] (or uint8) to a PNG."""
    from PIL import Image

    arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_output(frames: np.ndarray, path: str, fps: int, *, image: bool) -> str:
    """A PNG for an image pipeline's (1, H, W, 3) output (``path``'s extension becomes .png),
    else an mp4 of the (F, H, W, 3) frames. Returns the path written."""
    if image:
        root, ext = os.path.splitext(path)
        return write_image(frames[0], path if ext.lower() == ".png" else root + ".png")
    return write_video(frames, path, fps)


def write_video(frames: np.ndarray, path: str, fps: int) -> str:
    """Write (F, H, W, 3) floats in [0, 1] (or uint8) to an mp4 with imageio/ffmpeg."""
    import imageio.v2 as imageio

    arr = frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # libx264 with yuv420p needs even sizes; pad by edge replication instead of resizing.
    ph, pw = arr.shape[1] % 2, arr.shape[2] % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    imageio.mimwrite(path, list(arr), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                     ffmpeg_log_level="error")
    return path


TOY_EXAMPLE_PROMPT = "two red circles moving right over a striped background"


class _Model:
    """A loaded pipeline plus how to call it (the built-in model takes prompt embeddings)."""

    def __init__(self, name: str, device: str, dtype: torch.dtype):
        self.name = name
        if name == "toy":
            from .toy import pipeline as toy

            self.pipe = toy.load_pipeline(device=device, dtype=dtype)
            self.defaults = {"prompt": TOY_EXAMPLE_PROMPT, "frames": toy.DEFAULT_NUM_FRAMES,
                             "height": toy.DEFAULT_HEIGHT, "width": toy.DEFAULT_WIDTH,
                             "steps": toy.DEFAULT_NUM_INFERENCE_STEPS, "guidance": toy.DEFAULT_GUIDANCE_SCALE,
                             "fps": 8}
            self.makes_images = False
            self.presets = toy.PRESETS
            self.named_presets = toy.NAMED_PRESETS
            self._toy = toy
            self.steps_note = (" in each of two stages (a video, then its later frames again continuing its first)"
                               if self.pipe.toy_sampler == "first-frame" else "")
        else:
            from diffusers import DiffusionPipeline

            if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") == "1":
                raise SystemExit(f"sparsegen generate: --model {name!r} is not a local folder and the hub is offline")
            self.pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype).to(device)
            # Image pipelines (Stable Diffusion, SDXL, FLUX) take no frame count and write a PNG.
            self.makes_images = "num_frames" not in inspect.signature(type(self.pipe).__call__).parameters
            if self.makes_images:
                self.defaults = {"prompt": "a cat sitting in tall grass, photograph", "frames": 1, "height": None,
                                 "width": None, "steps": 30, "guidance": 5.0, "fps": 1}
            else:
                self.defaults = {"prompt": "a cat walking through tall grass, cinematic", "frames": 33, "height": 480,
                                 "width": 832, "steps": 30, "guidance": 5.0, "fps": 16}
            self.presets = self.named_presets = {}
            self._toy = None
            self.steps_note = ""
        self.pipe.set_progress_bar_config(disable=False, leave=False)
        self.device = device

    def __call__(self, *, prompt, negative_prompt, frames, height, width, steps, guidance, seed, callback):
        if self._toy is not None:
            if negative_prompt:
                raise SystemExit("sparsegen generate: the built-in model has no negative prompts (its unconditional "
                                 "input is the empty prompt); drop --negative-prompt")
            try:
                video = self._toy.generate(self.pipe, [prompt], seed=seed, num_frames=frames, height=height,
                                           width=width, num_inference_steps=steps, guidance_scale=guidance,
                                           callback_on_step_end=callback)
            except ValueError as e:
                raise SystemExit(f"sparsegen generate: {e}") from None
            return video[0]
        kw = dict(prompt=prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(seed),
                  output_type="np", callback_on_step_end=callback)
        if self.makes_images:
            if frames not in (None, 1):
                raise SystemExit(f"sparsegen generate: {type(self.pipe).__name__} makes images; drop --frames")
            kw = {k: v for k, v in kw.items() if k != "num_frames" and v is not None}
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
        out = self.pipe(**kw)
        if self.makes_images:
            return np.asarray(out.images[0], dtype=np.float32)[None]  # (1, H, W, 3)
        frames_out = out.frames[0] if hasattr(out, "frames") else out[0][0]
        return np.asarray(frames_out, dtype=np.float32)


def _torch_dtype(dtype: Optional[str], device: str) -> torch.dtype:
    """The named dtype, or bfloat16 on CUDA and float32 elsewhere."""
    return getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def _timed_run(model: _Model, settings: dict, handle=None) -> tuple[np.ndarray, list[float], float, list]:
    """(frames, seconds of each denoising step, total seconds, attention density of each
    step or None). Steps are counted as the pipeline calls back, so a sampler that runs
    the denoising loop twice (the built-in model's two stages) reports both."""
    marks: list[float] = []
    densities: list[Optional[float]] = []

    def callback(pipe, i, t, kwargs):
        marks.append(time.perf_counter())
        # The step just finished is the handle's latest (its counter restarts with each loop).
        stats = handle.step_densities() if handle is not None else []
        densities.append(stats[-1][1] if stats else None)
        return {}

    t0 = time.perf_counter()
    frames = model(callback=callback, **settings)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return frames, steps, total, densities


def generate_video(
    *,
    model: str = DEFAULT_MODEL,
    method: str = DEFAULT_METHOD,
    options: Optional[dict] = None,
    preset: Optional[str] = None,
    config=None,
    prompt: Optional[str] = None,
    negative_prompt: Optional[str] = None,
    frames: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: Optional[str] = None,
    out: Optional[str] = "video.mp4",
    fps: Optional[int] = None,
    compare_dense: bool = False,
    repeats: int = 1,
    lora: Optional[str] = None,
    log=print,
) -> dict:
    """Generate one video with a method (and optionally dense) and return a summary dict.

    The method's config is ``config`` when given; otherwise :func:`method_config` of
    ``method``, ``preset`` and ``options`` (the built-in model brings a preset of its own
    for each method, which ``options`` override field by field).

    With ``lora`` (a folder written by ``sparsegen train-lora``) the LoRA is loaded into
    the pipeline (for the dense run too), the size defaults to the one it was trained
    at, and the method config is its recipe's (``options`` override single fields).

    The summary holds the settings, per-step seconds and attention density, total
    seconds, and with ``compare_dense`` the dense time, the speedup and the PSNR of the
    sparse video against the dense one.

    With ``repeats`` > 1 the runs alternate (dense, sparse, dense, sparse, ... with
    ``compare_dense``), so a change in the machine's load hits both alike; the times
    reported are the medians (``*_seconds_runs`` list every run) and the speedup is the
    ratio of the medians. Every run makes the same video (same seed).
    """
    if not (isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    import sparsegen

    torch_dtype = _torch_dtype(dtype, device)
    m = _Model(model, device, torch_dtype)
    d = m.defaults
    recipe = None
    if lora is not None:
        from .lora.recipe import Recipe

        recipe = Recipe.load(lora)
        recipe.load_lora(m.pipe, lora)
        d = {**d, "frames": recipe.frames, "height": recipe.height, "width": recipe.width}
        log(f"[sparsegen] LoRA {lora}: trained on {recipe.frames} frames {recipe.height}x{recipe.width} with "
            f"{recipe.trained_attention} attention ({recipe.method['method']})")
    settings = dict(
        prompt=prompt if prompt is not None else d["prompt"], negative_prompt=negative_prompt,
        frames=frames or d["frames"], height=height or d["height"], width=width or d["width"],
        steps=steps or d["steps"], guidance=guidance if guidance is not None else d["guidance"], seed=seed,
    )
    fps = fps or d.get("fps", 8)
    if config is not None:
        if options or preset:
            raise ValueError("pass either a config or a method with a preset and options, not both")
        cfg = config
    elif recipe is not None:
        if preset or (options and method != recipe.method["method"]):
            raise ValueError(f"the LoRA's recipe sets the method ({recipe.method['method']}); drop --preset, and pass "
                             f"only {recipe.method['method']}'s options to override its fields")
        cfg = recipe.config(**(options or {}))
    else:
        cfg = method_config(method, preset=preset, options=options, model_presets=m.presets,
                            model_named_presets=m.named_presets, log=log)
    summary = {"model": model, "method": cfg.to_dict(), "settings": settings, "device": device,
               "dtype": str(torch_dtype).replace("torch.", ""), "lora": lora}

    dense_frames = None
    dense_runs: list[float] = []
    sparse_runs: list[float] = []
    for r in range(repeats):
        which = f" (run {r + 1} of {repeats})" if repeats > 1 else ""
        if compare_dense:
            log(f"[sparsegen] dense run{which}: {settings['frames']} frames {settings['height']}x{settings['width']}, "
                f"{settings['steps']} steps{m.steps_note}")
            dense_frames, steps_r, total_r, _ = _timed_run(m, settings)
            dense_runs.append(total_r)
            if r == 0 or total_r <= min(dense_runs):
                summary["dense_step_seconds"] = steps_r
        log(f"[sparsegen] {cfg.method} run{which}: {settings['frames']} frames "
            f"{settings['height']}x{settings['width']}, {settings['steps']} steps{m.steps_note}")
        handle = sparsegen.apply(m.pipe, cfg)
        try:
            sparse_frames, steps_r, total_r, density_r = _timed_run(m, settings, handle)
        finally:
            handle.remove()
        sparse_runs.append(total_r)
        if r == 0 or total_r <= min(sparse_runs):
            sparse_steps, step_density = steps_r, density_r
    sparse_total = float(np.median(sparse_runs))
    summary["seconds_runs"] = sparse_runs
    if compare_dense:
        summary["dense_seconds"] = float(np.median(dense_runs))
        summary["dense_seconds_runs"] = dense_runs
    summary["seconds"] = sparse_total
    summary["step_seconds"] = sparse_steps
    summary["step_density"] = step_density
    for i, (sec, den) in enumerate(zip(sparse_steps, summary["step_density"])):  # the fastest run's steps
        dtxt = "n/a" if den is None else f"{den:.3f}"
        log(f"  step {i:3d}: {sec * 1000:8.1f} ms   attention density {dtxt}")
    log(f"[sparsegen] total {sparse_total:.2f} s")
    if out:
        out = write_output(sparse_frames, out, fps, image=m.makes_images)
        summary["out"] = out
        log(f"[sparsegen] wrote {out}")
    if dense_frames is not None:
        summary["speedup"] = summary["dense_seconds"] / sparse_total
        summary["psnr_vs_dense"] = psnr(sparse_frames, dense_frames)
        med = " (medians of alternating runs: dense " + ", ".join(f"{t:.2f}" for t in dense_runs) + f"; {cfg.method} " \
            + ", ".join(f"{t:.2f}" for t in sparse_runs) + ")" if repeats > 1 else ""
        log(f"[sparsegen] dense {summary['dense_seconds']:.2f} s, {cfg.method} {sparse_total:.2f} s{med}: "
            f"speedup {summary['speedup']:.2f}x, PSNR vs dense {summary['psnr_vs_dense']:.2f} dB")
        if out:
            root, ext = os.path.splitext(out)
            side = np.concatenate([dense_frames, sparse_frames], axis=2)
            summary["side_by_side"] = write_output(side, f"{root}_vs_dense{ext or '.mp4'}", fps,
                                                   image=m.makes_images)
            log(f"[sparsegen] wrote {summary['side_by_side']} (left: dense, right: {cfg.method})")
    return summary


def calibrate_model(
    *,
    model: str = DEFAULT_MODEL,
    prompts: Optional[Sequence[str]] = None,
    out: str,
    density: float = 0.5,
    frames: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: Optional[str] = None,
    log=print,
    **calibration,
):
    """Calibrate a PARO plan on ``model`` (``"toy"`` or a pipeline folder / hub id) and save it.

    Each prompt is generated (dense) with the model's defaults for the sizes not given;
    ``calibration`` goes to :func:`sparsegen.calibration.calibrate_paro` (``block_size``,
    ``order_weight``, ``reorder``, ``first_half_buckets``, ``sample_query_blocks``).

    Returns:
        the saved :class:`~sparsegen.methods.paro.ParoPlan`.
    """
    from .calibration import calibrate_paro

    torch_dtype = _torch_dtype(dtype, device)
    m = _Model(model, device, torch_dtype)
    d = m.defaults
    prompts = list(prompts) if prompts else [d["prompt"]]
    settings = dict(negative_prompt=None, frames=frames or d["frames"], height=height or d["height"],
                    width=width or d["width"], steps=steps or d["steps"],
                    guidance=guidance if guidance is not None else d["guidance"], seed=seed, callback=None)

    def run():
        for p in prompts:
            m(prompt=p, **settings)

    log(f"[sparsegen] calibrating PARO on {model}: {len(prompts)} prompt(s), {settings['frames']} frames "
        f"{settings['height']}x{settings['width']}, {settings['steps']} steps, density {density} (two dense runs)")
    t0 = time.perf_counter()
    plan = calibrate_paro(m.pipe, run, density=density, prompts=prompts, **calibration)
    plan.save(out)
    counts = {}
    for row in plan.orders:
        for o in row:
            counts[o] = counts.get(o, 0) + 1
    log(f"[sparsegen] plan for {plan.describe_geometry()}, block {plan.block_size}, "
        f"{len(plan.buckets)} step buckets, densities {[round(x, 3) for x in plan.bucket_densities()]}")
    log(f"[sparsegen] orders (heads): {dict(sorted(counts.items(), key=lambda kv: -kv[1]))}")
    log(f"[sparsegen] wrote {out} in {time.perf_counter() - t0:.1f} s; use it with "
        f"`sparsegen generate --model {model} --method paro --plan {out}`")
    return plan
