"""Agent attention on the shipped toy model, training-free: quality against dense attention.

    python evals/agent_quality.py            # 8 prompts (~6 min on 2 cores)
    python evals/agent_quality.py --quick    # 2 prompts, 4 steps

For three agent counts (agent cells of the 5 x 8 x 8 token grid: 1 x 2 x 2 -> 80 agents,
1 x 4 x 4 -> 20, 1 x 8 x 8 -> 5) and two schedules (AgentSD's early-steps rule,
``agent_steps=0.4``, and every step), every evaluation video is generated with the same
seed as its dense reference and scored by PSNR / SSIM (``toylab.metrics``) and prompt
following. Per layer, the relative L1 error of agent attention against exact attention on
the same q, k, v is measured on a calibration prompt by
``sparsegen.calibration.calibrate_agent_layers`` (which also gives the layers under a
bound: a row "calibrated layers" uses them).

Writes ``<out>/agent_quality.json`` and the page ``evals/results/agent.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparsegen
from sparsegen.calibration import calibrate_agent_layers
from sparsegen.toy import pipeline as toy
from sparsegen.toy.data import evaluation_specs
from toylab.metrics import measure_video, prompt_following, psnr, ssim
from toylab.report import save_result

REPO = Path(__file__).resolve().parent.parent
CELLS = ((1, 2, 2), (1, 4, 4), (1, 8, 8))
SCHEDULES = (0.4, 1.0)
MAX_REL_ERROR = 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "out" / "agent")
    parser.add_argument("--results", type=Path, default=REPO / "evals" / "results" / "agent.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.prompts or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else toy.DEFAULT_NUM_INFERENCE_STEPS)
    specs_all = evaluation_specs(n + 1)
    specs, calib = specs_all[:n], specs_all[n]
    prompts = [s.prompt for s in specs]
    tic = time.perf_counter()
    pipe = toy.load_pipeline()
    dense = toy.generate(pipe, prompts, seed=args.seed, num_inference_steps=steps)
    dense_follow = prompt_following([measure_video(v) for v in dense], specs)
    rows = []

    def evaluate(label, config):
        with sparsegen.apply(pipe, config) as handle:
            t0 = time.perf_counter()
            videos = toy.generate(pipe, prompts, seed=args.seed, num_inference_steps=steps)
            seconds = time.perf_counter() - t0
            dens = [d for _, d in handle.step_densities()]
        p = [psnr(v, r) for v, r in zip(videos, dense)]
        row = {"label": label, "config": config.to_dict(), "agents": config.num_agents((5, 8, 8)),
               "psnr": float(np.mean([x for x in p if np.isfinite(x)])),
               "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, dense)])),
               "following": prompt_following([measure_video(v) for v in videos], specs),
               "work": float(np.mean(dens)), "seconds": seconds}
        rows.append(row)
        print(f"{label:45s} PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} work {row['work']:.3f} "
              f"following {row['following']}", flush=True)

    layer_errors = {}
    for cell in CELLS:
        calibrated = calibrate_agent_layers(
            pipe, lambda: toy.generate(pipe, [calib.prompt], seed=args.seed + 1000, num_inference_steps=steps),
            max_rel_error=MAX_REL_ERROR, agent_cell=cell)
        layer_errors[str(cell)] = list(calibrated.layer_errors)
        print(f"cell {cell}: per-layer relative error {[round(e, 3) for e in calibrated.layer_errors]}", flush=True)
        for share in SCHEDULES:
            evaluate(f"cell {cell}, agent_steps {share}", sparsegen.AgentConfig(agent_cell=cell, agent_steps=share))
        if calibrated.layers:
            evaluate(f"cell {cell}, agent_steps 0.4, layers {list(calibrated.layers)}", calibrated)
    result = {"command": "python evals/agent_quality.py" + "".join(
                  " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
              "prompts": prompts, "calibration_prompt": calib.prompt, "steps": steps, "dense_following": dense_follow,
              "layer_errors": layer_errors, "max_rel_error": MAX_REL_ERROR, "rows": rows,
              "seconds_total": time.perf_counter() - tic, "torch": torch.__version__}
    save_result(result, args.out, "agent_quality", args.results, write_markdown)
    return 0


def write_markdown(result: dict, path: Path) -> None:
    f = result["dense_following"]
    lines = [
        "# Agent attention on the built-in model (training-free)", "",
        f"Command: `{result['command']}` ({result['seconds_total'] / 60:.0f} min on 2 CPU cores; torch "
        f"{result['torch']}).", "",
        f"17 frames = 5 x 8 x 8 video tokens, {result['steps']} steps per sampling stage, {len(result['prompts'])} "
        f"evaluation prompts; PSNR/SSIM against the dense video with the same seed; dense prompt following: colour "
        f"{f['colour']:.2f}, direction {f['direction']:.2f}. \"work\" is the mean over steps of the attention work "
        "against dense (2M / N in agent steps, 1 in the others).", "",
        "| setting | agents | work | PSNR (dB) | SSIM | colour | direction |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['agents']} | {r['work']:.3f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['following']['colour']:.2f} | {r['following']['direction']:.2f} |")
    lines += ["", f"Per-layer relative L1 error of agent attention against exact attention (same q, k, v; the "
              f"steps that use agents; calibration prompt \"{result['calibration_prompt']}\"; layers under "
              f"{result['max_rel_error']} are the calibrated ones):", "",
              "| agent cell | " + " | ".join(f"layer {i}" for i in range(len(next(iter(result['layer_errors'].values())))))
              + " |", "|---|" + "---|" * len(next(iter(result["layer_errors"].values())))]
    for cell, errs in result["layer_errors"].items():
        lines.append(f"| {cell} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")
    lines += ["", "No training-free result of agent attention on a DiT is published; these are our own measurements "
              "on a 320-token model.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
