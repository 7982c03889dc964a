"""BlockSparseMask: construction, inspection, composition, FlexAttention round trip, rendering."""

from __future__ import annotations

import pytest
import torch

from sparsegen.kernels import BlockSparseMask


def _random_token_mask(b, h, sq, sk, p, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, sq, sk, generator=g) < p
    m[..., torch.arange(min(sq, sk)), torch.arange(min(sq, sk))] = True  # no empty row
    return m


@pytest.mark.parametrize("sq,sk,qbs,kbs", [(97, 97, 32, 32), (1000, 1025, 64, 128), (130, 70, 128, 16)])
def test_from_dense_is_exact_and_layout_is_sorted(sq, sk, qbs, kbs):
    tok = _random_token_mask(2, 3, sq, sk, 0.02, seed=sq)
    m = BlockSparseMask.from_dense(tok, q_block_size=qbs, kv_block_size=kbs)
    assert torch.equal(m.to_dense(), tok)
    assert m.shape == (2, 3, -(-sq // qbs), -(-sk // kbs))
    for row_n, row in zip(m.kv_num_blocks.flatten().tolist(), m.kv_indices.flatten(0, 2)):
        idx = row[:row_n]
        assert torch.all(idx[1:] > idx[:-1])


def test_from_block_matrix_density_and_full_blocks():
    blocks = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    m = BlockSparseMask.from_block_matrix(blocks, q_len=100, kv_len=70, q_block_size=32, kv_block_size=32)
    assert m.density() == pytest.approx(7 / 12)
    assert m.num_partial_blocks() == 0
    assert torch.equal(m.to_block_matrix()[0, 0], blocks)
    dense = m.to_dense()[0, 0]
    assert dense.shape == (100, 70)
    assert dense[96:, 64:].all() and not dense[96:, 32:64].any()
    assert "density=0.5833" in repr(m)


def test_empty_query_block_is_rejected_with_fix():
    blocks = torch.zeros(3, 3, dtype=torch.bool)
    blocks[0, 0] = blocks[2, 2] = True
    with pytest.raises(ValueError, match=r"every query block must visit at least one key block; 1 do not .*\[0, 0, 1\]"):
        BlockSparseMask.from_block_matrix(blocks, q_len=96, kv_len=96, q_block_size=32, kv_block_size=32)


def test_wrong_grid_and_types_are_rejected():
    with pytest.raises(ValueError, match=r"blocks has grid \(2, 2\) but q_len=100"):
        BlockSparseMask.from_block_matrix(torch.ones(2, 2, dtype=torch.bool), q_len=100, kv_len=64,
                                          q_block_size=32, kv_block_size=32)
    with pytest.raises(TypeError, match="blocks must be a bool tensor"):
        BlockSparseMask.from_block_matrix(torch.ones(2, 2), q_len=64, kv_len=64, q_block_size=32, kv_block_size=32)


def test_mask_mod_matches_predicate_and_dedups_tiles():
    def causal(b, h, q, k):
        return k <= q

    m = BlockSparseMask.from_mask_mod(causal, q_len=200, kv_len=200, q_block_size=64, kv_block_size=64)
    ref = torch.tril(torch.ones(200, 200, dtype=torch.bool))
    assert torch.equal(m.to_dense()[0, 0], ref)
    # Diagonal blocks are partial; all full-size diagonal tiles are the same pattern.
    assert m.num_partial_blocks() == 4
    assert m.tiles.shape[0] == 2  # the 64x64 lower triangle, and the ragged last one
    coarse = BlockSparseMask.from_mask_mod(causal, q_len=200, kv_len=200, q_block_size=64, kv_block_size=64,
                                           exact=False)
    assert coarse.num_partial_blocks() == 0 and coarse.num_visited_blocks() == m.num_visited_blocks()


@pytest.mark.parametrize("op", ["or", "and"])
def test_union_and_intersection_match_token_level(op):
    a = _random_token_mask(1, 2, 150, 150, 0.05, seed=1)
    b = _random_token_mask(1, 2, 150, 150, 0.05, seed=2)
    a[..., :, :40] = True  # some full blocks on one side
    ma = BlockSparseMask.from_dense(a, q_block_size=32, kv_block_size=32)
    mb = BlockSparseMask.from_dense(b, q_block_size=32, kv_block_size=32)
    got = (ma | mb) if op == "or" else (ma & mb)
    want = (a | b) if op == "or" else (a & b)
    assert torch.equal(got.to_dense(), want)


def test_union_broadcasts_heads():
    a = BlockSparseMask.from_block_matrix(torch.eye(4, dtype=torch.bool), q_len=128, kv_len=128,
                                          q_block_size=32, kv_block_size=32)
    per_head = torch.zeros(3, 4, 4, dtype=torch.bool)
    per_head[:, :, 0] = True
    per_head[1, :, 3] = True
    b = BlockSparseMask.from_block_matrix(per_head, q_len=128, kv_len=128, q_block_size=32, kv_block_size=32)
    u = a | b
    assert u.shape == (1, 3, 4, 4)
    assert torch.equal(u.to_block_matrix()[0], torch.eye(4, dtype=torch.bool) | per_head)


def test_combining_masks_of_other_geometry_fails():
    a = BlockSparseMask.full(q_len=64, kv_len=64, q_block_size=32, kv_block_size=32)
    b = BlockSparseMask.full(q_len=96, kv_len=64, q_block_size=32, kv_block_size=32)
    with pytest.raises(ValueError, match="must share lengths and block sizes"):
        a | b


@pytest.mark.parametrize("sq,sk", [(256, 256), (97, 1025)])
def test_flex_round_trip(sq, sk):
    tok = _random_token_mask(2, 2, sq, sk, 0.03, seed=7)
    tok[..., :, :64] = True  # guarantees some full blocks
    m = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=64)
    fm = m.to_flex_block_mask()
    assert tuple(fm.seq_lengths) == (sq, sk) and tuple(fm.BLOCK_SIZE) == (32, 64)
    back = BlockSparseMask.from_flex_block_mask(fm)
    assert torch.equal(back.to_dense(), tok)
    # FlexAttention itself agrees with the token mask.
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(fm.mask_mod, 2, 2, sq, sk, device="cpu")
    assert torch.equal(dense & m.to_block_matrix().repeat_interleave(32, 2).repeat_interleave(64, 3)[..., :sq, :sk],
                       tok)
    # ... and flex_attention with the converted mask computes our attention.
    from torch.nn.attention.flex_attention import flex_attention

    from sparsegen.kernels.reference import reference_attention

    q, k, v = torch.randn(2, 2, sq, 16), torch.randn(2, 2, sk, 16), torch.randn(2, 2, sk, 16)
    got = flex_attention(q, k, v, block_mask=fm).transpose(1, 2)
    ref, _ = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m)
    assert (got.double() - ref).abs().max().item() < 1e-5


def test_from_flex_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q, k):
        return (q - k).abs() <= 40

    fm = create_block_mask(sliding, B=None, H=None, Q_LEN=300, KV_LEN=300, device="cpu", BLOCK_SIZE=64)
    m = BlockSparseMask.from_flex_block_mask(fm)
    i = torch.arange(300)
    assert torch.equal(m.to_dense()[0, 0], (i[:, None] - i[None, :]).abs() <= 40)
    assert m.num_partial_blocks() > 0


def test_transposed_layout_matches_block_matrix():
    tok = _random_token_mask(1, 2, 200, 300, 0.01, seed=3)
    m = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=64)
    qn, qi, qt = m.transposed()
    bm = m.to_block_matrix()
    for h in range(2):
        for j in range(m.num_kv_blocks):
            n = int(qn[0, h, j])
            assert qi[0, h, j, :n].tolist() == bm[0, h, :, j].nonzero().squeeze(1).tolist()
            for slot in range(n):
                i = int(qi[0, h, j, slot])
                tile = m.tiles[qt[0, h, j, slot]] if qt[0, h, j, slot] >= 0 else None
                blk = tok[0, h, i * 32:(i + 1) * 32, j * 64:(j + 1) * 64]
                if tile is None:
                    assert blk.all()
                else:
                    assert torch.equal(tile[: blk.shape[0], : blk.shape[1]], blk)


def test_render_png(tmp_path):
    from PIL import Image
    import numpy as np

    tok = _random_token_mask(1, 2, 256, 256, 0.02, seed=4)
    g = torch.Generator().manual_seed(5)
    kind = torch.randint(0, 3, (2, 8, 8), generator=g)  # per block: 0 cleared (but the diagonal), 1 full, 2 random
    cells = kind.repeat_interleave(32, 1).repeat_interleave(32, 2)[None]
    tok = torch.where(cells == 1, True, torch.where(cells == 0, torch.eye(256, dtype=torch.bool), tok))
    m = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    st = m.block_state()[0]
    assert set(st.unique().tolist()) == {0, 1, 2}, "the case must hold skipped, full and partial blocks"
    path = m.render(str(tmp_path / "m.png"))
    with Image.open(path) as img:
        arr = np.asarray(img)
    # Two 8 x 8 block panels at 8 pixels per block, 4 grey pixels apart; every pixel is
    # its block's state: black skipped, white full, grey partial.
    colour = torch.tensor([0, 255, 128], dtype=torch.uint8)
    panels = [colour[st[h].long()].repeat_interleave(8, 0).repeat_interleave(8, 1).numpy() for h in range(2)]
    expected = np.concatenate([panels[0], np.full((64, 4), 64, dtype=np.uint8), panels[1]], axis=1)
    assert arr.shape == expected.shape and np.array_equal(arr, expected)


def test_select_heads_and_device_cache():
    per_head = torch.ones(4, 3, 3, dtype=torch.bool)
    per_head[2] = torch.eye(3, dtype=torch.bool)
    m = BlockSparseMask.from_block_matrix(per_head, q_len=96, kv_len=96, q_block_size=32, kv_block_size=32)
    sub = m.select_heads(2, 4)
    assert sub.shape == (1, 2, 3, 3)
    assert torch.equal(sub.to_block_matrix()[0, 0], torch.eye(3, dtype=torch.bool))
    assert m.to("cpu") is m


# ------------------------------------------------------------------ the kernels' layout


def _check_kernel_layout(lay, state, short_block):
    """Full blocks first, partial blocks after, each ascending; together exactly the visited blocks."""
    b, h, nb, kb = state.shape
    for bb in range(b):
        for hh in range(h):
            for i in range(nb):
                n, nf = int(lay.num[bb, hh, i]), int(lay.num_full[bb, hh, i])
                idx = lay.indices[bb, hh, i, :n].tolist()
                tid = lay.tile_ids[bb, hh, i, :n].tolist()
                row = state[bb, hh, i]
                full = [j for j in range(kb) if row[j] == 1 and j != short_block]
                part = [j for j in range(kb) if row[j] == 2 or (row[j] == 1 and j == short_block)]
                assert idx[:nf] == full and sorted(idx[nf:]) == idx[nf:] == part, (bb, hh, i)
                assert all(t == -1 for t in tid[:nf])
                assert [t >= 0 for t in tid[nf:]] == [row[j] == 2 for j in part]


@pytest.mark.parametrize("sq,sk,qbs,kbs", [(97, 97, 32, 32), (1000, 1025, 64, 128), (256, 192, 64, 64)])
def test_kernel_layout_splits_full_and_partial_blocks(sq, sk, qbs, kbs):
    """Token tiles and a short last key block go to the partial list; the rest are full, per row, in order."""
    g = torch.Generator().manual_seed(sq + sk)
    blocks = torch.rand(2, 3, -(-sq // qbs), -(-sk // kbs), generator=g) < 0.5
    blocks[..., 0] = True
    tok = blocks.repeat_interleave(qbs, 2).repeat_interleave(kbs, 3)[..., :sq, :sk].clone()
    tok[0, 1, : sq // 2, : sk // 3] &= torch.rand(sq // 2, sk // 3, generator=g) < 0.7   # some partial blocks
    m = BlockSparseMask.from_dense(tok, q_block_size=qbs, kv_block_size=kbs)
    assert m.num_partial_blocks() > 0
    lay = m.kernel_layout()
    assert lay is m.kernel_layout()  # cached on the mask
    assert lay.tiles.dtype == torch.uint8 and lay.tiles.is_contiguous()
    short_kv = m.num_kv_blocks - 1 if sk % kbs else None
    _check_kernel_layout(lay, m.block_state(), short_kv)
    # Transposed: query blocks per key block; the short last query block is partial.
    lt = m.kernel_layout_transposed()
    short_q = m.num_q_blocks - 1 if sq % qbs else None
    _check_kernel_layout(lt, m.block_state().transpose(-1, -2), short_q)
    assert lt.tiles is lay.tiles


def test_kernel_layout_without_tiles_and_broadcast_heads():
    m = BlockSparseMask.from_block_matrix(torch.tril(torch.ones(4, 4, dtype=torch.bool)), q_len=128, kv_len=100,
                                          q_block_size=32, kv_block_size=32)
    lay = m.kernel_layout()
    assert lay.tiles is None and lay.num.shape == (1, 1, 4)
    # Key block 3 holds tokens 96..99 only: partial (tile id -1) wherever it is visited.
    assert lay.num_full[0, 0].tolist() == [1, 2, 3, 3]
    assert lay.indices[0, 0, 3].tolist() == [0, 1, 2, 3] and lay.tile_ids[0, 0, 3].tolist() == [-1] * 4


def test_kernel_layout_needs_no_host_sync():
    """Derived with device operations only: it even runs on the meta device, where any read of a value fails."""
    num = torch.empty(2, 4, 50, dtype=torch.int32, device="meta")
    idx = torch.empty(2, 4, 50, 30, dtype=torch.int32, device="meta")
    tid = torch.empty(2, 4, 50, 30, dtype=torch.int32, device="meta")
    tiles = torch.empty(3, 64, 64, dtype=torch.bool, device="meta")
    m = BlockSparseMask(num, idx, 50 * 64, 3000, 64, 64, tid, tiles)
    lay = m.kernel_layout()
    assert lay.indices.device.type == "meta" and lay.indices.shape == (2, 4, 50, 30)
    assert lay.num_full.shape == (2, 4, 50) and lay.tiles.dtype == torch.uint8


def test_from_block_matrix_with_a_host_bound_on_the_width():
    """``max_blocks`` fixes the layout's width without reading the block matrix back; the
    mask is the same, only wider."""
    g = torch.Generator().manual_seed(7)
    blocks = torch.rand(2, 3, 9, 11, generator=g) < 0.3
    blocks[..., torch.arange(9), torch.arange(9)] = True
    kw = dict(q_len=9 * 32 - 5, kv_len=11 * 16 - 3, q_block_size=32, kv_block_size=16)
    tight = BlockSparseMask.from_block_matrix(blocks, **kw)
    wide = BlockSparseMask.from_block_matrix(blocks, **kw, max_blocks=11)
    assert wide.kv_indices.shape[-1] == 11 and tight.kv_indices.shape[-1] == int(blocks.sum(-1).max())
    assert torch.equal(wide.to_block_matrix(), tight.to_block_matrix())
    assert torch.equal(wide.kv_num_blocks, tight.kv_num_blocks)
    assert BlockSparseMask.from_block_matrix(blocks, **kw, max_blocks=99).kv_indices.shape[-1] == 11
    with pytest.raises(ValueError, match=r"max_blocks must be an int >= 1"):
        BlockSparseMask.from_block_matrix(blocks, **kw, max_blocks=0)
