"""Quality of the Quickstart's main job: the built-in model's "long" GNA preset against dense at 129 frames.

    python evals/main_job.py [--prompts 8] [--frames 129]

The Quickstart runs ``sparsegen generate --method gna --preset long --frames 129
--compare-dense --repeats 2``, which reports the measured speedup and the PSNR of the
sparse video against the dense one for one prompt. This script states the quality next
to that figure over several prompts: for the fixed evaluation prompts it generates each
video dense (the pipeline unpatched) and with the preset (the variants alternating, the
order rotating by prompt) and reads from the pixels whether the prompt's colour and
direction are followed, how many frames show an object and how straight its track is
(the built-in model's checks, ``evals/toylab/metrics.py``), plus each video's PSNR against
its dense twin and the seconds per video. It prints a markdown table and writes
``evals/out/main_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import sparsegen  # noqa: F401  (the patching API used by length_lora.Variant)
from length_lora import Variant, sampled_videos
from sparsegen.generate import method_config
from sparsegen.toy import pipeline as toy
from sparsegen.toy.data import evaluation_specs
from toylab.metrics import psnr
from toylab.report import jsonable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("evals", "out", "main_job.json"))
    args = p.parse_args(argv)
    cfg = method_config("gna", preset="long", model_presets=toy.PRESETS, model_named_presets=toy.NAMED_PRESETS,
                        log=lambda *a: None)
    pipe = toy.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    variants = [Variant("dense", pipe), Variant("gna long", pipe, cfg)]
    specs = evaluation_specs(args.prompts)
    print(f"{args.frames} frames, {args.prompts} prompts, {toy.DEFAULT_NUM_INFERENCE_STEPS} steps, guidance "
          f"{toy.DEFAULT_GUIDANCE_SCALE}, sampler {pipe.toy_sampler}; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    stats, videos = sampled_videos(variants, args.frames, specs, steps=toy.DEFAULT_NUM_INFERENCE_STEPS,
                                   guidance=toy.DEFAULT_GUIDANCE_SCALE, sampler=pipe.toy_sampler, seed=args.seed)
    psnrs = [psnr(a, b) for a, b in zip(videos["gna long"], videos["dense"])]
    print("\n| variant | colour | direction | objects shown | objects shown, last quarter | track jitter (px) "
          "| s / video (median) | PSNR vs dense (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in stats.items():
        n = s["prompts"]
        pv = "-" if name == "dense" else f"{np.mean(psnrs):.2f} dB"
        print(f"| {name} | {s['hits']['colour']}/{n} | {s['hits']['direction']}/{n} | "
              f"{s['mean_present_fraction']:.2f} | {s['late_present_fraction']:.2f} | "
              f"{'-' if s['median_track_jitter'] is None else format(s['median_track_jitter'], '.2f')} | "
              f"{s['median_seconds_per_video']:.1f} | {pv} |")
    speed = stats["dense"]["median_seconds_per_video"] / stats["gna long"]["median_seconds_per_video"]
    print(f"\nspeedup (median seconds per video) {speed:.2f}x; load average {os.getloadavg()[0]:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(jsonable({"config": cfg.to_dict(), "frames": args.frames, "stats": stats, "psnr_vs_dense": psnrs,
                            "speedup": speed}), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
