"""Wan 2.1 (text-to-video, image-to-video, VACE), Wan 2.2 (two transformers) and Wan 2.2 Animate.

Self-attention is ``blocks.{i}.attn1`` over video tokens only; text and image
conditioning enter through ``attn2`` (cross-attention), which is left untouched. VACE's
control blocks (``vace_blocks.{i}.attn1``) attend over control tokens on the same grid.
Animate's latents carry the reference frame first (``T + 1`` latent frames); its face
adapter (``face_adapter.{i}``) is a cross-attention to motion features, left untouched.
"""

from .base import ModelAdapter, TextLayout

WAN = ModelAdapter(
    name="wan",
    transformer_classes=("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel"),
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline",
                      "WanAnimatePipeline"),
    self_attention_pattern=r"(vace_)?blocks\.\d+\.attn1",
    patch_size=lambda cfg: tuple(int(p) for p in cfg.patch_size),
    text_layout=TextLayout.NONE,
    transformer_attributes=("transformer", "transformer_2"),
)
