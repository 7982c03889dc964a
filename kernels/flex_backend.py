"""``backend="flex"``: block-sparse attention through PyTorch FlexAttention, compiled.

How it works::

    BlockSparseMask ──(once per mask and device, cached on the mask)──> FlexAttention BlockMask
                                                                        + rows that attend nothing
    q, k, v (B, S, H, D) ──transpose (views, no copy)──> (B, H, S, D)
        ──torch.compile(flex_attention, dynamic=False, fullgraph=True)──> out (B, H, Sq, D) [, lse]
        ──transpose back; rows that attend nothing: out 0, lse -inf──> out (B, Sq, H, D), lse fp32 (B, H, Sq)

What the compiled FlexAttention kernels serve (torch 2.13; ``flex_support_error`` refuses the rest)::

    device  dtypes             head dim  block sizes         LSE  backward
    CUDA    fp16, bf16, fp32   >= 16     multiples of 16     yes  yes      Triton templates
    CPU     fp16, bf16, fp32   any       any                 no   no       C++ template (needs AVX2)

(CPU head dims 1, 8, 33, 64, 72 and 256 were run against the reference; CUDA is read
from FlexAttention's lowering and heuristics, not run.)

On CPU, torch's FlexAttention is inference-only: its compiled kernel neither returns the
log-sum-exp nor has a backward, and ``flex_attention`` refuses inputs that require grad.

Compilation: one compiled callable per process, built on first use. Every new input
shape (sequence lengths, batch, heads, head dim), dtype, mask layout size, number of
token tiles, softmax scale value or grad mode compiles anew (seconds on CPU); a new mask
of the same shapes reuses the compiled kernel. ``dynamic=False`` because on CPU a recompile with automatic dynamic
shapes emits C++ that does not build (torch 2.13: "'cur_kvSplitSize8' was not declared").
Dynamo's ``torch._dynamo.config.recompile_limit`` (default 8) bounds the number of
shapes one process compiles; past it the call raises (``fullgraph=True``) with a message
saying so.

Only torch is imported here; FlexAttention is imported where it is used.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .mask import BlockSparseMask
from .quant import QuantConfig

__all__ = ["flex_block_sparse_attention", "flex_support_error"]

_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# FlexAttention's Triton kernels compute QK^T with tl.dot, which needs K >= 16.
_CUDA_MIN_HEAD_DIM = 16
# Kernel tile edges FlexAttention's Triton templates use; its default tiles (64-128 rows)
# must divide our block sizes, see _cuda_kernel_options.
_CUDA_TILE_EDGES = (64, 32, 16)


# ------------------------------------------------------------------- support checks
def _device_error(device_type: str, head_dim: int, mask: BlockSparseMask, *, needs_lse: bool,
                  needs_grad: bool) -> Optional[str]:
    """The first reason FlexAttention's compiled kernels on ``device_type`` cannot serve a call, or None."""
    version = torch.__version__
    if device_type == "cpu":
        if not _cpu_supported():
            return ("backend='flex' on CPU needs a CPU with AVX2 (and ATEN_CPU_CAPABILITY not set to 'default'): "
                    "PyTorch compiles FlexAttention for CPU only there; use backend='torch'")
        if needs_lse:
            return (f"backend='flex' cannot return the LSE on CPU: torch {version}'s FlexAttention for CPU is "
                    "inference-only (its compiled kernel returns no log-sum-exp and has no backward); "
                    "use backend='torch' for return_lse=True on CPU, or run backend='flex' on CUDA")
        if needs_grad:
            return (f"backend='flex' cannot compute gradients on CPU: torch {version}'s FlexAttention for CPU is "
                    "inference-only; call it under torch.no_grad() (or on detached inputs), use backend='torch' "
                    "to train on CPU, or run backend='flex' on CUDA")
        return None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return ("backend='flex' on CUDA needs the `triton` package (torch.compile generates FlexAttention's "
                    "CUDA kernels with Triton); pip install triton")
        if head_dim < _CUDA_MIN_HEAD_DIM:
            return (f"backend='flex' on CUDA needs head_dim >= {_CUDA_MIN_HEAD_DIM} (FlexAttention's Triton kernels); "
                    f"got head_dim={head_dim}; use backend='triton' or backend='torch'")
        qbs, kbs = mask.q_block_size, mask.kv_block_size
        if qbs % _CUDA_TILE_EDGES[-1] or kbs % _CUDA_TILE_EDGES[-1]:
            return (f"backend='flex' on CUDA needs block sizes that are multiples of {_CUDA_TILE_EDGES[-1]} "
                    f"(FlexAttention's kernel tiles must divide them); got mask.q_block_size={qbs}, "
                    f"mask.kv_block_size={kbs}; build the mask with such block sizes or use backend='triton'")
        return None
    return f"backend='flex' runs on CPU and CUDA tensors; got device {device_type!r}; use backend='torch'"


@functools.lru_cache(maxsize=None)
def _cpu_supported() -> bool:
    """Whether PyTorch compiles FlexAttention for this CPU (its own check, where it exists)."""
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except ImportError:  # the module moved: assume the documented requirement (x86 with AVX2)
        return bool(getattr(torch.cpu, "_is_avx2_supported", lambda: False)())
    return bool(check_cpu_supported())


def flex_support_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                       quant: Optional[QuantConfig], *, return_lse: bool) -> Optional[str]:
    """The first reason ``backend="flex"`` cannot serve these inputs, or None.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D); mask already checked against the shapes.
        return_lse: whether the caller asks for the log-sum-exp.
    """
    if quant is not None:
        return (f"backend='flex' does not run quantized attention (got quant={quant}); quantized attention runs on "
                "backend='triton' (CUDA) and backend='torch' (any device); for flex pass quant=None")
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return (f"backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); got torch "
                f"{torch.__version__}; upgrade torch or use backend='torch'")
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return ("backend='flex' needs torch.compile, which this Python/platform does not support "
                "(torch._dynamo.is_dynamo_supported() is False); use backend='torch'")
    if q.dtype not in _FLEX_DTYPES:
        return f"backend='flex' supports {_FLEX_DTYPES}, got {q.dtype=}"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _device_error(q.device.type, q.shape[-1], mask, needs_lse=return_lse, needs_grad=needs_grad)


# ------------------------------------------------------------------- per-mask state
@dataclass(frozen=True)
class _FlexMask:
    """What a call needs from one mask on one device, built once and cached on the mask."""

    block_mask: Any                       # torch.nn.attention.flex_attention.BlockMask
    empty_rows: Optional[torch.Tensor]    # bool (B or 1, H or 1, Sq, 1) or None: rows that attend nothing
    kernel_options: Optional[dict]        # FlexAttention kernel options (CUDA tile sizes) or None


def _empty_rows(mask: BlockSparseMask) -> Optional[torch.Tensor]:
    """bool (B or 1, H or 1, Sq, 1): query tokens that attend no key, or None if there are none.

    A row is empty when every block its query block visits is a token tile whose row is
    empty within the block's valid keys (a full block, even the ragged last one, holds at
    least one key), or when its query block visits none (possible only in a layout built
    by hand). Runs once per mask.
    """
    b, h, qb = mask.kv_num_blocks.shape
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    dev = mask.device
    k_max = mask.kv_indices.shape[-1]
    visited = torch.arange(k_max, device=dev) < mask.kv_num_blocks[..., None].long()  # (B, H, Qb, K)
    if mask.tile_ids is None:
        has_keys = visited.any(-1)[..., None].expand(b, h, qb, qbs)
    else:
        tile_ids = mask.tile_ids.long()
        full = visited & (tile_ids < 0)
        part = visited & (tile_ids >= 0)
        # A tile row attends something within the valid keys of its block: all of them,
        # except in the last key block, whose keys past kv_len do not exist.
        tail = mask.kv_len - (mask.num_kv_blocks - 1) * kbs
        row_any = mask.tiles.any(-1)                       # (T, qbs)
        row_any_tail = mask.tiles[..., :tail].any(-1)      # (T, qbs)
        ids = tile_ids[part]
        in_last = mask.kv_indices[part].long() == mask.num_kv_blocks - 1
        rows = torch.where(in_last[:, None], row_any_tail[ids], row_any[ids])  # (P, qbs)
        owner = part.nonzero()[:, :3]                                            # (P, 3): b, h, query block
        flat = (owner[:, 0] * h + owner[:, 1]) * qb + owner[:, 2]
        counts = torch.zeros(b * h * qb, qbs, dtype=torch.int32, device=dev)
        counts.index_add_(0, flat, rows.to(torch.int32))
        has_keys = full.any(-1)[..., None] | (counts.view(b, h, qb, qbs) > 0)
    empty = ~has_keys.reshape(b, h, qb * qbs)[:, :, : mask.q_len]
    return empty[..., None].contiguous() if bool(empty.any()) else None


def _cuda_kernel_options(mask: BlockSparseMask) -> Optional[dict]:
    """Tile sizes for FlexAttention's Triton kernels that divide the mask's block sizes.

    Its default tiles (e.g. 128 x 64 forward, 64 x 128 backward on H100) must divide the
    block sizes, else the call fails to compile. Masks with 128-multiple blocks (what
    ``create_block_mask`` makes) keep the tuned defaults; others get the largest tile of
    64 / 32 / 16 dividing both block sizes, forward and backward.
    """
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    if qbs % 128 == 0 and kbs % 128 == 0:
        return None
    g = math.gcd(qbs, kbs)
    t = next(e for e in _CUDA_TILE_EDGES if g % e == 0)  # flex_support_error guarantees 16 | g
    return {"fwd_BLOCK_M": t, "fwd_BLOCK_N": t,
            "bwd_BLOCK_M1": t, "bwd_BLOCK_N1": t, "bwd_BLOCK_M2": t, "bwd_BLOCK_N2": t}


def _flex_mask(mask: BlockSparseMask, device: torch.device) -> _FlexMask:
    """The mask's FlexAttention form on ``device``: converted once, cached on the mask."""
    key = ("flex", str(device))
    cache = mask._cache
    if key not in cache:
        m = mask.to(device)
        cache[key] = _FlexMask(m.to_flex_block_mask(), _empty_rows(m),
                               _cuda_kernel_options(m) if device.type == "cuda" else None)
    return cache[key]


# ------------------------------------------------------------------------ the call
@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    """``torch.compile(flex_attention)``, built once per process on first use."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block-sparse attention with compiled FlexAttention (differentiable where flex is: CUDA).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D); mask already checked against the shapes
            (``flex_support_error`` returned None for these inputs).
        scale: softmax scale.
        return_lse: compute the log-sum-exp too.
    Returns:
        out (B, Sq, H, D) in q's dtype, and lse fp32 (B, H, Sq) (natural log; -inf for rows
        that attend nothing, whose output is 0) or None.
    """
    import torch._dynamo
    from torch.nn.attention.flex_attention import AuxRequest

    fm = _flex_mask(mask, q.device)
    fn = _compiled_flex()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views: flex reads strides
    kwargs = {"block_mask": fm.block_mask, "scale": scale}
    if fm.kernel_options is not None:
        kwargs["kernel_options"] = fm.kernel_options
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    try:
        res = fn(qt, kt, vt, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        limit = torch._dynamo.config.recompile_limit
        raise RuntimeError(
            f"backend='flex' has compiled FlexAttention for {limit} input shapes in this process, dynamo's limit "
            "(torch._dynamo.config.recompile_limit); each new shape (lengths, heads, head dim, dtype, scale, mask "
            "layout size, number of token tiles) compiles anew. Raise the limit if you run more shapes on purpose, "
            "or use backend='torch'"
        ) from e
    out, lse = (res[0], res[1].lse) if return_lse else (res, None)
    # The contract of every backend: a row that attends nothing has output 0 and LSE -inf.
    # FlexAttention 2.13 already returns that (CPU kernel, unfused path, Triton template);
    # enforced here so the contract does not rest on a kernel detail.
    if fm.empty_rows is not None:
        out = out.masked_fill(fm.empty_rows, 0.0)
    out = out.transpose(1, 2)
    if lse is not None:
        lse = lse.to(torch.promote_types(lse.dtype, torch.float32))
        if fm.empty_rows is not None:
            lse = lse.masked_fill(fm.empty_rows[..., 0], float("-inf"))
    return out, lse
