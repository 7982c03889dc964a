"""Quality of every sparse-attention method against dense attention, on the shipped toy model.

    python evals/quality.py              # full sweep (about 10 minutes on 2 cores)
    python evals/quality.py --quick      # CI: 2 prompts, 4 steps, one setting per method

For each available method (``sparsegen.available_methods()``; ``dense`` through the
plugin is the control and must reproduce the unpatched model exactly) and a sweep of
settings that change its density:

* video-level: PSNR and SSIM (11 x 11 Gaussian, ``toylab.metrics``) of the
  sparse generation against the dense one with the same seeds, on a fixed prompt set;
  LPIPS only when a network for it is available offline (it is not: reported as such);
* attention-level: per layer, the relative L1 error ``sum|o_sparse - o_dense| /
  sum|o_dense|`` of the method's attention output against exact attention on the *same*
  q, k, v, recorded from the dense generation (``toylab.probe``) at three
  denoising steps, with the method's layer/step schedule applied as in the generation;
* density: the mean over denoising steps of ``handle.step_densities()`` (the share of
  (query block, key block) pairs computed, dense layers and steps counting 1), the mean
  over sparse calls only, and for static masks the share of attended token pairs;
* length extrapolation: 2x and 4x the training length (33 and 65 frames), dense
  against radial: PSNR, SSIM, density, time, and whether colour and motion still
  follow the prompt.

Writes ``<out>/quality.json``, ``<out>/quality.csv`` (long format), the markdown page
``evals/results/quality.md`` (``--results``) and its figures
``density_vs_psnr_<method>.png`` and ``attention_error.png`` in the folder named like
the page without ``.md`` (``evals/results/quality/``; ``--figures``). Times are
wall-clock on a CPU and are indicative only (the machine may be shared).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparsegen
from sparsegen.methods import config_class
from sparsegen.patching import make_config
from sparsegen.toy import pipeline as toy
from sparsegen.toy.data import evaluation_specs
from toylab.metrics import measure_video, prompt_following, psnr, ssim
from toylab.probe import dense_attention, densities, record_attention_inputs
from toylab.report import command_block, jsonable

REPO = Path(__file__).resolve().parent.parent

# The toy grid at 17 frames is 5 latent frames x 8 x 8 tokens = 320 tokens: blocks must be
# small for a mask to be sparse at all. Radial keeps one latent frame (64 tokens) per block;
# GNA and VMoBA use 16-token kernel blocks.
#
# Radial at 64 tokens per frame: P = 128, so the band width of every frame distance >= 1 is
# below the fixed decimation constant 128 and the frame pair is dropped unless
# dist % (128 / w0) == 0; at 5 latent frames only the diagonal and the sink survive, for
# any decay_factor and block size. Its density is changed here by the sink and by the
# schedule (dense layers, dense first steps) instead.
VMOBA_TOY_BLOCKS = toy.VMOBA_BLOCKS
SWEEPS: dict[str, list[dict]] = {
    "dense": [{}],
    "radial": [
        dict(block_size=64, sink=False),
        dict(block_size=64),
        dict(block_size=64, dense_layers=1),
        dict(block_size=64, dense_steps=5),
        dict(block_size=64, dense_layers=1, dense_steps=5),
    ],
    "gna": [
        dict(kernel_size=(3, 3, 3), block_size=16),
        dict(kernel_size=(3, 5, 5), block_size=16),
        dict(kernel_size=(5, 5, 5), block_size=16),
        dict(kernel_size=(3, 7, 7), block_size=16),
        dict(kernel_size=(5, 7, 7), block_size=16),
    ],
    "vmoba": [
        dict(VMOBA_TOY_BLOCKS, top_k=(1, 2, 4)),
        dict(VMOBA_TOY_BLOCKS, top_k=(2, 3, 8)),
        dict(VMOBA_TOY_BLOCKS, top_k=(3, 5, 12)),
        dict(VMOBA_TOY_BLOCKS, top_k=(4, 7, 16)),
        dict(VMOBA_TOY_BLOCKS, selection="threshold", threshold=0.25),
        dict(VMOBA_TOY_BLOCKS, selection="threshold", threshold=0.5),
    ],
}
QUICK_SWEEPS = {name: sweep[:1] if name != "radial" else [sweep[1]] for name, sweep in SWEEPS.items()}
LONG_RADIAL = dict(block_size=64)
LONG_FRAMES = (33, 65)  # 2x and 4x the training length (9 and 17 latent frames)


# Methods that need a calibrated plan are measured by their own script.
CALIBRATED = {"paro": "needs a plan calibrated on the model: measured by `python evals/paro_quality.py` "
                      "(evals/results/paro.md)"}


def methods_available() -> tuple[list[str], dict[str, str]]:
    """Methods whose module imports, and why the others were left out."""
    ok, missing = [], dict(CALIBRATED)
    for name in sparsegen.available_methods():
        if name in CALIBRATED:
            continue
        try:
            config_class(name)
            ok.append(name)
        except ImportError as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    return ok, missing


def lpips_status() -> str:
    if importlib.util.find_spec("lpips") is None:
        return ("not computed: the `lpips` package is not installed and its network weights (AlexNet/VGG "
                "ImageNet features) cannot be downloaded on this machine")
    return ("not computed: `lpips` is installed but its backbone weights are downloaded on first use, "
            "which this machine cannot do")


def options_label(method_name: str, options: dict) -> str:
    """Options as text; VMoBA's toy block layout (the same in every setting) is left out."""
    shown = {k: v for k, v in options.items() if not (method_name == "vmoba" and k in VMOBA_TOY_BLOCKS)}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"


def static_token_density(method_name: str, options: dict, geometry) -> float | None:
    """Share of (query, key) token pairs a static mask attends; None for dynamic methods."""
    method = make_config(method_name, **options).make_method()
    if not method.has_static_mask:
        return None
    n = geometry.num_tokens
    pairs = method.attended_pairs(geometry)
    if pairs is not None:
        return pairs / float(n * n)
    return method.static_mask(geometry).token_density()


def attention_errors(method_name: str, options: dict, records) -> dict[int, float]:
    """Relative L1 error per layer of the method's attention against exact attention on
    recorded q, k, v, with the config's dense layers and steps applied."""
    config = make_config(method_name, **options)
    method = config.make_method()
    num, den = {}, {}
    for r in records:
        exact, _ = dense_attention(r.q, r.k, r.v)
        if method_name == "dense" or config.layer_is_dense(r.layer) or config.step_is_dense(r.step, r.num_steps):
            approx = exact
        else:
            approx, _ = method.attention(r.q, r.k, r.v, r.call(backend="torch"))
        num[r.layer] = num.get(r.layer, 0.0) + float((approx.float() - exact.float()).abs().sum())
        den[r.layer] = den.get(r.layer, 0.0) + float(exact.float().abs().sum())
    return {layer: num[layer] / den[layer] for layer in sorted(num)}


def video_scores(videos: np.ndarray, reference: np.ndarray) -> tuple[list[float], list[float]]:
    return ([psnr(v, r) for v, r in zip(videos, reference)], [ssim(v, r) for v, r in zip(videos, reference)])


def finite_mean(values) -> float:
    """Mean, with +inf (identical videos) kept as inf."""
    values = list(values)
    return math.inf if any(math.isinf(v) for v in values) and all(math.isinf(v) for v in values) else float(
        np.mean([v for v in values if not math.isinf(v)] or [math.inf]))


def run_sweep(pipe, prompts, *, seed, steps, sweeps, record_steps) -> tuple[dict, list[dict]]:
    with record_attention_inputs(pipe, steps=record_steps, max_calls_per_step=1) as records:
        dense = toy.generate(pipe, prompts, seed=seed, num_inference_steps=steps)
    recorded = list(records)
    for r in recorded:
        r.num_steps = steps
    # the unpatched pipeline, timed, is the dense reference (the recorder's own attention is exact too)
    tic = time.perf_counter()
    plain = toy.generate(pipe, prompts, seed=seed, num_inference_steps=steps)
    dense_seconds = time.perf_counter() - tic
    geometry = recorded[0].geometry
    reference = {"dense_seconds": dense_seconds, "recorder_vs_plain_max_abs": float(np.abs(plain - dense).max()),
                 "geometry": f"{geometry.frames} x {geometry.height} x {geometry.width}"}
    rows = []
    for method_name, sweep in sweeps.items():
        for options in sweep:
            handle = sparsegen.apply(pipe, method_name, **options)
            try:
                tic = time.perf_counter()
                videos = toy.generate(pipe, prompts, seed=seed, num_inference_steps=steps)
                seconds = time.perf_counter() - tic
                dens = densities(handle)
            finally:
                handle.remove()
            p, s = video_scores(videos, plain)
            errors = attention_errors(method_name, options, recorded)
            row = {
                "method": method_name, "options": options, "label": options_label(method_name, options),
                "psnr_per_video": p, "ssim_per_video": s, "psnr": finite_mean(p), "ssim": float(np.mean(s)),
                **dens,
                "mask_token_density": (static_token_density(method_name, options, geometry)
                                       if method_name in ("radial", "gna") else None),
                "attention_rel_l1_per_layer": errors,
                "attention_rel_l1_mean": float(np.mean(list(errors.values()))),
                "seconds": seconds,
            }
            rows.append(row)
            print(f"{method_name:7s} {row['label']:60.60s} density {row['effective_density']:.3f} "
                  f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} attn relL1 {row['attention_rel_l1_mean']:.4f} "
                  f"({seconds:.1f} s)", flush=True)
    return reference, rows


def run_long(pipe, specs, *, seed, steps, frames_list) -> list[dict]:
    """Dense against radial at longer lengths than the model was trained on."""
    prompts = [s.prompt for s in specs]
    out = []
    for frames in frames_list:
        tic = time.perf_counter()
        dense = toy.generate(pipe, prompts, seed=seed, num_frames=frames, num_inference_steps=steps)
        dense_seconds = time.perf_counter() - tic
        handle = sparsegen.apply(pipe, "radial", **LONG_RADIAL)
        try:
            tic = time.perf_counter()
            radial = toy.generate(pipe, prompts, seed=seed, num_frames=frames, num_inference_steps=steps)
            radial_seconds = time.perf_counter() - tic
            dens = densities(handle)
        finally:
            handle.remove()
        p, s = video_scores(radial, dense)

        def follows(videos):
            return prompt_following([measure_video(v) for v in videos], specs)

        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        tokens_per_frame = (toy.DEFAULT_HEIGHT // pipe.vae_scale_factor_spatial) * (
            toy.DEFAULT_WIDTH // pipe.vae_scale_factor_spatial)  # patch size 1: one token per latent cell
        row = {"frames": frames, "latent_frames": latent_frames, "tokens": latent_frames * tokens_per_frame,
               "radial_options": LONG_RADIAL, "psnr_per_video": p, "ssim_per_video": s, "psnr": finite_mean(p),
               "ssim": float(np.mean(s)), **dens, "dense_seconds": dense_seconds, "radial_seconds": radial_seconds,
               "prompt_following_dense": follows(dense), "prompt_following_radial": follows(radial)}
        out.append(row)
        print(f"{frames} frames: radial density {row['effective_density']:.3f} PSNR {row['psnr']:.2f} "
              f"SSIM {row['ssim']:.4f} dense {dense_seconds:.1f} s radial {radial_seconds:.1f} s", flush=True)
    return out


def plot_density_vs_psnr(rows, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sparse_rows = [r for r in rows if r["method"] != "dense"]
    for method in sorted({r["method"] for r in sparse_rows}):
        mine = [r for r in sparse_rows if r["method"] == method]
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for r in sparse_rows:  # other methods in grey for context
            if r["method"] != method and math.isfinite(r["psnr"]):
                ax.plot(r["effective_density"], r["psnr"], "o", color="0.8", ms=4)
        mine = sorted(mine, key=lambda r: r["effective_density"])
        xs = [r["effective_density"] for r in mine]
        ys = [r["psnr"] for r in mine]
        ax.plot(xs, ys, "o-", ms=6, lw=1, color="C0", label=method)
        for r in mine:
            ax.annotate(r["label"].replace("block_size=", "bs=").replace("kernel_size=", "k="),
                        (r["effective_density"], r["psnr"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("effective attention density (share of block pairs computed, dense layers/steps = 1)")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{method}: density vs PSNR on the toy model (grey: other methods)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"density_vs_psnr_{method}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_attention_errors(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse_rows = [r for r in rows if r["method"] != "dense"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    styles = {"radial": "o-", "gna": "s-", "vmoba": "^-"}
    for i, r in enumerate(sparse_rows):
        layers = sorted(int(k) for k in r["attention_rel_l1_per_layer"])
        vals = [r["attention_rel_l1_per_layer"][k] for k in layers]
        ax.plot(layers, np.maximum(vals, 1e-6), styles.get(r["method"], "x-"), ms=3, lw=1,
                label=f"{r['method']} {r['label']}"[:60])
    ax.set_yscale("log")
    ax.set_xlabel("self-attention layer")
    ax.set_ylabel("relative L1 error of the attention output")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csv(result: dict, path: Path) -> None:
    versions = {"sparsegen": sparsegen.__version__, "torch": torch.__version__}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["section", "method", "options", "frames", "prompt_index", "metric", "value", "sparsegen", "torch"])
        frames = result["video_size"]["num_frames"]
        for r in result["sweep"]:
            opts = json.dumps(r["options"], sort_keys=True)
            for i, (p, s) in enumerate(zip(r["psnr_per_video"], r["ssim_per_video"])):
                w.writerow(["sweep", r["method"], opts, frames, i, "psnr_db", p, *versions.values()])
                w.writerow(["sweep", r["method"], opts, frames, i, "ssim", s, *versions.values()])
            for metric in ("effective_density", "sparse_call_density", "mask_token_density", "seconds"):
                w.writerow(["sweep", r["method"], opts, frames, "", metric, r[metric], *versions.values()])
            for layer, e in r["attention_rel_l1_per_layer"].items():
                w.writerow(["sweep", r["method"], opts, frames, "", f"attention_rel_l1_layer{layer}", e,
                            *versions.values()])
        for r in result["long"]:
            opts = json.dumps(r["radial_options"], sort_keys=True)
            for i, (p, s) in enumerate(zip(r["psnr_per_video"], r["ssim_per_video"])):
                w.writerow(["long", "radial", opts, r["frames"], i, "psnr_db", p, *versions.values()])
                w.writerow(["long", "radial", opts, r["frames"], i, "ssim", s, *versions.values()])
            for metric in ("effective_density", "dense_seconds", "radial_seconds"):
                w.writerow(["long", "radial", opts, r["frames"], "", metric, r[metric], *versions.values()])


def _fmt(x, spec=".2f"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf (identical)"
    return format(x, spec)


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Sparse attention quality on the toy model",
        "",
        *command_block(result["command"]),
        f"Model `{result['model_path']}` (diffusers `WanTransformer3DModel`, 6 layers, 6 heads; see its model card). "
        f"{result['num_prompts']} fixed prompts (`sparsegen.toy.data.evaluation_specs`), seeds {result['seed']} + prompt "
        f"index, {result['steps']} denoising steps, guidance {result['guidance_scale']}, "
        f"{result['video_size']['num_frames']} frames at {result['video_size']['height']} x "
        f"{result['video_size']['width']} = {result['geometry']} latent tokens (frames x rows x columns). Sparse and dense generations share seeds; "
        "PSNR and SSIM are of the sparse video against the dense one, averaged over prompts. "
        f"Machine: {result['machine']}; wall time {result['wall_seconds']:.0f} s.",
        "",
        f"LPIPS: {result['lpips']}.",
        "",
    ]
    if result["methods_missing"]:
        lines += [f"Methods left out (module failed to import): {result['methods_missing']}.", ""]
    lines += [
        "Columns: *density* = mean over steps of `handle.step_densities()` (share of (query block, key block) pairs "
        "computed; dense layers and steps count 1); *sparse-call density* = the same over sparse calls only; *token "
        "density* = share of (query, key) token pairs the static mask attends (radial, GNA); *attn rel L1* = mean over "
        "layers of the attention output's relative L1 error against exact attention on the same q, k, v (recorded in "
        f"the dense run at steps {result['record_steps']}, conditional pass, schedule applied as in the generation).",
        "",
        "| method | options | density | sparse-call density | token density | PSNR (dB) | SSIM | attn rel L1 | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sweep"]:
        lines.append(
            f"| {r['method']} | {r['label']} | {_fmt(r['effective_density'], '.3f')} | "
            f"{_fmt(r['sparse_call_density'], '.3f')} | {_fmt(r['mask_token_density'], '.3f')} | {_fmt(r['psnr'])} | "
            f"{_fmt(r['ssim'], '.4f')} | {_fmt(r['attention_rel_l1_mean'], '.4f')} | {_fmt(r['seconds'], '.1f')} |")
    lines += [
        "",
        f"Dense reference generation (unpatched pipeline): {result['reference']['dense_seconds']:.1f} s for "
        f"{result['num_prompts']} videos. The `dense` row runs through `sparsegen.apply(pipe, \"dense\")` and must be "
        "identical to it (PSNR inf).",
        "",
        "Radial at this size: 64 tokens per latent frame gives every frame distance a band narrower than the fixed "
        "decimation constant 128, so only the diagonal frame pairs and the sink (key frame 0) remain, whatever "
        "`decay_factor` and block size; its density is varied through the sink and the dense layer/step schedule.",
        "",
        f"VMoBA settings share the toy block layout {json.dumps(VMOBA_TOY_BLOCKS)} (1D: 5 blocks of one latent frame; "
        "2D: 8 blocks of 2 x 4 tokens over all frames; 3D: 20 blocks of 1 x 4 x 4); `top_k` is per (1D, 2D, 3D) layer.",
        "",
        "Per-layer attention error, per method setting:",
        "",
        "| method | options | " + " | ".join(f"layer {l}" for l in result["layers"]) + " |",
        "|---|---|" + "---|" * len(result["layers"]),
    ]
    for r in result["sweep"]:
        errs = r["attention_rel_l1_per_layer"]
        lines.append(f"| {r['method']} | {r['label']} | " + " | ".join(_fmt(errs[l], ".4f") for l in errs) + " |")
    links = result["figure_links"]
    lines += ["", "Density against PSNR, one figure per method (the other methods' points in grey), and the "
              "per-layer attention error of every setting (regenerated by the command above):", ""]
    lines += [f"![{Path(link).stem}]({link})" for link in links]
    lines.append("")
    lines += [
        "## Longer videos than the model was trained on (dense vs radial)",
        "",
        f"{len(result['long_prompts'])} prompts, radial options {json.dumps(LONG_RADIAL)}, same steps and seeds. "
        "Prompt following = share of videos whose measured colour / motion direction match the prompt "
        "(`toylab.metrics.measure_video`).",
        "",
        "| frames | latent tokens | radial density | PSNR (dB) | SSIM | dense time (s) | radial time (s) | "
        "colour / direction (dense) | colour / direction (radial) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["long"]:
        fd, fr = r["prompt_following_dense"], r["prompt_following_radial"]
        lines.append(f"| {r['frames']} | {r['tokens']} | {_fmt(r['effective_density'], '.3f')} | {_fmt(r['psnr'])} | "
                     f"{_fmt(r['ssim'], '.4f')} | {r['dense_seconds']:.1f} | {r['radial_seconds']:.1f} | "
                     f"{fd['colour']:.2f} / {fd['direction']:.2f} | {fr['colour']:.2f} / {fr['direction']:.2f} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 4 steps, one setting per method, 33 frames only")
    parser.add_argument("--model-path", type=Path, default=None, help="asset directory (default: the shipped model)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (default 8; 2 with --quick)")
    parser.add_argument("--long-prompts", type=int, default=None, help="prompts for 33/65 frames (default 4; 1 quick)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the available methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "out" / "quality")
    parser.add_argument("--results", type=Path, default=REPO / "evals" / "results" / "quality.md",
                        help="markdown page to write ('-' to skip)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="folder for the PNGs (default: the results page's path without .md, or --out)")
    args = parser.parse_args(argv)
    figure_dir = args.figures or (args.out if str(args.results) == "-" else args.results.with_suffix(""))
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    n = args.prompts or (2 if args.quick else 8)
    n_long = args.long_prompts or (1 if args.quick else 4)
    steps = args.steps or (4 if args.quick else toy.DEFAULT_NUM_INFERENCE_STEPS)
    record_steps = sorted({0, steps // 2, steps - 1})

    available, missing = methods_available()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise SystemExit(f"--methods: {unknown} not available; available: {available}")
        available = wanted
    base = QUICK_SWEEPS if args.quick else SWEEPS
    sweeps = {m: base.get(m, [{}]) for m in available}  # a method without a sweep runs its defaults

    pipe = toy.load_pipeline(path=args.model_path)
    specs = evaluation_specs(n)
    reference, rows = run_sweep(pipe, [s.prompt for s in specs], seed=args.seed, steps=steps, sweeps=sweeps,
                                record_steps=record_steps)
    long_specs = evaluation_specs(n_long)
    long_rows = run_long(pipe, long_specs, seed=args.seed, steps=steps, frames_list=LONG_FRAMES[:1] if args.quick else LONG_FRAMES)

    args.out.mkdir(parents=True, exist_ok=True)
    figure_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_density_vs_psnr(rows, figure_dir)
    plot_attention_errors(rows, figure_dir / "attention_error.png")
    figures.append(figure_dir / "attention_error.png")
    page_dir = args.out if str(args.results) == "-" else args.results.parent
    result = {
        "command": "python evals/quality.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "model_path": str(args.model_path or toy.ASSET_DIR.relative_to(REPO)),
        "num_prompts": n, "prompts": [s.prompt for s in specs], "long_prompts": [s.prompt for s in long_specs],
        "steps": steps, "seed": args.seed, "guidance_scale": toy.DEFAULT_GUIDANCE_SCALE, "record_steps": record_steps,
        "video_size": {"num_frames": toy.DEFAULT_NUM_FRAMES, "height": toy.DEFAULT_HEIGHT, "width": toy.DEFAULT_WIDTH},
        "geometry": reference["geometry"], "layers": sorted({int(k) for r in rows for k in r["attention_rel_l1_per_layer"]}),
        "methods": available, "methods_missing": missing, "lpips": lpips_status(), "reference": reference,
        "sweep": rows, "long": long_rows, "figures": [str(p) for p in figures],
        "figure_links": [os.path.relpath(p, page_dir) for p in figures],
        "machine": f"{platform.machine()} CPU, {args.threads} threads", "versions": {
            "sparsegen": sparsegen.__version__, "torch": torch.__version__},
        "wall_seconds": time.perf_counter() - tic,
    }
    (args.out / "quality.json").write_text(json.dumps(jsonable(result), indent=1, default=str) + "\n")
    write_csv(result, args.out / "quality.csv")
    if str(args.results) != "-":
        write_markdown(result, args.results)
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
