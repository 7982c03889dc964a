"""CogVideoX 1.0 and 1.5 (2B / 5B; text-to-video, image-to-video, video-to-video).

Joint attention over ``[text tokens, video tokens]`` in ``transformer_blocks.{i}.attn1``;
its processor calls ``F.scaled_dot_product_attention`` directly (no attention mask: the
text is padded to the model's fixed length and attended in full). Latents arrive as
(batch, frames, channels, height, width); 1.5 also patches time (``patch_size_t=2``,
frames padded to a multiple of it by the pipeline).
"""

from .base import LatentLayout, ModelAdapter, TextLayout

COGVIDEOX = ModelAdapter(
    name="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    pipeline_classes=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                      "CogVideoXFunControlPipeline"),
    self_attention_pattern=r"transformer_blocks\.\d+\.attn1",
    patch_size=lambda cfg: (int(cfg.patch_size_t or 1), int(cfg.patch_size), int(cfg.patch_size)),
    text_layout=TextLayout.PREFIX,
    latent_layout=LatentLayout.FRAMES_FIRST,
)
