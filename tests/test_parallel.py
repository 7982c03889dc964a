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
