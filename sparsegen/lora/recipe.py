"""The JSON recipe written beside a trained LoRA: what it was trained for, and how to run it.

A LoRA folder written by ``sparsegen train-lora`` holds::

    pytorch_lora_weights.safetensors   diffusers' LoRA format (pipe.load_lora_weights(folder))
    sparsegen_recipe.json              this recipe: method config, frames, resolution, model identity

The LoRA loads without sparsegen. The recipe makes sparsegen run the attention schedule
the LoRA was trained for::

    pipe.load_lora_weights(folder)                      # diffusers (Wan 2.2 transformer_2:
                                                        #   load_into_transformer_2=True)
    handle = sparsegen.apply(pipe, recipe=folder)       # the recipe's method config, checked
    video = pipe(prompt, num_frames=recipe.frames, ...)  # against pipe's model

Model identity: a LoRA only makes sense on the weights it was trained on. The recipe
records the transformer's class, a hash of its config (the architecture) and a
fingerprint of its weights (a few values of a few tensors that no LoRA target
touches, compared with a relative tolerance so that loading the model in another
dtype still matches); :meth:`Recipe.check_model` refuses any other model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["Recipe", "RECIPE_FILE", "LORA_WEIGHTS_FILE", "RECIPE_VERSION", "module_identity", "check_identity",
           "lora_target_matcher"]

logger = logging.getLogger("sparsegen")

RECIPE_FILE = "sparsegen_recipe.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
RECIPE_FORMAT = "sparsegen-lora-recipe"
RECIPE_VERSION = 1
TRANSFORMER_NAMES = ("transformer", "transformer_2")

# Weight fingerprint: FINGERPRINT_VALUES evenly spaced values of each of the first and
# last FINGERPRINT_TENSORS // 2 eligible parameters. Two values match when they differ by
# at most FINGERPRINT_RTOL of their magnitude: rounding fp32 weights to bf16 moves them by
# at most 2**-9 (0.2%), while another training run or model differs by far more than 1%.
FINGERPRINT_TENSORS = 4
FINGERPRINT_VALUES = 16
FINGERPRINT_RTOL = 1e-2
FINGERPRINT_ATOL = 1e-6


def _config_hash(module: torch.nn.Module) -> str:
    """sha256 of a diffusers module's config (public keys), or of its class name without one."""
    config = getattr(module, "config", None)
    items = {} if config is None else {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(module).__name__}:{text}".encode()).hexdigest()


def lora_target_matcher(targets) -> callable:
    """A predicate on module names with peft's rule for ``target_modules``: a string is a
    regular expression matched in full, a list matches a name equal to an entry or ending
    with ``"." + entry``."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    entries = tuple(targets or ())
    return lambda name: any(name == t or name.endswith("." + t) for t in entries)


def _fingerprint(module: torch.nn.Module, targets) -> list[dict]:
    """A few values of a few parameters no LoRA touches (see FINGERPRINT_* above).

    Names are read as they are without a LoRA (peft's ``.base_layer`` dropped, its own
    parameters skipped), so a model with the LoRA loaded fingerprints like the bare one.
    """
    targeted = lora_target_matcher(targets)
    eligible = []
    for name, p in module.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        owner = clean.rsplit(".", 1)[0] if "." in clean else ""
        if targeted(owner) or p.numel() == 0:
            continue
        eligible.append((clean, p))
    half = FINGERPRINT_TENSORS // 2
    chosen = eligible if len(eligible) <= FINGERPRINT_TENSORS else eligible[:half] + eligible[-half:]
    out = []
    with torch.no_grad():
        for name, p in chosen:
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_VALUES, flat.numel())).round().long()
            out.append({"name": name, "shape": list(p.shape),
                        "values": [float(v) for v in flat[idx.to(flat.device)].double().cpu()]})
    return out


def module_identity(module: torch.nn.Module, *, name: str = "", lora_targets=()) -> dict:
    """What identifies a trained module: class, config hash and a weight fingerprint.

    Args:
        module: e.g. a pipeline's transformer (with or without a LoRA loaded).
        name: a human-readable label recorded with it (a model folder, "toy").
        lora_targets: the LoRA's ``target_modules``; their weights are left out of the
            fingerprint, so a fused LoRA does not change the identity.
    """
    return {"name": name, "class": type(module).__name__, "config_sha256": _config_hash(module),
            "fingerprint": _fingerprint(module, lora_targets)}


def check_identity(expected: dict, module: torch.nn.Module, *, what: str, fix: str, lora_targets=()) -> None:
    """Raise ValueError (saying ``fix``) unless ``module`` is the module ``expected`` describes."""
    label = expected.get("name") or expected.get("class")
    if type(module).__name__ != expected.get("class"):
        raise ValueError(f"{what} was made for a {expected.get('class')} ({label}), not a {type(module).__name__}; "
                         f"{fix}")
    if _config_hash(module) != expected.get("config_sha256"):
        raise ValueError(f"{what} was made for another {expected.get('class')} architecture ({label}: its config "
                         f"differs from this model's); {fix}")
    actual = {f["name"]: f for f in _fingerprint(module, lora_targets)}
    for f in expected.get("fingerprint", []):
        mine = actual.get(f["name"])
        if mine is None or mine["shape"] != f["shape"] or not all(
                abs(a - b) <= FINGERPRINT_RTOL * max(abs(a), abs(b)) + FINGERPRINT_ATOL
                for a, b in zip(mine["values"], f["values"])):
            raise ValueError(f"{what} was made for other weights ({label}): parameter {f['name']!r} differs from "
                             f"this model's; {fix}")


def _transformer_of(pipe_or_transformer, attribute: str) -> torch.nn.Module:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer
    module = getattr(pipe_or_transformer, attribute, None)
    if module is None:
        raise ValueError(f"this LoRA was trained for `{attribute}`, which {type(pipe_or_transformer).__name__} does "
                         "not have; load the pipeline it was trained for")
    return module


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A trained LoRA's recipe (``sparsegen_recipe.json``).

    Attributes:
        method: the method config used at inference, as ``config.to_dict()`` (training ran
            the same config on every denoising step: ``dense_steps`` and
            ``dense_last_steps`` are the inference warm-up and finish only).
        trained_attention: "sparse" (the method's mask, forward and backward) or "dense".
        frames, height, width: the video size the LoRA was trained at (pixels, frames).
        model: :func:`module_identity` of the transformer it was trained on.
        transformer: which of the pipeline's transformers it belongs to ("transformer",
            or "transformer_2": Wan 2.2's low-noise expert, loaded with
            ``pipe.load_lora_weights(folder, load_into_transformer_2=True)``).
        lora: rank, alpha, target modules, weight file name.
        training: the training settings (steps, batch, learning rate, data, ...), for the record.
        version: recipe schema version.
    """

    method: dict
    trained_attention: str
    frames: int
    height: int
    width: int
    model: dict
    transformer: str = "transformer"
    lora: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version!r} is not understood by this sparsegen (it reads version "
                             f"{RECIPE_VERSION}); upgrade sparsegen or retrain the LoRA")
        if self.transformer not in TRANSFORMER_NAMES:
            raise ValueError(f"recipe transformer={self.transformer!r} must be one of {TRANSFORMER_NAMES}")
        if self.trained_attention not in ("sparse", "dense"):
            raise ValueError(f"recipe trained_attention={self.trained_attention!r} must be 'sparse' or 'dense'")
        if not isinstance(self.method, dict) or "method" not in self.method:
            raise ValueError("recipe 'method' must be a method config dict with a 'method' key (config.to_dict())")

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, folder) -> "Recipe":
        """Read ``folder/sparsegen_recipe.json``.

        Raises:
            ValueError: no recipe there, not a sparsegen recipe, or an unknown version.
        """
        path = Path(folder) / RECIPE_FILE
        if not path.is_file():
            raise ValueError(f"no LoRA recipe at {str(path)!r}: pass the folder `sparsegen train-lora --out` wrote "
                             f"(it holds {LORA_WEIGHTS_FILE} and {RECIPE_FILE})")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-export the LoRA") from None
        if not isinstance(d, dict) or d.get("format") != RECIPE_FORMAT:
            raise ValueError(f"{path} is not a sparsegen LoRA recipe (its 'format' is not {RECIPE_FORMAT!r})")
        d.pop("format")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{path} has unknown field(s) {unknown}; it was written by another sparsegen release")
        return cls(**d)

    def save(self, folder) -> Path:
        path = Path(folder) / RECIPE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": RECIPE_FORMAT, **dataclasses.asdict(self)}, indent=2, default=str))
        return path

    # ------------------------------------------------------------------- use
    def config(self, **overrides):
        """The inference method config, with ``overrides`` replacing single fields.

        Raises:
            ValueError: an override the method does not have, or an invalid value.
        """
        from ..methods import config_from_dict

        return config_from_dict({**self.method, **overrides})

    def check_model(self, pipe_or_transformer) -> None:
        """Raise ValueError unless ``pipe_or_transformer`` holds the transformer this LoRA
        was trained on (the pipeline's ``self.transformer`` attribute, or the module itself)."""
        module = _transformer_of(pipe_or_transformer, self.transformer)
        check_identity(self.model, module, what="this LoRA recipe",
                       fix="load the model it was trained on, or train a LoRA for this one",
                       lora_targets=self.lora.get("targets", ()))

    def load_lora(self, pipe, folder, *, adapter_name: Optional[str] = None) -> None:
        """Check the model, then load the LoRA with diffusers (into ``transformer_2`` when
        it was trained for Wan 2.2's second transformer)."""
        self.check_model(pipe)
        kwargs = {"load_into_transformer_2": True} if self.transformer == "transformer_2" else {}
        pipe.load_lora_weights(str(folder), weight_name=self.lora.get("weight_name", LORA_WEIGHTS_FILE),
                               adapter_name=adapter_name, **kwargs)

    def warn_if_not_loaded(self, pipe_or_transformer) -> None:
        """Log a warning when the pipeline's transformer carries no LoRA at all."""
        module = _transformer_of(pipe_or_transformer, self.transformer)
        if not getattr(module, "peft_config", None):
            logger.warning("sparsegen: the recipe sets the attention schedule only, and no LoRA is loaded in %s; "
                           "load it first with pipe.load_lora_weights(folder)%s", self.transformer,
                           " (load_into_transformer_2=True)" if self.transformer == "transformer_2" else "")


def json_safe(value: Any) -> Any:
    """Tuples as lists, enums as values: what JSON writes for a config or settings dict."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))
