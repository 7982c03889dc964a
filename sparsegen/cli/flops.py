"""``sparsegen flops``: theoretical FLOPs of one transformer pass (batch 1) with dense,
VMoBA or block-sparse attention (the library is :mod:`sparsegen.flops`).

    sparsegen flops --paper                                  # VMoBA's published Wan2.1-1.3B figures
    sparsegen flops --latent 30,48,80 --method gna --kernel-size 18,24,24 --stride 16,8,8
    sparsegen flops --latent 41,48,80 --method radial --decay-factor 0.2

With ``--method radial`` or ``gna`` the method's static mask is built for ``--latent`` and
counted; ``--method agent`` counts pooled agents for ``--latent``; ``--method paro --plan
DIR`` counts a calibrated plan's masks (on its own grid). The options are the config's
fields (``sparsegen flops --method gna --help``).

    sparsegen flops --latent 21,30,52 --method agent --agent-cell 1,4,4
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Optional

from ..flops import (MODELS, TERA, VMOBA_FLOPS_BLOCKS, VMOBA_FLOPS_TOPK_RATIO, TransformerSpec,
                     dense_attention_flops, method_transformer_flops, paper_table, transformer_flops,
                     vmoba_transformer_flops)
from ..methods import AttentionGeometry, config_class
from .options import add_config_arguments, config_options

__all__ = ["add_command", "DEFAULT_METHOD"]

DEFAULT_METHOD = "all"
# Methods counted from their config for the latent grid (static masks, agents, a PARO plan).
_MASK_METHODS = ("radial", "gna", "agent", "paro")


def add_command(subparsers, method: str) -> None:
    p = subparsers.add_parser(
        "flops", allow_abbrev=False,
        help="theoretical FLOPs of a transformer pass with dense, VMoBA or block-sparse attention",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="wan2.1-1.3b", choices=sorted(MODELS), help="model sizes (default wan2.1-1.3b)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="video token counts S")
    p.add_argument("--latent", default=None, help="latent grid T,H,W after patchify (tokens = T*H*W)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=["all", "full", "vmoba", "sparse", *_MASK_METHODS],
                   help="attention to count: full, vmoba, sparse (--density of a block-sparse mask), all, or a "
                        "method counted from its config for --latent (radial, gna, agent; paro with --plan; its "
                        "options below)")
    p.add_argument("--blocks", default=",".join(str(b) for b in VMOBA_FLOPS_BLOCKS),
                   help="VMoBA blocks per layer kind 1D,2D,3D (default 7,40,60)")
    p.add_argument("--topk-ratio", type=float, default=VMOBA_FLOPS_TOPK_RATIO,
                   help="VMoBA selected share of blocks (default 0.18)")
    p.add_argument("--density", type=float, default=None,
                   help="for --method sparse/all: fraction of attention computed (a mask's density)")
    p.add_argument("--paper", action="store_true", help="print the published VMoBA numbers next to ours")
    p.add_argument("--json", action="store_true", help="print JSON")
    if method in _MASK_METHODS:
        add_config_arguments(p, config_class(method), shared=False)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = MODELS[args.model]
    try:
        if args.paper:
            rows = paper_table(spec)
            if args.json:
                print(json.dumps({"model": asdict(spec), "rows": rows}))
            else:
                print(f"VMoBA theoretical FLOPs, {spec.name}, batch 1 (ours vs published)")
                for r in rows:
                    print(f"  {r['method']:>5} S={r['tokens']:>6}: {r['tflops']:8.2f} T  published "
                          f"{r['published_tflops']:8.2f} T  ({100 * r['rel_diff']:+.2f}%)")
            return 0
        if args.method in _MASK_METHODS:
            return _run_method_cli(args, spec)
        tokens = list(args.tokens or [])
        if args.latent:
            t, h, w = _latent(args.latent)
            tokens.append(t * h * w)
        if not tokens:
            raise ValueError("give --tokens S [S ...], --latent T,H,W or --paper")
        try:
            blocks = tuple(float(x) for x in args.blocks.split(","))
        except ValueError:
            raise ValueError(f"--blocks must be comma-separated numbers like 7,40,60, got {args.blocks!r}") from None
        if args.method == "sparse" and args.density is None:
            raise ValueError("--method sparse needs --density (e.g. the density `sparsegen mask ...` prints)")
        if args.density is not None and not 0 < args.density <= 1:
            raise ValueError(f"--density must be in (0, 1], got {args.density}")
        rows = []
        for s in tokens:
            row = {"tokens": s, "full": transformer_flops(spec, s)["total"]}
            if args.method in ("all", "vmoba"):
                row["vmoba"] = vmoba_transformer_flops(spec, s, blocks=blocks, topk_ratio=args.topk_ratio)["total"]
            if args.density is not None:
                row["sparse"] = transformer_flops(
                    spec, s, self_attention=args.density * dense_attention_flops(s, s, spec.dim))["total"]
            if args.method == "vmoba" or args.method == "sparse":
                row = {k: v for k, v in row.items() if k in ("tokens", "full", args.method)}
            rows.append(row)
    except ValueError as e:
        print(f"sparsegen flops: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": asdict(spec), "rows": rows}))
        return 0
    for r in rows:
        parts = [f"S={r['tokens']}", f"full {r['full'] / TERA:.2f} T"]
        for key in ("vmoba", "sparse"):
            if key in r:
                parts.append(f"{key} {r[key] / TERA:.2f} T ({r['full'] / r[key]:.2f}x fewer)")
        print(f"{spec.name}: " + ", ".join(parts))
    return 0


def _latent(text: Optional[str]) -> tuple[int, int, int]:
    try:
        t, h, w = (int(x) for x in text.split(","))
    except (AttributeError, ValueError):
        raise ValueError(f"--latent must be three comma-separated ints T,H,W (tokens after patchify), got {text!r}") \
            from None
    return t, h, w


def _run_method_cli(args: argparse.Namespace, spec: TransformerSpec) -> int:
    """``sparsegen flops --method radial|gna|agent --latent T,H,W [method options]``, or
    ``--method paro --plan DIR [--latent T,H,W]``."""
    cfg_cls = config_class(args.method)
    if args.latent is None and args.method != "paro":
        raise ValueError(f"--method {args.method} builds the method's mask for a token grid: give --latent T,H,W")
    latent = _latent(args.latent) if args.latent else None
    config = cfg_cls(**config_options(args, cfg_cls, shared=False))
    geometry = AttentionGeometry(*(latent or config.plan.grid))
    res = method_transformer_flops(spec, config, geometry)
    full = transformer_flops(spec, geometry.num_tokens)["total"]
    row = {"tokens": geometry.num_tokens, "latent": list(geometry.grid), "full": full, args.method: res["total"],
           "density": res["density"], "self_attention": res["self_attention"],
           "attended_self_attention": res["attended_self_attention"], "config": config.to_dict(),
           **{k: res[k] for k in ("agents", "buckets") if k in res}}
    if args.json:
        print(json.dumps({"model": asdict(spec), "rows": [row]}))
        return 0
    print(f"{spec.name}: S={row['tokens']} (latent {','.join(map(str, geometry.grid))}), full {full / TERA:.2f} T, {args.method} "
          f"{res['total'] / TERA:.2f} T ({full / res['total']:.2f}x fewer); "
          f"{'attention FLOPs vs dense' if args.method in ('agent', 'paro') else 'mask density'} {res['density']:.4f}, "
          f"self-attention {res['self_attention'] / TERA:.2f} T computed, "
          f"{res['attended_self_attention'] / TERA:.2f} T attended")
    return 0
