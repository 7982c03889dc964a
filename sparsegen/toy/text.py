"""A tiny prompt encoder for the toy grammar, trained jointly with the video model.

It replaces Wan's UMT5 text encoder: words of the toy vocabulary get learned
embeddings plus learned position embeddings, go through one small transformer
encoder layer, and come out as ``prompt_embeds`` of shape (B, MAX_PROMPT_TOKENS,
text_dim). As with Wan's encoder, positions after the end-of-prompt token are zero,
and the empty prompt (the unconditional input of classifier-free guidance) is just
the end token.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import BACKGROUNDS, COLOURS, COUNT_WORDS, DIRECTIONS, SHAPES

PAD, END = "<pad>", "<end>"
# Every word the grammar can produce (see sparsegen.toy.data), in a fixed order:
# token ids are indices into this tuple, so it must never be reordered.
VOCABULARY: tuple[str, ...] = (
    PAD, END, ",",
    *COUNT_WORDS.values(),
    *COLOURS,
    *SHAPES, *(s + "s" for s in SHAPES),
    "moving", *DIRECTIONS,
    "over", *BACKGROUNDS, "background",
    "camera", "panning",
)
MAX_PROMPT_TOKENS = 16  # the longest grammatical prompt is 13 words + the end token


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Prompts -> token ids (B, MAX_PROMPT_TOKENS), end token appended, padded with PAD.

    Words are lower-cased; commas are separate tokens.

    Raises:
        TypeError: if ``prompts`` is not a list of str.
        ValueError: if a word is not in VOCABULARY or a prompt is too long.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}: {prompts!r:.80}")
    index = {w: i for i, w in enumerate(VOCABULARY)}
    ids = torch.full((len(prompts), MAX_PROMPT_TOKENS), index[PAD], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().replace(",", " , ").split()
        unknown = [w for w in words if w not in index or w in (PAD, END)]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r} has words outside the toy model's vocabulary: {unknown}. "
                f"Use the grammar of sparsegen.toy.data, e.g. 'a red circle moving right over a striped background'."
            )
        if len(words) + 1 > MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_PROMPT_TOKENS - 1} fit")
        ids[row, : len(words)] = torch.tensor([index[w] for w in words], dtype=torch.long)
        ids[row, len(words)] = index[END]
    return ids


class ToyPromptEncoder(ModelMixin, ConfigMixin):
    """Word + position embeddings and one transformer encoder layer.

    Args:
        text_dim: width of the output embeddings (the transformer's ``text_dim``).
        num_heads: heads of the encoder layer.
        vocab_size, max_tokens: must match VOCABULARY and MAX_PROMPT_TOKENS.
    """

    @register_to_config
    def __init__(self, text_dim: int = 64, num_heads: int = 2, vocab_size: int = len(VOCABULARY), max_tokens: int = MAX_PROMPT_TOKENS):
        super().__init__()
        if vocab_size != len(VOCABULARY) or max_tokens != MAX_PROMPT_TOKENS:
            raise ValueError(
                f"{vocab_size=} and {max_tokens=} must match this version's vocabulary "
                f"({len(VOCABULARY)} words, {MAX_PROMPT_TOKENS} tokens)"
            )
        self.word = nn.Embedding(vocab_size, text_dim)
        self.position = nn.Parameter(torch.randn(max_tokens, text_dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(
            text_dim, num_heads, dim_feedforward=2 * text_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids (B, L) -> embeddings (B, L, text_dim), zero after the end token."""
        valid = token_ids != 0  # PAD is id 0
        # include the end token itself; everything after it is padding
        x = self.word(token_ids) + self.position[: token_ids.shape[1]]
        x = self.layer(x, src_key_padding_mask=~valid)
        x = self.norm(x)
        return x * valid.unsqueeze(-1).to(x.dtype)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> prompt_embeds (B, MAX_PROMPT_TOKENS, text_dim)."""
        ids = tokenize(prompts).to(self.word.weight.device)
        return self(ids)
