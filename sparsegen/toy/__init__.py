"""A small video model trained on procedural data, shipped with the project.

    >>> import sparsegen.toy as toy
    >>> pipe = toy.load_pipeline()            # a diffusers.WanPipeline, built offline
    >>> toy.generate(pipe, ["a red circle moving right over a striped background"], seed=0).shape
    (1, 17, 32, 32, 3)

Submodules: ``data`` (procedural videos with ground truth, also a training data
source), ``codec`` (lossless latent space), ``text`` (prompt encoder), ``pipeline``
(load / build / generate). The model's trainer, metrics and attention probes serve
evaluations only and live in ``evals/toylab``.
"""

import importlib

# Imported on first use, so `sparsegen.toy.data` does not pull in diffusers.
_FROM_PIPELINE = ("load_pipeline", "generate", "generate_from_first_frame", "encode_prompt", "build_pipeline", "ASSET_DIR")


def __getattr__(name):
    if name in _FROM_PIPELINE:
        return getattr(importlib.import_module("sparsegen.toy.pipeline"), name)
    raise AttributeError(f"module 'sparsegen.toy' has no attribute {name!r}")


__all__ = list(_FROM_PIPELINE)
