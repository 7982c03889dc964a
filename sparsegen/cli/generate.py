"""``sparsegen generate``: make a video with a sparse-attention method, optionally against dense.

    sparsegen generate                                   # the built-in small model, offline
    sparsegen generate --method radial --decay-factor 0.5 --dense-steps 2 --compare-dense
    sparsegen generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method radial --preset wan2.1 \\
        --frames 81 --height 480 --width 832

Every option of the chosen method's config is a flag of the same name
(``sparsegen generate --method vmoba --help`` lists them). With the built-in model each
method starts from the model's own preset; a flag overrides that field only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from ..generate import DEFAULT_METHOD, DEFAULT_MODEL, generate_video
from ..methods import available_methods, config_class, config_from_dict
from .options import add_config_arguments, config_options

__all__ = ["add_command", "add_arguments", "main", "DEFAULT_METHOD"]


def add_command(subparsers, method: str) -> None:
    p = subparsers.add_parser("generate", allow_abbrev=False,
                              help="generate a video with sparse attention (default: built-in model)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, method)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser, method: str) -> None:
    """The command's own flags plus the flags of ``method``'s config."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'toy' (built-in small model, offline), a local pipeline folder or a hub id")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=available_methods(),
                   help=f"sparse method (default {DEFAULT_METHOD}); its options are listed below")
    p.add_argument("--preset", default=None,
                   help="start from a named preset of the method (e.g. radial: wan2.1, wan2.2, hunyuanvideo; "
                        "the built-in model's gna: long); flags override its fields")
    p.add_argument("--config", default=None, help="the whole method config as JSON (a file path or a JSON string)")
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
    p.add_argument("--repeats", type=int, default=1,
                   help="run N times, alternating with the dense run under --compare-dense, and report median "
                        "times (robust on a busy machine)")
    p.add_argument("--json", default=None, help="write a JSON summary to this path")
    p.add_argument("--lora", default=None,
                   help="a LoRA folder from `sparsegen train-lora`: loads it and runs its recipe's method config "
                        "(method flags override single fields) at the size it was trained for (flags override)")
    if method in available_methods():
        add_config_arguments(p, config_class(method))


def run(args: argparse.Namespace) -> int:
    options = config_options(args, config_class(args.method))
    config = None
    if args.config:
        if options or args.preset or args.lora:
            raise SystemExit("sparsegen generate: pass the method config either with --config, as a preset and "
                             "flags, or through --lora's recipe, not several")
        text = open(args.config).read() if os.path.exists(args.config) else args.config
        d = json.loads(text)
        d.setdefault("method", args.method)
        config = config_from_dict(d)
    try:
        summary = generate_video(
            model=args.model, method=args.method, options=options, preset=args.preset, config=config,
            prompt=args.prompt, negative_prompt=args.negative_prompt, frames=args.frames, height=args.height,
            width=args.width, steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
            dtype=args.dtype, out=args.out, fps=args.fps, compare_dense=args.compare_dense, repeats=args.repeats,
            lora=args.lora,
        )
    except ValueError as e:
        raise SystemExit(f"sparsegen generate: {e}") from None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python examples/generate.py`` (the options of ``sparsegen generate``)."""
    from . import _chosen_method

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="generate", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, _chosen_method(argv, DEFAULT_METHOD))
    return run(p.parse_args(argv))
