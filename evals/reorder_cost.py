"""What per-head token reordering costs inside a reordered attention call (CPU, measured).

    python evals/reorder_cost.py [--tokens 16384] [--heads 8] [--head-dim 64] [--density 0.25] [--repeats 5]

For q, k, v of (1, S, heads, head_dim) on a video grid, with one order per head cycling
through the six (F, H, W) orders, this times in one interleaved loop: reordering q, k, v
(``sparsegen.reorder_tokens``), the block-sparse attention on the reordered tokens
(``block_sparse_attention``, a random per-head block mask of the given density, 64-token
blocks, torch backend) and the inverse reordering of the output; and prints each part's
median and the reordering's share of the whole call (target below 10% at 16k tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.reorder import ORDERS, reorder_tokens


def _grid(tokens: int) -> tuple[int, int, int]:
    """A (F, H, W) grid of ``tokens`` tokens with F a power of two near the cube root."""
    f = 1
    while f * 2 <= round(tokens ** (1 / 3)) and tokens % (f * 2) == 0:
        f *= 2
    rest = tokens // f
    h = int(rest ** 0.5)
    while rest % h:
        h -= 1
    return f, h, rest // h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    grid = _grid(args.tokens)
    n = grid[0] * grid[1] * grid[2]
    orders = [ORDERS[i % len(ORDERS)] for i in range(args.heads)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, args.heads, args.head_dim, generator=g) for _ in range(3))
    nb = -(-n // 64)
    blocks = torch.rand(args.heads, nb, nb, generator=g) < args.density
    blocks |= torch.eye(nb, dtype=torch.bool)
    mask = BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=64, kv_block_size=64)
    times = {"reorder q, k, v": [], "attention": [], "inverse of the output": []}
    with torch.no_grad():
        for r in range(args.repeats + 1):  # round 0 warms up
            t0 = time.perf_counter()
            qr, kr, vr = (reorder_tokens(t, grid=grid, order=orders) for t in (q, k, v))
            t1 = time.perf_counter()
            out = block_sparse_attention(qr, kr, vr, mask, backend="torch")
            t2 = time.perf_counter()
            reorder_tokens(out, grid=grid, order=orders, inverse=True)
            t3 = time.perf_counter()
            if r:
                for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[name].append(dt)
    med = {name: statistics.median(t) for name, t in times.items()}
    total = sum(med.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"grid {grid} = {n} tokens, {args.heads} heads ({len(set(orders))} distinct orders), head dim "
          f"{args.head_dim}, fp32, block density {mask.density():.3f}, median of {args.repeats}")
    for name, m in med.items():
        spread = f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"
        print(f"  {name:22s} {m * 1e3:9.1f} ms  ({spread} ms)  {100 * m / total:5.1f}% of the call")
    share = (med["reorder q, k, v"] + med["inverse of the output"]) / total
    print(f"reordering's share of the call: {100 * share:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
