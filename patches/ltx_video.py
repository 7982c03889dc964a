"""LTX-Video 0.9.x (text-to-video, image-to-video, conditioning): video-only self-attention.

``transformer_blocks.{i}.attn1`` attends over the video tokens (text enters through
``attn2``). The latents arrive packed (batch, tokens, channels) after the 32x spatial /
8x temporal VAE; the transformer's forward receives the latent grid as ``num_frames``,
``height`` and ``width`` (patch 1 x 1 x 1 in the released models), read here without
touching device values.
"""

from __future__ import annotations

from .base import ModelAdapter, TextLayout


def _ltx_grid(transformer, arguments: dict, cache: dict) -> tuple[int, int, int]:
    hs = arguments.get("hidden_states")
    f, h, w = (arguments.get(n) for n in ("num_frames", "height", "width"))
    if hs is None or None in (f, h, w):
        raise ValueError("sparsegen: LTXVideoTransformer3DModel.forward needs hidden_states and the latent grid "
                         "(num_frames, height, width) to read the token grid; calls with video_coords only are not "
                         "supported")
    cfg = transformer.config
    grid = (int(f) // int(cfg.patch_size_t), int(h) // int(cfg.patch_size), int(w) // int(cfg.patch_size))
    if hs.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"sparsegen: {hs.shape[1]} LTX tokens do not match the grid {grid} its forward was given")
    return grid


LTX_VIDEO = ModelAdapter(
    name="ltx_video",
    transformer_classes=("LTXVideoTransformer3DModel",),
    pipeline_classes=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    self_attention_pattern=r"transformer_blocks\.\d+\.attn1",
    patch_size=lambda cfg: (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size)),
    text_layout=TextLayout.NONE,
    grid_reader=_ltx_grid,
)
