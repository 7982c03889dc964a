"""``sparsegen mask radial|gna|vmoba``: build a method's mask for a token grid and report it.

Method options are the config's own fields (:mod:`.options`): ``sparsegen mask radial
--decay-factor 0.2`` is ``RadialConfig(decay_factor=0.2)``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from ..methods.gna import GNAConfig
from ..methods.radial import RadialConfig, kept_blocks_per_distance, radial_block_mask
from ..methods.vmoba import LAYER_KINDS, PRESETS as VMOBA_PRESETS, Selection, VMoBAConfig, vmoba_selection
from ..neighborhood import neighborhood_layout
from ..tiling import check_grid
from .options import add_config_arguments, config_options, flag_name

__all__ = ["add_command"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 30,48,80, got {text!r}") from None


def _add_output_flags(p: argparse.ArgumentParser, png_help: str = "render the block mask to this PNG file") -> None:
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.add_argument("--png", metavar="PATH", default=None, help=png_help)


def _fail(kind: str, error: Exception) -> int:
    print(f"sparsegen mask {kind}: error: {error}", file=sys.stderr)
    return 2


def add_command(subparsers) -> None:
    mask = subparsers.add_parser("mask", allow_abbrev=False,
                                 help="build a method's mask and report its density (and render it)")
    kinds = mask.add_subparsers(dest="kind", required=True)
    _add_radial(kinds)
    _add_gna(kinds)
    _add_vmoba(kinds)


# ------------------------------------------------------------------------ radial
def _add_radial(kinds) -> None:
    p = kinds.add_parser(
        "radial", allow_abbrev=False,
        help="radial attention mask: density, kept blocks per frame distance, PNG",
        description="Build the radial attention block mask for a video token grid and report it. "
                    "Per-distance counts are the kept blocks of the pair (query frame d+1, key frame 1) "
                    "(with --no-sink: (d, 0)); blocks straddling a frame boundary count for each pair they meet. "
                    "'built in' is the build time of the first build in the process (a measurement, not a test).",
    )
    p.add_argument("--frames", type=int, required=True, help="latent frames")
    p.add_argument("--tokens-per-frame", type=int, required=True, help="tokens per latent frame (h x w after patchify)")
    add_config_arguments(p, RadialConfig, shared=False)
    _add_output_flags(p)
    p.set_defaults(func=_run_radial)


def _run_radial(args: argparse.Namespace) -> int:
    try:
        cfg = RadialConfig(**config_options(args, RadialConfig, shared=False))
        tic = time.perf_counter()
        mask = radial_block_mask(frames=args.frames, tokens_per_frame=args.tokens_per_frame,
                                 block_size=cfg.block_size, decay_factor=cfg.decay_factor, sink=cfg.sink,
                                 decimation_unit=cfg.decimation_unit)
        build_seconds = time.perf_counter() - tic  # first build in this process, cold
    except (TypeError, ValueError) as e:
        return _fail("radial", e)
    blocks = mask.to_block_matrix()[0, 0]
    per_distance = kept_blocks_per_distance(blocks, frames=args.frames, tokens_per_frame=args.tokens_per_frame,
                                            block_size=cfg.block_size, sink=cfg.sink)
    kept, total = mask.num_visited_blocks(), blocks.numel()
    if args.png:
        mask.render(args.png)
    if args.json:
        print(json.dumps({
            "density": mask.density(), "kept_blocks": kept, "total_blocks": total,
            "per_distance": {str(d): c for d, c in per_distance.items()},
            "frames": args.frames, "tokens_per_frame": args.tokens_per_frame, "block_size": cfg.block_size,
            "decay_factor": cfg.decay_factor, "sink": cfg.sink, "decimation_unit": cfg.decimation_unit,
            "png": args.png, "build_seconds": build_seconds,
        }))
        return 0
    n = args.frames * args.tokens_per_frame
    k0 = 1 if cfg.sink and args.frames > 1 else 0
    print(f"radial mask: {args.frames} frames x {args.tokens_per_frame} tokens = {n} tokens, "
          f"block {cfg.block_size}, decay {cfg.decay_factor:g}, sink {'on' if cfg.sink else 'off'}, "
          f"decimation unit {cfg.decimation_unit}")
    print(f"density {mask.density():.4f} (sparsity {100 * mask.sparsity():.2f}%): "
          f"{kept} of {total} blocks kept ({mask.shape[2]} x {mask.shape[3]} grid); "
          f"built in {build_seconds:.2f} s")
    print(f"kept blocks of the pair (query frame d+{k0}, key frame {k0}) per distance d:")
    for d, c in per_distance.items():
        print(f"  d={d:<4d} {c}")
    if args.png:
        print(f"wrote {args.png}")
    return 0


# --------------------------------------------------------------------------- gna
def _add_gna(kinds) -> None:
    p = kinds.add_parser(
        "gna", allow_abbrev=False,
        help="neighborhood attention mask: density, full/partial blocks, speedup bound, PNG",
        description="Build the GNA block mask on tiled tokens and report its density, full and partial blocks "
                    "and the upper-bound speedup (dense token pairs / computed token pairs). Without --tile the "
                    "tile with the least wasted work is chosen and reported. Per-axis options take one value "
                    "for every axis or one per axis of --grid.",
    )
    p.add_argument("--grid", type=_ints, required=True, help="token grid, e.g. 30,48,80 (1 to 3 axes)")
    add_config_arguments(p, GNAConfig, shared=False)
    _add_output_flags(p)
    p.set_defaults(func=_run_gna)


def _per_axis(value, nd: int, name: str):
    """One value for every axis, or one per axis of the grid."""
    vals = value if isinstance(value, tuple) else (value,)
    if len(vals) == 1:
        return vals * nd
    if len(vals) != nd:
        raise ValueError(f"{flag_name(name)} has {len(vals)} values but --grid has {nd} axes; give 1 or {nd}")
    return vals


def _gna_report(stats: dict, chosen: bool) -> str:
    how = "chosen automatically for the least wasted work" if chosen else "given"
    return (
        f"GNA grid={tuple(stats['grid'])} kernel={tuple(stats['kernel_size'])} stride={tuple(stats['stride'])} "
        f"dilation={tuple(stats['dilation'])} causal={tuple(stats['is_causal'])}\n"
        f"  tile q={tuple(stats['tile'])} kv={tuple(stats['kv_tile'])}, {how}; blocks "
        f"({stats['q_block_size']}, {stats['kv_block_size']})\n"
        f"  density {stats['density']:.4f} (token density {stats['token_density']:.4f}); "
        f"{stats['full_blocks']} full blocks, {stats['partial_blocks']} partial blocks\n"
        f"  speedup bound {stats['speedup_bound']:.2f}x over dense attention"
    )


def _run_gna(args: argparse.Namespace) -> int:
    given = config_options(args, GNAConfig, shared=False)
    defaults = {f.name: f.default for f in GNAConfig.option_fields(shared=False)}
    opts = {**defaults, **given}
    try:
        if opts["kernel_size"] is None:
            raise ValueError(f"{flag_name('kernel_size')} is required (the window size per axis)")
        nd = len(args.grid)
        axes = {name: _per_axis(opts[name], nd, name) for name in ("kernel_size", "stride", "dilation", "is_causal")}
        tile = None if opts["tile"] is None else _per_axis(opts["tile"], nd, "tile")
        kv_tile = None if opts["kv_tile"] is None else _per_axis(opts["kv_tile"], nd, "kv_tile")
        lay = neighborhood_layout(args.grid, tile=tile, kv_tile=kv_tile, block_size=opts["block_size"], **axes)
    except (TypeError, ValueError) as e:
        return _fail("gna", e)
    stats = lay.stats()
    stats["tile_chosen"] = tile is None
    if args.png:
        lay.mask.render(args.png)
        stats["png"] = args.png
    if args.json:
        print(json.dumps(stats, sort_keys=True))
    else:
        print(_gna_report(stats, chosen=tile is None))
        if args.png:
            print(f"  wrote {args.png}")
    return 0


# ------------------------------------------------------------------------- vmoba
def _add_vmoba(kinds) -> None:
    p = kinds.add_parser(
        "vmoba", allow_abbrev=False,
        help="VMoBA masks of one layer of each kind on seeded Gaussian q, k: blocks, padding, density",
        description="Build the VMoBA masks of layers 0, 1, 2 (temporal, spatial, spatiotemporal partitions) for a "
                    "token grid. The selection depends on the queries and keys; this command draws them from a "
                    "seeded standard normal distribution, so threshold-mode densities are those of unstructured "
                    "inputs, not of a trained model.",
    )
    p.add_argument("--grid", type=_ints, required=True, help="token grid frames,height,width, e.g. 21,30,52")
    p.add_argument("--preset", choices=sorted(VMOBA_PRESETS), default=None,
                   help="start from a preset; options given below override its fields (default: the defaults)")
    add_config_arguments(p, VMoBAConfig, shared=False)
    p.add_argument("--heads", type=int, default=2, help="heads of the random inputs (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim of the random inputs (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    _add_output_flags(p, "render the masks (first head) to PATH with the layer index before the suffix")
    p.set_defaults(func=_run_vmoba)


def _run_vmoba(args: argparse.Namespace) -> int:
    overrides = config_options(args, VMoBAConfig, shared=False)
    try:
        cfg = VMoBAConfig.preset(args.preset, **overrides) if args.preset else VMoBAConfig(**overrides)
        grid = check_grid(args.grid, 3)
        for name in ("heads", "head_dim"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    except (TypeError, ValueError) as e:
        return _fail("vmoba", e)
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(args.seed)
    q = torch.randn(1, n, args.heads, args.head_dim, generator=gen)
    k = torch.randn(1, n, args.heads, args.head_dim, generator=gen)
    layers = []
    for layer in range(3):
        part, selected = vmoba_selection(q, k, grid, layer, cfg)
        mask = part.block_mask(selected)
        pairs = (selected.double() * part.query_block_tokens.view(-1, 1) * part.block_tokens.view(1, -1)).sum()
        row = dict(layer=layer, kind=LAYER_KINDS[layer], extent=list(part.extent), blocks=part.num_blocks,
                   kernel_tokens=part.length, padding=part.length - n, density=mask.density(),
                   token_density=float(pairs) / (args.heads * n * n),
                   selected_blocks_per_query_block=float(selected.sum(-1).double().mean()))
        if args.png:
            stem, dot, suffix = args.png.rpartition(".")
            path = f"{stem}_layer{layer}.{suffix}" if dot else f"{args.png}_layer{layer}"
            mask.render(path, heads=[0])
            row["png"] = path
        layers.append(row)
    if args.json:
        print(json.dumps(dict(grid=list(grid), tokens=n, config=cfg.to_dict(), inputs="gaussian", seed=args.seed,
                              heads=args.heads, head_dim=args.head_dim, layers=layers), sort_keys=True))
        return 0
    sel = cfg.selection.value
    how = (f"top_k {cfg.top_k}" if cfg.selection == Selection.TOPK else f"threshold {cfg.threshold:g}")
    print(f"VMoBA masks: grid {grid} = {n} tokens, selection {sel} ({how}), block {cfg.block_size}; "
          f"Gaussian q, k (seed {args.seed}, {args.heads} heads, head_dim {args.head_dim})")
    for r in layers:
        print(f"  layer {r['layer']} {r['kind']:<14} blocks {r['blocks']:>4} of {tuple(r['extent'])}  "
              f"padding {r['padding']:>5}  density {r['density']:.4f}  token density {r['token_density']:.4f}  "
              f"blocks/query block {r['selected_blocks_per_query_block']:.2f}" + (f"  -> {r['png']}" if args.png
                                                                                     else ""))
    return 0
