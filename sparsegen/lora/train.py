"""LoRA fine-tuning under sparse attention (the library behind ``sparsegen train-lora``).

Radial attention's length-extension recipe (Li et al. 2025, appendix B), for any
sparsegen method:

* the base model is frozen; a peft LoRA (rank 128, alpha 128 by default) is added to
  ``to_q, to_k, to_v, to_out.0`` of the attention layers through diffusers' PEFT
  integration (``transformer.add_adapter``); its parameters are kept in fp32 whatever
  the base model's dtype;
* every self-attention call of every training step runs the method's mask, forward and
  backward, through sparsegen's engine (the method's ``dense_layers`` stay dense; the
  default recipe keeps the first two, as the paper). ``dense_steps`` and
  ``dense_last_steps`` are inference settings (a training step is one denoising call):
  they are saved in the recipe and used when the LoRA generates. ``--dense`` trains the
  dense baseline instead;
* the loss is the model's own flow-matching loss with logit-normal noise levels
  (:mod:`.objective`); AdamW with a linear warm-up and gradient clipping;
* processes: ``accelerate launch`` runs one per device (DDP; on CPU over gloo). The
  batch size is the *global* batch: each of P processes trains on its B / P samples
  of every step, so a run's result does not depend on P (up to summation order).

Defaults and why:

==================  =========  ==============================================================
option              default    why
==================  =========  ==============================================================
rank / alpha        128 / 128  the paper's LoRA; alpha = rank gives a LoRA scale of 1
lr                  1e-4       the usual AdamW rate for rank-64..128 LoRAs of video DiTs
                               (diffusers' and finetrainers' Wan/HunyuanVideo LoRA examples)
warmup_steps        100        the LoRA's B matrices start at zero; ramping the rate while
                               Adam's moment estimates are still few keeps the first updates
                               from overshooting (10% of the default run)
after warm-up       constant   short fine-tunes gain little from decay, and a constant rate
                               lets a resumed run extend --steps without changing the past
grad_clip           1.0        guards against the rare large gradient of a low-noise sample
weight_decay        1e-4       a light pull towards the base model
betas, eps          0.9, 0.999, 1e-8  AdamW's defaults
logit_mean / std    0 / 1      Esser et al.'s logit-normal; then the scheduler's flow shift
batch_size          1          global; the paper used 1-8 with sequence parallelism
steps               1000       the paper trained 1.2k-5k steps on ~2k videos
==================  =========  ==============================================================

Wan 2.2 (two transformers): one run trains one of them (``--transformer transformer``,
the high-noise expert, or ``transformer_2``, the low-noise one) on the noise levels that
transformer serves (split at the pipeline's ``boundary_ratio``); train the other with a
second run into another folder, and load it with ``load_into_transformer_2=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import models
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import prepare_data
from .objective import add_noise, flow_matching_loss, sample_sigmas
from .recipe import LORA_WEIGHTS_FILE, Recipe, json_safe, module_identity

__all__ = ["TrainLoraConfig", "LoraTrainingResult", "train_lora", "DEFAULT_TARGETS", "LENGTH_RECIPE_DEFAULTS",
           "SUMMARY_FILE", "LOG_FILE"]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The paper's length-extension schedule, applied on top of the method's (or the model's)
# preset and under the user's flags: the first two layers dense (in training and at
# inference) and two dense warm-up steps at inference.
LENGTH_RECIPE_DEFAULTS = {"dense_layers": 2, "dense_steps": 2}
SUMMARY_FILE = "training_summary.json"
LOG_FILE = "train_log.jsonl"
VALIDATION_DIR = "validation"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
DTYPES = ("float32", "bfloat16", "float16")
# Options that may differ when a run is resumed: they change when and what is written or
# how long the run goes on, not what a step computes.
RUNTIME_FIELDS = ("out", "resume", "steps", "checkpoint_every", "keep_checkpoints", "validate_every",
                  "validation_prompt", "validation_steps", "validation_guidance", "log_every", "cache_dir")


@dataclasses.dataclass
class TrainLoraConfig:
    """Everything that defines a LoRA training run (the flags of ``sparsegen train-lora``).

    Args:
        out: folder for the LoRA, its recipe, checkpoints, validation videos and logs.
        model: "toy" (the built-in model) or a local diffusers pipeline folder.
        data: a video folder (metadata.csv / metadata.jsonl), "toy" (fresh generated videos
            every step) or "toy:N" (a fixed set of N); see :mod:`sparsegen.lora.data`.
        frames, height, width: training video size (default: the built-in model's 17 x 32 x 32;
            required for other models).
        method, method_options, preset: the sparse method and its config fields (the flags
            of ``sparsegen generate``), over the method's named preset or the model's own.
        dense: train with dense attention (the baseline); the recipe then says "dense".
        transformer: which transformer to train ("transformer_2": Wan 2.2's low-noise expert).
        rank, alpha: LoRA rank and alpha (default alpha = rank).
        targets: module names the LoRA wraps (peft's suffix rule).
        self_attention_only: wrap them only in the video self-attention layers (Wan: ``attn1``).
        steps, batch_size (global), lr, warmup_steps, grad_clip, weight_decay: optimisation.
        logit_mean, logit_std, timestep_shift: noise-level sampling (shift default: the
            scheduler's).
        caption_dropout: probability of training a sample on the empty prompt.
        gradient_checkpointing: recompute each block's activations in the backward pass.
        dtype: the frozen base model's dtype (default bfloat16 on CUDA, float32 on CPU).
        seed: LoRA initialisation, noise, noise levels, caption dropout, data order.
        resume: None, "latest" (newest checkpoint under ``out``) or a checkpoint folder.
        checkpoint_every, keep_checkpoints: checkpoint period (and always at the end); how
            many to keep (0: all).
        validate_every: write a validation video every N steps and at the end (0: never),
            with ``validation_prompt`` (default: the data's first caption), ``validation_steps``
            and ``validation_guidance`` (default: the model's).
        log_every: steps between loss reports (each is one read of the loss to the host).
        cache_dir: where encoded data is cached (default ``out/cache``).
    """

    out: str
    model: str = models.TOY_MODEL
    data: str = "toy"
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    method: str = "radial"
    method_options: dict = dataclasses.field(default_factory=dict)
    preset: Optional[str] = None
    dense: bool = False
    transformer: str = "transformer"
    rank: int = 128
    alpha: Optional[float] = None
    targets: tuple = DEFAULT_TARGETS
    self_attention_only: bool = False
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 1e-4
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: Optional[float] = None
    caption_dropout: float = 0.0
    gradient_checkpointing: bool = False
    dtype: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_prompt: Optional[str] = None
    validation_steps: Optional[int] = None
    validation_guidance: Optional[float] = None
    log_every: int = 10
    cache_dir: Optional[str] = None

    def __post_init__(self):
        def bad(name, allowed):
            return ValueError(f"train-lora: {name}={getattr(self, name)!r} is invalid: {allowed}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("rank", "steps", "batch_size", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be an integer >= 0")
        for name in ("frames", "height", "width", "validation_steps"):
            if getattr(self, name) is not None and (not is_int(getattr(self, name)) or getattr(self, name) < 1):
                raise bad(name, "must be a positive integer (or left unset for the model's default)")
        for name in ("lr", "grad_clip", "weight_decay", "logit_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "must be a finite number >= 0" + (" (0 turns clipping off)" if name == "grad_clip"
                                                                   else ""))
        if not self.lr > 0 or not self.logit_std > 0:
            raise bad("lr" if not self.lr > 0 else "logit_std", "must be > 0")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise bad("alpha", "must be a number > 0 (default: the rank)")
        if self.timestep_shift is not None and not self.timestep_shift > 0:
            raise bad("timestep_shift", "must be > 0 (default: the scheduler's flow shift)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise bad("caption_dropout", "must be in [0, 1)")
        if self.transformer not in ("transformer", "transformer_2"):
            raise bad("transformer", "must be 'transformer' or 'transformer_2'")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t
                                                                       for t in self.targets):
            raise bad("targets", "must be a non-empty list of module names, e.g. to_q,to_k,to_v,to_out.0")
        self.targets = tuple(self.targets)
        if self.dense and (self.method_options or self.preset):
            raise ValueError("train-lora: --dense trains with dense attention; drop the method options and --preset")


@dataclasses.dataclass
class LoraTrainingResult:
    """``out``: the LoRA folder; ``summary``: what ``training_summary.json`` holds;
    ``pipe``: the pipeline with the trained LoRA in its transformer (sparse patch removed)."""

    out: Path
    summary: dict
    pipe: object


def resolve_method_config(config: TrainLoraConfig, model_presets: dict):
    """The inference method config of the run: preset (named, or the model's) <- the
    length-extension defaults <- the user's options. ``(config, description)``."""
    from ..generate import method_config
    from ..methods import config_class

    if config.dense or config.method == "dense":
        return config_class("dense")(), "dense attention (the baseline)"
    options = {**LENGTH_RECIPE_DEFAULTS, **config.method_options}
    cfg = method_config(config.method, preset=config.preset, options=options, model_presets=model_presets,
                        log=lambda *_: None)
    base = (f"preset {config.preset!r}" if config.preset else
            "the built-in model's preset" if config.method in model_presets else "the method's defaults")
    mine = ", ".join(f"{k}={v}" for k, v in config.method_options.items())
    recipe = ", ".join(f"{k}={v}" for k, v in LENGTH_RECIPE_DEFAULTS.items() if k not in config.method_options)
    return cfg, f"{base}" + (f", the length recipe's {recipe}" if recipe else "") + (f", your {mine}" if mine else "")


def lora_targets(config: TrainLoraConfig, transformer):
    """peft ``target_modules``: the names (suffix rule), or with ``self_attention_only`` a
    regular expression restricted to the adapter's self-attention modules."""
    if not config.self_attention_only:
        return list(config.targets)
    from ..patches import adapter_for

    pattern = adapter_for(transformer).self_attention_pattern
    return rf"(?:{pattern})\.(?:{'|'.join(re.escape(t) for t in config.targets)})"


def learning_rate(config: TrainLoraConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def _model_label(model: str) -> str:
    return "sparsegen built-in model (toy_wan)" if model == models.TOY_MODEL else str(Path(model).resolve())


def _check_resume(saved: dict, config: TrainLoraConfig, folder: Path) -> None:
    current = json_safe(dataclasses.asdict(config))
    different = sorted(k for k in set(saved) | set(current)
                       if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))
    if different:
        diff = "; ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in different)
        raise ValueError(f"--resume {folder}: that run was made with other settings ({diff}); resume with the same "
                         "settings or start a new --out")


class _SparsePatch:
    """The training-time sparse patch of the bare transformer: every call sparse (step 0 of
    a schedule with no dense steps), removable around validation."""

    def __init__(self, transformer, config):
        self.transformer, self.config, self.handle = transformer, config, None

    def attach(self):
        if self.config is not None:
            import sparsegen

            self.handle = sparsegen.apply(self.transformer, self.config)
            self.handle.set_step(0)  # a bare transformer: no timestep is read

    def detach(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def density(self) -> Optional[float]:
        """Mean attention density over the calls since attach (a host read; between steps)."""
        stats = self.handle.step_densities() if self.handle is not None else []
        return stats[-1][1] if stats else None


def train_lora(config: TrainLoraConfig, *, pipe=None, log: Callable[[str], None] = print) -> LoraTrainingResult:
    """Train a LoRA and write it (diffusers format) with its recipe to ``config.out``.

    ``pipe``: train this already loaded pipeline (on its device and dtype) instead of
    loading ``config.model``, which then only labels the model in the recipe.

    Runs in every process ``accelerate launch`` starts (or alone). Writes, in ``out``:
    ``pytorch_lora_weights.safetensors``, ``sparsegen_recipe.json``,
    ``training_summary.json``, ``train_log.jsonl``, ``checkpoints/step-N/`` and, with
    ``validate_every``, ``validation/step-N.mp4``.

    Raises:
        ValueError: invalid settings, unsupported model, bad data, a checkpoint made with
            other settings (each message names the value and how to fix it).
    """
    import sparsegen
    from accelerate import Accelerator
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    # Without a GPU, accelerate sets up several processes (MULTI_CPU over gloo) only when told
    # it runs on the CPU; otherwise each process would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = log if main else (lambda *_: None)
    out = Path(config.out)
    if config.batch_size % world:
        raise ValueError(f"train-lora: --batch-size {config.batch_size} is the global batch and must be divisible by "
                         f"the {world} processes; use a multiple of {world}")
    label = _model_label(config.model) if pipe is None else (getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    if pipe is None:
        device = accelerator.device
        dtype = getattr(torch, config.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        pipe = models.load_pipeline(config.model, device=device, dtype=dtype)
    else:
        models.check_supported(pipe, config.model)
        base = models.transformer_of(pipe, config.transformer)
        device, dtype = base.device, base.dtype
    defaults = models.model_defaults(pipe)
    frames, height, width = (getattr(config, k) or defaults[k] for k in ("frames", "height", "width"))
    if None in (frames, height, width):
        raise ValueError(f"train-lora: pass --frames, --height and --width for --model {config.model!r} (only the "
                         "built-in model has defaults)")
    transformer = models.transformer_of(pipe, config.transformer)
    models.check_geometry(pipe, transformer, frames, height, width)
    objective = models.objective_of(pipe, config.transformer)
    shift = config.timestep_shift or objective.shift
    method_cfg, method_words = resolve_method_config(config, defaults["presets"])
    train_cfg = None if method_cfg.method == "dense" else dataclasses.replace(method_cfg, dense_steps=0,
                                                                              dense_last_steps=0)
    say(f"[sparsegen] train-lora: {method_cfg.method} attention ({method_words}) on {frames} frames "
        f"{height}x{width}, {world} process(es), global batch {config.batch_size}")
    targets = lora_targets(config, transformer)
    identity = module_identity(transformer, name=label, lora_targets=targets)

    source = prepare_data(config.data, pipe, frames=frames, height=height, width=width, seed=config.seed,
                          cache_dir=Path(config.cache_dir) if config.cache_dir else out / "cache", rank=rank,
                          world=world, barrier=accelerator.wait_for_everyone, log=say)
    validation_prompt = config.validation_prompt or defaults["prompt"] or source.first_caption
    validation_embeds = None
    if config.validate_every and not models.is_toy(pipe):
        validation_embeds = models.encode_prompts(pipe, [validation_prompt])
    if not models.is_toy(pipe) and getattr(pipe, "text_encoder", None) is not None:
        pipe.text_encoder.to("cpu")  # captions are encoded; training needs the transformer only

    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    torch.manual_seed(config.seed)  # the LoRA's initialisation: the same in every process
    try:
        transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank,
                                           init_lora_weights=True, target_modules=targets))
    except ValueError as e:
        raise ValueError(f"train-lora: --targets {list(config.targets)} match no module of {type(transformer).__name__}"
                         f" ({e}); name Linear layers of its attention, e.g. to_q,to_k,to_v,to_out.0") from None
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    for _, p in named:
        p.data = p.data.float()  # LoRA weights in fp32 whatever the base dtype
    params = [p for _, p in named]
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  weight_decay=config.weight_decay)

    start, history = 0, []
    if config.resume:
        folder = latest_checkpoint(out) if config.resume == "latest" else Path(config.resume)
        if folder is None:
            raise ValueError(f"--resume latest: no checkpoint under {out / 'checkpoints'}; start without --resume")
        lora_state, optimizer_state, state = load_checkpoint(folder)
        _check_resume(state["config"], config, folder)
        missing = sorted({n for n, _ in named} ^ set(lora_state))
        if missing:
            raise ValueError(f"--resume {folder}: its LoRA parameters do not match this run's ({missing[:3]} ...)")
        with torch.no_grad():
            for n, p in named:
                p.copy_(lora_state[n])
        optimizer.load_state_dict(optimizer_state)
        start, history = int(state["step"]), [list(h) for h in state["history"]]
        say(f"[sparsegen] train-lora: resumed from {folder} at step {start}")

    patch = _SparsePatch(transformer, train_cfg)
    patch.attach()
    model, optimizer = accelerator.prepare(transformer, optimizer)
    shape = models.latent_shape(pipe, transformer, frames, height, width)
    per = config.batch_size // world
    mine = slice(rank * per, (rank + 1) * per)
    empty = source.empty_embeds
    recipe = Recipe(method=json_safe(method_cfg.to_dict()), trained_attention="dense" if train_cfg is None else "sparse",
                    frames=frames, height=height, width=width, model=identity, transformer=config.transformer,
                    lora={"rank": config.rank, "alpha": config.alpha or config.rank, "targets": targets,
                          "self_attention_only": config.self_attention_only, "weight_name": LORA_WEIGHTS_FILE},
                    training={**json_safe(dataclasses.asdict(config)), "data_source": source.describe(),
                              "world_size": world})

    def checkpoint(done: int):
        if main:
            save_checkpoint(out, done, lora={n: p for n, p in named}, optimizer=optimizer.optimizer
                            if hasattr(optimizer, "optimizer") else optimizer, keep=config.keep_checkpoints,
                            state={"config": json_safe(dataclasses.asdict(config)), "history": history})
        accelerator.wait_for_everyone()

    def validate(done: int):
        if main:
            patch.detach()
            transformer.eval()
            handle = sparsegen.apply(pipe, method_cfg)
            try:
                video = models.sample_video(
                    pipe, prompt=validation_prompt, embeds=validation_embeds, negative=empty[None],
                    frames=frames, height=height, width=width, steps=config.validation_steps or defaults["steps"],
                    guidance=defaults["guidance"] if config.validation_guidance is None else config.validation_guidance,
                    seed=config.seed)
            finally:
                handle.remove()
                transformer.train()
                patch.attach()
            from ..generate import write_video

            path = write_video(video, str(out / VALIDATION_DIR / f"step-{done:07d}.mp4"), defaults["fps"])
            say(f"[sparsegen] train-lora: validation video {path} ({validation_prompt!r})")
        accelerator.wait_for_everyone()

    if main:
        out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / LOG_FILE, "a") if main else None
    bar = tqdm(total=config.steps, initial=min(start, config.steps), disable=not main, desc="train-lora")
    pending: list[torch.Tensor] = []
    tic = time.perf_counter()
    grad_norm = None
    for step in range(start, config.steps):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every draw is a function of (seed, step), for the global batch; this process takes its slice.
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        sigma = sample_sigmas(g, config.batch_size, logit_mean=config.logit_mean, logit_std=config.logit_std,
                              shift=shift, low=objective.sigma_low, high=objective.sigma_high)[mine]
        noise = torch.randn((config.batch_size, *shape), generator=g)[mine]
        dropped = (torch.rand(config.batch_size, generator=g) < config.caption_dropout)[mine]
        x0, embeds = source.batch(step, range(step * config.batch_size + mine.start,
                                              step * config.batch_size + mine.stop))
        if tuple(x0.shape[1:]) != shape:
            raise ValueError(f"train-lora: the data's latents are {tuple(x0.shape[1:])}, the model expects {shape} "
                             "for this size; delete the cache folder and start again")
        embeds = torch.where(dropped[:, None, None], empty[None].to(embeds.dtype), embeds)
        x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
        noisy = add_noise(x0, noise, sigma)
        output = models.predict(model, noisy.to(dtype), sigma * objective.num_train_timesteps,
                                embeds.to(device=device, dtype=dtype))
        loss = flow_matching_loss(output, x0, noise, sigma, objective.prediction_type)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            # One host read per report: the losses since the last one, averaged over processes.
            losses = accelerator.reduce(torch.stack(pending), reduction="mean").tolist()
            history.extend([done - len(losses) + i + 1, v] for i, v in enumerate(losses))
            pending = []
            record = {"step": done, "loss": sum(losses) / len(losses), "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm), "density": patch.density()}
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            checkpoint(done)
        if config.validate_every and (done % config.validate_every == 0 or done == config.steps):
            validate(done)
    bar.close()
    seconds = time.perf_counter() - tic
    if log_file is not None:
        log_file.close()

    density = patch.density()
    patch.detach()
    transformer = accelerator.unwrap_model(model)
    transformer.eval()
    summary = {
        "config": json_safe(dataclasses.asdict(config)), "method": json_safe(method_cfg.to_dict()),
        "trained_attention": recipe.trained_attention, "frames": frames, "height": height, "width": width,
        "steps_done": max(start, config.steps), "steps_this_session": max(0, config.steps - start),
        "world_size": world, "seconds_this_session": seconds,
        "seconds_per_step": seconds / max(1, config.steps - start), "attention_density": density,
        "loss_history": history, "data": source.describe(), "versions": _versions(),
    }
    if main:
        type(pipe).save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
        recipe.save(out)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        say(f"[sparsegen] train-lora: wrote {out / LORA_WEIGHTS_FILE} and its recipe")
    accelerator.wait_for_everyone()
    return LoraTrainingResult(out=out, summary=summary, pipe=pipe)


def _versions() -> dict:
    import accelerate
    import diffusers
    import peft

    import sparsegen

    return {"sparsegen": sparsegen.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}
