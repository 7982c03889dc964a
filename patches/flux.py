"""FLUX.1 (dev / schnell; text-to-image): joint attention over ``[text tokens, image tokens]``.

Dual-stream blocks (``transformer_blocks.{i}.attn``) concatenate the text before the
image inside their processor; single-stream blocks (``single_transformer_blocks.{i}.attn``)
receive the concatenation. Both reach attention through ``dispatch_attention_fn``.

The latents arrive packed (batch, tokens, channels): the token grid is read from the
image position ids (``img_ids``, rows and columns of each token), once per distinct ids
tensor (the pipeline passes the same one at every step). A grid is one frame:
(1, height / 16, width / 16) tokens for FLUX's 8x VAE and 2 x 2 packing. Inputs whose ids
are not one full row-major grid (FLUX Kontext's reference-image tokens) are refused.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, TextLayout


def _flux_grid(transformer, arguments: dict, cache: dict) -> tuple[int, int, int]:
    hs, ids = arguments.get("hidden_states"), arguments.get("img_ids")
    if hs is None or ids is None:
        raise ValueError("sparsegen: FluxTransformer2DModel.forward needs hidden_states and img_ids to read the "
                         "token grid")
    if ids.dim() == 3:
        ids = ids[0]
    key = (ids.data_ptr(), tuple(ids.shape), str(ids.device), getattr(ids, "_version", 0))
    grid = cache.get(key)
    if grid is None:
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1  # once per ids tensor
        expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if ids.shape[0] != rows * cols or not torch.equal(ids[:, 1:].cpu().long(), expected) or bool(ids[:, 0].any()):
            raise ValueError(
                f"sparsegen: the FLUX image position ids are not one row-major grid ({ids.shape[0]} tokens, "
                f"{rows} x {cols} positions); reference-image tokens (FLUX Kontext) are not supported yet"
            )
        grid = (1, rows, cols)
        cache[key] = grid
    if hs.shape[1] != grid[1] * grid[2]:
        raise ValueError(f"sparsegen: {hs.shape[1]} image tokens do not match the position ids' grid {grid}")
    return grid


FLUX = ModelAdapter(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    self_attention_pattern=r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
    patch_size=lambda cfg: (1, 1, 1),
    text_layout=TextLayout.PREFIX,
    grid_reader=_flux_grid,
)
