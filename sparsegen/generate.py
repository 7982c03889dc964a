"""``sparsegen generate``: make a video with a sparse-attention method, optionally against dense.

    sparsegen generate                                   # the built-in small model, offline
    sparsegen generate --method radial --decay-factor 0.5 --dense-steps 2 --compare-dense
    sparsegen generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 81 --height 480 --width 832

Any option of the chosen method's config is accepted as ``--option-name VALUE``
(``sparsegen generate --method radial --help-method`` lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from typing import Optional

import numpy as np
import torch

__all__ = ["add_cli", "main", "generate_video", "psnr", "write_video"]

DEFAULT_MODEL = "toy"


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a video with sparse attention (default: built-in model)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run_cli)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'toy' (built-in small model, offline), a local pipeline folder or a hub id")
    p.add_argument("--method", default="radial", help="sparse method (sparsegen.available_methods()) or 'dense'")
    p.add_argument("--config", default=None, help="method config as JSON (a file path or a JSON string)")
    p.add_argument("--prompt", default=None, help="text prompt (default: the model's example prompt)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the model's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="video.mp4", help="output mp4 path")
    p.add_argument("--compare-dense", action="store_true",
                   help="also run dense attention: report speedup and PSNR, write a side-by-side video")
    p.add_argument("--json", default=None, help="write a JSON summary to this path")
    p.add_argument("--help-method", action="store_true", help="list the chosen method's options and exit")


def _field_type(cfg_cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cfg_cls)
    return hints.get(f.name, str)


def _convert(value: str, typ, name: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name.replace('_', '-')} expects true/false, got {value!r}")
    if typ is int:
        return int(value)
    if typ is float:
        return float(value)
    if origin is typing.Union or (origin is not None and type(None) in args) or args:
        # Union[int, tuple[int, ...]] etc.: try int, then comma list, then float, then string.
        if "," in value:
            return tuple(int(x) for x in value.split(",") if x.strip())
        for conv in (int, float):
            try:
                return conv(value)
            except ValueError:
                pass
        return value
    if isinstance(typ, type) and issubclass(typ, str):
        return typ(value)
    return value


def method_options_from_argv(method: str, extra: list[str]) -> dict:
    """Turn ``--decay-factor 0.5 --dense-steps 2`` into config keyword arguments."""
    from .methods import get_method

    cfg_cls, _ = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls) if f.name != "version"}
    opts, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}")
        name = tok[2:]
        value = None
        if "=" in name:
            name, value = name.split("=", 1)
        key = name.replace("-", "_")
        if key not in fields:
            valid = ", ".join("--" + n.replace("_", "-") for n in sorted(fields))
            raise ValueError(f"method '{method}' has no option --{name}; its options are: {valid}")
        typ = _field_type(cfg_cls, fields[key])
        if value is None:
            if typ is bool and (i + 1 >= len(extra) or extra[i + 1].startswith("--")):
                value = "true"
            else:
                if i + 1 >= len(extra):
                    raise ValueError(f"--{name} needs a value")
                value = extra[i + 1]
                i += 1
        opts[key] = _convert(value, typ, key)
        i += 1
    return opts


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two videos with values in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


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
            self.method_options = toy.RECOMMENDED_METHOD_OPTIONS
            self._toy = toy
            self.steps_note = (" in each of two stages (a video, then its later frames again continuing its first)"
                               if self.pipe.toy_sampler == "first-frame" else "")
        else:
            from diffusers import DiffusionPipeline

            if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") == "1":
                raise SystemExit(f"sparsegen generate: --model {name!r} is not a local folder and the hub is offline")
            self.pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype).to(device)
            self.defaults = {"prompt": "a cat walking through tall grass, cinematic", "frames": 33, "height": 480,
                             "width": 832, "steps": 30, "guidance": 5.0, "fps": 16}
            self.method_options = {}
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
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
        out = self.pipe(**kw)
        frames_out = out.frames[0] if hasattr(out, "frames") else out[0][0]
        return np.asarray(frames_out, dtype=np.float32)


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
    method: str = "radial",
    options: Optional[dict] = None,
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
    log=print,
) -> dict:
    """Generate one video with a method (and optionally dense) and return a summary dict.

    The summary holds the settings, per-step seconds and attention density, total
    seconds, and with ``compare_dense`` the dense time, the speedup and the PSNR of the
    sparse video against the dense one.
    """
    import sparsegen

    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    m = _Model(model, device, torch_dtype)
    d = m.defaults
    settings = dict(
        prompt=prompt if prompt is not None else d["prompt"], negative_prompt=negative_prompt,
        frames=frames or d["frames"], height=height or d["height"], width=width or d["width"],
        steps=steps or d["steps"], guidance=guidance if guidance is not None else d["guidance"], seed=seed,
    )
    fps = fps or d.get("fps", 8)
    if config is not None:
        cfg = config
    else:
        from .patching import make_config

        if not options and method in m.method_options:
            options = dict(m.method_options[method])
            log(f"[sparsegen] {method} options for the built-in model: "
                + ", ".join(f"{k}={v}" for k, v in options.items()) + " (give any option to choose your own)")
        cfg = make_config(method, **(options or {}))
    summary = {"model": model, "method": cfg.to_dict(), "settings": settings, "device": device,
               "dtype": str(torch_dtype).replace("torch.", "")}

    dense_frames = None
    if compare_dense:
        log(f"[sparsegen] dense run: {settings['frames']} frames {settings['height']}x{settings['width']}, "
            f"{settings['steps']} steps{m.steps_note}")
        dense_frames, dense_steps, dense_total, _ = _timed_run(m, settings)
        summary["dense_seconds"] = dense_total
        summary["dense_step_seconds"] = dense_steps

    log(f"[sparsegen] {cfg.method} run: {settings['frames']} frames {settings['height']}x{settings['width']}, "
        f"{settings['steps']} steps{m.steps_note}")
    handle = sparsegen.apply(m.pipe, cfg)
    try:
        sparse_frames, sparse_steps, sparse_total, step_density = _timed_run(m, settings, handle)
    finally:
        handle.remove()
    summary["seconds"] = sparse_total
    summary["step_seconds"] = sparse_steps
    summary["step_density"] = step_density
    for i, (sec, den) in enumerate(zip(sparse_steps, summary["step_density"])):
        dtxt = "n/a" if den is None else f"{den:.3f}"
        log(f"  step {i:3d}: {sec * 1000:8.1f} ms   attention density {dtxt}")
    log(f"[sparsegen] total {sparse_total:.2f} s")
    if out:
        write_video(sparse_frames, out, fps)
        summary["out"] = out
        log(f"[sparsegen] wrote {out}")
    if dense_frames is not None:
        summary["speedup"] = summary["dense_seconds"] / sparse_total
        summary["psnr_vs_dense"] = psnr(sparse_frames, dense_frames)
        log(f"[sparsegen] dense {summary['dense_seconds']:.2f} s, {cfg.method} {sparse_total:.2f} s: "
            f"speedup {summary['speedup']:.2f}x, PSNR vs dense {summary['psnr_vs_dense']:.2f} dB")
        if out:
            root, ext = os.path.splitext(out)
            side = np.concatenate([dense_frames, sparse_frames], axis=2)
            summary["side_by_side"] = write_video(side, f"{root}_vs_dense{ext or '.mp4'}", fps)
            log(f"[sparsegen] wrote {summary['side_by_side']} (left: dense, right: {cfg.method})")
    return summary


def _run_cli(args, extra=None) -> int:
    extra = extra if extra is not None else getattr(args, "_extra", [])
    from .methods import get_method

    if args.help_method:
        cfg_cls, _ = get_method(args.method)
        print(f"options of method '{args.method}':")
        for f in dataclasses.fields(cfg_cls):
            if f.name != "version":
                print(f"  --{f.name.replace('_', '-'):24s} default {f.default!r}")
        return 0
    config = None
    if args.config:
        from .methods import config_from_dict

        text = open(args.config).read() if os.path.exists(args.config) else args.config
        d = json.loads(text)
        d.setdefault("method", args.method)
        config = config_from_dict(d)
        if extra:
            raise SystemExit("sparsegen generate: pass method options either with --config or as flags, not both")
        options = None
    else:
        try:
            options = method_options_from_argv(args.method, extra)
        except ValueError as e:
            raise SystemExit(f"sparsegen generate: {e}") from None
    summary = generate_video(
        model=args.model, method=args.method, options=options, config=config, prompt=args.prompt,
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device, dtype=args.dtype,
        out=args.out, fps=args.fps, compare_dense=args.compare_dense,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python examples/generate.py`` (same options as ``sparsegen generate``)."""
    p = argparse.ArgumentParser(prog="generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    args, extra = p.parse_known_args(argv)
    return _run_cli(args, extra)


if __name__ == "__main__":
    sys.exit(main())
