"""backend="flex": compiled FlexAttention against the fp64 reference, refusals, the Backend enum.

Compiling FlexAttention on CPU takes seconds per distinct shape, so the compiled cases
are few (four shapes x dtypes); everything else runs on cases that need no compile.

torch's FlexAttention for CPU is inference-only (its compiled kernel returns no LSE and
has no backward). The LSE and gradient tests therefore run our flex backend on flex's
own unfused implementation (``flex_attention`` not compiled, which computes the LSE and,
once its CPU guard is lifted, gradients): what they check is ours — mask conversion,
layout, scale, natural-log LSE, rows that attend nothing, autograd through the wrapper —
the code that runs around the compiled kernels on CUDA.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from sparsegen.kernels import (BACKENDS, Backend, BlockSparseMask, block_sparse_attention, can_run_flex,
                               can_run_torch)
from sparsegen.kernels import flex_backend
from sparsegen.kernels.reference import reference_attention
from sparsegen.testing import FP32_GRADIENT_FACTOR, assert_close_to_golden
from triton_cases import block_mask, eager_attention, qkv, window_mask


def _tiles_with_empty_rows(sq, sk, qbs, kbs, seed, heads=1):
    """Random token mask (batch 1, ``heads``) with partial tiles; queries 0 and ``sq // 2`` attend nothing."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.rand(1, heads, sq, sk, generator=g) < 0.3
    tok[..., :, 0] = True
    tok[..., 0, :] = False
    tok[..., sq // 2, :] = False
    return BlockSparseMask.from_dense(tok, q_block_size=qbs, kv_block_size=kbs)


def _mirrored(mask):
    """The same layout with every token tile mirrored left-right (same shapes, other tokens)."""
    return BlockSparseMask(mask.kv_num_blocks, mask.kv_indices, mask.q_len, mask.kv_len, mask.q_block_size,
                           mask.kv_block_size, mask.tile_ids, mask.tiles.flip(-1).contiguous())


def _check(out, q, k, v, mask, scale, what):
    gold, _ = reference_attention(q, k, v, mask, scale=scale)
    eager, _ = eager_attention(q, k, v, mask, scale)
    assert_close_to_golden(out, eager, gold, what=what)


# ------------------------------------------------------------------ compiled (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_broadcast_tiles_empty_rows_batch2(dtype):
    """97 tokens (ragged last block), batch 2, a (1, 1) mask broadcast over batch and heads,
    token tiles, two queries that attend nothing."""
    q, k, v = qkv(2, 97, 97, 2, 64, dtype, seed=1)
    mask = _tiles_with_empty_rows(97, 97, 32, 32, seed=2)
    out = block_sparse_attention(q, k, v, mask, backend="flex")
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, 48] == 0), "rows that attend nothing must be 0"
    _check(out, q, k, v, mask, 64 ** -0.5, f"flex b2 s97 d64 broadcast tiles {dtype}")


def test_compiled_ragged_q_ne_kv_odd_head_dim_scale():
    """1000 queries x 777 keys (both ragged), head dim 72, blocks (64, 128), per-head
    banded token tiles, a non-default scale."""
    q, k, v = qkv(1, 1000, 777, 2, 72, torch.float32, seed=3)
    mask = window_mask(1, 2, 1000, 777, 64, 128)
    assert mask.has_tiles and mask.shape[1] == 2
    out = block_sparse_attention(q, k, v, mask, scale=0.2, backend=Backend.FLEX)
    _check(out, q, k, v, mask, 0.2, "flex s1000x777 d72 per-head window, scale 0.2")


def test_compiled_new_mask_of_same_shapes_reuses_the_kernel():
    """Another mask with the same shapes (here: the same tiles mirrored) runs without a
    recompile and gives its own attention; the conversion happens once per mask."""
    q, k, v = qkv(2, 97, 97, 2, 64, torch.float32, seed=4)
    first = _tiles_with_empty_rows(97, 97, 32, 32, seed=2)
    block_sparse_attention(q, k, v, first, backend="flex")  # compiled here or by an earlier test
    second = _mirrored(first)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    out = block_sparse_attention(q, k, v, second, backend="flex")
    out_again = block_sparse_attention(q, k, v, second, backend="flex")
    assert counters["stats"]["unique_graphs"] == graphs, "a mask of the same shapes recompiled"
    assert torch.equal(out, out_again)
    assert sum(1 for key in second._cache if key[0] == "flex") == 1
    _check(out, q, k, v, second, 64 ** -0.5, "flex second mask (mirrored tiles)")


def test_recompile_limit_is_reported_with_the_fix():
    """Past dynamo's recompile limit the call fails (fullgraph) with a message saying what to do.

    With the limit at 1 and a shape already compiled, a new dtype is refused before compiling."""
    import torch._dynamo

    q, k, v = qkv(2, 97, 97, 2, 64, torch.float32, seed=4)
    mask = _tiles_with_empty_rows(97, 97, 32, 32, seed=2)
    block_sparse_attention(q, k, v, mask, backend="flex")  # compiled here or by an earlier test
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(RuntimeError, match=r"dynamo's limit \(torch._dynamo.config.recompile_limit\).*"
                                               r"Raise the limit"):
            block_sparse_attention(q.half(), k.half(), v.half(), mask, backend="flex")


def test_compiled_pure_block_mask_per_head():
    """1024 tokens, blocks 128, per-head random block layout, no tiles: flex runs without a mask_mod."""
    q, k, v = qkv(1, 1024, 1024, 2, 64, torch.float32, seed=5)
    mask = block_mask(1, 2, 1024, 1024, 128, 128, 0.3, seed=6)
    assert not mask.has_tiles
    assert flex_backend._flex_mask(mask, q.device).block_mask.mask_mod.__name__ == "noop_mask"
    out = block_sparse_attention(q, k, v, mask, backend="flex")
    _check(out, q, k, v, mask, 64 ** -0.5, "flex s1024 d64 per-head blocks")


def test_empty_rows_map_matches_the_token_mask():
    """The once-per-mask map of rows that attend nothing, against the dense token mask,
    including tile bits past kv_len in the ragged last key block (which attend nothing)."""
    tok = torch.zeros(1, 1, 64, 97, dtype=torch.bool)
    tok[..., :, 0] = True
    tok[..., 5, :] = False
    tok[..., 5, 96] = True  # query 5 sees only the last key; mirrored, its bit lands past kv_len
    last_key_only = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    masks = [last_key_only, _mirrored(last_key_only)]
    for heads, sk, kbs in ((1, 97, 32), (2, 70, 16)):
        mask = _tiles_with_empty_rows(97, sk, 32, kbs, seed=8, heads=heads)
        masks += [mask, _mirrored(mask)]
    for i, m in enumerate(masks):
        expected = ~m.to_dense().any(-1)
        got = flex_backend._empty_rows(m)
        if not expected.any():
            assert got is None, i
        else:
            assert got is not None and torch.equal(got[..., 0], expected), i
    assert flex_backend._empty_rows(masks[1])[0, 0, 5, 0], "query 5 of the mirrored mask attends nothing"
    assert flex_backend._empty_rows(block_mask(2, 2, 97, 70, 32, 16, 0.4, seed=3)) is None


# ------------------------------------------------- LSE and gradients (unfused flex)
@pytest.fixture
def unfused_flex(monkeypatch):
    """Run the flex backend on flex's unfused implementation; lift its CPU backward guard."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(flex_backend, "_compiled_flex", lambda: fa.flex_attention)
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _lse_case(dtype=torch.float32):
    """Batch 2, 97 queries x 70 keys (ragged), blocks (32, 16), per-head tiles, empty rows."""
    q, k, v = qkv(2, 97, 70, 2, 16, dtype, seed=7)
    return q, k, v, _tiles_with_empty_rows(97, 70, 32, 16, seed=8, heads=2)


def test_lse_natural_log_and_empty_rows(unfused_flex):
    q, k, v, mask = _lse_case()
    out, lse = flex_backend.flex_block_sparse_attention(q, k, v, mask, scale=0.3, return_lse=True)
    assert lse.shape == (2, 2, 97) and lse.dtype == torch.float32
    gold, gold_lse = reference_attention(q, k, v, mask, scale=0.3)
    eager, eager_lse = eager_attention(q, k, v, mask, 0.3)
    assert torch.isneginf(gold_lse).any(), "the case must contain rows that attend nothing"
    assert_close_to_golden(out, eager, gold, what="unfused flex out")
    assert_close_to_golden(lse, eager_lse, gold_lse, what="unfused flex lse")  # -inf exactly where gold's


def test_gradients_of_out_and_lse_match_reference(unfused_flex):
    q, k, v, mask = _lse_case()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flex_backend.flex_block_sparse_attention(*leaves, mask, scale=0.25, return_lse=True)
    g = torch.Generator().manual_seed(9)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    finite = torch.isfinite(lse.detach())
    # Rows that attend nothing have LSE -inf and no gradient; keep the loss finite.
    (out * go).sum().add(torch.where(finite, lse * gl, torch.zeros_like(lse)).sum()).backward()

    def reference_grads(dtype):
        ref = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        ro, rl = reference_attention(*ref, mask, scale=0.25, dtype=dtype)
        loss = (ro * go.to(dtype)).sum() + torch.where(finite, rl * gl.to(dtype), torch.zeros_like(rl)).sum()
        loss.backward()
        return [t.grad for t in ref]

    golden, eager = reference_grads(torch.float64), reference_grads(torch.float32)
    for name, a, e, gold in zip(("dq", "dk", "dv"), (t.grad for t in leaves), eager, golden):
        assert_close_to_golden(a, e, gold, factor=FP32_GRADIENT_FACTOR, what=f"unfused flex {name}")


def test_conversion_happens_once_per_mask(unfused_flex, monkeypatch):
    q, k, v, mask = _lse_case()
    calls = []
    original = BlockSparseMask.to_flex_block_mask

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(BlockSparseMask, "to_flex_block_mask", counting)
    for _ in range(3):
        flex_backend.flex_block_sparse_attention(q, k, v, mask, scale=0.25, return_lse=False)
    assert len(calls) == 1


# ----------------------------------------------------------------------- refusals
def test_refusals_say_which_backend_serves_it():
    q, k, v = qkv(1, 64, 64, 2, 16, torch.float32, seed=0)
    mask = block_mask(1, 1, 64, 64, 32, 32, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"backend='flex' does not run quantized attention .*"
                                         r"backend='triton' \(CUDA\) and backend='torch'"):
        block_sparse_attention(q, k, v, mask, backend="flex", quant="int8")
    with pytest.raises(ValueError, match=r"backend='flex' cannot return the LSE on CPU.*"
                                         r"use backend='torch' for return_lse=True"):
        block_sparse_attention(q, k, v, mask, backend="flex", return_lse=True)
    with pytest.raises(ValueError, match=r"backend='flex' cannot compute gradients on CPU.*torch.no_grad\(\)"):
        block_sparse_attention(q.clone().requires_grad_(), k, v, mask, backend="flex")
    qm, km, vm = (t.to("meta") for t in (q, k, v))
    assert not can_run_flex(qm, km, vm, mask)
    with pytest.raises(ValueError, match=r"runs on CPU and CUDA tensors; got device 'meta'"):
        can_run_flex(qm, km, vm, mask, raise_error=True)
    # The quiet form answers without raising; the same inputs pass once nothing is refused.
    assert not can_run_flex(q, k, v, mask, return_lse=True)
    assert can_run_flex(q, k, v, mask) and can_run_flex(q.clone().requires_grad_(), k, v, mask) is False


def test_cuda_rules_head_dim_and_block_sizes():
    """FlexAttention's Triton kernels need head_dim >= 16 and 16-multiple blocks (checked without a GPU)."""
    pytest.importorskip("triton")
    ok = block_mask(1, 1, 128, 128, 64, 64, 1.0, seed=0)
    assert flex_backend._device_error("cuda", 64, ok, needs_lse=True, needs_grad=True) is None
    err = flex_backend._device_error("cuda", 8, ok, needs_lse=False, needs_grad=False)
    assert err is not None and "head_dim >= 16" in err and "head_dim=8" in err
    odd = block_mask(1, 1, 96, 96, 24, 24, 1.0, seed=0)
    err = flex_backend._device_error("cuda", 64, odd, needs_lse=False, needs_grad=False)
    assert err is not None and "mask.q_block_size=24, mask.kv_block_size=24" in err


@pytest.mark.parametrize("qbs,kbs,tile", [(128, 128, None), (256, 128, None), (64, 128, 64), (96, 64, 32),
                                          (48, 32, 16)])
def test_cuda_kernel_tiles_divide_the_blocks(qbs, kbs, tile):
    mask = block_mask(1, 1, 2 * qbs, 2 * kbs, qbs, kbs, 1.0, seed=0)
    opts = flex_backend._cuda_kernel_options(mask)
    if tile is None:
        assert opts is None  # FlexAttention's tuned defaults divide 128-multiples
    else:
        assert set(opts.values()) == {tile} and {"fwd_BLOCK_M", "bwd_BLOCK_N2"} <= set(opts)


# ------------------------------------------------------------------ Backend names
def test_backend_enum_and_strings_are_interchangeable():
    assert BACKENDS == tuple(b.value for b in Backend) == ("auto", "triton", "torch", "flex", "reference")
    assert Backend("flex") is Backend.FLEX and Backend.TORCH == "torch" and str(Backend.FLEX) == "flex"
    q, k, v = qkv(1, 80, 80, 2, 16, torch.float32, seed=1)
    mask = block_mask(1, 2, 80, 80, 32, 32, 0.5, seed=1)
    assert torch.equal(block_sparse_attention(q, k, v, mask, backend="torch"),
                       block_sparse_attention(q, k, v, mask, backend=Backend.TORCH))
    assert can_run_torch(q, k, v, mask)
    with pytest.raises(ValueError, match=r"backend='flexx' is not one of \('auto', 'triton', 'torch', 'flex'"):
        block_sparse_attention(q, k, v, mask, backend="flexx")
    with pytest.raises(TypeError, match=r"backend must be a str or sparsegen.kernels.Backend, got int"):
        block_sparse_attention(q, k, v, mask, backend=3)


def test_auto_never_picks_flex_on_cpu(monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise AssertionError("auto must not run flex")

    monkeypatch.setattr(flex_backend, "flex_block_sparse_attention", boom)
    q, k, v = qkv(1, 64, 64, 1, 16, torch.float32, seed=2)
    mask = block_mask(1, 1, 64, 64, 32, 32, 1.0, seed=2)
    assert can_run_flex(q, k, v, mask)
    with caplog.at_level(logging.DEBUG, logger="sparsegen.kernels"):
        block_sparse_attention(q, k, v, mask)
    assert "auto chose 'torch'" in caplog.text
