"""LoRA fine-tuning under sparse attention, and the recipe that runs a trained LoRA.

    sparsegen train-lora --data toy --frames 33 --steps 1000 --out runs/len33      # train
    accelerate launch --multi_gpu --num_processes 2 -m sparsegen.lora --data toy ...  # on 2 processes

    pipe.load_lora_weights("runs/len33")                       # diffusers alone loads the LoRA
    handle = sparsegen.apply(pipe, recipe="runs/len33")         # the attention schedule it was trained for

Modules: ``train`` (the training loop, :class:`TrainLoraConfig`), ``data`` (video folders,
the built-in generator, the on-disk cache), ``objective`` (flow-matching loss,
logit-normal noise levels), ``models`` (what training needs from a pipeline),
``checkpoint`` (safetensors + JSON checkpoints), ``recipe`` (the JSON beside the LoRA).
Heavy dependencies (accelerate, peft) are imported only when training runs.
"""

from .recipe import LORA_WEIGHTS_FILE, RECIPE_FILE, Recipe

__all__ = ["Recipe", "RECIPE_FILE", "LORA_WEIGHTS_FILE", "TrainLoraConfig", "LoraTrainingResult", "train_lora"]


def __getattr__(name):
    if name in ("TrainLoraConfig", "LoraTrainingResult", "train_lora"):
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module 'sparsegen.lora' has no attribute {name!r}")
