"""sparsegen.reorder_tokens: the six (F, H, W) orders, per head, exact round trips."""

from __future__ import annotations

import itertools

import pytest
import torch

import sparsegen
from sparsegen.reorder import ORDERS, order_permutation, reorder_tokens


def test_orders_against_a_hand_built_grid():
    f, h, w = 2, 3, 4
    x = torch.arange(f * h * w).view(1, -1, 1, 1).float()  # token t carries the value t
    for order in ORDERS:
        out = reorder_tokens(x, grid=(f, h, w), order=order).view(-1).long().tolist()
        sizes = {"F": f, "H": h, "W": w}
        expected = []
        for pos in itertools.product(*(range(sizes[a]) for a in order)):  # slowest axis first
            coord = dict(zip(order, pos))
            expected.append(coord["F"] * h * w + coord["H"] * w + coord["W"])
        assert out == expected, order
    assert reorder_tokens(x, grid=(f, h, w), order="FHW").equal(x)
    # The module docstring's example.
    y = torch.arange(12).view(1, -1, 1, 1)
    assert reorder_tokens(y, grid=(2, 2, 3), order="HWF").view(-1).tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    assert reorder_tokens(y, grid=(2, 2, 3), order="WHF").view(-1).tolist() == [0, 6, 3, 9, 1, 7, 4, 10, 2, 8, 5, 11]


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 5, 7), (4, 2, 6)])
def test_round_trip_is_exact_per_head(grid):
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, n, 7, 5, generator=g).to(torch.bfloat16)
    orders = [ORDERS[i % 6] for i in range(7)]
    r = reorder_tokens(x, grid=grid, order=orders)
    assert torch.equal(reorder_tokens(r, grid=grid, order=orders, inverse=True), x)
    for head, order in enumerate(orders):  # each head moved by its own order only
        assert torch.equal(r[:, :, head], reorder_tokens(x[:, :, head:head + 1], grid=grid, order=order)[:, :, 0])
    # Heads-major storage (how attention outputs often come back) gives the same values.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert (n == 1 or not xt.is_contiguous()) and torch.equal(reorder_tokens(xt, grid=grid, order=orders), r)
    same = reorder_tokens(x, grid=grid, order=["HWF"] * 7)
    assert torch.equal(same, reorder_tokens(x, grid=grid, order="HWF"))
    perm, inv = order_permutation(grid, "WFH"), order_permutation(list(grid), "WFH", inverse=True)
    assert torch.equal(perm[inv], torch.arange(n)) and sparsegen.reorder_tokens is reorder_tokens


def test_bad_inputs_say_what_to_do():
    x = torch.zeros(1, 12, 2, 4)
    with pytest.raises(ValueError, match=r"order must be one of \('FHW', 'FWH', 'HFW', 'HWF', 'WFH', 'WHF'\).*'FFH'"):
        reorder_tokens(x, grid=(2, 2, 3), order="FFH")
    with pytest.raises(ValueError, match="order lists 3 orders but x has 2 heads"):
        reorder_tokens(x, grid=(2, 2, 3), order=["FHW", "HWF", "WHF"])
    with pytest.raises(ValueError, match=r"x has 12 tokens but grid \(2, 2, 4\) holds 16; pass the video tokens only"):
        reorder_tokens(x, grid=(2, 2, 4), order="FHW")
    with pytest.raises(ValueError, match=r"grid must be \(frames, height, width\) of ints >= 1, got \(2, 6\)"):
        reorder_tokens(x, grid=(2, 6), order="FHW")
    with pytest.raises(ValueError, match="must be laid out"):
        reorder_tokens(torch.zeros(12, 2, 4), grid=(2, 2, 3), order="FHW")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        reorder_tokens([0.0], grid=(1, 1, 1), order="FHW")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reordered_attention_equals_dense_attention_with_the_permuted_mask(backend):
    from sparsegen.kernels import BlockSparseMask
    from sparsegen.kernels.reference import reference_attention
    from sparsegen.reorder import reordered_attention
    from sparsegen.testing import assert_close_to_golden

    grid, heads, d = (3, 4, 4), 3, 16
    n = 48
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, heads, d, generator=g) for _ in range(3))
    orders = ["FHW", "HWF", "WHF"]
    # Per head, a block mask over the reordered tokens (16-token blocks), diagonal kept.
    blocks = torch.rand(heads, 3, 3, generator=g) < 0.5
    blocks |= torch.eye(3, dtype=torch.bool)
    mask = BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=16, kv_block_size=16)
    out, lse = reordered_attention(q, k, v, mask, grid=grid, order=orders, return_lse=True, backend=backend)
    # The same mask in the original token order: token i sits at position pos[h][i] of head h.
    dense_reordered = mask.to_dense()[0]  # (H, S, S) over reordered positions
    original = torch.stack([dense_reordered[h][order_permutation(grid, o, inverse=True)][
        :, order_permutation(grid, o, inverse=True)] for h, o in enumerate(orders)])
    token_mask = BlockSparseMask.from_block_matrix(original, q_len=n, kv_len=n, q_block_size=1, kv_block_size=1)
    gold_o, gold_l = reference_attention(q, k, v, token_mask, dtype=torch.float64)
    eager_o, _ = reference_attention(q, k, v, token_mask, dtype=torch.float32)
    assert_close_to_golden(out, eager_o, gold_o, what=f"reordered attention ({backend})")
    assert torch.allclose(lse.double(), gold_l, atol=1e-4)
