"""The Triton backend's custom ops under torch.compile, fake tensors and opcheck.

``sparsegen::bsa_fwd`` / ``bsa_bwd`` / ``bsa_fwd_quant`` have fake implementations, so
``torch.compile(fullgraph=True)`` traces a model that calls
``block_sparse_attention(..., backend="triton")`` without graph breaks, one opaque node
per call. On this CPU machine the compiled graph runs the kernels in Triton's
interpreter (conftest sets TRITON_INTERPRET=1); compiled with the ``aot_eager`` backend,
which traces forward and backward through the fake implementations (AOTAutograd)
and then runs them eagerly. Shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsegen.kernels.ops  # noqa: F401  (registers the sparsegen:: ops)
from sparsegen.kernels import BlockSparseMask, QuantConfig, block_sparse_attention
from triton_cases import qkv, window_mask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mask_args(mask):
    return (mask.kv_num_blocks, mask.kv_indices, mask.tile_ids, mask.tiles)


def test_compiled_forward_fullgraph_matches_eager():
    mask = window_mask(2, 2, 97, 97, 32, 32)
    q, k, v = qkv(2, 97, 97, 2, 64, torch.float32, seed=0)
    counts = CompileCounterWithBackend("aot_eager")

    def attend(q_, k_, v_):
        out, lse = block_sparse_attention(q_, k_, v_, mask, backend="triton", return_lse=True)
        return out * 2.0, lse

    compiled = torch.compile(attend, backend=counts, fullgraph=True)
    out, lse = compiled(q, k, v)
    ref_out, ref_lse = attend(q, k, v)
    assert counts.frame_count == 1
    ops = [n.target for n in counts.graphs[0].graph.nodes if n.op == "call_function"]
    # The whole call is one graph with the custom op as an opaque node (Dynamo records the overload packet).
    assert ops.count(torch.ops.sparsegen.bsa_fwd) == 1, ops
    # Same kernels, same inputs: bit-identical.
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_compiled_training_step_matches_eager_gradients():
    """Under compile the backward derives the mask's transposed layout inside ``bsa_bwd``."""
    mask = window_mask(1, 2, 80, 80, 32, 32)
    q, k, v = qkv(1, 80, 80, 2, 64, torch.float32, seed=1)

    def loss_fn(q_, k_, v_):
        out, lse = block_sparse_attention(q_, k_, v_, mask, backend="triton", return_lse=True)
        return (out * out).sum() + lse.sum()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.isfinite(a).all(), name
        # Eager passes the transposed layout cached on the mask, compile derives it: same kernels, same numbers.
        assert torch.equal(a, b), f"{name}: compiled gradients differ by {(a - b).abs().max().item():.2e}"


def test_compiled_quantized_forward_fullgraph():
    mask = window_mask(1, 2, 97, 97, 32, 32)
    q, k, v = qkv(1, 97, 97, 2, 64, torch.float16, seed=2)

    def attend(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, mask, backend="triton", quant="int8-pv8")

    with torch.no_grad():
        out = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v)
        ref = attend(q, k, v)
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    with torch.no_grad():  # the preset really reaches the kernel: INT8 P·V differs from half P·V
        half = block_sparse_attention(q, k, v, mask, backend="triton", quant="int8")
    assert not torch.equal(out, half)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fake_implementations_give_shapes_and_dtypes(dtype):
    """The fake kernels alone (no data): shapes and dtypes for cross-attention lengths."""
    b, sq, sk, h, d = 2, 300, 170, 3, 72
    mask = window_mask(b, 1, sq, sk, 64, 32)
    transposed = mask.transposed()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = torch.empty(b, sq, h, d, dtype=dtype)
        k = torch.empty(b, sk, h, d, dtype=dtype)
        v = torch.empty(b, sk, h, d, dtype=dtype)
        args = tuple(mode.from_tensor(t) if t is not None else None for t in _mask_args(mask))
        out, lse = torch.ops.sparsegen.bsa_fwd(q, k, v, *args, *transposed, 64, 32, 0.1)
        assert (out.shape, out.dtype) == ((b, sq, h, d), dtype)
        assert (lse.shape, lse.dtype) == ((b, h, sq), torch.float32)
        dq, dk, dv = torch.ops.sparsegen.bsa_bwd(out, lse, q, k, v, out, lse, *args, None, None, None, 64, 32, 0.1)
        assert [(t.shape, t.dtype) for t in (dq, dk, dv)] == [((b, sq, h, d), dtype), ((b, sk, h, d), dtype),
                                                              ((b, sk, h, d), dtype)]
        qo, ql = torch.ops.sparsegen.bsa_fwd_quant(q, k, v, *args, 64, 32, 0.1, *_quant_fields(QuantConfig(pv="int8")))
        assert (qo.shape, qo.dtype, ql.shape, ql.dtype) == ((b, sq, h, d), dtype, (b, h, sq), torch.float32)


def _quant_fields(cfg):
    return cfg.qk.value, cfg.pv.value, cfg.q_block, cfg.k_block, cfg.smooth_k, cfg.p_scale_inv


def _opcheck_args(dtype, requires_grad):
    mask = window_mask(1, 2, 48, 40, 32, 32)
    q, k, v = qkv(1, 48, 40, 2, 64, dtype, seed=3)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return mask, q, k, v


def test_opcheck_forward_and_backward_ops():
    mask, q, k, v = _opcheck_args(torch.float32, requires_grad=True)
    fwd_args = (q, k, v, *_mask_args(mask), None, None, None, 32, 32, 0.125)
    torch.library.opcheck(torch.ops.sparsegen.bsa_fwd.default, fwd_args)
    with torch.no_grad():
        out, lse = torch.ops.sparsegen.bsa_fwd(*fwd_args)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (go, gl, q.detach(), k.detach(), v.detach(), out, lse, *_mask_args(mask), *mask.transposed(),
                32, 32, 0.125)
    torch.library.opcheck(torch.ops.sparsegen.bsa_bwd.default, bwd_args)


def test_opcheck_quantized_op():
    mask, q, k, v = _opcheck_args(torch.float16, requires_grad=False)
    args = (q, k, v, *_mask_args(mask), 32, 32, 0.125, *_quant_fields(QuantConfig(qk="int4", pv="int8")))
    torch.library.opcheck(torch.ops.sparsegen.bsa_fwd_quant.default, args)


def test_block_mask_without_tiles_compiles():
    mask = BlockSparseMask.full(q_len=70, kv_len=70, q_block_size=32, kv_block_size=32)
    q, k, v = qkv(1, 70, 70, 1, 64, torch.float32, seed=4)
    fn = torch.compile(lambda a, b, c: block_sparse_attention(a, b, c, mask, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2)).transpose(1, 2)
    # fp32 attention over 70 keys: errors of a few fp32 ulps of |out| <= max|v|.
    assert (fn(q, k, v) - ref).abs().max().item() < 50 * torch.finfo(torch.float32).eps * v.abs().max().item()
