"""``sparsegen calibrate paro``: make a PARO plan (per-head orders + block masks) for a model.

    sparsegen calibrate paro --out plans/toy                # the built-in model, offline
    sparsegen calibrate paro --model THUDM/CogVideoX-5b --prompt "a cat" --prompt "a city at night" \\
        --frames 49 --steps 50 --density 0.5 --out plans/cogvideox-5b-49f

The plan serves the model and the token grid (resolution, frame count) it was made at;
use it with ``sparsegen generate --method paro --plan DIR`` or
``sparsegen.apply(pipe, "paro", plan=DIR)``.
"""

from __future__ import annotations

import argparse

import torch

from ..generate import DEFAULT_MODEL, calibrate_model

__all__ = ["add_command", "run"]


def add_command(subparsers) -> None:
    p = subparsers.add_parser("calibrate", allow_abbrev=False, help="calibrate a method's plan (PARO)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["paro"], help="the method to calibrate")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'toy' (built-in small model, offline), a local pipeline folder or a hub id")
    p.add_argument("--prompt", action="append", default=None,
                   help="a calibration prompt (repeat for several; default: the model's example prompt)")
    p.add_argument("--density", type=float, default=0.5, help="share of visited blocks per step bucket")
    p.add_argument("--out", required=True, help="directory to write the plan to")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the calibration runs")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=64, help="mask block size (64, as published)")
    p.add_argument("--order-weight", type=float, default=0.5,
                   help="weight of block sparsity against block uniformity when choosing each head's order")
    p.add_argument("--no-reorder", dest="reorder", action="store_false",
                   help="keep every head in row-major order (the ablation without reordering)")
    p.add_argument("--first-half-buckets", type=int, default=None,
                   help="group the first half of the steps into this many mask buckets (default: one per step)")
    p.add_argument("--sample-query-blocks", type=int, default=16,
                   help="query blocks per call and order scored when choosing orders")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        calibrate_model(model=args.model, prompts=args.prompt, out=args.out, density=args.density,
                        frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                        guidance=args.guidance, seed=args.seed, device=args.device, dtype=args.dtype,
                        block_size=args.block_size, order_weight=args.order_weight, reorder=args.reorder,
                        first_half_buckets=args.first_half_buckets, sample_query_blocks=args.sample_query_blocks)
    except ValueError as e:
        raise SystemExit(f"sparsegen calibrate: {e}") from None
    return 0
