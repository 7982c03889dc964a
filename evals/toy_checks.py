"""Evidence that the shipped toy model learned: prompt following and attention locality.

    python evals/toy_checks.py                       # full run (about 2 minutes on 2 cores)
    python evals/toy_checks.py --quick               # a few prompts and steps (CI smoke run)
    python evals/toy_checks.py --model-path DIR      # another asset directory
    python evals/toy_checks.py --sampler first-frame # two-stage sampling (toy.generate_from_first_frame)

1. Prompt following. For a fixed prompt set, dense generations of the trained model, of
   the same architecture at its random initialisation (baseline) and the generator's own
   videos for the same prompts (the ceiling of each check) are read back with
   ``toylab.metrics.measure_video``: dominant colour, direction of motion, object
   count, background texture (nearest-centroid classifier fitted on separate real
   videos), plus speed and foreground share against the ground truth, and motion
   consistency: the share of frames showing an object, how far the object's track
   strays from a straight line, and whether reversing the direction word (same noise)
   reverses the motion.
2. Denoising. The generator's videos for the same prompts are noised to fixed levels
   sigma (x_sigma = (1 - sigma) x0 + sigma noise, as in training) and the trained and
   untrained models predict the clean video in one call; PSNR
   of that prediction against the clean video says what the model learned at each noise
   level, independently of the sampler.
3. Attention locality. During the trained and the untrained model's generations the q
   and k of every self-attention layer are recorded (``toylab.probe``) and the
   softmax attention mass is binned by temporal distance (latent frames) and spatial
   Chebyshev distance (tokens); the summary is the mass on the 3 x 3 x 3 token
   neighbourhood divided by its share under uniform attention (1 = no locality).
4. Prompt reliance. The denoising of check 2 is repeated with one attribute of every
   prompt changed (colour, shape, count, background to another value, the objects' and
   the camera's direction to the opposite one, the camera pan removed); the PSNR the
   prediction loses says how much the model uses that word (0 dB = it ignores the word).
   And from pure noise, where the best prediction is the mean video given the prompt,
   whether the prediction's red mass drifts along the prompt's direction as the
   generator's mean video does; given a noised object held at rest, whether the
   prediction sets it moving the prompt's way; and given only the first frame (the later
   ones pure noise, one timestep per token), whether it continues it the prompt's way.

Writes ``<out>/toy_checks.json``, the markdown page ``evals/results/toy.md``
(``--results``) and its figures ``attention_locality.png`` and ``samples.png`` in the
folder named like the page without ``.md`` (``evals/results/toy/``; ``--figures``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsegen.toy import pipeline as toy
from sparsegen.toy.data import (
    BACKGROUNDS, COLOURS, COUNT_WORDS, DIRECTIONS, SEED_RANGES, SHAPES, PromptSpec, evaluation_specs, render_video,
)
from toylab.denoising import denoising_check, one_call_prediction
from toylab.metrics import above_chance_p, measure_video, motion_consistency
from toylab.probe import locality_profile, record_attention_inputs
from toylab.report import command_block

REPO = Path(__file__).resolve().parent.parent
CHANCE = {"colour": 1 / len(COLOURS), "direction": 1 / len(DIRECTIONS), "count": 1 / 3, "background": 1 / len(BACKGROUNDS)}
CALIBRATION_OFFSET = 500_000  # background-classifier videos: evaluation range, far from the prompt seeds
# Everything is rendered, generated and measured at the model's training size.
VIDEO_SIZE = dict(num_frames=toy.DEFAULT_NUM_FRAMES, height=toy.DEFAULT_HEIGHT, width=toy.DEFAULT_WIDTH)


class BackgroundClassifier:
    """Nearest class centroid over standardised background features, fitted on real videos."""

    def __init__(self, num_videos: int):
        feats, labels = [], []
        for i in range(num_videos):
            seed = SEED_RANGES["evaluation"] + CALIBRATION_OFFSET + i
            background = BACKGROUNDS[i % len(BACKGROUNDS)]
            video = render_video(seed, spec=_with_background(seed, background), **VIDEO_SIZE)
            feats.append(measure_video(video.frames).background)
            labels.append(background)
        feats = np.array(feats)
        self.mean, self.std = feats.mean(0), feats.std(0) + 1e-9
        z = (feats - self.mean) / self.std
        self.centroids = {b: z[[l == b for l in labels]].mean(0) for b in BACKGROUNDS}
        self.training_accuracy = float(np.mean([self.predict(f) == l for f, l in zip(feats, labels)]))

    def predict(self, features: np.ndarray) -> str:
        z = (np.asarray(features) - self.mean) / self.std
        return min(self.centroids, key=lambda b: float(np.sum((z - self.centroids[b]) ** 2)))


def _with_background(seed: int, background: str) -> PromptSpec:
    rng = np.random.default_rng(seed)
    spec = PromptSpec(count=int(rng.integers(1, 4)), colour=list(COLOURS)[rng.integers(4)], shape=SHAPES[rng.integers(3)],
                      direction=list(DIRECTIONS)[rng.integers(4)], background=background)
    return spec


def untrained_pipeline(model_path=None):
    """The shipped architecture at diffusers' default initialisation (and an untrained
    prompt encoder), with the trained model's codec, scheduler and noise prior."""
    trained = toy.load_pipeline(path=model_path)
    return toy.build_pipeline(toy.new_transformer(seed=0).eval(), trained.vae, toy.new_prompt_encoder(seed=0).eval(),
                              trained.scheduler, trained.toy_frame_noise_correlation)


def score(videos, specs, truths, classifier) -> dict:
    """Per-check accuracy and ground-truth comparisons for videos (N, F, H, W, 3)."""
    rows, measurements = [], []
    for video, spec, truth in zip(videos, specs, truths):
        m = measure_video(video)
        measurements.append(m)
        true_speed = float(np.linalg.norm(truth.velocities, axis=1).mean())
        rows.append({
            "prompt": spec.prompt,
            "colour": m.colour, "direction": m.direction, "count": m.count,
            "background": classifier.predict(m.background),
            "speed": float(np.linalg.norm(m.velocity)), "true_speed": true_speed,
            "foreground_fraction": m.foreground_fraction,
            "present_fraction": m.present_fraction, "track_jitter": m.track_jitter,
            "ok": {"colour": m.colour == spec.colour, "direction": m.direction == spec.direction,
                   "count": m.count == spec.count, "background": classifier.predict(m.background) == spec.background},
        })
    hits = {k: int(sum(r["ok"][k] for r in rows)) for k in CHANCE}
    accuracy = {k: hits[k] / len(rows) for k in CHANCE}
    real_fg = np.array([float((measure_video(t.frames).foreground_fraction)) for t in truths])
    fg = np.array([r["foreground_fraction"] for r in rows])
    speed_ratio = np.array([r["speed"] / r["true_speed"] for r in rows])
    return {
        "accuracy": accuracy,
        "hits": hits,
        "p_above_chance": {k: above_chance_p(hits[k], len(rows), CHANCE[k]) for k in CHANCE},
        "median_speed_ratio": float(np.median(speed_ratio)),
        "mean_foreground_fraction": float(fg.mean()),
        "mean_foreground_fraction_real": float(real_fg.mean()),
        **motion_consistency(measurements),
        "rows": rows,
    }


def reversal_agreement(videos, reversed_videos) -> dict:
    """Does reversing the direction word reverse the motion, noise held fixed?

    Args:
        videos, reversed_videos: (N, F, H, W, 3) for the prompts and for the same prompts
            with the objects' direction reversed (same noise / same generator seed).
    Returns:
        {"reversed": share of pairs whose fitted motions point in opposite directions
        (cosine below 0), "median_cosine": median cosine between the two motions}; pairs
        where either video shows no motion are counted as not reversed.
    """
    cosines = []
    for a, b in zip(videos, reversed_videos):
        va, vb = measure_video(a).velocity, measure_video(b).velocity
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        cosines.append(float(va @ vb) / norm if norm > 0 else 0.0)
    cosines = np.array(cosines)
    return {"reversed": float(np.mean(cosines < 0)), "median_cosine": float(np.median(cosines))}


# Noise levels where the model has to bring what the prompt says: the video is faint but not gone.
RELIANCE_SIGMAS = (0.8, 0.95)
OPPOSITE_DIRECTION = {"left": "right", "right": "left", "up": "down", "down": "up"}
ATTRIBUTE_CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(COUNT_WORDS), "background": BACKGROUNDS}
# Directions (of the objects, and of the camera where it pans) change to the opposite one.
RELIANCE_ATTRIBUTES = (*ATTRIBUTE_CHOICES, "direction", "pan")


def with_other_attribute(spec: PromptSpec, attribute: str) -> PromptSpec:
    """``spec`` with one of RELIANCE_ATTRIBUTES changed: a direction or pan to the opposite
    one, the others to the next value of their choices.

    Raises:
        ValueError: for "pan" when the camera is static (there is no pan to reverse).
    """
    if attribute in ("direction", "pan"):
        if getattr(spec, attribute) is None:
            raise ValueError(f"{spec.prompt!r} has a static camera: no pan to reverse")
        value = OPPOSITE_DIRECTION[getattr(spec, attribute)]
    else:
        choices = ATTRIBUTE_CHOICES[attribute]
        value = choices[(choices.index(getattr(spec, attribute)) + 1) % len(choices)]
    return dataclasses.replace(spec, **{attribute: value})


def prompt_reliance(pipe, real: np.ndarray, specs, *, seed: int, sigmas=RELIANCE_SIGMAS, reference=None) -> dict:
    """{change: {sigma: PSNR (dB) the one-call prediction loses when every prompt is changed so}}.

    Changes: each of RELIANCE_ATTRIBUTES (the pan one over the prompts that have a pan),
    the pan removed, and the whole prompt emptied. The true and the changed prompts see the
    same noise. ``reference``: the true prompts' {sigma: PSNR} over all of ``specs`` from
    ``denoising_check`` with the same seed, if already computed (covering ``sigmas``).
    """
    panned = [i for i, s in enumerate(specs) if s.pan is not None]
    everyone = list(range(len(specs)))
    changes = {a: (everyone, lambda s, a=a: with_other_attribute(s, a).prompt) for a in RELIANCE_ATTRIBUTES if a != "pan"}
    changes[f"pan reversed ({len(panned)} panning prompts)"] = (panned, lambda s: with_other_attribute(s, "pan").prompt)
    changes[f"pan removed ({len(panned)} panning prompts)"] = (panned, lambda s: dataclasses.replace(s, pan=None).prompt)
    changes["all (empty prompt)"] = (everyone, lambda s: "")
    references = {tuple(everyone): reference} if reference is not None else {}
    result = {}
    for change, (rows, alter) in changes.items():
        if not rows:
            continue
        chosen = [specs[i] for i in rows]
        if tuple(rows) not in references:
            references[tuple(rows)] = denoising_check(pipe, real[rows], [s.prompt for s in chosen], seed=seed,
                                                      sigmas=sigmas)[0]
        true_scores = references[tuple(rows)]
        scores, _ = denoising_check(pipe, real[rows], [alter(s) for s in chosen], seed=seed, sigmas=sigmas)
        result[change] = {str(sg): true_scores[sg] - scores[sg] for sg in sigmas}
    return result


DRIFT_SEED_OFFSET = 600_000  # generator videos for the mean videos: evaluation range, apart from the others


def red_mass_centroids(video: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) video -> (F, 2) centroid (x, y) in pixels of its red excess, max(R - (G + B) / 2, 0)."""
    weight = np.clip(video[..., 0] - (video[..., 1] + video[..., 2]) / 2, 0.0, None)
    ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]] + 0.5
    total = np.maximum(weight.sum(axis=(1, 2)), 1e-12)
    return np.stack([(weight * xs).sum(axis=(1, 2)) / total, (weight * ys).sum(axis=(1, 2)) / total], axis=1)


def drift_along(video: np.ndarray, direction: str) -> float:
    """Slope (pixels per frame) of the red-mass centroid of a video along ``direction``."""
    slope = np.polyfit(np.arange(video.shape[0]), red_mass_centroids(video), 1)[0]
    return float(slope @ np.array(DIRECTIONS[direction]))


def red_circle_videos(direction: str, num_videos: int) -> tuple[PromptSpec, np.ndarray]:
    """'a red circle moving <direction> over a plain background' and ``num_videos`` generator
    videos (N, F, H, W, 3) of it, from seeds set apart for the motion checks."""
    spec = PromptSpec(1, "red", "circle", direction, "plain")
    return spec, np.stack([render_video(SEED_RANGES["evaluation"] + DRIFT_SEED_OFFSET + i, spec=spec, **VIDEO_SIZE).frames
                           for i in range(num_videos)])


def pure_noise_drift(pipe, *, seed: int, num_videos: int) -> dict:
    """Does the model's prediction from pure noise move with the prompt's direction?

    At sigma = 1 the best one-call prediction is the mean video given the prompt. For
    "a red circle moving <D> over a plain background", the generator's mean video (over
    ``num_videos`` layouts) drifts along D at the objects' mean speed; the
    model's prediction, averaged over ``num_videos`` noises, is measured the same way.

    Returns:
        {direction: {"generator": px/frame, "trained": px/frame}} along each direction.
    """
    result = {}
    for direction in DIRECTIONS:
        spec, real = red_circle_videos(direction, num_videos)
        _, predictions = denoising_check(pipe, real, [spec.prompt] * num_videos, seed=seed, sigmas=(1.0,))
        result[direction] = {"generator": drift_along(real.mean(axis=0), direction),
                             "trained": drift_along(predictions[1.0].mean(axis=0), direction)}
    return result


HELD_OBJECT_SIGMAS = (0.5, 0.7, 0.9)


def held_object_motion(pipe, *, seed: int, num_videos: int, sigmas=HELD_OBJECT_SIGMAS) -> dict:
    """Does the model add the prompt's motion to an object that does not move?

    For "a red circle moving <D> over a plain background", generator videos with their
    middle frame held for the whole video (the object at rest) are noised to each sigma and
    predicted in one call. The data never holds still, so the best prediction moves the
    faint object along D; a model that only carries over the motion its input shows
    predicts it at rest.

    Returns:
        {"sigma": {sigma: mean fitted velocity (px/frame) of the predictions along the
        prompt's direction}, "generator": the generator videos' own mean speed along D}.
    """
    along, generator = {sg: [] for sg in sigmas}, []
    for direction in DIRECTIONS:
        spec, moving = red_circle_videos(direction, num_videos)
        held = np.stack([np.repeat(v[len(v) // 2][None], len(v), axis=0) for v in moving])
        generator += [float(measure_video(v).velocity @ np.array(DIRECTIONS[direction])) for v in moving]
        _, predictions = denoising_check(pipe, held, [spec.prompt] * num_videos, seed=seed, sigmas=sigmas)
        for sg in sigmas:
            along[sg] += [float(measure_video(v).velocity @ np.array(DIRECTIONS[direction])) for v in predictions[sg]]
    return {"sigma": {str(sg): float(np.mean(v)) for sg, v in along.items()}, "generator": float(np.mean(generator))}


# Latent frame 0 (the video's first frame) shown at a low noise level, the other latent frames pure noise.
FIRST_FRAME_SIGMA = 0.1


def first_frame_continuation(pipe, *, seed: int, num_videos: int, first_sigma: float = FIRST_FRAME_SIGMA) -> dict:
    """Does the model continue a shown first frame in the prompt's direction?

    For "a red circle moving <D> over a plain background", generator videos whose first
    latent frame is noised to ``first_sigma`` and whose later latent frames are pure noise
    (one timestep per token) are predicted in one call. Where the object goes next can only
    come from the prompt, so the best prediction's red mass drifts along D (less than the
    data's own speed, since later frames are predicted as a blurred mean). A model trained
    with one noise level per video never saw such input.

    Returns:
        {"trained": mean drift of the predictions (px/frame) along D, "generator": the
        generator videos' own, "reversed": the same predictions' drift along D when the
        prompt names the opposite direction}.
    """
    latent_frames = (VIDEO_SIZE["num_frames"] - 1) // toy.TEMPORAL_FACTOR + 1
    levels = [first_sigma] + [1.0] * (latent_frames - 1)
    trained, generator, reversed_ = [], [], []
    for direction in DIRECTIONS:
        spec, real = red_circle_videos(direction, num_videos)
        generator += [drift_along(v, direction) for v in real]
        for prompt, out in ((spec.prompt, trained),
                            (dataclasses.replace(spec, direction=OPPOSITE_DIRECTION[direction]).prompt, reversed_)):
            predictions = one_call_prediction(pipe, real, [prompt] * num_videos, seed=seed, sigma=levels)
            out += [drift_along(v, direction) for v in predictions]
    return {"first_sigma": first_sigma, "trained": float(np.mean(trained)), "generator": float(np.mean(generator)),
            "reversed": float(np.mean(reversed_))}


def plot_denoising(real: np.ndarray, predictions: dict, path: Path, frame: int = 8) -> None:
    """Frame ``frame`` of the first video: clean, then the trained model's prediction per noise level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = list(predictions)
    fig, axes = plt.subplots(1, len(sigmas) + 1, figsize=(1.6 * (len(sigmas) + 1), 2.0))
    panels = [("clean", real[0, frame])] + [(f"sigma {s}", predictions[s][0, frame]) for s in sigmas]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("trained model: clean video predicted in one call from a noised real video", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generate_videos(pipe, prompts, *, seed, steps, guidance, batch, record_steps=(), sampler="joint"):
    """Dense generations (N, F, H, W, 3), ``batch`` prompts at a time (prompt i from noise
    seed + i) with ``sampler`` (toy.generate's), and the attention inputs recorded at ``record_steps``
    of the first batch (conditional pass of the pipeline's own loop only; none when
    ``record_steps`` is empty)."""
    videos, records = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        recording = (record_attention_inputs(pipe, steps=record_steps, max_calls_per_step=1)
                     if start == 0 and record_steps else contextlib.nullcontext([]))
        with recording as recs:
            videos.append(toy.generate(pipe, chunk, seed=seed + start, num_inference_steps=steps,
                                       guidance_scale=guidance, sampler=sampler, **VIDEO_SIZE))
        records += list(recs)
    return np.concatenate(videos), records


def generate_all(pipe, prompts, *, seed, steps, guidance, batch, record_steps, sampler="joint"):
    """Dense generations (N, F, H, W, 3), the locality profile per layer, and the token
    grid as text ('frames x rows x columns')."""
    videos, records = generate_videos(pipe, prompts, seed=seed, steps=steps, guidance=guidance, batch=batch,
                                      record_steps=record_steps, sampler=sampler)
    layers = sorted({r.layer for r in records})
    profiles = {layer: locality_profile([r for r in records if r.layer == layer]) for layer in layers}
    g = records[0].geometry
    return videos, profiles, f"{g.frames} x {g.height} x {g.width}"


def plot_locality(profiles: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    cmap = plt.get_cmap("viridis")
    trained, untrained = profiles["trained"], profiles["untrained"]
    n = len(trained)
    for panel, (ax, key, xlabel) in enumerate(zip(
            axes, ("temporal", "spatial"), ("temporal distance |dt| (latent frames)", "spatial distance (tokens, Chebyshev)"))):
        for i, (layer, prof) in enumerate(sorted(trained.items())):
            ratio = getattr(prof, f"{key}_mass") / getattr(prof, f"{key}_uniform")
            ax.plot(np.arange(len(ratio)), ratio, "o-", ms=3, color=cmap(i / max(n - 1, 1)), label=f"layer {layer}")
        mean_untrained = np.mean([getattr(p, f"{key}_mass") / getattr(p, f"{key}_uniform") for p in untrained.values()],
                                 axis=0)
        ax.plot(np.arange(len(mean_untrained)), mean_untrained, "s:", ms=3, color="grey", lw=2,
                label="untrained model (mean of layers)")
        ax.axhline(1.0, color="k", ls="--", lw=1.5, label="uniform attention")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("attention mass / uniform share (per distance)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if panel == 0:
            ax.legend(fontsize=8)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ratios = [p.local_ratio for _, p in sorted(trained.items())]
    fig.suptitle("toy Wan self-attention mass vs token distance; 3x3x3-neighbourhood mass / uniform: "
                 + ", ".join(f"{r:.1f}" for r in ratios), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(rows: list[tuple[str, np.ndarray]], prompts: list[str], path: Path, frames=(0, 8, 16)) -> None:
    """A grid: one row per (source, prompt), the chosen frames side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_prompts = len(prompts)
    fig, axes = plt.subplots(n_prompts, len(rows), figsize=(3.2 * len(rows), 1.25 * n_prompts + 0.6), dpi=100, squeeze=False)
    for j, (name, videos) in enumerate(rows):
        for i in range(n_prompts):
            strip = np.concatenate([videos[i, min(f, videos.shape[1] - 1)] for f in frames], axis=1)
            axes[i, j].imshow(np.clip(strip, 0, 1), interpolation="nearest")  # 32 px frames: show pixels
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"{name} (frames {', '.join(map(str, frames))})", fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(prompts[i].replace(" over", "\nover").replace(", camera", ",\ncamera"), fontsize=6,
                                      rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _format_or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _per_source_row(result: dict, label: str, cell) -> str:
    """A row of the prompt-following table without chance or hit count: ``cell`` formats
    the generator's, the trained and the untrained model's scores."""
    real, trained, untrained = (cell(result[k]) for k in ("real", "trained", "untrained"))
    return f"| {label} | - | {real} | {trained} | - | {untrained} |"


def write_markdown(result: dict, path: Path) -> None:
    acc = {k: result[k]["accuracy"] for k in ("real", "trained", "untrained")}
    lines = [
        "# Toy model: does it follow prompts, and is its attention local?",
        "",
        *command_block(result["command"]),
        f"Model: `{result['model_path']}`. {result['num_prompts']} fixed prompts (`sparsegen.toy.data.evaluation_specs`), "
        f"{result['steps']} denoising steps, guidance {result['guidance_scale']}, "
        f"{toy.SAMPLER_WORDS[result.get('sampler', 'joint')]}, seed {result['seed']} + prompt index, "
        f"{result['video_size']['num_frames']} frames at {result['video_size']['height']} x "
        f"{result['video_size']['width']} ({result['geometry']} latent tokens, frames x rows x columns). "
        f"Wall time {result['wall_seconds']:.0f} s (torch threads: {result['threads']}; the machine may be shared).",
        "",
        "## Prompt following (accuracy of each check)",
        "",
        "The same pixel-level reader scores the generator's own videos for the same prompts (the ceiling of each "
        "check), the trained model and the untrained model (same architecture, diffusers' default initialisation).",
        "",
        "*p* = one-sided binomial probability of at least the trained model's hits by chance alone "
        "(below 0.05: the model follows that part of the prompt more often than chance).",
        "",
        "| check | chance | generator ground truth | trained model | trained: hits, p | untrained model |",
        "|---|---|---|---|---|---|",
    ]
    trained = result["trained"]
    for k in CHANCE:
        lines.append(f"| {k} | {CHANCE[k]:.2f} | {acc['real'][k]:.2f} | {acc['trained'][k]:.2f} | "
                     f"{trained['hits'][k]}/{result['num_prompts']}, {trained['p_above_chance'][k]:.2g} | "
                     f"{acc['untrained'][k]:.2f} |")
    lines += [
        f"| speed / true speed (median) | - | {result['real']['median_speed_ratio']:.2f} | "
        f"{trained['median_speed_ratio']:.2f} | - | {result['untrained']['median_speed_ratio']:.2f} |",
        f"| foreground share of pixels (mean) | - | {result['real']['mean_foreground_fraction']:.3f} | "
        f"{trained['mean_foreground_fraction']:.3f} | - | {result['untrained']['mean_foreground_fraction']:.3f} |",
        _per_source_row(result, "frames showing an object (mean share)", lambda r: f"{r['mean_present_fraction']:.2f}"),
        _per_source_row(result, "track jitter, px (median)", lambda r: _format_or_dash(r["median_track_jitter"], ".2f")),
        _per_source_row(result, "direction word reversed, same noise: motion reverses (share)",
                        lambda r: f"{r['direction_reversal']['reversed']:.2f}"),
        _per_source_row(result, "same: median cosine between the two motions",
                        lambda r: f"{r['direction_reversal']['median_cosine']:+.2f}"),
        "",
        "How each check reads a video: foreground = pixels whose HSV saturation is above the midpoint between the most "
        "saturated background and the least saturated object colour the generator can make; colour = the named colour "
        "nearest in hue to most foreground pixels; direction = the named direction closest to the fitted motion of the "
        "foreground centroid; count = most frequent number of objects per frame (foreground regions, each split into "
        "the regions of its bright interior, i.e. without the darker outline rings, when it holds several; the "
        "generator's own count falls short where an object stays mostly hidden behind another); background = nearest centroid of three texture features, fitted on "
        f"{result['background_classifier']['videos']} separate generator videos (accuracy on them "
        f"{result['background_classifier']['training_accuracy']:.2f}). "
        "Motion consistency: a frame shows an object when its foreground covers at least a quarter of the smallest "
        "object's area; track jitter = RMS distance in pixels of the per-frame foreground centroid from its fitted "
        "straight line (the generator's objects move steadily; occlusion moves the centroid a little); direction "
        "reversal = each prompt generated again with the objects' direction reversed and the same noise (the "
        "generator: the same seed): the share of pairs whose fitted motions point in opposite directions (cosine "
        "below 0), and their median cosine: -1 when the word alone sets the direction, near 0 for unrelated "
        "motions, +1 when the noise alone sets it.",
        "",
        f"![samples]({result['figure_links']['samples']})",
        "",
        "## Denoising: what the model learned at each noise level",
        "",
        "The generator's videos for the same prompts, noised to level sigma exactly as in training, and the clean "
        "video predicted in one model call (the model's clean-video output, or x_sigma - sigma v for a velocity "
        "model; conditional, no guidance); mean PSNR against "
        "the clean video (pixels in [0, 1]).",
        "",
        "| sigma | " + " | ".join(result["denoising"]["trained"]) + " |",
        "|---|" + "---|" * len(result["denoising"]["trained"]),
        "| trained model PSNR (dB) | " + " | ".join(f"{v:.1f}" for v in result["denoising"]["trained"].values()) + " |",
        "| untrained model PSNR (dB) | " + " | ".join(f"{v:.1f}" for v in result["denoising"]["untrained"].values())
        + " |",
        "",
        f"![denoising]({result['figure_links']['denoising']})",
        "",
        "## Prompt reliance: which words the model uses",
        "",
        "The trained model's one-call prediction above, repeated with one attribute of every prompt changed "
        "(object or camera direction to the opposite one, the others to another value, the pan removed; the same "
        "noise): PSNR lost against the prediction with the true prompt. 0 dB means the model ignores that word.",
        "",
        "| changed | " + " | ".join(f"sigma {s}: dB lost" for s in next(iter(result["prompt_reliance"].values())))
        + " |",
        "|---|" + "---|" * len(next(iter(result["prompt_reliance"].values()))),
    ]
    for attribute, lost in result["prompt_reliance"].items():
        lines.append(f"| {attribute} | " + " | ".join(f"{v:.2f}" for v in lost.values()) + " |")
    lines += [
        "",
        "From pure noise (sigma 1) the best one-call prediction is the mean video given the prompt. For "
        "'a red circle moving <direction> over a plain background', the drift (pixels per frame, along the "
        "prompt's direction) of the red mass of the generator's mean video and of the trained model's prediction "
        "averaged over noises (same number of videos and noises):",
        "",
        "| direction | generator mean video | trained model from pure noise |",
        "|---|---|---|",
    ]
    for direction, drift in result["pure_noise_drift"].items():
        lines.append(f"| {direction} | {drift['generator']:.2f} | {drift['trained']:.2f} |")
    held = result["held_object_motion"]
    lines += [
        "",
        "An object at rest: 'a red circle moving <direction> over a plain background' (each direction), generator "
        "videos with their middle frame held for the whole video, noised and predicted in one call. The data never "
        "holds still, so the best prediction moves the faint object along the prompt's direction; a model that only "
        "carries over the motion its input shows predicts it at rest. Mean fitted velocity of the predictions along "
        f"the prompt's direction, px per frame (the generator's own videos: {held['generator']:.2f}):",
        "",
        "| sigma | " + " | ".join(held["sigma"]) + " |",
        "|---|" + "---|" * len(held["sigma"]),
        "| trained model | " + " | ".join(f"{v:+.3f}" for v in held["sigma"].values()) + " |",
    ]
    cont = result["first_frame_continuation"]
    lines += [
        "",
        "A first frame to continue: the same prompts and generator videos (not held), the first latent frame noised "
        f"to sigma {cont['first_sigma']} and the later ones pure noise (one timestep per token), predicted in one "
        "call. Where the object goes next can only come from the prompt. Drift of the red mass along the prompt's "
        "direction, px per frame (a model trained with one noise level per video never saw such input):",
        "",
        "| generator's videos | trained model | trained model, prompt naming the opposite direction |",
        "|---|---|---|",
        f"| {cont['generator']:+.3f} | {cont['trained']:+.3f} | {cont['reversed']:+.3f} |",
    ]
    lines += [
        "",
        "## Attention locality",
        "",
        f"Self-attention maps of every layer, recorded at steps {result['record_steps']} of the conditional pass for "
        f"the first {result['recorded_prompts']} prompts: share of attention mass by temporal and spatial token "
        "distance, against uniform attention. Summary: mass on the 3 x 3 x 3 token neighbourhood divided by that "
        "neighbourhood's share of keys (1 = no locality).",
        "",
        "| layer | trained: local mass ratio | trained: mean abs dt (uniform) | trained: mean spatial distance (uniform) "
        "| untrained: local mass ratio |",
        "|---|---|---|---|---|",
    ]
    for layer, t in result["locality"]["trained"].items():
        u = result["locality"]["untrained"][layer]
        lines.append(f"| {layer} | {t['local_ratio']:.2f} | {t['mean_temporal_distance']:.2f} "
                     f"({t['mean_temporal_distance_uniform']:.2f}) | {t['mean_spatial_distance']:.2f} "
                     f"({t['mean_spatial_distance_uniform']:.2f}) | {u['local_ratio']:.2f} |")
    lines += [
        f"| mean | {result['locality']['trained_mean_local_ratio']:.2f} | | | "
        f"{result['locality']['untrained_mean_local_ratio']:.2f} |",
        "",
        f"![attention locality]({result['figure_links']['attention_locality']})",
        "",
        "The command above regenerates this page, its figures and `toy_checks.json` (in `--out`).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 4 steps, a small classifier fit")
    parser.add_argument("--model-path", type=Path, default=None, help="asset directory (default: the shipped model)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (default 24; 4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's, toy.DEFAULT_GUIDANCE_SCALE)")
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--sampler", choices=toy.SAMPLERS, default=None,
                        help="joint: all frames together (WanPipeline); first-frame: then the later frames again as a "
                             "continuation of the first (toy.generate_from_first_frame); default: the model's own "
                             "(its sampling.json), for the untrained baseline too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "out" / "toy_checks")
    parser.add_argument("--results", type=Path, default=REPO / "evals" / "results" / "toy.md",
                        help="markdown page to write ('-' to skip)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="folder for the PNGs (default: the results page's path without .md, or --out)")
    args = parser.parse_args(argv)
    figures = args.figures or (args.out if str(args.results) == "-" else args.results.with_suffix(""))
    torch.set_num_threads(args.threads)
    n = args.prompts or (4 if args.quick else 24)
    steps = args.steps or (4 if args.quick else toy.DEFAULT_NUM_INFERENCE_STEPS)
    guidance = toy.DEFAULT_GUIDANCE_SCALE if args.guidance is None else args.guidance
    record_steps = sorted({0, steps // 2, steps - 1})
    tic = time.monotonic()

    specs = evaluation_specs(n)
    prompts = [s.prompt for s in specs]
    truths = [render_video(SEED_RANGES["evaluation"] + i, spec=s, **VIDEO_SIZE) for i, s in enumerate(specs)]
    classifier = BackgroundClassifier(16 if args.quick else 64)

    pipes = {"trained": toy.load_pipeline(path=args.model_path), "untrained": untrained_pipeline(args.model_path)}
    sampler = args.sampler or pipes["trained"].toy_sampler
    videos, profiles = {}, {}
    for name, pipe in pipes.items():
        videos[name], profiles[name], geometry = generate_all(
            pipe, prompts, seed=args.seed, steps=steps, guidance=guidance, batch=args.batch, record_steps=record_steps,
            sampler=sampler)
        print(f"generated {n} videos with the {name} model ({time.monotonic() - tic:.0f} s)", flush=True)
    real = np.stack([t.frames for t in truths])
    # The same prompts with the objects' direction reversed, from the same noise (generator: the same seed).
    reversed_specs = [with_other_attribute(s, "direction") for s in specs]
    reversed_videos = {"real": np.stack([render_video(SEED_RANGES["evaluation"] + i, spec=s, **VIDEO_SIZE).frames
                                         for i, s in enumerate(reversed_specs)])}
    for name, pipe in pipes.items():
        reversed_videos[name], _ = generate_videos(pipe, [s.prompt for s in reversed_specs], seed=args.seed, steps=steps,
                                                   guidance=guidance, batch=args.batch, sampler=sampler)
    print(f"generated the direction-reversed prompts ({time.monotonic() - tic:.0f} s)", flush=True)

    result = {
        "command": "python evals/toy_checks.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "model_path": str(args.model_path or toy.ASSET_DIR.relative_to(REPO)),
        "num_prompts": n, "steps": steps, "seed": args.seed, "guidance_scale": guidance, "sampler": sampler,
        "record_steps": record_steps, "recorded_prompts": min(args.batch, n), "video_size": VIDEO_SIZE,
        "threads": args.threads, "geometry": geometry,
        "background_classifier": {"videos": 16 if args.quick else 64, "training_accuracy": classifier.training_accuracy},
        "chance": CHANCE,
        "real": score(real, specs, truths, classifier),
        "trained": score(videos["trained"], specs, truths, classifier),
        "untrained": score(videos["untrained"], specs, truths, classifier),
    }
    for name, ordinary in (("real", real), ("trained", videos["trained"]), ("untrained", videos["untrained"])):
        result[name]["direction_reversal"] = reversal_agreement(ordinary, reversed_videos[name])
    denoising, predictions = {}, {}
    for name, pipe in pipes.items():
        denoising[name], predictions[name] = denoising_check(pipe, real, prompts, seed=args.seed)
    result["denoising"] = {name: {str(s): v for s, v in d.items()} for name, d in denoising.items()}
    result["prompt_reliance"] = prompt_reliance(pipes["trained"], real, specs, seed=args.seed,
                                                reference=denoising["trained"])
    result["pure_noise_drift"] = pure_noise_drift(pipes["trained"], seed=args.seed, num_videos=8 if args.quick else 32)
    result["held_object_motion"] = held_object_motion(pipes["trained"], seed=args.seed, num_videos=2 if args.quick else 8)
    result["first_frame_continuation"] = first_frame_continuation(pipes["trained"], seed=args.seed,
                                                                  num_videos=2 if args.quick else 8)
    result["locality"] = {name: {str(l): p.to_dict() for l, p in profiles[name].items()} for name in profiles}
    for name in profiles:
        result["locality"][f"{name}_mean_local_ratio"] = float(np.mean([p.local_ratio for p in profiles[name].values()]))
    result["wall_seconds"] = time.monotonic() - tic

    args.out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    figure_paths = {"attention_locality": figures / "attention_locality.png", "samples": figures / "samples.png",
                    "denoising": figures / "denoising.png"}
    page_dir = args.out if str(args.results) == "-" else args.results.parent
    result["figure_links"] = {k: os.path.relpath(p, page_dir) for k, p in figure_paths.items()}
    (args.out / "toy_checks.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_locality(profiles, figure_paths["attention_locality"])
    plot_denoising(real, predictions["trained"], figure_paths["denoising"])
    shown = min(4, n)
    plot_samples([("generator", real[:shown]), ("trained model", videos["trained"][:shown]),
                  ("untrained model", videos["untrained"][:shown])], prompts[:shown], figure_paths["samples"])
    if str(args.results) != "-":
        write_markdown(result, args.results)
    for name in ("real", "trained", "untrained"):
        print(name, json.dumps(result[name]["accuracy"]), "objects shown:", round(result[name]["mean_present_fraction"], 3),
              "track jitter px:", result[name]["median_track_jitter"], "direction reversal:",
              json.dumps({k: round(v, 3) for k, v in result[name]["direction_reversal"].items()}))
    print("local mass ratio (mean over layers): trained "
          f"{result['locality']['trained_mean_local_ratio']:.2f}, untrained {result['locality']['untrained_mean_local_ratio']:.2f}")
    print("PSNR lost with one attribute changed:", json.dumps(
        {a: {s: round(v, 2) for s, v in lost.items()} for a, lost in result["prompt_reliance"].items()}))
    print("drift from pure noise (px/frame along the direction):", json.dumps(
        {d: {k: round(v, 3) for k, v in drift.items()} for d, drift in result["pure_noise_drift"].items()}))
    print("held object, velocity of the prediction along the prompt's direction (px/frame):",
          json.dumps({k: round(v, 3) for k, v in result["held_object_motion"]["sigma"].items()}),
          "generator", round(result["held_object_motion"]["generator"], 3))
    print("first frame shown, the rest pure noise: drift of the prediction along the prompt's direction (px/frame):",
          json.dumps({k: round(v, 3) for k, v in result["first_frame_continuation"].items()}))
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
