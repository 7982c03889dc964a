"""The Triton backend as PyTorch operators: custom ops, fake kernels and autograd.

Three ``torch.library`` custom ops wrap the launchers of :mod:`.triton_attention`:

* ``sparsegen::bsa_fwd(q, k, v, <layout>) -> (out, lse)``, differentiable (its
  backward calls ``sparsegen::bsa_bwd``, which also takes the gradient of ``lse``);
* ``sparsegen::bsa_bwd(...) -> (dq, dk, dv)``;
* ``sparsegen::bsa_fwd_quant(q, k, v, <layout>, <QuantConfig fields>) -> (out, lse)``,
  INT8 inference (quantizes with :func:`.quant.quantize_qk` / :func:`.quant.quantize_v`).
  The config enters as its fields (strings, ints, a bool): Dynamo traces attribute
  reads of the frozen config, but not ``json.dumps``.

Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a
model calling ``block_sparse_attention(..., backend="triton")`` as one opaque node per
call. A mask enters an op as its tensors (``kv_num_blocks``, ``kv_indices``, optional
``tile_ids`` / ``tiles``) plus its block sizes; the lengths come from q and k.

The kernels walk a :class:`~.mask.KernelLayout`: the mask's lists with full blocks
first and partial blocks after. Eager callers pass the one cached on the mask
(``BlockSparseMask.kernel_layout``, derived once per mask on its device, no host
synchronisation) by giving ``kv_num_full``: the index and tile-id arguments are then
that layout's. Without it (``torch.compile`` traces, direct op calls) the ops derive it
per call, on the device.

The backward also needs the mask's transposed layout (query blocks per key block).
Eager callers pass the one cached on the mask (``BlockSparseMask.kernel_layout_transposed``,
with ``q_num_full``); under ``torch.compile`` it is derived inside the backward op,
because deriving it has a data-dependent size.

The kernels fold the softmax scale into the exponent's fused multiply-add, which needs
``scale >= 0``; for a negative scale the ops flip the sign of K (and of its gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._env import new_empty, triton_interpreting
from .mask import BlockSparseMask, KernelLayout, kernel_layout_from_lists
from .quant import PVFormat, QuantConfig, quantize_qk, quantize_v
from . import tuning

__all__ = ["triton_block_sparse_attention", "triton_support_error"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA limit on gridDim.y, which holds batch * heads


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _short_block(length: int, block: int) -> Optional[int]:
    return length // block if length % block else None


def _forward_layout(kv_num_blocks, kv_indices, tile_ids, tiles, kv_num_full, kv_len, kv_block_size) -> KernelLayout:
    """The forward :class:`KernelLayout`: as given (``kv_num_full`` set), else derived from the mask's lists."""
    if kv_num_full is not None:
        return KernelLayout(kv_num_blocks, kv_num_full, kv_indices, tile_ids, tiles)
    return kernel_layout_from_lists(kv_num_blocks, kv_indices, tile_ids, tiles,
                                    short_block=_short_block(kv_len, kv_block_size))


def _transposed_layout(q_num_blocks, q_indices, q_tile_ids, q_num_full, fwd: KernelLayout,
                       q_len, kv_len, q_block_size, kv_block_size) -> KernelLayout:
    """The transposed :class:`KernelLayout`: as given, derived from given transposed lists, or from the forward one."""
    if q_num_blocks is not None and q_indices is not None:
        if q_num_full is not None:
            return KernelLayout(q_num_blocks, q_num_full, q_indices, q_tile_ids, fwd.tiles)
        return kernel_layout_from_lists(q_num_blocks, q_indices, q_tile_ids, fwd.tiles,
                                        short_block=_short_block(q_len, q_block_size))
    tiles = None if fwd.tiles is None else fwd.tiles.view(torch.bool)
    mask = BlockSparseMask(fwd.num, fwd.indices, q_len, kv_len, q_block_size, kv_block_size,
                           None if tiles is None else fwd.tile_ids, tiles)
    return mask.kernel_layout_transposed()


def _nonnegative_scale(k: Tensor, scale: float) -> tuple[Tensor, float]:
    """(k, scale) with scale >= 0: softmax(scale * q k^T) = softmax((-scale) * q (-k)^T)."""
    return (k, scale) if scale >= 0 else (-k, -scale)


# ------------------------------------------------------------------------ forward op


@torch.library.custom_op("sparsegen::bsa_fwd", mutates_args=(), device_types=None)
def bsa_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, tile_ids: Optional[Tensor], tiles: Optional[Tensor],
    q_num_blocks: Optional[Tensor], q_indices: Optional[Tensor], q_tile_ids: Optional[Tensor],
    q_block_size: int, kv_block_size: int, scale: float,
    kv_num_full: Optional[Tensor] = None, q_num_full: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention forward.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); layout tensors as in ``BlockSparseMask``, or,
    with ``kv_num_full`` (int32 (B, H, Qb)), a :class:`KernelLayout`'s (module doc);
    ``q_num_blocks`` / ``q_indices`` / ``q_tile_ids`` (/ ``q_num_full``): the transposed
    layout, read only by the backward (None: derived there). Returns out (B, Sq, H, D)
    in q's dtype and lse fp32 (B, H, Sq), natural log.
    """
    from .triton_attention import launch_forward

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    b, sq, h, d = q.shape
    layout = _forward_layout(kv_num_blocks, kv_indices, tile_ids, tiles, kv_num_full, k.shape[1], kv_block_size)
    k, scale = _nonnegative_scale(k, scale)
    out = new_empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = new_empty((b, h, sq), dtype=torch.float32, device=q.device)
    launch_forward(q, k, v, layout, q_block_size, kv_block_size, scale, out, lse)
    return out, lse


@bsa_fwd.register_fake
def _bsa_fwd_fake(q, k, v, kv_num_blocks, kv_indices, tile_ids, tiles, q_num_blocks, q_indices, q_tile_ids,
                  q_block_size, kv_block_size, scale, kv_num_full=None, q_num_full=None):
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


# ------------------------------------------------------------------------ backward op


@torch.library.custom_op("sparsegen::bsa_bwd", mutates_args=(), device_types=None)
def bsa_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, tile_ids: Optional[Tensor], tiles: Optional[Tensor],
    q_num_blocks: Optional[Tensor], q_indices: Optional[Tensor], q_tile_ids: Optional[Tensor],
    q_block_size: int, kv_block_size: int, scale: float,
    kv_num_full: Optional[Tensor] = None, q_num_full: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`bsa_fwd`: dq (B, Sq, H, D), dk, dv (B, Sk, H, D) in the input dtype.

    grad_out: (B, Sq, H, D); grad_lse: fp32 (B, H, Sq) or None (no gradient through lse);
    layout arguments as in :func:`bsa_fwd`.
    """
    from .triton_attention import launch_backward

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, grad_out = _last_dim_contiguous(out), _last_dim_contiguous(grad_out)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    layout = _forward_layout(kv_num_blocks, kv_indices, tile_ids, tiles, kv_num_full, sk, kv_block_size)
    layout_t = _transposed_layout(q_num_blocks, q_indices, q_tile_ids, q_num_full, layout,
                                  sq, sk, q_block_size, kv_block_size)
    flip = scale < 0
    k, scale = _nonnegative_scale(k, scale)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    lse = lse.contiguous()
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    dq = new_empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    dk = new_empty((b, sk, h, d), dtype=k.dtype, device=q.device)
    dv = new_empty((b, sk, h, d), dtype=v.dtype, device=q.device)
    launch_backward(grad_out, grad_lse, q, k, v, out, lse, layout, layout_t,
                    q_block_size, kv_block_size, scale, delta, dq, dk, dv)
    if flip:
        dk.neg_()
    return dq, dk, dv


@bsa_bwd.register_fake
def _bsa_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks, kv_indices, tile_ids, tiles,
                  q_num_blocks, q_indices, q_tile_ids, q_block_size, kv_block_size, scale,
                  kv_num_full=None, q_num_full=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, kv_num_blocks, kv_indices, tile_ids, tiles, q_num_blocks, q_indices, q_tile_ids,
     q_block_size, kv_block_size, scale, *num_full) = inputs
    kv_num_full, q_num_full = (list(num_full) + [None, None])[:2]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, tile_ids, tiles,
                          q_num_blocks, q_indices, q_tile_ids, kv_num_full, q_num_full)
    ctx.block_sizes = (q_block_size, kv_block_size)
    ctx.scale = scale


def _fwd_backward(ctx, grad_out, grad_lse):
    (q, k, v, out, lse, kv_num_blocks, kv_indices, tile_ids, tiles, q_num_blocks, q_indices, q_tile_ids,
     kv_num_full, q_num_full) = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.sparsegen.bsa_bwd(
        grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks, kv_indices, tile_ids, tiles,
        q_num_blocks, q_indices, q_tile_ids, ctx.block_sizes[0], ctx.block_sizes[1], ctx.scale,
        kv_num_full, q_num_full)
    return (dq, dk, dv) + (None,) * 12


bsa_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------ INT8 forward op


@torch.library.custom_op("sparsegen::bsa_fwd_quant", mutates_args=(), device_types=None)
def bsa_fwd_quant(
    q: Tensor, k: Tensor, v: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, tile_ids: Optional[Tensor], tiles: Optional[Tensor],
    q_block_size: int, kv_block_size: int, scale: float,
    qk_format: str, pv_format: str, quant_q_block: int, quant_k_block: int, smooth_k: bool, p_scale_inv: int,
    kv_num_full: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Quantized block-sparse attention forward (inference only).

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); the six arguments after the scale are the
    fields of a :class:`QuantConfig` (``qk``, ``pv``, ``q_block``, ``k_block``,
    ``smooth_k``, ``p_scale_inv``); ``kv_num_full`` as in :func:`bsa_fwd`. Returns out
    (B, Sq, H, D) in q's dtype and lse fp32 (B, H, Sq).
    """
    from .triton_attention import launch_forward_quant

    cfg = QuantConfig(qk=qk_format, pv=pv_format, q_block=quant_q_block, k_block=quant_k_block,
                      smooth_k=smooth_k, p_scale_inv=p_scale_inv)
    b, sq, h, d = q.shape
    qz = quantize_qk(q, k, cfg, scale)
    if cfg.pv == PVFormat.INT8:
        v_op, v_scale = quantize_v(v)
    else:
        v_op, v_scale = _last_dim_contiguous(v), None
    out = new_empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = new_empty((b, h, sq), dtype=torch.float32, device=q.device)
    layout = _forward_layout(kv_num_blocks, kv_indices, tile_ids, tiles, kv_num_full, k.shape[1], kv_block_size)
    launch_forward_quant(qz.q_int, qz.q_scale, qz.k_int, qz.k_scale, v_op, v_scale, layout,
                         q_block_size, kv_block_size, cfg.q_block, cfg.k_block, cfg.p_scale_inv, out, lse)
    return out, lse


@bsa_fwd_quant.register_fake
def _bsa_fwd_quant_fake(q, k, v, kv_num_blocks, kv_indices, tile_ids, tiles, q_block_size, kv_block_size,
                        scale, qk_format, pv_format, quant_q_block, quant_k_block, smooth_k, p_scale_inv,
                        kv_num_full=None):
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


# ------------------------------------------------------------------------ public functions



def triton_support_error(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask,
                         quant: Optional[QuantConfig]) -> Optional[str]:
    """Why the Triton kernels cannot serve these inputs, with how to fix it; None if they can.

    Reads only shapes, dtypes, devices and flags (no tensor data), so it is safe to
    call while ``torch.compile`` traces.
    """
    if q.dtype not in _TRITON_DTYPES:
        return f"backend='triton' supports {_TRITON_DTYPES}, got {q.dtype=}; cast the inputs or use backend='torch'"
    bf16_dot = quant is None or quant.pv != PVFormat.INT8  # INT8 P·V multiplies only integers
    if q.dtype == torch.bfloat16 and bf16_dot and q.device.type == "cpu" and triton_interpreting():
        return ("bf16 inputs cannot run in Triton's interpreter (TRITON_INTERPRET=1): its tl.dot returns garbage "
                "for bf16 operands (triton 3.x); run on a CUDA device, or use float16 / float32 (or a quant "
                "preset with INT8 P·V, which has no bf16 product) to test the kernels in the interpreter")
    d = q.shape[-1]
    if not (tuning.MIN_HEAD_DIM <= d <= tuning.MAX_HEAD_DIM):
        return (f"backend='triton' supports head_dim in [{tuning.MIN_HEAD_DIM}, {tuning.MAX_HEAD_DIM}] "
                f"(tuned and compile-checked: {tuning.SHIPPED_HEAD_DIMS}); got {q.shape[-1]=}. "
                "Use backend='torch' for this head dim")
    if q.shape[0] * q.shape[2] > _MAX_GRID_Y:
        return (f"backend='triton' launches one program row per (batch, head): batch * heads = "
                f"{q.shape[0] * q.shape[2]} exceeds {_MAX_GRID_Y}; split the batch into smaller calls")
    if quant is not None and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ("quantized attention is inference-only: run it under torch.no_grad() (or detach q, k, v), "
                "or use quant=None to train")
    if mask.device != q.device:
        return f"the mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)"
    return None


def triton_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, *, scale: float, quant: Optional[QuantConfig],
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention with the Triton kernels (through the ``sparsegen::`` custom ops).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, H, D) (checked by the caller against ``mask``).
        mask: its batch/head dims may be 1 (broadcast); tiles mark partial blocks.
        scale: softmax scale.
        quant: None (differentiable) or a :class:`QuantConfig` (inference only).

    Returns:
        out (B, Sq, H, D) in q's dtype; lse fp32 (B, H, Sq), natural log (-inf for rows
        that attend nothing, whose output is 0).

    Precision: products run on the tensor cores; fp32 inputs use TF32 operands with
    fp32 accumulation (relative error ~1e-3, as torch with ``allow_tf32``); the
    softmax statistics and accumulators are fp32 for every dtype.
    """
    compiling = torch.compiler.is_compiling()
    # Cached on the mask, derived once on its device; under torch.compile derived in the graph.
    lay = mask.kernel_layout(cache=not compiling)
    lists = (lay.num, lay.indices, lay.tile_ids, lay.tiles)
    if quant is not None:
        return torch.ops.sparsegen.bsa_fwd_quant(
            q, k, v, *lists, mask.q_block_size, mask.kv_block_size, float(scale),
            quant.qk.value, quant.pv.value, quant.q_block, quant.k_block, quant.smooth_k, quant.p_scale_inv,
            lay.num_full)
    transposed = (None, None, None, None)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and not compiling:
        lt = mask.kernel_layout_transposed()  # cached on the mask
        transposed = (lt.num, lt.indices, lt.tile_ids, lt.num_full)
    return torch.ops.sparsegen.bsa_fwd(
        q, k, v, *lists, *transposed[:3], mask.q_block_size, mask.kv_block_size, float(scale),
        lay.num_full, transposed[3])
