"""``sparsegen train-lora``: fine-tune a LoRA under sparse attention (e.g. for longer videos).

    sparsegen train-lora --data toy --frames 33 --steps 1000 --out runs/len33
    sparsegen train-lora --model ./Wan2.1-T2V-1.3B-Diffusers --data ./my_videos --frames 161 \\
        --height 480 --width 832 --method radial --decay-factor 0.2 --gradient-checkpointing --out runs/wan161
    accelerate launch --multi_gpu --num_processes 2 -m sparsegen.lora --data toy --batch-size 2 --out runs/ddp

then ``sparsegen generate --lora runs/len33`` (or, in Python, ``pipe.load_lora_weights(dir)``
and ``sparsegen.apply(pipe, recipe=dir)``).

Every option of the chosen method's config is a flag of the same name as in
``sparsegen generate`` (``sparsegen train-lora --method gna --help`` lists GNA's). Training
runs every denoising call sparse (the method's ``--dense-layers`` stay dense, 2 by
default); ``--dense-steps`` / ``--dense-last-steps`` are the inference schedule saved in
the recipe (default 2 dense warm-up steps). ``--batch-size`` is the global batch, split
over the processes ``accelerate launch`` starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..generate import DEFAULT_METHOD
from ..methods import available_methods, config_class
from .options import add_config_arguments, config_options

__all__ = ["add_command", "add_arguments", "run", "main"]


def add_command(subparsers, method: str) -> None:
    p = subparsers.add_parser("train-lora", allow_abbrev=False,
                              help="fine-tune a LoRA under sparse attention (peft + accelerate)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, method)
    p.set_defaults(func=run)


def _targets(text: str) -> tuple:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. to_q,to_k,to_v,to_out.0")
    return items


def add_arguments(p: argparse.ArgumentParser, method: str) -> None:
    """The command's own flags plus the flags of ``method``'s config."""
    from ..lora.train import DEFAULT_TARGETS, DTYPES, TrainLoraConfig

    d = TrainLoraConfig(out="")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="'toy' (the built-in model, default) or a local diffusers "
                   "pipeline folder (Wan text-to-video)")
    g.add_argument("--data", default=d.data, help="a folder of videos with metadata.csv or metadata.jsonl "
                   "(path/file_name and caption/text columns), 'toy' (fresh generated videos every step) or 'toy:N' "
                   "(a fixed set of N generated videos); default toy")
    g.add_argument("--frames", type=int, default=None, help="training video frames (built-in model default 17)")
    g.add_argument("--height", type=int, default=None, help="training height in pixels (built-in model default 32)")
    g.add_argument("--width", type=int, default=None, help="training width in pixels (built-in model default 32)")
    g.add_argument("--transformer", default=d.transformer, choices=["transformer", "transformer_2"],
                   help="which transformer to train (transformer_2: Wan 2.2's low-noise expert; one per run)")
    g.add_argument("--cache-dir", default=None, help="where encoded latents and captions are cached (default OUT/cache)")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="the frozen base model's dtype (default bfloat16 on CUDA, float32 on CPU); LoRA weights "
                        "are fp32")

    g = p.add_argument_group("attention")
    g.add_argument("--method", default=DEFAULT_METHOD, choices=available_methods(),
                   help=f"sparse method used in training and saved in the recipe (default {DEFAULT_METHOD}); "
                        "its options are listed below")
    g.add_argument("--preset", default=None, help="start from a named preset of the method; flags override its fields")
    g.add_argument("--dense", action="store_true", help="train with dense attention (the baseline to compare with)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank}, as the paper)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    g.add_argument("--targets", type=_targets, default=DEFAULT_TARGETS,
                   help=f"comma-separated module names to wrap (default {','.join(DEFAULT_TARGETS)})")
    g.add_argument("--self-attention-only", action="store_true",
                   help="wrap the targets of the video self-attention layers only (not cross-attention)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch, split over processes (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate after warm-up (default {d.lr:g})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warm-up steps (default {d.warmup_steps}), then constant")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"clip the gradient norm to this (default {d.grad_clip:g}; 0: off)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay ({d.weight_decay:g})")
    g.add_argument("--logit-mean", type=float, default=d.logit_mean, help="logit-normal noise levels: mean (0)")
    g.add_argument("--logit-std", type=float, default=d.logit_std, help="logit-normal noise levels: std (1)")
    g.add_argument("--timestep-shift", type=float, default=None,
                   help="flow shift applied to sampled noise levels (default: the scheduler's)")
    g.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                   help="probability of training a sample on the empty prompt (default 0)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time)")
    g.add_argument("--seed", type=int, default=d.seed, help="LoRA init, noise, noise levels, data order (default 0)")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for the LoRA, its recipe, checkpoints and logs")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in OUT (or from the checkpoint folder given)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"checkpoint period in steps (default {d.checkpoint_every}; always at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help=f"checkpoints kept (default {d.keep_checkpoints}; 0: all)")
    g.add_argument("--validate-every", type=int, default=d.validate_every,
                   help="write a validation video every N steps and at the end (default 0: never)")
    g.add_argument("--validation-prompt", default=None, help="validation prompt (default: the model's example or "
                   "the data's first caption)")
    g.add_argument("--validation-steps", type=int, default=None, help="denoising steps of the validation video")
    g.add_argument("--validation-guidance", type=float, default=None, help="guidance scale of the validation video")
    g.add_argument("--log-every", type=int, default=d.log_every, help=f"steps between loss reports ({d.log_every})")
    if method in available_methods():
        add_config_arguments(p, config_class(method))


def config_from_args(args: argparse.Namespace):
    """The :class:`~sparsegen.lora.train.TrainLoraConfig` the flags describe."""
    from ..lora.train import TrainLoraConfig

    return TrainLoraConfig(
        out=args.out, model=args.model, data=args.data, frames=args.frames, height=args.height, width=args.width,
        method=args.method, method_options=config_options(args, config_class(args.method)), preset=args.preset,
        dense=args.dense, transformer=args.transformer, rank=args.rank, alpha=args.alpha, targets=args.targets,
        self_attention_only=args.self_attention_only, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
        logit_mean=args.logit_mean, logit_std=args.logit_std, timestep_shift=args.timestep_shift,
        caption_dropout=args.caption_dropout, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
        seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, validate_every=args.validate_every,
        validation_prompt=args.validation_prompt, validation_steps=args.validation_steps,
        validation_guidance=args.validation_guidance, log_every=args.log_every, cache_dir=args.cache_dir,
    )


def run(args: argparse.Namespace) -> int:
    from ..lora.train import train_lora

    try:
        train_lora(config_from_args(args))
    except ValueError as e:
        raise SystemExit(f"sparsegen train-lora: {e}") from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m sparsegen.lora``: ``sparsegen train-lora`` with these flags."""
    from . import main as cli_main

    return cli_main(["train-lora", *(sys.argv[1:] if argv is None else argv)])
