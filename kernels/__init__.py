"""sparsegen.kernels: block-sparse (and INT8) attention for any PyTorch model.

Imports nothing from the rest of sparsegen and nothing from diffusers.

    >>> from sparsegen.kernels import BlockSparseMask, block_sparse_attention
"""

from .api import BACKENDS, Backend, block_sparse_attention, can_run_flex, can_run_torch, can_run_triton
from .mask import BlockSparseMask
from .quant import PVFormat, QKFormat, QuantConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockSparseMask",
    "PVFormat",
    "QKFormat",
    "QuantConfig",
    "block_sparse_attention",
    "can_run_flex",
    "can_run_torch",
    "can_run_triton",
]
