"""SkyReels-V2 (text-to-video, image-to-video, video-to-video, diffusion forcing; Wan-shaped).

Self-attention is ``blocks.{i}.attn1`` over video tokens; text and image conditioning
enter through ``attn2``. Diffusion forcing (``num_frame_per_block > 1``) passes a
frame-causal block mask to the self-attention (a query's frame block and earlier ones);
methods with a static mask intersect theirs with it.
"""

from .base import ModelAdapter, TextLayout

SKYREELS_V2 = ModelAdapter(
    name="skyreels_v2",
    transformer_classes=("SkyReelsV2Transformer3DModel",),
    pipeline_classes=("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
                      "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"),
    self_attention_pattern=r"blocks\.\d+\.attn1",
    patch_size=lambda cfg: tuple(int(p) for p in cfg.patch_size),
    text_layout=TextLayout.NONE,
    frame_causal=lambda cfg: int(cfg.num_frame_per_block),
)
