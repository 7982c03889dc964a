"""Token permutations: tile layouts (ragged and padded), dilation groups, partitions, axis orders."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.reference import reference_attention
from sparsegen.testing import assert_close_to_golden, random_sweep_size
from sparsegen.tiling import (
    AXIS_ORDERS,
    TokenPermutation,
    axis_order,
    balanced_segments,
    partition_layout,
    tile_layout,
)

PAD = -1  # how the brute-force layouts below mark a padding position


# ------------------------------------------------------------------ brute-force layouts
def _axis_positions(n: int, tile: int, dilation: int, pad: bool) -> list[list[int]]:
    """Segments of one axis: residue classes i % dilation in turn, each cut into runs of `tile`."""
    segments = []
    for r in range(dilation):
        members = list(range(r, n, dilation))
        for start in range(0, len(members), tile):
            seg = members[start:start + tile]
            if pad:
                seg = seg + [PAD] * (tile - len(seg))
            segments.append(seg)
    return segments


def _brute_force_perm(grid, tile, dilation, pad) -> list[int]:
    """Source token per permuted position: tiles in row-major tile order, row-major inside a tile."""
    per_axis = [_axis_positions(n, t, d, pad) for n, t, d in zip(grid, tile, dilation)]
    strides = [math.prod(grid[ax + 1:]) for ax in range(len(grid))]
    n_tokens = math.prod(grid)
    perm = []
    for segs in itertools.product(*per_axis):
        for coords in itertools.product(*segs):
            if PAD in coords:
                perm.append(n_tokens)
            else:
                perm.append(sum(c * s for c, s in zip(coords, strides)))
    return perm


# ------------------------------------------------------------------ hand-derived layouts
def test_ragged_tiles_match_the_documented_example():
    #  0  1 |  2  3 |  4        tiles A B C / D E F, row-major inside each tile
    #  5  6 |  7  8 |  9
    # 10 11 | 12 13 | 14
    lay = tile_layout((3, 5), (2, 2))
    assert lay.perm.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert lay.tile_offsets.tolist() == [0, 4, 8, 10, 12, 14, 15]
    assert lay.tile_counts == (2, 3) and lay.tile_shape is None and not lay.has_padding
    assert lay.tile_of_position().tolist() == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 2 + [4] * 2 + [5]


def test_padded_tiles_hold_exactly_one_block_each():
    lay = tile_layout((3, 5), (2, 2), pad=True)
    p = 15  # the padding marker is num_tokens
    assert lay.perm.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, p, 9, p, 10, 11, p, p, 12, 13, p, p, 14, p, p, p]
    assert lay.length == 24 and lay.tile_shape == (2, 2)
    assert lay.tile_offsets.tolist() == list(range(0, 25, 4))
    x = torch.arange(1, 16, dtype=torch.float32).view(1, 15, 1, 1)
    y = lay.apply(x).view(-1)
    assert y[lay.perm == p].eq(0).all(), "padding positions are zero"
    assert torch.equal(lay.invert(lay.apply(x)), x)


def test_dilation_groups_are_tiled_separately():
    # Axis of 7 with dilation 2: residues 0 2 4 6 | 1 3 5, tiles of 3 -> [0 2 4] [6] [1 3 5].
    lay = tile_layout(7, 3, dilation=2)
    assert lay.perm.tolist() == [0, 2, 4, 6, 1, 3, 5]
    assert lay.tile_offsets.tolist() == [0, 3, 4, 7]
    padded = tile_layout(7, 3, dilation=2, pad=True)
    assert padded.perm.tolist() == [0, 2, 4, 6, 7, 7, 1, 3, 5]


@pytest.mark.parametrize("pad", [False, True])
def test_layouts_match_brute_force_on_random_grids(pad):
    rng = random.Random(1234 + pad)
    for _ in range(4 * random_sweep_size()):
        nd = rng.randint(1, 3)
        grid = tuple(rng.randint(1, 9) for _ in range(nd))
        tile = tuple(rng.randint(1, 5) for _ in range(nd))
        dilation = tuple(rng.randint(1, n) for n in grid)
        lay = tile_layout(grid, tile, pad=pad, dilation=dilation)
        expected = _brute_force_perm(grid, tile, dilation, pad)
        assert lay.perm.tolist() == expected, (grid, tile, dilation, pad)
        sizes = (lay.tile_offsets[1:] - lay.tile_offsets[:-1]).tolist()
        if pad:
            assert sizes == [math.prod(tile)] * lay.num_tiles
        assert sum(sizes) == lay.length


def test_every_tile_is_a_cuboid_of_the_grid():
    grid, tile = (5, 7, 6), (2, 3, 4)
    lay = tile_layout(grid, tile)
    coords = torch.stack(torch.unravel_index(lay.perm, grid), 1)  # (N, 3)
    for t in range(lay.num_tiles):
        c = coords[lay.tile_offsets[t]:lay.tile_offsets[t + 1]]
        lo, hi = c.min(0).values, c.max(0).values
        extent = (hi - lo + 1).tolist()
        assert all(e <= s for e, s in zip(extent, tile))
        assert len(c) == math.prod(extent), "a tile holds its whole bounding box"
        assert lo.remainder(torch.tensor(tile)).eq(0).all(), "tiles start on the tile grid"
        flat = (c[:, 0] * grid[1] + c[:, 1]) * grid[2] + c[:, 2]
        assert torch.all(flat[1:] > flat[:-1]), "row-major inside a tile"


# ------------------------------------------------------------------ round trips
def _layouts():
    """Permutations of the grid (5, 6, 7): ragged and padded tiles, dilation, partitions, axis orders."""
    grid = (5, 6, 7)
    yield "ragged", tile_layout(grid, (2, 4, 3))
    yield "padded", tile_layout(grid, (2, 4, 4), pad=True)
    yield "dilated", tile_layout(grid, (2, 2, 2), pad=True, dilation=(1, 2, 3))
    yield "partition", partition_layout(grid, [(5,), balanced_segments(6, 4), balanced_segments(7, 3)])
    for order in AXIS_ORDERS:
        yield order, axis_order(grid, order)


@pytest.mark.parametrize("name,layout", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_round_trip_of_q_k_v_and_output_is_exact(name, layout):
    torch.manual_seed(0)
    n = 5 * 6 * 7
    q, k, v = (torch.randn(2, n, 3, 8) for _ in range(3))
    for x in (q, k, v):
        y = layout.apply(x)
        assert y.shape == (2, layout.length, 3, 8)
        assert torch.equal(layout.invert(y), x)
    # Output of attention computed on the permuted sequence comes back in grid order.
    qp, kp, vp = layout.apply(q), layout.apply(k), layout.apply(v)
    real_keys = (layout.perm < n).view(1, -1)
    key_mask = BlockSparseMask.from_dense(real_keys.expand(layout.length, -1).contiguous(),
                                          q_block_size=64, kv_block_size=64)
    out_p, lse_p = reference_attention(qp, kp, vp, key_mask, dtype=torch.float32)
    golden, golden_lse = reference_attention(q, k, v, None)
    eager, eager_lse = reference_attention(q, k, v, None, dtype=torch.float32)
    assert_close_to_golden(layout.invert(out_p), eager, golden, what=f"{name} output")
    assert_close_to_golden(layout.invert(lse_p, dim=2), eager_lse, golden_lse, what=f"{name} lse")


def test_six_axis_orders_iterate_the_named_axes():
    grid = (3, 4, 5)
    sizes = dict(zip("FHW", grid))
    seen = set()
    for order in AXIS_ORDERS:
        perm = axis_order(grid, order).perm.tolist()
        expected = []
        for vals in itertools.product(*(range(sizes[a]) for a in order)):
            pos = dict(zip(order, vals))
            expected.append((pos["F"] * 4 + pos["H"]) * 5 + pos["W"])
        assert perm == expected, order
        seen.add(tuple(perm))
    assert len(seen) == 6
    assert axis_order(grid, "FHW").is_identity() and not axis_order(grid, "HWF").is_identity()
    # HWF puts the frames of one spatial position next to each other.
    assert axis_order(grid, "HWF").perm[:3].tolist() == [0, 20, 40]


def test_vmoba_partitions():
    grid = (21, 30, 52)
    temporal = partition_layout(grid, [(3,) * 7, (30,), (52,)])
    assert temporal.is_identity() and temporal.num_tiles == 7
    spatial = partition_layout(grid, [(21,), balanced_segments(30, 5), balanced_segments(52, 13)])
    assert spatial.num_tiles == 5 * 13
    first = spatial.perm[:spatial.tile_offsets[1]]
    f, h, w = torch.unravel_index(first, grid)
    assert len(first) == 21 * 6 * 4 and set(f.tolist()) == set(range(21))
    assert set(h.tolist()) == set(range(6)) and set(w.tolist()) == set(range(4))
    assert balanced_segments(10, 4) == (3, 3, 2, 2) and balanced_segments(3, 5) == (1, 1, 1)


# ------------------------------------------------------------------ errors
def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"grid must hold positive ints .* got \(0, 3\)"):
        tile_layout((0, 3), 2)
    with pytest.raises(ValueError, match=r"tile=\(2, 2, 2\) has 3 entries but the grid has 2 axes"):
        tile_layout((4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match=r"tile=\(2, 0\): every entry must be an int >= 1"):
        tile_layout((4, 4), (2, 0))
    with pytest.raises(TypeError, match=r"tile must be an int or a sequence of 2 ints, got True"):
        tile_layout((4, 4), True)
    with pytest.raises(ValueError, match=r"dilation=\(5, 1\) exceeds the grid \(4, 4\) on axis 0"):
        tile_layout((4, 4), 2, dilation=(5, 1))
    with pytest.raises(ValueError, match=r"axis_order needs a 3-axis .* got \(3, 4\)"):
        axis_order((3, 4), "FHW")
    with pytest.raises(ValueError, match=r"order='FFH' is not one of"):
        axis_order((3, 4, 5), "FFH")
    with pytest.raises(ValueError, match=r"segments\[1\]=\(3, 3\) must be positive and sum to the axis length 7"):
        partition_layout((2, 7), [(2,), (3, 3)])
    lay = tile_layout((3, 5), 2, pad=True)
    with pytest.raises(ValueError, match=r"x has 14 tokens along dim=1 but the permutation is for 15"):
        lay.apply(torch.zeros(1, 14, 1, 1))
    with pytest.raises(ValueError, match=r"x has 15 positions along dim=1 but the permuted sequence has 24"):
        lay.invert(torch.zeros(1, 15, 1, 1))
    with pytest.raises(ValueError, match="repeats a token"):
        TokenPermutation(torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match=r"perm must hold every token 0..2 once"):
        TokenPermutation(torch.tensor([0, 1]), 3)


def test_identity_permutation_returns_its_input():
    from sparsegen.tiling import TokenPermutation

    x = torch.randn(2, 12, 3, 4)
    ident = TokenPermutation(torch.arange(12), 12)
    assert ident.is_identity() and ident.apply(x) is x and ident.invert(x) is x
    swapped = TokenPermutation(torch.tensor([1, 0] + list(range(2, 12))), 12)
    assert not swapped.is_identity() and torch.equal(swapped.invert(swapped.apply(x)), x)
    padded = TokenPermutation(torch.tensor(list(range(12)) + [12]), 12)
    assert not padded.is_identity() and padded.apply(x).shape[1] == 13
