"""What an adapter declares about a diffusers model (and nothing about any method).

An adapter names:
  * the transformer classes it serves and the pipeline attributes holding them;
  * which modules are the video self-attention layers, in execution order;
  * how to read the latent token grid from the transformer's inputs (patch sizes);
  * whether text tokens share the self-attention sequence (joint attention), and where.

The interception itself (one mechanism for every adapter) lives in ``sparsegen.apply``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["LatentLayout", "ModelAdapter", "TextLayout"]


class TextLayout(str, enum.Enum):
    """Where text tokens sit in a self-attention sequence."""

    NONE = "none"      # video tokens only (text enters through cross-attention)
    SUFFIX = "suffix"  # [video tokens, text tokens]; padded text keys masked by the model's attn_mask
    PREFIX = "prefix"  # [text tokens, video tokens] (CogVideoX)


class LatentLayout(str, enum.Enum):
    """How the transformer's latent video input is laid out."""

    CHANNELS_FIRST = "BCFHW"  # (batch, channels, frames, height, width): Wan, HunyuanVideo
    FRAMES_FIRST = "BFCHW"    # (batch, frames, channels, height, width): CogVideoX
    IMAGE = "BCHW"            # (batch, channels, height, width): UNets (Stable Diffusion)


@dataclass(frozen=True)
class ModelAdapter:
    """Declarative description of one model family.

    Args:
        name: short identifier (``sparsegen.supported_models()`` lists it).
        transformer_classes: class names of the denoiser this adapter serves.
        pipeline_classes: pipelines known to carry it (for messages and docs).
        transformer_attributes: pipeline attributes that may hold such a transformer
            (Wan 2.2 has two: ``transformer`` and ``transformer_2``).
        self_attention_pattern: regex matched (fullmatch) against ``named_modules()``
            names; matches, in module order, are the patched layers 0..L-1.
        patch_size: maps the transformer's config to (pt, ph, pw).
        text_layout: :class:`TextLayout` value.
        hidden_states_arg, timestep_arg: names of the transformer ``forward`` arguments
            holding the latent video and the timestep.
        latent_layout: :class:`LatentLayout` of the latent video argument.
        grid_reader: for models whose latents arrive already flattened to a token
            sequence (FLUX), ``grid_reader(transformer, arguments, cache) -> (F, H, W)``
            reads the grid from the forward's arguments (by name); ``cache`` is a dict the
            handle keeps, so a reader that must look at device values (position ids) does
            it once per distinct input rather than on every call.
        levels: for UNets, ``levels(unet) -> [downsample factors]`` of the resolution
            levels that hold patched attention; each layer's grid is the latent grid
            divided by its level's factor (found from its token count).
        frame_causal: for models whose self-attention may receive a frame-causal block
            mask (SkyReels-V2's diffusion forcing), ``frame_causal(config) -> latent frames
            per causal block``: a mask passed to a patched layer is that one, and methods
            intersect their own with it. None: a mask passed to video self-attention is
            refused.
    """

    name: str
    transformer_classes: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    self_attention_pattern: str
    patch_size: Callable[[object], tuple[int, int, int]]
    text_layout: TextLayout = TextLayout.NONE
    transformer_attributes: tuple[str, ...] = ("transformer",)
    hidden_states_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    latent_layout: LatentLayout = LatentLayout.CHANNELS_FIRST
    grid_reader: Optional[Callable[[torch.nn.Module, dict, dict], tuple[int, int, int]]] = None
    levels: Optional[Callable[[torch.nn.Module], list[int]]] = None
    frame_causal: Optional[Callable[[object], int]] = None

    def __post_init__(self):
        object.__setattr__(self, "text_layout", TextLayout(self.text_layout))
        object.__setattr__(self, "latent_layout", LatentLayout(self.latent_layout))

    def serves(self, transformer: torch.nn.Module) -> bool:
        names = {c.__name__ for c in type(transformer).__mro__}
        return any(n in names for n in self.transformer_classes)

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        pat = re.compile(self.self_attention_pattern)
        return [(n, m) for n, m in transformer.named_modules() if pat.fullmatch(n)]

    def read_grid(self, transformer: torch.nn.Module, arguments: dict, cache: dict) -> tuple[int, int, int]:
        """(frames, height, width) of the token grid of one forward call, from its arguments by name."""
        if self.grid_reader is not None:
            return self.grid_reader(transformer, arguments, cache)
        hs = arguments.get(self.hidden_states_arg)
        if hs is None:
            raise ValueError(f"sparsegen: {type(transformer).__name__}.forward got no '{self.hidden_states_arg}'")
        return self.token_grid(transformer, hs)

    def token_grid(self, transformer: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) of the token grid after patchify, from 5-D latents laid out
        as :attr:`latent_layout` says."""
        if hidden_states.dim() != (4 if self.latent_layout == LatentLayout.IMAGE else 5):
            raise ValueError(
                f"{self.name}: expected latents laid out {self.latent_layout.value}, got "
                f"{tuple(hidden_states.shape)=}"
            )
        pt, ph, pw = self.patch_size(transformer.config)
        if self.latent_layout == LatentLayout.IMAGE:
            _, _, h, w = hidden_states.shape
            return (1, h // ph, w // pw)
        if self.latent_layout == LatentLayout.FRAMES_FIRST:
            _, f, _, h, w = hidden_states.shape
        else:
            _, _, f, h, w = hidden_states.shape
        return (f // pt, h // ph, w // pw)
