"""Length extension on the built-in model: LoRAs for 2x and 4x its training length, trained
under sparse attention, and what they change against dense attention and no LoRA.

    python evals/length_lora.py --train            # train the LoRAs (33 and 65 frames; sparse and dense attention)
    python evals/length_lora.py                    # evaluate them: writes evals/results/length_lora.md
    python evals/length_lora.py --train --evaluate # both in one run
    python evals/length_lora.py --quick            # CI smoke run: LoRAs of 2 steps in a temp folder, 2 prompts

The built-in model (``sparsegen/assets/toy_wan``) was trained on 17-frame videos (5 latent
frames x 8 x 8 = 320 tokens). 33 frames are 9 latent frames (576 tokens), 65 frames 17
(1088 tokens).

**Training** (``--train``) calls :func:`sparsegen.lora.train_lora` with the built-in data
generator (fresh videos of the target length every step, ``--data toy``) for each length
in ``--frames`` and each attention in ``--train-attention``:

* ``OUT/len<F>``: the LoRA trained with the sparse method (``--method``, default radial),
  forward and backward through sparsegen's engine, the first ``dense_layers=2`` layers
  dense (the length-extension recipe), 2 dense warm-up steps at inference (its recipe);
* ``OUT/len<F>-dense``: the same LoRA trained with dense attention, the baseline it is
  compared with (as in the radial-attention paper's "dense + LoRA").

OUT defaults to ``sparsegen/assets/toy_wan_lora``, next to the model. Each folder holds
the diffusers LoRA (``pytorch_lora_weights.safetensors``), its recipe
(``sparsegen_recipe.json``), the training summary and log, ``training_sessions.json``
(times of each training session) and a model card (``README.md`` with the command, steps,
time and ``loss_curve.png``); checkpoints are deleted once a LoRA is complete unless
``--keep-checkpoints``. Budget: after the first PROBE_STEPS steps the measured seconds
per step and the projected total are printed, and a run that would exceed
``--budget-minutes`` (30) stops there, saying which ``--steps`` fit (``--resume``
continues it).

Defaults and why:

==================  ==========  ============================================================
option              default     why
==================  ==========  ============================================================
rank / alpha        16 / 16     the paper's rank 128 is 1/24 of its models' 3072-wide
                                projections; at width 192 that ratio gives 8 (rank 128 here
                                would exceed the 192 x 192 projections it adapts: 2 x 128 x
                                192 LoRA weights for 192 x 192 base weights). 16 doubles it:
                                the adapted subspace stays 1/12 of the width and the 48
                                adapted projections gain 295k parameters (8% of the model's
                                3.5 M), 1.2 MB of fp32 safetensors per LoRA
radial options      block_size  64 tokens per latent frame: with the published decimation
                    16,         unit 128 every frame pair but the diagonal and the sink is
                    decimation  dropped; unit 16 keeps a band that shrinks with distance
                    unit 16     (16, 16, 14, 14, 10 ... blocks of 16 x 16 per frame pair;
                                ``sparsegen mask radial --frames 17 --tokens-per-frame 64
                                --block-size 16 --decimation-unit 16``), block density 0.85
                                at 9 latent frames and 0.68 at 17 in the sparse layers. With
                                64-token blocks a frame pair is one block and the band
                                cannot shrink at all
dense_layers        2           the paper's length-extension recipe (train-lora's default)
lr                  1e-3        train-lora's 1e-4 is for billion-parameter models; the
                                built-in model itself trained at a peak of 2e-3 with AdamW.
                                A choice, not a measured optimum: the loss curve in each
                                card shows how it went
steps               1500        batch 1 (1500 videos); fits the 30-min budget at the
                                per-step times measured on the 2-core machine (the run
                                prints its own projection and stops if it does not)
warmup_steps        100         train-lora's default
==================  ==========  ============================================================

**Evaluation** (the default action) at each length in ``--frames``, against the data
generator's ground truth, for four variants:

* ``dense``: the model as shipped, unpatched (diffusers' attention);
* ``sparse``: the same with the sparse LoRA's recipe config (its method, options and
  schedule: 2 dense layers, 2 dense warm-up steps), no LoRA;
* ``sparse + LoRA``: the sparse-trained LoRA with its recipe
  (``pipe.load_lora_weights(dir)``; ``sparsegen.apply(pipe, recipe=dir)``);
* ``dense + LoRA``: the dense-trained LoRA (``len<F>-dense``) with dense attention
  (``--dense-lora same``: the sparse-trained LoRA instead, with dense attention).

Measured:

1. one-call denoising PSNR: held-out generator videos of the long length (evaluation
   seed range, apart from the other checks' seeds) noised to each of ``--sigmas`` and
   predicted in one conditional call (``toylab.denoising``); in the sparse variants
   every call runs the method's mask (its dense layers dense), as in training;
2. sampled videos of ``--prompts`` fixed prompts (``evaluation_specs``), generated one
   at a time with the model's sampler, the variants interleaved: colour and direction
   read from the pixels (``toylab.metrics``), and temporal consistency over the whole
   length: share of frames showing an object (all frames, and the last quarter) and
   track jitter (RMS distance in px of the foreground centroid from a straight line);
   the generator's own videos for the same prompts are the ceiling;
3. time: generation seconds per video (median over the prompts, from the same
   generations), and training seconds per step with dense and with sparse attention
   (forward, backward and AdamW step of the same LoRA on the same video; the two
   alternate, ``--timing-steps`` each after one untimed warm-up, median). All times
   come from this one run; the 1-minute load average is read at its start and end and a
   warning printed when it exceeds LOAD_WARNING (other processes share the CPU).

Writes ``<eval-dir>/length_lora.json`` and ``length_lora.csv`` (long format), the page
``evals/results/length_lora.md`` (``--results``) and its figures ``denoising.png`` and
``samples_<F>.png`` in the folder named like the page without ``.md`` (``--figures``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import sparsegen
from sparsegen.methods import available_methods, config_class
from sparsegen.toy import pipeline as toy
from sparsegen.toy.data import COLOURS, DIRECTIONS, SEED_RANGES, evaluation_specs, render_batch, render_video
from toylab.denoising import DENOISING_SIGMAS, one_call_prediction
from toylab.metrics import above_chance_p, measure_video, motion_consistency, prompt_following, psnr
from toylab.probe import densities
from toylab.report import command_block, jsonable

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "evals/length_lora.py"
TRAIN_FRAMES = toy.DEFAULT_NUM_FRAMES  # 17: the built-in model's training length
LENGTH_FACTORS = (2, 4)
# 2x and 4x the training length in the codec's 1 + 4k frame layout: 33 and 65 frames.
DEFAULT_FRAMES = tuple(1 + f * (TRAIN_FRAMES - 1) for f in LENGTH_FACTORS)
DEFAULT_LORA_ROOT = REPO / "sparsegen" / "assets" / "toy_wan_lora"
ATTENTIONS = ("sparse", "dense")  # what a LoRA is trained with
# Method options for the built-in model's 64-token latent frames (see the module docstring);
# train-lora then adds the length recipe (dense_layers=2, dense_steps=2) and the user's flags.
METHOD_DEFAULTS = {"radial": dict(block_size=16, decimation_unit=16)}
DEFAULT_RANK = 16
DEFAULT_LR = 1e-3
DEFAULT_STEPS = 1500
DEFAULT_WARMUP = 100
PROBE_STEPS = 10  # steps timed before the projection of a run's total
BUDGET_MINUTES = 30.0
LOAD_WARNING = 1.2  # 1-minute load average above which times are flagged (2 cores)
# Held-out videos for the denoising check: the evaluation seed range, apart from the seeds
# the prompt checks (0 ...), toy_checks' classifier (500,000 ...) and motion checks (600,000 ...) use.
DENOISE_SEED_OFFSET = 700_000
VARIANTS = ("dense", "sparse", "sparse + LoRA", "dense + LoRA")
SESSIONS_FILE = "training_sessions.json"
CARD_FILE = "README.md"
LOSS_CURVE = "loss_curve.png"
# --quick: 3 denoising steps, so that each sampling stage runs one step after the recipe's 2 dense warm-up steps.
QUICK = dict(frames=DEFAULT_FRAMES[:1], prompts=2, inference_steps=3, sigmas=(0.5,), denoise_videos=2, steps=2,
             timing_steps=2)


# ------------------------------------------------------------------------ helpers
def lora_dir(root: Path, frames: int, attention: str) -> Path:
    """``root/len<frames>`` (sparse-trained) or ``root/len<frames>-dense``."""
    return Path(root) / (f"len{frames}" if attention == "sparse" else f"len{frames}-dense")


def latent_frames(frames: int) -> int:
    return (frames - 1) // toy.TEMPORAL_FACTOR + 1


def tokens(frames: int) -> int:
    return latent_frames(frames) * (toy.DEFAULT_HEIGHT // toy.SPATIAL_FACTOR) * (toy.DEFAULT_WIDTH // toy.SPATIAL_FACTOR)


def load_average() -> float:
    return float(os.getloadavg()[0])


def load_warning(when: str, value: float) -> Optional[str]:
    """A warning when the 1-minute load average says other processes use the CPU."""
    if value <= LOAD_WARNING:
        return None
    message = (f"warning: the 1-minute load average was {value:.2f} at the {when} of this run (> {LOAD_WARNING}): "
               "other processes share the CPU and the times are inflated; rerun on an idle machine for times to quote")
    print(message, flush=True)
    return message


def median(values) -> float:
    return float(np.median(np.asarray(list(values), dtype=np.float64)))


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def parse_float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"noise levels must be in (0, 1], got {text!r}")
    return values


def parse_attentions(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if not values or any(v not in ATTENTIONS for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(ATTENTIONS)}, got {text!r}")
    return values


# ----------------------------------------------------------------------- training
def _sessions(folder: Path) -> list[dict]:
    path = folder / SESSIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _train_session(config, *, command: str, log) -> dict:
    """One ``train_lora`` call; its times and load average appended to SESSIONS_FILE."""
    from sparsegen.lora.train import train_lora

    folder = Path(config.out)
    load_start, tic = load_average(), time.perf_counter()
    summary = train_lora(config, log=log).summary
    session = {"command": command, "steps_from": summary["steps_done"] - summary["steps_this_session"],
               "steps_to": summary["steps_done"], "seconds": summary["seconds_this_session"],
               "seconds_per_step": summary["seconds_per_step"], "wall_seconds": time.perf_counter() - tic,
               "load_average_start": load_start, "load_average_end": load_average(),
               "threads": torch.get_num_threads()}
    sessions = _sessions(folder) + [session]
    (folder / SESSIONS_FILE).write_text(json.dumps(sessions, indent=1) + "\n")
    return session


def train_length_lora(frames: int, attention: str, args, *, root: Path, command: str) -> Path:
    """Train (or continue) the LoRA for ``frames`` frames with ``attention`` into
    ``lora_dir(root, frames, attention)``, within the budget; then write its card.

    Raises:
        SystemExit: the folder already holds a LoRA (without --resume / --overwrite), or
            the measured pace would exceed --budget-minutes (the message says which --steps fit).
    """
    from sparsegen.lora import LORA_WEIGHTS_FILE
    from sparsegen.lora.checkpoint import CHECKPOINTS, latest_checkpoint
    from sparsegen.lora.train import TrainLoraConfig

    out = lora_dir(root, frames, attention)
    label = f"{out.name} ({attention} attention)"
    resuming = args.resume and latest_checkpoint(out) is not None
    if out.exists() and not resuming:
        if args.overwrite:
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise SystemExit(f"{out} already holds a LoRA run ({LORA_WEIGHTS_FILE if (out / LORA_WEIGHTS_FILE).is_file() else 'files'}); "
                             "pass --resume to continue it from its newest checkpoint or --overwrite to start again")
    dense = attention == "dense"
    config = TrainLoraConfig(
        out=str(out), data="toy", frames=frames, method=args.method,
        method_options={} if dense else args.method_options, dense=dense, rank=args.rank, alpha=args.alpha,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume="latest" if resuming else None)
    log = print if not args.quiet else (lambda *_: None)
    done = latest_checkpoint(out)
    start = int(done.name.split("-")[1]) if resuming and done is not None else 0
    probe = min(args.steps, start + PROBE_STEPS)
    if start < probe:
        session = _train_session(dataclasses.replace(config, steps=probe), command=command, log=log)
        pace = session["seconds_per_step"]
        projected = (session["seconds"] + (args.steps - probe) * pace) / 60.0
        print(f"{label}: {pace:.3f} s/step measured over steps {start + 1}-{probe} (load average "
              f"{session['load_average_end']:.2f}); {args.steps} steps project to {projected:.1f} min of training "
              f"(budget {args.budget_minutes:g} min)", flush=True)
        if args.budget_minutes > 0 and projected > args.budget_minutes:
            fit = int(probe + (args.budget_minutes * 60.0 - session["seconds"]) / pace)
            raise SystemExit(
                f"{label}: {args.steps} steps would take about {projected:.0f} min at the measured pace, over the "
                f"{args.budget_minutes:g}-min budget. Pass --steps {max(fit, probe)} (fits at that pace), or "
                f"--budget-minutes {math.ceil(projected) + 1} to accept it; the {probe} steps done are kept in {out} "
                "and continue with --resume")
        config = dataclasses.replace(config, resume="latest")
    if probe < args.steps or start >= probe:
        _train_session(config, command=command, log=log)
    if not args.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    write_card(out)
    return out


def loss_history(folder: Path) -> list[list[float]]:
    """[[step, loss], ...] of every step, from the run's training summary."""
    from sparsegen.lora.train import SUMMARY_FILE

    return json.loads((folder / SUMMARY_FILE).read_text())["loss_history"]


def lora_record(folder: Path) -> dict:
    """What the evaluation page says about one trained LoRA (from its summary, recipe, sessions)."""
    from sparsegen.lora import Recipe
    from sparsegen.lora.train import SUMMARY_FILE

    summary = json.loads((folder / SUMMARY_FILE).read_text())
    recipe = Recipe.load(folder)
    sessions = _sessions(folder)
    seconds = sum(s["seconds"] for s in sessions) if sessions else summary["seconds_this_session"]
    history = summary["loss_history"]
    tail = [l for _, l in history[-max(1, len(history) // 10):]]
    try:
        shown = str(folder.resolve().relative_to(REPO))
    except ValueError:
        shown = str(folder)
    return {"folder": shown, "trained_attention": recipe.trained_attention, "method": recipe.method,
            "frames": recipe.frames, "steps": summary["steps_done"], "batch_size": summary["config"]["batch_size"],
            "rank": recipe.lora["rank"], "alpha": recipe.lora["alpha"], "lr": summary["config"]["lr"],
            "warmup_steps": summary["config"]["warmup_steps"], "training_seconds": seconds,
            "seconds_per_step": seconds / max(1, summary["steps_done"]),
            "sessions": sessions, "attention_density": summary["attention_density"],
            "final_loss": float(np.mean(tail)) if tail else None, "final_loss_steps": len(tail),
            "command": sessions[-1]["command"] if sessions else None}


def session_commands(sessions: list[dict]) -> str:
    """The command of a run (one line), or with the steps of each when it was resumed with others."""
    commands = list(dict.fromkeys(s["command"] for s in sessions))
    if len(commands) <= 1:
        return commands[0] if commands else "(not recorded)"
    return "\n".join(f"{s['command']}   # steps {s['steps_from'] + 1}-{s['steps_to']}" for s in sessions)


def write_card(folder: Path) -> Path:
    """README.md (model card) and loss_curve.png beside a trained LoRA."""
    from toylab.train import plot_loss_curve

    r = lora_record(folder)
    minutes = r["training_seconds"] / 60.0
    plot_loss_curve({"train": loss_history(folder), "validation": []}, folder / LOSS_CURVE,
                    title=f"{folder.name}: {r['trained_attention']} attention, {r['steps']} steps, {minutes:.1f} min")
    method = r["method"]
    if r["trained_attention"] == "sparse":
        options = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("method", "version"))
        attention = (f"{method['method']} attention ({options}); every training call ran the mask forward and backward "
                     f"through sparsegen's engine, the first {method.get('dense_layers', 0)} layers dense; at inference "
                     "the recipe adds the dense warm-up steps")
    else:
        attention = "dense attention (the baseline a sparse-trained LoRA is compared with)"
    sessions = r["sessions"]
    loads = ", ".join(f"{s['load_average_start']:.2f} / {s['load_average_end']:.2f}" for s in sessions) or "-"
    threads = sorted({s["threads"] for s in sessions})
    lines = [
        f"# {folder.name}: LoRA for {r['frames']}-frame videos on the built-in model",
        "",
        f"A LoRA for `sparsegen/assets/toy_wan` (trained on {TRAIN_FRAMES}-frame videos) at {r['frames']} frames "
        f"({latent_frames(r['frames'])} latent frames x 8 x 8 = {tokens(r['frames'])} tokens), trained with "
        f"{attention}. Data: fresh procedural videos of {r['frames']} frames every step (`--data toy`).",
        "",
        *command_block(session_commands(sessions)),
        "| | |",
        "|---|---|",
        f"| LoRA | rank {r['rank']}, alpha {r['alpha']:g}, on to_q, to_k, to_v, to_out.0 of every attention layer |",
        f"| steps | {r['steps']} (batch {r['batch_size']}: {r['steps'] * r['batch_size']} videos) |",
        f"| optimizer | AdamW, learning rate {r['lr']:g} after {r['warmup_steps']} linear warm-up steps, gradient "
        "clipping 1.0 |",
        f"| training time | {minutes:.1f} min ({r['seconds_per_step']:.3f} s per step, training loop only), "
        f"{platform.machine()} CPU, {', '.join(map(str, threads)) or '?'} thread(s); 1-minute load average at start / "
        f"end of each session: {loads} |",
        f"| final training loss | {r['final_loss']:.4f} (mean of the last {r['final_loss_steps']} steps) |",
        f"| attention density in training | "
        + (f"{r['attention_density']:.3f} (share of block pairs computed, dense layers counting 1) |"
           if r["attention_density"] is not None else "1 (dense) |"),
        "",
        "Use it (the recipe sets the attention schedule it was trained for):",
        "",
        "```python",
        "import sparsegen, sparsegen.toy as toy",
        "pipe = toy.load_pipeline()",
        f'pipe.load_lora_weights("{r["folder"]}")',
        f'handle = sparsegen.apply(pipe, recipe="{r["folder"]}")',
        f'video = toy.generate(pipe, ["a red circle moving right over a striped background"], num_frames={r["frames"]})',
        "```",
        "",
        f"or `sparsegen generate --lora {r['folder']}`. What it changes is measured by `python {SCRIPT}` "
        "(evals/results/length_lora.md).",
        "",
        "Files: `pytorch_lora_weights.safetensors` (diffusers' LoRA format), `sparsegen_recipe.json` (method config, "
        "size, model identity), `training_summary.json` (config, loss per step, versions), `train_log.jsonl`, "
        f"`{SESSIONS_FILE}` (each training session's steps, times, load average), `{LOSS_CURVE}`.",
        "",
        f"![loss curve]({LOSS_CURVE})",
        "",
    ]
    path = folder / CARD_FILE
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class Variant:
    """One way of running the model: a pipeline (with or without a LoRA) and its attention.

    ``config``: the sparse method config (None: dense, the pipeline unpatched); ``recipe``:
    the LoRA folder whose recipe patches generation (``sparsegen.apply(pipe, recipe=...)``).
    """

    name: str
    pipe: object
    config: object = None
    recipe: Optional[Path] = None

    @property
    def sparse(self) -> bool:
        return self.config is not None

    def generation(self):
        """Context: the pipeline patched for sampling (the config's full schedule), or as is."""
        if not self.sparse:
            return contextlib.nullcontext(None)
        if self.recipe is not None:
            return sparsegen.apply(self.pipe, recipe=self.recipe)
        return sparsegen.apply(self.pipe, self.config)

    @contextlib.contextmanager
    def one_call(self):
        """Context: the transformer patched so every call is sparse (dense layers excepted),
        as in training; one-call predictions have no denoising schedule."""
        if not self.sparse:
            yield None
            return
        config = dataclasses.replace(self.config, dense_steps=0, dense_last_steps=0)
        with sparsegen.apply(self.pipe.transformer, config) as handle:
            handle.set_step(0)
            yield handle


def make_variants(frames: int, root: Path, dense_lora: str) -> tuple[list[Variant], dict]:
    """The four variants at ``frames`` frames, and the records of the LoRAs they use.

    Raises:
        SystemExit: a LoRA is missing or was trained for another length (the message says
            which command trains it).
    """
    from sparsegen.lora import LORA_WEIGHTS_FILE, Recipe

    needed = {"sparse": lora_dir(root, frames, "sparse")}
    needed["dense"] = needed["sparse"] if dense_lora == "same" else lora_dir(root, frames, "dense")
    for attention, folder in needed.items():
        if not (folder / LORA_WEIGHTS_FILE).is_file():
            train = (f"python {SCRIPT} --train --frames {frames}"
                     + ("" if attention == "sparse" else " --train-attention dense")
                     + ("" if Path(root).resolve() == DEFAULT_LORA_ROOT.resolve() else f" --out {root}"))
            raise SystemExit(f"no {attention}-trained LoRA for {frames} frames at {folder}: train it with `{train}`"
                             + ("" if attention == "sparse" else ", or pass --dense-lora same to run the "
                                "sparse-trained LoRA with dense attention instead"))
    recipes = {a: Recipe.load(f) for a, f in needed.items()}
    for attention, recipe in recipes.items():
        if recipe.frames != frames:
            raise SystemExit(f"{needed[attention]} was trained at {recipe.frames} frames, not {frames}; "
                             f"train it with `python {SCRIPT} --train --frames {frames}`")
    if recipes["sparse"].trained_attention != "sparse":
        raise SystemExit(f"{needed['sparse']} was trained with dense attention; the sparse-trained LoRA must be there")
    sparse_config = recipes["sparse"].config()
    base = toy.load_pipeline()
    pipes = {}
    for attention in ("sparse", "dense"):
        pipes[attention] = toy.load_pipeline()
        recipes[attention].load_lora(pipes[attention], needed[attention])
    variants = [Variant("dense", base), Variant("sparse", base, sparse_config),
                Variant("sparse + LoRA", pipes["sparse"], sparse_config, needed["sparse"]),
                Variant("dense + LoRA", pipes["dense"])]
    return variants, {a: lora_record(f) for a, f in needed.items()}


def denoising(variants: list[Variant], frames: int, *, videos: int, sigmas, seed: int, chunk: int) -> dict:
    """Per variant {sigma: {"mean": dB, "per_video": [dB, ...]}} of one-call predictions of
    ``videos`` held-out generator videos (N, frames, 32, 32, 3); chunks of ``chunk`` videos
    share a noise seed (``seed + first index``), the same for every variant."""
    seeds = [SEED_RANGES["evaluation"] + DENOISE_SEED_OFFSET + i for i in range(videos)]
    batch, prompts, _ = render_batch(seeds, num_frames=frames)
    real = ((batch + 1.0) / 2.0).permute(0, 2, 3, 4, 1).numpy()  # (N, F, H, W, 3) in [0, 1]
    out = {}
    for variant in variants:
        scores = {}
        with variant.one_call():
            for sigma in sigmas:
                per_video = []
                for start in range(0, videos, chunk):
                    part = slice(start, start + chunk)
                    pred = one_call_prediction(variant.pipe, real[part], prompts[part], seed=seed + start, sigma=sigma)
                    per_video += [psnr(p, r) for p, r in zip(pred, real[part])]
                scores[str(sigma)] = {"mean": float(np.mean(per_video)), "per_video": per_video}
        out[variant.name] = scores
        print(f"  denoising {variant.name:14s} " + " ".join(f"sigma {s}: {v['mean']:.2f} dB" for s, v in scores.items()),
              flush=True)
    return out


def video_stats(videos, specs) -> dict:
    """Prompt following and temporal consistency of videos (N, F, H, W, 3) for ``specs``."""
    measured = [measure_video(v) for v in videos]
    quarter = max(3, videos[0].shape[0] // 4)
    late = [measure_video(v[-quarter:]) for v in videos]
    follows = prompt_following(measured, specs)
    n = len(specs)
    hits = {a: int(round(share * n)) for a, share in follows.items()}
    chance = {"colour": 1 / len(COLOURS), "direction": 1 / len(DIRECTIONS)}
    return {"colour": follows["colour"], "direction": follows["direction"], "hits": hits, "prompts": n,
            "p_above_chance": {a: above_chance_p(hits[a], n, chance[a]) for a in hits},
            **motion_consistency(measured),
            "late_present_fraction": motion_consistency(late)["mean_present_fraction"], "late_frames": quarter,
            "per_video": [{"colour": m.colour, "direction": m.direction, "present_fraction": m.present_fraction,
                           "track_jitter": m.track_jitter} for m in measured]}


def sampled_videos(variants: list[Variant], frames: int, specs, *, steps: int, guidance: float, sampler: str,
                   seed: int) -> tuple[dict, dict]:
    """Each prompt generated by every variant in turn (the order rotating by prompt), one
    video per call (prompt i from noise seed ``seed + i``, as ``toy.generate`` batches it).

    Returns:
        ({variant: video_stats + "seconds_per_video" + "density"}, {variant: (N, F, H, W, 3)}).
    """
    videos = {v.name: [] for v in variants}
    seconds = {v.name: [] for v in variants}
    dens = {v.name: [] for v in variants}
    for i, spec in enumerate(specs):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for variant in order:
            with variant.generation() as handle:
                tic = time.perf_counter()
                video = toy.generate(variant.pipe, [spec.prompt], seed=seed + i, num_frames=frames,
                                     num_inference_steps=steps, guidance_scale=guidance, sampler=sampler)[0]
                seconds[variant.name].append(time.perf_counter() - tic)
                if handle is not None:
                    dens[variant.name].append(densities(handle))
            videos[variant.name].append(video)
        print(f"  prompt {i + 1}/{len(specs)}: " + ", ".join(f"{v.name} {seconds[v.name][-1]:.1f} s" for v in variants),
              flush=True)
    stats = {}
    for variant in variants:
        s = video_stats(videos[variant.name], specs)
        s["seconds_per_video"] = seconds[variant.name]
        s["median_seconds_per_video"] = median(seconds[variant.name])
        d = dens[variant.name]
        sparse_calls = [x["sparse_call_density"] for x in d if x["sparse_call_density"] is not None]
        s["density"] = None if not d else {
            "effective_density": float(np.mean([x["effective_density"] for x in d])),
            "sparse_call_density": float(np.mean(sparse_calls)) if sparse_calls else None}
        stats[variant.name] = s
    return stats, {name: np.stack(v) for name, v in videos.items()}


def training_step_times(frames: int, sparse_config, lora: dict, *, steps: int, seed: int) -> dict:
    """Seconds of one LoRA training step with dense and with sparse attention, alternating.

    A fresh built-in model with a new LoRA of the trained one's rank, alpha and targets; a
    step is the forward pass of one video of ``frames`` frames (batch 1), the flow-matching
    loss, the backward pass, gradient clipping and the AdamW update (as ``train_lora``;
    rendering and encoding the video is left out, it is the same for both). The sparse
    step runs every call with ``sparse_config``'s mask (dense layers dense). One untimed
    round warms both up; then ``steps`` timed steps of each, alternating which goes first.

    Returns:
        {"dense": [s, ...], "sparse": [s, ...], "median_dense", "median_sparse", "sparse_over_dense"}.
    """
    from peft import LoraConfig

    from sparsegen.lora import models
    from sparsegen.lora.data import ToyStream
    from sparsegen.lora.objective import add_noise, flow_matching_loss, sample_sigmas

    pipe = toy.load_pipeline()
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], init_lora_weights=True,
                                       target_modules=lora["targets"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = models.objective_of(pipe)
    source = ToyStream(pipe, frames=frames, height=toy.DEFAULT_HEIGHT, width=toy.DEFAULT_WIDTH)
    train_config = dataclasses.replace(sparse_config, dense_steps=0, dense_last_steps=0)
    times = {"dense": [], "sparse": []}
    for round_ in range(steps + 1):  # round 0 warms both paths up
        for attention in (("dense", "sparse") if round_ % 2 == 0 else ("sparse", "dense")):
            x0, embeds = source.batch(round_, [round_])
            g = torch.Generator().manual_seed(seed * 1_000_003 + round_)
            sigma = sample_sigmas(g, 1, shift=objective.shift)
            noise = torch.randn(x0.shape, generator=g)
            patch = (sparsegen.apply(transformer, train_config) if attention == "sparse"
                     else contextlib.nullcontext(None))
            with patch as handle:
                if handle is not None:
                    handle.set_step(0)
                tic = time.perf_counter()
                output = models.predict(transformer, add_noise(x0, noise, sigma),
                                        sigma * objective.num_train_timesteps, embeds)
                flow_matching_loss(output, x0, noise, sigma, objective.prediction_type).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - tic
            if round_ > 0:
                times[attention].append(elapsed)
    md, ms = median(times["dense"]), median(times["sparse"])
    return {**times, "median_dense": md, "median_sparse": ms, "sparse_over_dense": ms / md}


def evaluate_length(frames: int, args, *, root: Path) -> tuple[dict, dict]:
    """Everything measured at one length: (result, {variant: sampled videos} incl. "generator")."""
    print(f"{frames} frames ({tokens(frames)} tokens):", flush=True)
    variants, loras = make_variants(frames, root, args.dense_lora)
    sparse_config = variants[1].config
    specs = evaluation_specs(args.prompts)
    result = {"frames": frames, "latent_frames": latent_frames(frames), "tokens": tokens(frames),
              "loras": loras, "sparse_config": sparse_config.to_dict(),
              "dense_lora": "dense-trained" if args.dense_lora == "trained" else "sparse-trained"}
    result["denoising"] = denoising(variants, frames, videos=args.denoise_videos, sigmas=args.sigmas, seed=args.seed,
                                    chunk=args.chunk)
    sampled, videos = sampled_videos(variants, frames, specs, steps=args.inference_steps, guidance=args.guidance,
                                     sampler=args.sampler, seed=args.seed)
    truth = np.stack([render_video(SEED_RANGES["evaluation"] + i, spec=s, num_frames=frames).frames
                      for i, s in enumerate(specs)])
    result["generator"] = video_stats(truth, specs)
    videos["generator"] = truth
    result["sampled"] = sampled
    result["training_step_seconds"] = training_step_times(frames, sparse_config, _lora_settings(root, frames),
                                                          steps=args.timing_steps, seed=args.seed)
    t = result["training_step_seconds"]
    print(f"  training step: dense {t['median_dense']:.3f} s, sparse {t['median_sparse']:.3f} s "
          f"(sparse / dense {t['sparse_over_dense']:.2f})", flush=True)
    return result, videos


def _lora_settings(root: Path, frames: int) -> dict:
    """rank, alpha and targets of the sparse-trained LoRA at ``frames`` (its recipe)."""
    from sparsegen.lora import Recipe

    return Recipe.load(lora_dir(root, frames, "sparse")).lora


# ------------------------------------------------------------------------ outputs
def plot_denoising(lengths: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(max(6.4, 4.6 * len(lengths)), 3.8), dpi=100, squeeze=False)
    styles = {"dense": "o-", "sparse": "s--", "sparse + LoRA": "^-", "dense + LoRA": "v--"}
    for ax, r in zip(axes[0], lengths):
        for name, scores in r["denoising"].items():
            sigmas = [float(s) for s in scores]
            ax.plot(sigmas, [v["mean"] for v in scores.values()], styles.get(name, "x-"), ms=4, lw=1, label=name)
        ax.set_title(f"{r['frames']} frames ({r['tokens']} tokens)", fontsize=9)
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel("PSNR of the one-call prediction (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"one-call denoising of held-out videos (model trained at {TRAIN_FRAMES} frames)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(videos: dict, prompt: str, path: Path, columns: int = 9) -> None:
    """Evenly spaced frames of the first prompt's video, one row per variant and the generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["generator", *[n for n in videos if n != "generator"]]
    num_frames = videos["generator"].shape[1]
    picks = np.linspace(0, num_frames - 1, min(columns, num_frames)).round().astype(int)
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.0 * len(picks) + 1.4, 1.05 * len(rows) + 0.4),
                             dpi=100, squeeze=False)
    for i, name in enumerate(rows):
        for j, f in enumerate(picks):
            ax = axes[i][j]
            ax.imshow(np.clip(videos[name][0, f], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{prompt!r}, {num_frames} frames", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csv(result: dict, path: Path) -> None:
    versions = [result["versions"]["sparsegen"], result["versions"]["torch"]]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["section", "variant", "frames", "key", "metric", "value", "sparsegen", "torch"])
        for r in result["lengths"]:
            f = r["frames"]
            for name, scores in r["denoising"].items():
                for sigma, v in scores.items():
                    for i, x in enumerate(v["per_video"]):
                        w.writerow(["denoising", name, f, i, f"psnr_db_sigma_{sigma}", x, *versions])
            for name, s in [*r["sampled"].items(), ("generator", r["generator"])]:
                for metric in ("colour", "direction", "mean_present_fraction", "late_present_fraction",
                               "median_track_jitter"):
                    w.writerow(["sampled", name, f, "", metric, s[metric], *versions])
                for i, x in enumerate(s.get("seconds_per_video", [])):
                    w.writerow(["time", name, f, i, "generation_seconds", x, *versions])
            t = r["training_step_seconds"]
            for attention in ("dense", "sparse"):
                for i, x in enumerate(t[attention]):
                    w.writerow(["time", attention, f, i, "training_step_seconds", x, *versions])


def _num(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    load = result["load_average"]
    lines = [
        f"# Length extension on the built-in model: LoRAs for {', '.join(str(r['frames']) for r in result['lengths'])} "
        "frames",
        "",
        *command_block(result["command"]),
        f"Model `{result['model_path']}` (trained at {TRAIN_FRAMES} frames = {latent_frames(TRAIN_FRAMES)} latent frames "
        f"x 8 x 8 = {tokens(TRAIN_FRAMES)} tokens) at longer lengths, against the data generator's ground truth, in "
        "four variants: **dense** (the model as shipped, unpatched), **sparse** (the sparse LoRA's recipe config, no "
        "LoRA), **sparse + LoRA** (the LoRA trained with that sparse attention, run with its recipe) and **dense + "
        "LoRA** (see each length for which LoRA). Machine: "
        f"{result['machine']}; wall time {result['wall_seconds']:.0f} s; 1-minute load average {load['start']:.2f} "
        f"at the start, {load['end']:.2f} at the end.",
        "",
    ]
    for warning in load["warnings"]:
        lines += [f"**{warning[0].upper() + warning[1:]}.**", ""]
    lines += [
        f"Denoising: {s['denoise_videos']} held-out generator videos (evaluation seeds from "
        f"{SEED_RANGES['evaluation'] + DENOISE_SEED_OFFSET}), noised to each level sigma as in training and predicted "
        "in one conditional call; mean PSNR of the prediction against the clean video. In the sparse variants every "
        "call runs the mask (the recipe's dense layers stay dense), as in training. Sampled videos: "
        f"{s['prompts']} fixed prompts (`evaluation_specs`), noise seed {s['seed']} + prompt index, "
        f"{s['inference_steps']} steps, guidance {s['guidance']}, sampler `{s['sampler']}`, one video per call with "
        "the variants interleaved. Colour and direction read from the pixels (hits, share; chance 0.25 each); "
        "objects shown = mean share of frames showing an object (all frames, and the last quarter); track jitter = "
        "median RMS distance in px of the foreground centroid from its fitted straight line; density = mean over "
        "the denoising steps of the share of (query block, key block) pairs computed (dense layers and steps count "
        "1). Generation time: median seconds per video over the same generations. Training step: median of "
        f"{s['timing_steps']} alternating steps each (forward, backward, AdamW; batch 1, the LoRA's rank) after one "
        "untimed round.",
        "",
    ]
    figure_links = result["figure_links"]
    for r in result["lengths"]:
        lines += [f"## {r['frames']} frames ({r['frames'] // (TRAIN_FRAMES - 1)}x; {r['latent_frames']} latent frames, "
                  f"{r['tokens']} tokens)", ""]
        cfg = ", ".join(f"{k}={v}" for k, v in r["sparse_config"].items() if k not in ("method", "version"))
        lines += [f"Sparse attention: {r['sparse_config']['method']} ({cfg}). Dense + LoRA runs the "
                  f"{r['dense_lora']} LoRA.", "",
                  "| LoRA | trained with | steps | training time (min) | s / step (training run) | final loss | "
                  "folder |", "|---|---|---|---|---|---|---|"]
        for attention, lr in r["loras"].items():
            lines.append(f"| {attention}-trained | {lr['trained_attention']} attention | {lr['steps']} | "
                         f"{lr['training_seconds'] / 60:.1f} | {lr['seconds_per_step']:.3f} | "
                         f"{_num(lr['final_loss'], '.4f')} | `{lr['folder']}` |")
        sigmas = list(next(iter(r["denoising"].values())))
        lines += ["", "### One-call denoising (PSNR, dB)", "",
                  "| variant | " + " | ".join(f"sigma {x}" for x in sigmas) + " |",
                  "|---|" + "---|" * len(sigmas)]
        for name, scores in r["denoising"].items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[x]['mean']:.2f}" for x in sigmas) + " |")
        lines += ["", "### Sampled videos: prompt following and temporal consistency", "",
                  "| variant | colour | direction | objects shown | objects shown, last quarter | track jitter (px) | "
                  "generation (s / video) | density |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, st in [*r["sampled"].items(), ("generator", r["generator"])]:
            dens = st.get("density")
            lines.append(
                f"| {name} | {st['hits']['colour']}/{st['prompts']} ({st['colour']:.2f}) | "
                f"{st['hits']['direction']}/{st['prompts']} ({st['direction']:.2f}) | "
                f"{st['mean_present_fraction']:.2f} | {st['late_present_fraction']:.2f} | "
                f"{_num(st['median_track_jitter'])} | "
                f"{_num(st.get('median_seconds_per_video'))} | "
                f"{_num(dens['effective_density'], '.3f') if dens else ('-' if name == 'generator' else '1')} |")
        t = r["training_step_seconds"]
        g = r["sampled"]
        lines += ["", "### Time (this run)", "", "| | dense | sparse | sparse / dense |", "|---|---|---|---|",
                  f"| training step, s (median) | {t['median_dense']:.3f} | {t['median_sparse']:.3f} | "
                  f"{t['sparse_over_dense']:.2f} |",
                  f"| generation without LoRA, s / video (median) | {g['dense']['median_seconds_per_video']:.2f} | "
                  f"{g['sparse']['median_seconds_per_video']:.2f} | "
                  f"{g['sparse']['median_seconds_per_video'] / g['dense']['median_seconds_per_video']:.2f} |",
                  f"| generation with LoRA, s / video (median) | {g['dense + LoRA']['median_seconds_per_video']:.2f} | "
                  f"{g['sparse + LoRA']['median_seconds_per_video']:.2f} | "
                  f"{g['sparse + LoRA']['median_seconds_per_video'] / g['dense + LoRA']['median_seconds_per_video']:.2f} |",
                  "", f"![samples, {r['frames']} frames]({figure_links['samples_' + str(r['frames'])]})", ""]
    lines += ["## Figures", "", f"![one-call denoising]({figure_links['denoising']})", "",
              f"The command above regenerates this page, its figures and `length_lora.json` / `length_lora.csv` (in "
              f"`{result['eval_dir']}`).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main
def build_parser(method: str) -> argparse.ArgumentParser:
    from sparsegen.cli.options import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--train", action="store_true", help="train the LoRAs (then stop, unless --evaluate)")
    p.add_argument("--evaluate", action="store_true", help="with --train: evaluate after training")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: LoRAs of 2 steps (in a temp folder unless --out), 33 frames, 2 prompts, "
                        "3 denoising steps (the recipe keeps 2 dense), 1 noise level; trains and evaluates")
    p.add_argument("--frames", type=parse_int_list, default=None,
                   help=f"lengths, comma-separated (default {','.join(map(str, DEFAULT_FRAMES))})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder of the LoRAs (len<F>, len<F>-dense; default {DEFAULT_LORA_ROOT.relative_to(REPO)})")
    g = p.add_argument_group("training")
    g.add_argument("--train-attention", type=parse_attentions, default=ATTENTIONS,
                   help="which LoRAs to train: sparse (the method's mask), dense (the baseline), or both (default)")
    g.add_argument("--method", default=method, choices=[m for m in available_methods() if m != "dense"],
                   help="sparse method of the sparse-trained LoRA (default radial); its option flags below (radial: "
                        f"{METHOD_DEFAULTS['radial']} unless given)")
    g.add_argument("--steps", type=int, default=None, help=f"training steps per LoRA (default {DEFAULT_STEPS})")
    g.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank (default {DEFAULT_RANK}; see the top)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    g.add_argument("--warmup-steps", type=int, default=None, help=f"warm-up steps (default {DEFAULT_WARMUP}; quick 0)")
    g.add_argument("--batch-size", type=int, default=1, help="videos per step (default 1)")
    g.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                   help=f"stop after {PROBE_STEPS} steps when the projected training time exceeds this (default "
                        f"{BUDGET_MINUTES:g}; 0: no limit)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint period in steps (default 500)")
    g.add_argument("--log-every", type=int, default=10, help="steps between loss reports (default 10)")
    g.add_argument("--resume", action="store_true", help="continue unfinished LoRAs from their newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace LoRA folders that exist")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints/ in the LoRA folders")
    g.add_argument("--quiet", action="store_true", help="no train-lora messages")
    g = p.add_argument_group("evaluation")
    g.add_argument("--dense-lora", choices=("trained", "same"), default="trained",
                   help="dense + LoRA runs the dense-trained LoRA (default) or the sparse-trained one ('same')")
    g.add_argument("--prompts", type=int, default=None, help="sampled prompts per length (default 16; quick 2)")
    g.add_argument("--inference-steps", type=int, default=None,
                   help=f"denoising steps (default the model's {toy.DEFAULT_NUM_INFERENCE_STEPS}; quick 3)")
    g.add_argument("--guidance", type=float, default=toy.DEFAULT_GUIDANCE_SCALE, help="guidance scale (model's)")
    g.add_argument("--sampler", choices=toy.SAMPLERS, default=None, help="default: the model's own (sampling.json)")
    g.add_argument("--sigmas", type=parse_float_list, default=None,
                   help=f"denoising noise levels (default {','.join(map(str, DENOISING_SIGMAS))}; quick 0.5)")
    g.add_argument("--denoise-videos", type=int, default=None, help="held-out videos per length (default 16; quick 2)")
    g.add_argument("--chunk", type=int, default=4, help="videos per one-call prediction (memory; default 4)")
    g.add_argument("--timing-steps", type=int, default=None,
                   help="timed training steps per attention (default 10; quick 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--eval-dir", type=Path, default=REPO / "evals" / "out" / "length_lora",
                   help="folder for length_lora.json and length_lora.csv")
    g.add_argument("--results", type=Path, default=None,
                   help="markdown page (default evals/results/length_lora.md; quick: EVAL_DIR/length_lora.md; '-': none)")
    g.add_argument("--figures", type=Path, default=None, help="folder for the PNGs (default: the page's path without .md)")
    given = METHOD_DEFAULTS.get(method)
    add_config_arguments(p, config_class(method), title=(
        f"options of method '{method}' for the sparse-trained LoRA (a flag not given: "
        + (f"{', '.join(f'{k}={v}' for k, v in given.items())} for the built-in model's 64-token frames, then "
           if given else "")
        + "train-lora's dense_layers=2, dense_steps=2, then the built-in model's preset, then the default shown)"))
    return p


def parse_args(argv) -> argparse.Namespace:
    from sparsegen.cli.options import config_options

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default="radial")
    known, _ = pre.parse_known_args(argv)
    method = known.method if known.method in available_methods() and known.method != "dense" else "radial"
    args = build_parser(method).parse_args(argv)
    args.method_options = {**METHOD_DEFAULTS.get(args.method, {}), **config_options(args, config_class(args.method))}
    defaults = dict(frames=DEFAULT_FRAMES, prompts=16, inference_steps=toy.DEFAULT_NUM_INFERENCE_STEPS,
                    sigmas=DENOISING_SIGMAS, denoise_videos=16, steps=DEFAULT_STEPS, timing_steps=10)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
    if args.warmup_steps is None:
        args.warmup_steps = 0 if args.quick else DEFAULT_WARMUP
    for name in ("prompts", "inference_steps", "denoise_videos", "timing_steps", "steps", "rank", "chunk", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    bad = [f for f in args.frames if f < 1 or (f - 1) % toy.TEMPORAL_FACTOR]
    if bad:
        raise SystemExit(f"--frames {bad}: the built-in model takes 1 + {toy.TEMPORAL_FACTOR} k frames, e.g. "
                         f"{','.join(map(str, DEFAULT_FRAMES))}")
    if args.evaluate and not args.train:
        raise SystemExit("--evaluate goes with --train (evaluating is what the script does without --train)")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"python {SCRIPT}" + "".join(" " + shlex.quote(a) for a in argv)
    tic = time.perf_counter()
    load_start = load_average()
    warnings = [w for w in [load_warning("start", load_start)] if w]
    with contextlib.ExitStack() as stack:
        if args.out is not None:
            root = args.out
        elif args.quick:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="length_lora_")))
        else:
            root = DEFAULT_LORA_ROOT
        train = args.train or args.quick
        if train:
            for frames in args.frames:
                for attention in args.train_attention:
                    path = train_length_lora(frames, attention, args, root=root, command=command)
                    print(f"wrote {path} ({path / CARD_FILE})", flush=True)
            if not (args.evaluate or args.quick):
                return 0
        lengths, videos = [], {}
        for frames in args.frames:
            result, videos[frames] = evaluate_length(frames, args, root=root)
            lengths.append(result)
        load_end = load_average()
        warnings += [w for w in [load_warning("end", load_end)] if w]

        results = args.results or (args.eval_dir / "length_lora.md" if args.quick
                                   else REPO / "evals" / "results" / "length_lora.md")
        write_page = str(results) != "-"
        figures = args.figures or (results.with_suffix("") if write_page else args.eval_dir)
        page_dir = results.parent if write_page else args.eval_dir
        args.eval_dir.mkdir(parents=True, exist_ok=True)
        figures.mkdir(parents=True, exist_ok=True)
        paths = {"denoising": figures / "denoising.png"}
        plot_denoising(lengths, paths["denoising"])
        prompt = evaluation_specs(1)[0].prompt
        for r in lengths:
            paths[f"samples_{r['frames']}"] = figures / f"samples_{r['frames']}.png"
            plot_samples(videos[r["frames"]], prompt, paths[f"samples_{r['frames']}"])
        try:
            eval_dir = str(args.eval_dir.resolve().relative_to(REPO))
        except ValueError:
            eval_dir = str(args.eval_dir)
        result = {
            "command": command, "quick": args.quick, "model_path": str(toy.ASSET_DIR.relative_to(REPO)),
            "settings": {"prompts": args.prompts, "inference_steps": args.inference_steps, "guidance": args.guidance,
                         "sampler": args.sampler or toy.load_default_sampler(), "sigmas": list(args.sigmas),
                         "denoise_videos": args.denoise_videos, "timing_steps": args.timing_steps, "seed": args.seed,
                         "dense_lora": args.dense_lora},
            "lengths": lengths, "load_average": {"start": load_start, "end": load_end, "warnings": warnings},
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} threads",
            "versions": {"sparsegen": sparsegen.__version__, "torch": torch.__version__},
            "figures": {k: str(v) for k, v in paths.items()},
            "figure_links": {k: os.path.relpath(v, page_dir) for k, v in paths.items()},
            "eval_dir": eval_dir, "wall_seconds": time.perf_counter() - tic,
        }
        (args.eval_dir / "length_lora.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
        write_csv(result, args.eval_dir / "length_lora.csv")
        if write_page:
            write_markdown(result, results)
        for r in lengths:
            for name, st in r["sampled"].items():
                print(f"{r['frames']} frames {name:14s} colour {st['colour']:.2f} direction {st['direction']:.2f} "
                      f"shown {st['mean_present_fraction']:.2f} (last quarter {st['late_present_fraction']:.2f}) "
                      f"jitter {_num(st['median_track_jitter'])} px, {st['median_seconds_per_video']:.1f} s/video")
        print(f"wrote {args.eval_dir}" + (f" and {results}" if write_page else "") +
              f" in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
