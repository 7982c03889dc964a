"""Head assignment for head-parallel (Ulysses) execution of sparse attention.

Under Ulysses context parallelism each rank attends a slice of the heads over the whole
sequence. With per-head sparsity (PARO's calibrated masks) the heads' work differs, and
contiguous slices can leave one rank with most of it. The greedy assignment (db-SP's):
heads sorted by work, heaviest first, each given to the least-loaded rank that still has
room (every rank takes H / ranks heads).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["greedy_head_assignment", "contiguous_head_assignment", "rank_imbalance"]


def contiguous_head_assignment(num_heads: int, ranks: int) -> list[list[int]]:
    """Rank r takes heads [r * H / ranks, (r + 1) * H / ranks) (diffusers' Ulysses layout)."""
    per = _per_rank(num_heads, ranks)
    return [list(range(r * per, (r + 1) * per)) for r in range(ranks)]


def greedy_head_assignment(work: Sequence[float], ranks: int) -> list[list[int]]:
    """Heads per rank, each rank's list ascending, evening the summed ``work``.

    Args:
        work: per head, its cost (e.g. visited blocks); len(work) must divide by ``ranks``.
    Returns:
        ``ranks`` lists of ``len(work) / ranks`` head indices.

    >>> greedy_head_assignment([9, 9, 1, 1], 2)
    [[0, 2], [1, 3]]
    """
    per = _per_rank(len(work), ranks)
    loads, heads = [0.0] * ranks, [[] for _ in range(ranks)]
    for h in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min((r for r in range(ranks) if len(heads[r]) < per), key=lambda r: (loads[r], r))
        heads[r].append(h)
        loads[r] += float(work[h])
    return [sorted(hs) for hs in heads]


def rank_imbalance(work: Sequence[float], assignment: Sequence[Sequence[int]]) -> float:
    """max / mean of the ranks' summed work (1.0 = perfectly even)."""
    loads = [sum(float(work[h]) for h in hs) for hs in assignment]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _per_rank(num_heads: int, ranks: int) -> int:
    if ranks < 1 or num_heads % ranks:
        raise ValueError(f"{num_heads} heads do not split evenly over {ranks} ranks")
    return num_heads // ranks
