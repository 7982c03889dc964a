"""sparsegen: sparse and quantized attention for diffusers pipelines, in one call."""

from .kernels import BlockSparseMask, QuantConfig, block_sparse_attention

__version__ = "0.1.0"

__all__ = ["BlockSparseMask", "QuantConfig", "block_sparse_attention", "__version__"]
