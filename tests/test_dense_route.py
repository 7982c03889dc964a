"""The CPU path's dense route: the same masked result as walking the blocks, taken only where it pays."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.kernels import torch_backend
from sparsegen.kernels.reference import reference_attention
from sparsegen.kernels.torch_backend import prefers_dense_route, torch_block_sparse_attention
from sparsegen.testing import assert_close_to_golden


def _mask(q_len, kv_len, qbs, kbs, *, heads=1, batch=1, density=0.5, tiles=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qb, kb = -(-q_len // qbs), -(-kv_len // kbs)
    blocks = torch.rand(batch, heads, qb, kb, generator=g) < density
    blocks[..., torch.arange(qb), torch.arange(qb) % kb] = True  # every row visits a block
    kw = {}
    if tiles:
        # Causal tiles on the diagonal and an empty-row tile (its first rows attend nothing) elsewhere.
        t = torch.stack([torch.tril(torch.ones(qbs, kbs, dtype=torch.bool)),
                         torch.ones(qbs, kbs, dtype=torch.bool)])
        t[1, : qbs // 2] = False
        tid = torch.full(blocks.shape, -1, dtype=torch.long)
        tid[..., torch.arange(qb), torch.arange(qb) % kb] = 0
        # Query block 0 visits only its last key block, through the tile whose first rows are empty.
        blocks[..., 0, :] = False
        blocks[..., 0, -1] = True
        tid[..., 0, :] = -1
        tid[..., 0, -1] = 1
        kw = dict(tile_ids=tid, tiles=t)
    return BlockSparseMask.from_block_matrix(blocks, q_len=q_len, kv_len=kv_len, q_block_size=qbs,
                                             kv_block_size=kbs, **kw)


CASES = [
    # (q_len, kv_len, q block, kv block, batch, heads, mask batch, mask heads, tiles, dtype)
    (97, 97, 32, 32, 2, 3, 1, 1, False, torch.float32),
    (200, 150, 64, 32, 1, 2, 1, 2, True, torch.float32),
    (320, 320, 64, 64, 2, 6, 2, 6, False, torch.bfloat16),
    (130, 130, 16, 64, 1, 1, 1, 1, True, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}x{c[3]}-{c[9]}-tiles{c[8]}")
def test_dense_route_equals_block_route_and_reference(case):
    sq, sk, qbs, kbs, b, h, mb, mh, tiles, dtype = case
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, h, 40, generator=g).to(dtype) for s in (sq, sk, sk))
    mask = _mask(sq, sk, qbs, kbs, batch=mb, heads=mh, tiles=tiles)
    scale = 40 ** -0.5
    o_d, l_d = torch_block_sparse_attention(q, k, v, mask, scale=scale, route="dense")
    o_b, l_b = torch_block_sparse_attention(q, k, v, mask, scale=scale, route="blocks")
    gold_o, gold_l = reference_attention(q, k, v, mask, scale=scale, dtype=torch.float64)
    eager_o, _ = reference_attention(q, k, v, mask, scale=scale, dtype=dtype)
    what = f"{case}"
    assert_close_to_golden(o_d, eager_o.to(dtype), gold_o, what=f"dense route {what}")
    assert_close_to_golden(o_b, eager_o.to(dtype), gold_o, what=f"block route {what}")
    # Both LSEs: -inf exactly where a row attends nothing, equal elsewhere.
    assert torch.equal(torch.isneginf(l_d), torch.isneginf(gold_l)) and torch.equal(torch.isneginf(l_b), torch.isneginf(l_d))
    finite = ~torch.isneginf(l_d)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(l_d[finite], gold_l[finite].float(), atol=tol), what
    if tiles:
        assert bool(torch.isneginf(l_d).any()), "the case should have rows that attend nothing"
        assert (o_d.transpose(1, 2)[torch.isneginf(l_d)] == 0).all()


def test_full_mask_dense_route_is_the_unmasked_kernel():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 300, 4, 32, generator=g) for _ in range(3))
    mask = BlockSparseMask.full(q_len=300, kv_len=300, q_block_size=64, kv_block_size=64)
    out = block_sparse_attention(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(out, sdpa)


def test_gradients_through_the_auto_route_equal_the_block_route():
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 160, 2, 32, generator=g) for _ in range(3)]
    mask = _mask(160, 160, 32, 32, heads=2, tiles=True)
    grads = {}
    for route in ("dense", "blocks"):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out, lse = torch_block_sparse_attention(q, k, v, mask, scale=32 ** -0.5, route=route)
        (out.square().sum() + lse.masked_fill(torch.isneginf(lse), 0).sum()).backward()
        grads[route] = (out.detach(), q.grad, k.grad, v.grad)
    for a, b in zip(grads["dense"], grads["blocks"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_route_choice():
    sparse_long = _mask(4096, 4096, 128, 128, density=0.2)
    assert not prefers_dense_route(sparse_long, 4096, 4096)
    assert prefers_dense_route(BlockSparseMask.full(q_len=4096, kv_len=4096), 4096, 4096)  # no bias needed
    # The measured costs: 64-token blocks pay 1.7x dense per unit of density, 16-token blocks 3.5x.
    assert torch_backend.block_route_cost(_mask(320, 320, 64, 64)) == 1.7
    assert torch_backend.block_route_cost(_mask(320, 320, 16, 64)) == 3.5
    assert torch_backend.block_route_cost(sparse_long) == 1.5
    for block, density, dense in ((64, 0.35, False), (64, 0.95, True), (16, 0.5, True), (16, 0.2, False)):
        m = _mask(1024, 1024, block, block, density=density, seed=5)
        expected = torch_backend.block_route_cost(m) * m.density() >= torch_backend.DENSE_ROUTE_COST
        assert expected == dense, (block, density, m.density())
        assert prefers_dense_route(m, 1024, 1024) == dense
    # A bias that would not fit is never built, however dense the mask.
    per_head = _mask(4096, 4096, 64, 64, heads=8, density=0.97)
    assert 8 * 4096 * 4096 > torch_backend.DENSE_ROUTE_MAX_BIAS_ELEMENTS
    assert not prefers_dense_route(per_head, 4096, 4096)


def test_only_auto_takes_the_dense_route(caplog):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 100, 2, 16, generator=g) for _ in range(3))
    mask = _mask(100, 100, 16, 16, heads=2, density=0.6)
    calls = []
    real = torch_backend._dense_route_forward

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    torch_backend._dense_route_forward = spy
    try:
        with caplog.at_level(logging.DEBUG, logger="sparsegen.kernels"):
            auto = block_sparse_attention(q, k, v, mask)
        explicit = block_sparse_attention(q, k, v, mask, backend="torch")
    finally:
        torch_backend._dense_route_forward = real
    assert prefers_dense_route(mask, 100, 100) and len(calls) == 1
    assert "dense route" in caplog.text
    assert torch.allclose(auto, explicit, atol=1e-6)


def test_bad_route_is_refused():
    q = torch.randn(1, 64, 1, 16)
    with pytest.raises(ValueError, match=r"route='fast' is not one of \('auto', 'blocks', 'dense'\)"):
        torch_block_sparse_attention(q, q, q, BlockSparseMask.full(q_len=64, kv_len=64), scale=1.0, route="fast")
