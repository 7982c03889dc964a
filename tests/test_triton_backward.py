"""Triton backward kernels (dq, dk, dv, and the gradient flowing into the LSE) in the interpreter.

Each case runs ``block_sparse_attention(..., backend="triton")`` under autograd and
compares the gradients with autograd through the fp64 reference. The tolerance is
derived (CONVENTIONS §3): autograd through plain attention in the inputs' dtype
(:func:`triton_cases.eager_attention`) gives the error budget. Sequence lengths are
not block multiples, masks are per head and carry token tiles (partial blocks).
Gradients start as NaN (SPARSEGEN_POISON_OUTPUTS=1 in conftest), so an element the
kernels skip fails the finiteness check of ``assert_close_to_golden``.

bf16 cannot run in the interpreter (see tests/test_triton_attention.py); fp16 stands in.
The interpreter multiplies fp32 in fp32 (the GPU builds use TF32 operands).
"""

from __future__ import annotations

import pytest
import torch

from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.kernels.reference import reference_attention
from sparsegen.testing import assert_close_to_golden
from triton_cases import block_mask, eager_attention, mixed_mask, qkv, window_mask


def _grads(fn, q, k, v, go, gl):
    """Gradients of ``sum(out * go) + sum(lse * gl)`` w.r.t. q, k, v (a None term is left out).

    ``fn(q, k, v) -> (out, lse)``; rows with lse = -inf take no LSE gradient.
    """
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    loss = (out.double() * go).sum() if go is not None else 0.0
    if gl is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).double() * gl).sum()
    loss.backward()
    # An input the loss does not depend on (v, for an LSE-only loss) has gradient zero.
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _check_backward(q, k, v, mask, what, *, scale=None, out_grad=True, lse_grad=True):
    """Compare the Triton gradients with fp64 reference autograd; returns them (dq, dk, dv)."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = torch.Generator().manual_seed(q.shape[1])
    go = torch.randn(q.shape, generator=g, dtype=torch.float64) if out_grad else None
    gl = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g, dtype=torch.float64) if lse_grad else None

    def triton_fn(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, mask, scale=scale, backend="triton", return_lse=True)

    def reference_fn(q_, k_, v_):
        return reference_attention(q_, k_, v_, mask, scale=sm_scale)

    def eager_fn(q_, k_, v_):
        return eager_attention(q_, k_, v_, mask, sm_scale)

    got = _grads(triton_fn, q, k, v, go, gl)
    gold = _grads(reference_fn, q.double(), k.double(), v.double(), go, gl)
    budget = _grads(eager_fn, q, k, v, go, gl)
    for name, a, e, r in zip(("dq", "dk", "dv"), got, budget, gold):
        assert a.dtype == q.dtype and a.shape == r.shape, f"{what} {name}: {a.dtype} {tuple(a.shape)}"
        assert_close_to_golden(a, e, r, what=f"{what} {name}")
    return got


# b, sq, sk, h, d, q_block, kv_block, mask kind
CASES = [
    (2, 97, 97, 2, 64, 32, 32, "blocks"),
    (2, 150, 150, 2, 72, 64, 32, "tiles"),
    (1, 130, 90, 2, 128, 32, 64, "tiles"),    # cross lengths
    (1, 200, 200, 2, 96, 128, 64, "blocks"),  # a query block spans two query tiles
]


def _mask(b, sq, sk, h, qbs, kbs, kind):
    if kind == "tiles":
        return window_mask(b, h, sq, sk, qbs, kbs)
    return block_mask(b, h, sq, sk, qbs, kbs, 0.4, seed=sq + sk)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-s{c[1]}x{c[2]}-h{c[3]}-d{c[4]}-blk{c[5]}x{c[6]}-{c[7]}")
def test_backward_fp32_matches_reference_autograd(case):
    b, sq, sk, h, d, qbs, kbs, kind = case
    mask = _mask(b, sq, sk, h, qbs, kbs, kind)
    assert mask.shape[:2] == (b, h)
    q, k, v = qkv(b, sq, sk, h, d, torch.float32, seed=sq * 3 + d)
    _check_backward(q, k, v, mask, f"triton bwd {case} fp32")


def test_backward_fp16_with_tiles():
    mask = window_mask(2, 2, 97, 97, 32, 32)
    q, k, v = qkv(2, 97, 97, 2, 64, torch.float16, seed=5, head_major=True)
    _check_backward(q, k, v, mask, "triton bwd tiles fp16", scale=0.2)


def test_backward_without_lse_gradient():
    """Only ``out`` is used: the LSE's gradient is absent and the kernels skip it."""
    mask = window_mask(1, 2, 97, 97, 32, 32)
    q, k, v = qkv(1, 97, 97, 2, 64, torch.float32, seed=8)
    _check_backward(q, k, v, mask, "triton bwd no lse grad", lse_grad=False)


def test_gradient_through_lse_only():
    """A loss on the LSE alone (as when partial attentions are merged): dv is exactly zero."""
    mask = block_mask(1, 2, 97, 97, 32, 32, 0.5, seed=1)
    q, k, v = qkv(1, 97, 97, 2, 64, torch.float32, seed=2)
    dq, dk, dv = _check_backward(q, k, v, mask, "triton bwd lse only", out_grad=False)
    assert torch.equal(dv, torch.zeros_like(dv)) and dq.abs().max() > 0


def test_backward_empty_rows_get_zero_gradient():
    tok = torch.zeros(1, 2, 97, 97, dtype=torch.bool)
    tok[..., 1:, :30] = True
    tok[:, 1, 50:70, :] = False      # head 1: a run of empty query rows
    mask = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    q, k, v = qkv(1, 97, 97, 2, 64, torch.float32, seed=4)
    # The LSE of an empty row is -inf and takes no gradient; compare the out-driven gradients.
    dq, dk, dv = _check_backward(q, k, v, mask, "triton bwd empty rows", lse_grad=False)
    assert torch.all(dq[0, 0] == 0) and torch.all(dq[0, 50:70, 1] == 0)
    # Keys no query attends (columns >= 30) get exactly zero gradient.
    assert torch.all(dk[:, 30:] == 0) and torch.all(dv[:, 30:] == 0)


# b, sq, sk, h, d, q_block, kv_block, dtype: both loops of both kernels (dQ walks the forward
# lists, dK/dV the transposed ones, where a short last query block is partial too).
MIXED_CASES = [
    (1, 97, 97, 2, 64, 32, 32, torch.float16),
    (1, 200, 130, 2, 40, 64, 64, torch.float32),
    (1, 150, 150, 1, 80, 64, 64, torch.float16),
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: f"b{c[0]}-s{c[1]}x{c[2]}-h{c[3]}-d{c[4]}-blk{c[5]}x{c[6]}"
                                                          f"-{str(c[7])[6:]}")
def test_backward_full_and_partial_block_lists(case):
    b, sq, sk, h, d, qbs, kbs, dtype = case
    mask, tok = mixed_mask(b, h, sq, sk, qbs, kbs, seed=sq + d)
    for lay in (mask.kernel_layout(), mask.kernel_layout_transposed()):
        assert (lay.num_full > 0).any() and (lay.num > lay.num_full).any()
    q, k, v = qkv(b, sq, sk, h, d, dtype, seed=d)
    # Rows that attend nothing have lse = -inf and take no LSE gradient.
    dq, dk, dv = _check_backward(q, k, v, mask, f"triton bwd mixed {case}", lse_grad=False)
    empty = ~tok.any(-1)  # (b, h, sq)
    assert torch.all(dq.transpose(1, 2)[empty] == 0)
