"""Wan 2.1 (text-to-video, image-to-video, VACE) and Wan 2.2 (two transformers).

Self-attention is ``blocks.{i}.attn1`` over video tokens only; text and image
conditioning enter through ``attn2`` (cross-attention), which is left untouched. VACE's
control blocks (``vace_blocks.{i}.attn1``) attend over control tokens on the same grid.
"""

from .base import ModelAdapter, TextLayout

WAN = ModelAdapter(
    name="wan",
    transformer_classes=("WanTransformer3DModel", "WanVACETransformer3DModel"),
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline"),
    self_attention_pattern=r"(vace_)?blocks\.\d+\.attn1",
    patch_size=lambda cfg: tuple(int(p) for p in cfg.patch_size),
    text_layout=TextLayout.NONE,
    transformer_attributes=("transformer", "transformer_2"),
)
