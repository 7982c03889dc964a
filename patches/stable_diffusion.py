"""Stable Diffusion 1.x / 2.x and SDXL (``UNet2DConditionModel``): image self-attention.

The patched layers are the self-attention (``attn1``) of every transformer block of the
UNet's down, mid and up blocks; cross-attention (``attn2``) is untouched. Their
processor (``AttnProcessor2_0``) calls ``F.scaled_dot_product_attention`` directly.
Each resolution level has its own token grid: the latent (height, width) divided by the
level's downsampling factor (rounded up). SD 1.5's levels with attention are 1, 2, 4 and
8 (mid block); SDXL's first level has no attention, so its levels are 2 and 4.
"""

from __future__ import annotations

from .base import LatentLayout, ModelAdapter, TextLayout


def _unet_levels(unet) -> list[int]:
    """Downsampling factors of the levels whose blocks hold attention."""
    factors = set()
    n = len(unet.down_blocks)
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None):
            factors.add(2 ** i)
    if getattr(unet.mid_block, "attentions", None):
        factors.add(2 ** (n - 1))
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None):
            factors.add(2 ** (len(unet.up_blocks) - 1 - i))
    return sorted(factors)


STABLE_DIFFUSION = ModelAdapter(
    name="stable_diffusion",
    transformer_classes=("UNet2DConditionModel",),
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                      "StableDiffusionXLImg2ImgPipeline"),
    self_attention_pattern=r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn1"
                           r"|mid_block\.attentions\.\d+\.transformer_blocks\.\d+\.attn1",
    patch_size=lambda cfg: (1, 1, 1),
    text_layout=TextLayout.NONE,
    transformer_attributes=("unet",),
    hidden_states_arg="sample",
    latent_layout=LatentLayout.IMAGE,
    levels=_unet_levels,
)
