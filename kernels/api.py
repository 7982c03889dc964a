"""Public entry point of the engine: ``block_sparse_attention``, the ``Backend`` names and
one ``can_run_<backend>`` predicate per backend."""

from __future__ import annotations

import enum
import logging
from typing import Optional, Union

import torch

from ._env import triton_interpreting
from .mask import BlockSparseMask
from .quant import QuantConfig, resolve_quant

__all__ = ["block_sparse_attention", "can_run_triton", "can_run_torch", "can_run_flex", "Backend", "BACKENDS"]

logger = logging.getLogger("sparsegen.kernels")


class Backend(str, enum.Enum):
    """The backends of :func:`block_sparse_attention`. Each member equals its string
    (``Backend.TORCH == "torch"``), so either spelling is accepted wherever a backend is."""

    AUTO = "auto"            # triton on CUDA, else torch; logs why at DEBUG level
    TRITON = "triton"        # our Triton kernels (CUDA; CPU only in Triton's interpreter)
    TORCH = "torch"          # our PyTorch path (any device; the fast CPU path)
    FLEX = "flex"            # PyTorch FlexAttention, compiled (CPU: inference without LSE)
    REFERENCE = "reference"  # dense masked attention in fp64: the test oracle, small inputs

    def __str__(self) -> str:
        return self.value


# The backend names as plain strings (kept for code that imported the tuple).
BACKENDS = tuple(b.value for b in Backend)


def _resolve_backend(backend: Union[str, Backend]) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or sparsegen.kernels.Backend, got {type(backend).__name__} "
                        f"({backend!r}); use one of {BACKENDS}")
    try:
        return Backend(backend)
    except ValueError:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}") from None


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str, raise_error: bool) -> bool:
    if raise_error:
        raise ValueError(msg)
    return False


def can_run_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                   quant: Optional[QuantConfig] = None, *, raise_error: bool = False) -> bool:
    """Whether the Triton kernels can serve these inputs.

    With ``raise_error=True`` the first reason they cannot is raised as ``ValueError``.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return _fail("backend='triton' needs the `triton` package (pip install triton; Linux only)", raise_error)
    if q.device.type != "cuda" and not (q.device.type == "cpu" and triton_interpreting()):
        return _fail(
            f"backend='triton' needs CUDA tensors (got {q.device}); on CPU use backend='torch', "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (slow; for testing)",
            raise_error,
        )
    from .ops import triton_support_error

    err = triton_support_error(q, k, v, mask, quant)
    if err is not None:
        return _fail(err, raise_error)
    return True


def can_run_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                  quant: Optional[QuantConfig] = None, *, raise_error: bool = False) -> bool:
    """Whether the PyTorch path can serve these inputs (any device, float dtypes)."""
    if q.dtype not in _FLOAT_DTYPES:
        return _fail(f"backend='torch' supports {_FLOAT_DTYPES}, got {q.dtype=}", raise_error)
    return True


def can_run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                 quant: Optional[QuantConfig] = None, *, raise_error: bool = False, return_lse: bool = False) -> bool:
    """Whether compiled FlexAttention (``backend="flex"``) can serve these inputs.

    It serves CUDA (forward, LSE, backward; head_dim >= 16, block sizes multiples of 16)
    and, for inference without the LSE, x86 CPUs with AVX2; never quantized attention.
    ``return_lse`` and inputs that require grad count, since flex on CPU serves neither.
    With ``raise_error=True`` the first reason it cannot is raised as ``ValueError``.
    """
    from .flex_backend import flex_support_error

    err = flex_support_error(q, k, v, mask, quant, return_lse=return_lse)
    if err is not None:
        return _fail(err, raise_error)
    return True


def _check_inputs(q, k, v, mask) -> BlockSparseMask:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be laid out (batch, seq, heads, head_dim); got {tuple(t.shape)=}. "
                "If your tensors are (batch, heads, seq, head_dim), pass x.transpose(1, 2)."
            )
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of {_FLOAT_DTYPES}; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device=}, {k.device=}, {v.device=}")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(
            f"k and v must be (batch={b}, seq_k, heads={h}, head_dim={d}); got {tuple(k.shape)=}, {tuple(v.shape)=}"
        )
    if not isinstance(mask, BlockSparseMask):
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError:  # pragma: no cover - very old torch
            BlockMask = ()
        if isinstance(mask, BlockMask):
            mask = BlockSparseMask.from_flex_block_mask(mask)
        else:
            raise TypeError(
                f"mask must be a sparsegen BlockSparseMask or a FlexAttention BlockMask, got {type(mask).__name__}"
            )
    mask.check_compatible(b, h, sq, k.shape[1])
    return mask.to(q.device)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    quant: Union[None, str, QuantConfig] = None,
    backend: Union[str, Backend] = Backend.AUTO,
):
    """Attention that visits only the key blocks a block mask lists.

    Args:
        q: (B, Sq, H, D) queries, in the layout diffusers passes to attention.
        k, v: (B, Sk, H, D).
        mask: a :class:`BlockSparseMask` (layout (B or 1, H or 1, Qb, ...)) or a
            FlexAttention ``BlockMask`` (converted on the fly; convert once with
            ``BlockSparseMask.from_flex_block_mask`` to reuse it).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp, fp32 (B, H, Sq), natural log.
        quant: ``None``, a preset (``"int8"``, ``"int4"``, ``"int8-pv8"``, ``"int4-pv8"``)
            or a :class:`QuantConfig`. Quantized attention is inference-only.
        backend: a :class:`Backend` or its string: ``"auto"`` (Triton on CUDA, else torch;
            logs why at DEBUG level; on CPU a mask too dense or a sequence too short for
            block gathering to pay is computed by one fused dense call with the mask as
            a token bias, the same result), ``"triton"``, ``"torch"``, ``"flex"`` (compiled
            FlexAttention; on CPU inference without the LSE, see :func:`can_run_flex`) or
            ``"reference"`` (dense fp64 oracle, small inputs). An explicit backend never
            falls back: it raises if it cannot run.

    Returns:
        out (B, Sq, H, D) in q's dtype, and with ``return_lse`` the LSE.

    Raises:
        ValueError / TypeError: inconsistent shapes, dtypes or devices, a mask built for
        other lengths, an unknown backend or one that cannot run these inputs.

    Example::

        >>> mask = BlockSparseMask.from_block_matrix(torch.eye(8, dtype=torch.bool) | ..., q_len=1000, ...)
        >>> out = block_sparse_attention(q, k, v, mask)
    """
    backend = _resolve_backend(backend)
    # Only auto may pick the torch path's dense route; an explicit "torch" walks the blocks.
    torch_route = "auto" if backend == Backend.AUTO else "blocks"
    mask = _check_inputs(q, k, v, mask)
    qcfg = resolve_quant(quant)
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    if backend == Backend.AUTO:
        if can_run_triton(q, k, v, mask, qcfg) and q.device.type == "cuda":
            backend = Backend.TRITON
        else:
            # Logger calls break a torch.compile graph: say why only in eager runs.
            if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
                try:
                    can_run_triton(q, k, v, mask, qcfg, raise_error=True)
                    reason = "inputs are not on a CUDA device"
                except ValueError as e:
                    reason = str(e)
                logger.debug("block_sparse_attention: auto chose 'torch' (triton rejected: %s)", reason)
            backend = Backend.TORCH

    if backend == Backend.TRITON:
        can_run_triton(q, k, v, mask, qcfg, raise_error=True)
        from .ops import triton_block_sparse_attention

        out, lse = triton_block_sparse_attention(q, k, v, mask, scale=sm_scale, quant=qcfg)
    elif backend == Backend.TORCH:
        can_run_torch(q, k, v, mask, qcfg, raise_error=True)
        from .torch_backend import torch_block_sparse_attention

        out, lse = torch_block_sparse_attention(q, k, v, mask, scale=sm_scale, quant=qcfg, route=torch_route)
    elif backend == Backend.FLEX:
        can_run_flex(q, k, v, mask, qcfg, raise_error=True, return_lse=return_lse)
        from .flex_backend import flex_block_sparse_attention

        out, lse = flex_block_sparse_attention(q, k, v, mask, scale=sm_scale, return_lse=return_lse)
    else:
        from .reference import reference_attention

        ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
        out, lse = reference_attention(q, k, v, mask, scale=sm_scale, quant=qcfg, dtype=ref_dtype)
        out, lse = out.to(q.dtype), lse.float()
    return (out, lse) if return_lse else out
