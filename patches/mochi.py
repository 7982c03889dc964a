"""Mochi 1: joint attention over ``[video tokens, valid text tokens]``.

Mochi's processor attends each sample separately over its video tokens followed by only
its valid (unpadded) text tokens, calling ``F.scaled_dot_product_attention`` directly;
each such call is served as joint attention with the text last (the text length is
what remains after the video grid).
"""

from .base import ModelAdapter, TextLayout

MOCHI = ModelAdapter(
    name="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    pipeline_classes=("MochiPipeline",),
    self_attention_pattern=r"transformer_blocks\.\d+\.attn1",
    patch_size=lambda cfg: (1, int(cfg.patch_size), int(cfg.patch_size)),
    text_layout=TextLayout.SUFFIX,
)
