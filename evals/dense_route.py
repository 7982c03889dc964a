"""Where the CPU path's dense route pays: block gathering vs one fused dense call, against dense SDPA.

    python evals/dense_route.py [--repeats 7] [--out evals/results/engine/dense_route.csv]

At the built-in model's attention shape (batch 2 for classifier-free guidance, 6 heads,
head dim 32, fp32) and a few larger head dims, for radial masks at the built-in model's
geometry (64 tokens per latent frame) and random block masks, this times, in one process
and interleaved call by call (so a change in the machine's state hits all of them alike):

* ``sdpa``: ``F.scaled_dot_product_attention`` without a mask (what diffusers runs);
* ``blocks``: the torch path gathering the visited key blocks (``route="blocks"``);
* ``dense``: the torch path's dense route, one fused call with the mask as a token bias
  (``route="dense"``);
* ``auto``: what ``block_sparse_attention(backend="auto")`` picks
  (:func:`sparsegen.kernels.torch_backend.prefers_dense_route`).

It prints a markdown table (medians over ``--repeats`` rounds, with the spread) and
writes a long-format CSV. Run it on an idle machine: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.torch_backend import prefers_dense_route, torch_block_sparse_attention
from sparsegen.methods.radial import radial_block_mask

TOKENS_PER_FRAME = 64  # the built-in model: 8 x 8 latent tokens per frame


def _random_mask(seq: int, block: int, density: float, heads: int, seed: int = 0) -> BlockSparseMask:
    g = torch.Generator().manual_seed(seed)
    nb = -(-seq // block)
    blocks = torch.rand(heads, nb, nb, generator=g) < density
    blocks |= torch.eye(nb, dtype=torch.bool)
    return BlockSparseMask.from_block_matrix(blocks, q_len=seq, kv_len=seq, q_block_size=block, kv_block_size=block)


def cases(heads: int):
    """(label, latent frames, mask) at the built-in model's frame size."""
    for frames in (5, 9, 17, 33):
        seq = frames * TOKENS_PER_FRAME
        for block, unit in ((64, 128), (64, 64), (16, 16)):
            yield (f"radial b{block} unit {unit}", frames,
                   radial_block_mask(frames=frames, tokens_per_frame=TOKENS_PER_FRAME, block_size=block,
                                     decay_factor=1.0, decimation_unit=unit))
        for density in (0.25, 0.5, 0.9):
            yield f"random b64 {density}", frames, _random_mask(seq, 64, density, heads)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--head-dims", type=int, nargs="+", default=[32])
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=os.path.join("evals", "out", "dense_route.csv"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start "
          f"{os.getloadavg()[0]:.2f}; batch {args.batch}, {args.heads} heads, fp32, median of {args.repeats}")
    print("| mask | latent frames | tokens | d | block density | sdpa ms | blocks / sdpa | dense route / sdpa "
          "| auto picks | auto / sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for d in args.head_dims:
            for label, frames, mask in cases(args.heads):
                seq = mask.q_len
                q, k, v = (torch.randn(args.batch, seq, args.heads, d) for _ in range(3))
                scale = d ** -0.5
                fns = {
                    "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                    "blocks": lambda: torch_block_sparse_attention(q, k, v, mask, scale=scale, route="blocks"),
                    "dense": lambda: torch_block_sparse_attention(q, k, v, mask, scale=scale, route="dense"),
                }
                for fn in fns.values():  # warm-up: caches on the mask, allocator
                    fn()
                times = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(_time(fn))
                med = {n: statistics.median(t) for n, t in times.items()}
                spread = {n: (min(t), max(t)) for n, t in times.items()}
                pick = "dense" if prefers_dense_route(mask, seq, seq) else "blocks"
                density = mask.density()
                print(f"| {label} | {frames} | {seq} | {d} | {density:.3f} | {med['sdpa'] * 1e3:.2f} | "
                      f"{med['blocks'] / med['sdpa']:.2f} | {med['dense'] / med['sdpa']:.2f} | {pick} | "
                      f"{med[pick] / med['sdpa']:.2f} |", flush=True)
                for name in fns:
                    rows.append(dict(mask=label, latent_frames=frames, tokens=seq, head_dim=d, batch=args.batch,
                                     heads=args.heads, block_density=round(density, 4), method=name,
                                     median_ms=round(med[name] * 1e3, 3), min_ms=round(spread[name][0] * 1e3, 3),
                                     max_ms=round(spread[name][1] * 1e3, 3), auto_pick=pick,
                                     torch=torch.__version__, threads=torch.get_num_threads()))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
