"""sparsegen: sparse and quantized attention for diffusers pipelines, in one call.

    >>> import sparsegen
    >>> handle = sparsegen.apply(pipe, "radial", decay_factor=0.2, dense_steps=12, dense_layers=1)
    >>> video = pipe(prompt, num_frames=81).frames[0]
    >>> handle.remove()
"""

from __future__ import annotations

import importlib

from .kernels import Backend, BlockSparseMask, QuantConfig, block_sparse_attention
from .methods import MethodConfig, SparseAttentionMethod, available_methods, config_from_dict, register_method
from .patches import supported_models
from .patching import SparseHandle, apply

__version__ = "0.1.0"

# Config classes are imported lazily from their method modules.
_LAZY = {
    "RadialConfig": "sparsegen.methods.radial",
    "GNAConfig": "sparsegen.methods.gna",
    "VMoBAConfig": "sparsegen.methods.vmoba",
    "DenseConfig": "sparsegen.methods.dense",
    "neighborhood_attention": "sparsegen.neighborhood",
    "reorder_tokens": "sparsegen.reorder",
    "PAROConfig": "sparsegen.methods.paro",
    "ParoPlan": "sparsegen.methods.paro",
    "load_plan": "sparsegen.methods.paro",
    "calibrate": "sparsegen.calibration",
    "AgentConfig": "sparsegen.methods.agent",
    "agent_attention": "sparsegen.agent",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsegen' has no attribute {name!r}")


__all__ = [
    "Backend", "BlockSparseMask", "QuantConfig", "block_sparse_attention", "apply", "SparseHandle",
    "supported_models", "MethodConfig", "SparseAttentionMethod", "available_methods", "config_from_dict",
    "register_method", *_LAZY, "__version__",
]
