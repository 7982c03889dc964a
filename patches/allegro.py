"""Allegro: video-only self-attention (``transformer_blocks.{i}.attn1``), per-frame 2 x 2
patches; its processor calls ``F.scaled_dot_product_attention`` directly."""

from .base import ModelAdapter, TextLayout

ALLEGRO = ModelAdapter(
    name="allegro",
    transformer_classes=("AllegroTransformer3DModel",),
    pipeline_classes=("AllegroPipeline",),
    self_attention_pattern=r"transformer_blocks\.\d+\.attn1",
    patch_size=lambda cfg: (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size)),
    text_layout=TextLayout.NONE,
)
