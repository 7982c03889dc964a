"""SkyReels-V2 (text-to-video, image-to-video, video-to-video; Wan-shaped).

Self-attention is ``blocks.{i}.attn1`` over video tokens; text and image conditioning
enter through ``attn2``. Diffusion forcing passes a frame-causal block mask to the
self-attention; intersecting it with a method's mask is not supported yet, so a sparse
call that receives it is refused (dense steps and layers still run).
"""

from .base import ModelAdapter, TextLayout

SKYREELS_V2 = ModelAdapter(
    name="skyreels_v2",
    transformer_classes=("SkyReelsV2Transformer3DModel",),
    pipeline_classes=("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline"),
    self_attention_pattern=r"blocks\.\d+\.attn1",
    patch_size=lambda cfg: tuple(int(p) for p in cfg.patch_size),
    text_layout=TextLayout.NONE,
)
