"""Greedy head assignment and joint segment maps for head-parallel execution (pure functions)."""

import pytest

from sparsegen.parallel import contiguous_head_assignment, greedy_head_assignment, rank_imbalance


def test_greedy_assignment_evens_the_ranks():
    work = [10, 9, 1, 1, 1, 0, 0, 0]
    contiguous = contiguous_head_assignment(8, 2)
    assert contiguous == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_imbalance(work, contiguous) == pytest.approx(21 / 11)
    greedy = greedy_head_assignment(work, 2)
    assert sorted(h for hs in greedy for h in hs) == list(range(8)) and all(len(hs) == 4 for hs in greedy)
    assert rank_imbalance(work, greedy) == pytest.approx(1.0)  # 10 + 1 + 0 + 0 vs 9 + 1 + 1 + 0
    assert greedy_head_assignment([9, 9, 1, 1], 2) == [[0, 2], [1, 3]]
    assert greedy_head_assignment([1, 1, 1, 1], 4) == [[0], [1], [2], [3]]


def test_device_greedy_assignment_equals_the_host_one():
    import random

    import torch

    from sparsegen.parallel import greedy_head_assignment_tensor, rank_imbalance_tensor

    rng = random.Random(0)
    for _ in range(200):  # small integer work: many ties, broken the same way on both sides
        ranks = rng.choice([1, 2, 3, 4])
        work = [rng.randint(0, 5) for _ in range(ranks * rng.randint(1, 6))]
        on_device = greedy_head_assignment_tensor(torch.tensor(work, dtype=torch.float32), ranks)
        assert on_device.tolist() == greedy_head_assignment(work, ranks), work
        assert rank_imbalance_tensor(torch.tensor(work), on_device).item() == pytest.approx(
            rank_imbalance(work, on_device.tolist()))
    assert rank_imbalance_tensor(torch.zeros(4), torch.tensor([[0, 1], [2, 3]])).item() == 1.0
    # Several problems at once (one per layer): each row as if alone.
    batch = torch.randint(0, 6, (5, 8)).float()
    together = greedy_head_assignment_tensor(batch, 4)
    assert together.shape == (5, 4, 2)
    assert [t.tolist() for t in together] == [greedy_head_assignment(w.tolist(), 4) for w in batch]
    with pytest.raises(ValueError, match="do not split evenly"):
        greedy_head_assignment_tensor(torch.ones(3), 2)


def test_heads_must_split_evenly():
    with pytest.raises(ValueError, match="do not split evenly"):
        greedy_head_assignment([1, 2, 3], 2)


def test_joint_order_restores_segments_sharded_per_rank():
    from sparsegen.parallel import joint_order

    text, video, ranks = 6, 12, 3
    # What each rank holds (its text shard, then its video shard), gathered in rank order.
    tokens = [f"t{i}" for i in range(text)] + [f"v{i}" for i in range(video)]
    gathered = []
    for r in range(ranks):
        gathered += tokens[r * 2:(r + 1) * 2] + tokens[text + r * 4:text + (r + 1) * 4]
    assert [gathered[i] for i in joint_order([text, video], ranks)] == tokens
    video_first = tokens[text:] + tokens[:text]
    gathered = []
    for r in range(ranks):
        gathered += video_first[r * 4:(r + 1) * 4] + video_first[video + r * 2:video + (r + 1) * 2]
    assert [gathered[i] for i in joint_order([video, text], ranks)] == video_first
    assert joint_order([5], 1) == list(range(5))
    with pytest.raises(ValueError, match="7 tokens does not split evenly over 2"):
        joint_order([7, 4], 2)


@pytest.mark.parametrize("method,options", [
    ("radial", dict(block_size=16, decay_factor=1.0)),
    ("gna", dict(kernel_size=(3, 5, 5), block_size=16)),                       # token tiles, partial blocks
    ("gna", dict(kernel_size=(3, 3, 3), block_size=16, tile=(1, 4, 4))),     # a non-identity layout
], ids=["radial", "gna", "gna-tiled"])
@pytest.mark.parametrize("shards", [2, 4])
def test_query_shards_against_all_keys_equal_the_whole_attention(method, options, shards):
    import torch

    from sparsegen.patching import make_config
    from sparsegen.methods.base import AttentionCall, AttentionGeometry

    m = make_config(method, **options).make_method()
    g = AttentionGeometry(5, 6, 8)  # 240 tokens: shards of 120 / 60 tokens cut query blocks of 16
    q, k, v = torch.randn(3, 1, 240, 2, 16).unbind(0)

    def call():
        return AttentionCall(geometry=g, layer=0, num_layers=1, step=None, num_steps=None, head_offset=0,
                             total_heads=2, backend="torch")

    ref, ref_lse = m.attention(q, k, v, call())
    n = 240 // shards
    outs = [m.shard_attention(q[:, r * n:(r + 1) * n], k, v, call(), start=r * n) for r in range(shards)]
    torch.testing.assert_close(torch.cat([o for o, _ in outs], 1), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([lse for _, lse in outs], 2), ref_lse, atol=1e-5, rtol=1e-5)


def test_methods_without_a_static_mask_refuse_query_shards():
    import torch

    from sparsegen.patching import make_config
    from sparsegen.methods.base import AttentionCall, AttentionGeometry

    m = make_config("agent").make_method()
    g = AttentionGeometry(2, 4, 4)
    q = torch.randn(1, 32, 2, 16)
    c = AttentionCall(geometry=g, layer=0, num_layers=1, step=None, num_steps=None, head_offset=0, total_heads=2,
                      backend="torch")
    with pytest.raises(ValueError, match="cannot run on a shard of the queries"):
        m.shard_attention(q[:, :16], q, q, c, start=0)


@pytest.mark.parametrize("method,options", [
    ("radial", dict(block_size=16, decay_factor=1.0)),
    ("gna", dict(kernel_size=(3, 3, 3), block_size=16, tile=(1, 4, 4), is_causal=(True, False, False))),
], ids=["radial", "gna-causal"])
def test_shard_work_counts_the_blocks_each_query_shard_computes(method, options):
    import torch

    from sparsegen.patching import make_config
    from sparsegen.methods.base import AttentionGeometry

    m = make_config(method, **options).make_method()
    g = AttentionGeometry(5, 8, 8)  # 320 tokens, 20 query blocks of 16; shards cut frames and tiles
    mask = m.static_mask(g)
    per_block = mask.kv_num_blocks.sum(dim=(0, 1))
    layout = m.token_layouts(g)[0]
    # Token held at each row of the mask's query order (the identity without a layout).
    row_token = torch.arange(mask.q_len) if layout is None else layout.perm
    assert sum(m.shard_work(g, 1)) == int(per_block.sum())
    for shards in (2, 4, 5):
        n = 320 // shards
        expected = []
        for r in range(shards):
            rows = row_token.view(-1, 16)  # (query blocks, 16): a block is computed if it holds a shard token
            holds = ((rows >= r * n) & (rows < (r + 1) * n)).any(dim=1)
            expected.append(int(per_block[holds].sum()))
        assert m.shard_work(g, shards) == expected, shards
    if method == "gna":  # causal in time: the last frames' shards visit more blocks than the first's
        work = m.shard_work(g, 5)
        assert work[0] < work[-1]
    with pytest.raises(ValueError, match="do not split into 3 equal shards"):
        m.shard_work(g, 3)
