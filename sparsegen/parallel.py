"""Head assignment and segment maps for head-parallel (Ulysses) execution of sparse attention.

Under Ulysses context parallelism each rank attends a slice of the heads over the whole
sequence. With per-head sparsity (PARO's calibrated masks) the heads' work differs, and
contiguous slices can leave one rank with most of it. The greedy assignment (db-SP's):
heads sorted by work, heaviest first, each given to the least-loaded rank that still has
room (every rank takes H / ranks heads). When the heads' work is known only per call (VMoBA
selects its blocks from q and k), :func:`greedy_head_assignment_tensor` computes the same
assignment on the device, from the previous call's work, without a host read.

Joint attention (text and video tokens in one sequence) is sharded per segment: diffusers
splits the text and the video inputs separately, so after the all-to-all the gathered
sequence is each rank's ``[its text shard, its video shard]`` in rank order, not
``[all text, all video]``. :func:`joint_order` maps one to the other from the segments'
lengths, never from positions assumed per model.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["greedy_head_assignment", "greedy_head_assignment_tensor", "contiguous_head_assignment",
           "rank_imbalance", "rank_imbalance_tensor", "joint_order"]


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


def greedy_head_assignment_tensor(work: torch.Tensor, ranks: int) -> torch.Tensor:
    """:func:`greedy_head_assignment` on the device: the same heads (ties broken the same way),
    computed with device operations only, so nothing is read back to the host.

    Args:
        work: (..., H) per head, its cost (leading dims: independent problems, e.g. one per
            layer, solved together in H device steps); H must divide by ``ranks``.
    Returns:
        long (..., ranks, H / ranks): row r holds rank r's heads, ascending.
    """
    num_heads = work.shape[-1]
    per = _per_rank(num_heads, ranks)
    lead = work.shape[:-1]
    w = work.detach().reshape(-1, num_heads).float()  # (P, H)
    heaviest_first = torch.argsort(-w, dim=1, stable=True)
    loads = w.new_zeros(w.shape[0], ranks)
    taken = torch.zeros(w.shape[0], ranks, dtype=torch.long, device=w.device)
    rank_of = torch.empty_like(heaviest_first)
    ones = torch.ones_like(heaviest_first[:, :1])
    for i in range(num_heads):  # argmin returns the first (lowest) rank on ties
        head = heaviest_first[:, i:i + 1]
        r = torch.where(taken < per, loads, torch.inf).argmin(dim=1, keepdim=True)
        rank_of.scatter_(1, head, r)
        loads.scatter_add_(1, r, w.gather(1, head))
        taken.scatter_add_(1, r, ones)
    heads = torch.arange(num_heads, device=w.device)
    return torch.argsort(rank_of * num_heads + heads, dim=1).view(*lead, ranks, per)


def rank_imbalance_tensor(work: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """:func:`rank_imbalance` on the device: 0-dim max / mean of the ranks' summed ``work``
    (H,) under ``assignment`` (ranks, H / ranks) long; 1.0 when there is no work."""
    loads = work.detach().float()[assignment].sum(dim=1)
    mean = loads.mean()
    return torch.where(mean > 0, loads.max() / mean.clamp_min(torch.finfo(loads.dtype).tiny), 1.0)


def _per_rank(num_heads: int, ranks: int) -> int:
    if ranks < 1 or num_heads % ranks:
        raise ValueError(f"{num_heads} heads do not split evenly over {ranks} ranks")
    return num_heads // ranks


def joint_order(segments: Sequence[int], ranks: int) -> list[int]:
    """Positions in the gathered sequence of each token of the unsharded sequence.

    Args:
        segments: lengths of the unsharded sequence's segments, in their order (e.g.
            ``[text, video]``); each is split evenly over ``ranks``, and every rank holds its
            shard of every segment, in the same order.
        ranks: the number of shards, concatenated in rank order after the gather.
    Returns:
        ``order`` with ``gathered[order[j]]`` = token ``j`` of the unsharded sequence;
        ``gathered.index_select(dim, order)`` restores it.

    Raises:
        ValueError: a segment does not split evenly.

    >>> joint_order([2, 4], 2)   # gathered: [t0 v0 v1 | t1 v2 v3]
    [0, 3, 1, 2, 4, 5]
    """
    for n in segments:
        if ranks < 1 or n % ranks:
            raise ValueError(f"a segment of {n} tokens does not split evenly over {ranks} ranks "
                             f"(segments {list(segments)})")
    shard = [n // ranks for n in segments]
    chunk = sum(shard)
    order = []
    for i, per in enumerate(shard):
        start = sum(shard[:i])
        order += [r * chunk + start + t for r in range(ranks) for t in range(per)]
    return order
