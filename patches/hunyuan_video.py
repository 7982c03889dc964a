"""HunyuanVideo: joint attention over [video tokens, text tokens].

Both the dual-stream blocks (``transformer_blocks.{i}.attn``) and the single-stream
blocks (``single_transformer_blocks.{i}.attn``) attend over the concatenated sequence;
padded text tokens are masked through the attention mask the model builds.
"""

from .base import ModelAdapter, TextLayout

HUNYUAN_VIDEO = ModelAdapter(
    name="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    pipeline_classes=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
    self_attention_pattern=r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
    patch_size=lambda cfg: (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size)),
    text_layout=TextLayout.SUFFIX,
)
