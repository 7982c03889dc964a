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
