"""sparsegen.patches: diffusers adapters (which modules, what geometry). No method logic."""

from .base import LatentLayout, ModelAdapter, TextLayout
from .allegro import ALLEGRO
from .cogvideox import COGVIDEOX
from .flux import FLUX
from .hunyuan_video import HUNYUAN_VIDEO
from .ltx_video import LTX_VIDEO
from .mochi import MOCHI
from .skyreels_v2 import SKYREELS_V2
from .stable_diffusion import STABLE_DIFFUSION
from .wan import WAN

ADAPTERS: tuple[ModelAdapter, ...] = (WAN, HUNYUAN_VIDEO, COGVIDEOX, LTX_VIDEO, MOCHI, SKYREELS_V2, ALLEGRO, FLUX,
                                      STABLE_DIFFUSION)

__all__ = ["ADAPTERS", "LatentLayout", "ModelAdapter", "TextLayout", "adapter_for", "supported_models"]


def supported_models() -> list[dict]:
    """One entry per adapter: name, transformer classes, pipelines."""
    return [
        {"name": a.name, "transformers": list(a.transformer_classes), "pipelines": list(a.pipeline_classes)}
        for a in ADAPTERS
    ]


def adapter_for(transformer) -> ModelAdapter:
    """The adapter serving this transformer, or ValueError listing what is supported."""
    for a in ADAPTERS:
        if a.serves(transformer):
            return a
    supported = ", ".join(f"{a.name} ({', '.join(a.transformer_classes)})" for a in ADAPTERS)
    raise ValueError(
        f"sparsegen has no adapter for {type(transformer).__name__}; supported models: {supported}"
    )
