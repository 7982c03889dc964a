"""Print the GPU time **model** table of evals/results/engine.md (predicted, never measured).

For the masks of the CPU benchmark's grid (random, radial, GNA, VMoBA at densities
0.1 / 0.25 / 0.5, built by ``evals/bench_attention.py``'s case builders, which time
nothing), this prints :mod:`sparsegen.kernels.timemodel`'s prediction for the Triton
forward in bf16 on an H100 and an A100: time, speedup over the same kernel on a dense
mask, and on the H100 at head dim 128 the speedup over FlashAttention-3's published
dense throughput (the range at 750 and 600 TFLOP/s). The per-tile costs are the issue
clocks the GPU gate measured in the kernels' SASS (``sparsegen.kernels.gate_clocks``).

Usage::

    python evals/gpu_model.py [--seq-lens 4096 16384 65536] [--head-dims 64 128]
"""

from __future__ import annotations

import argparse
import sys

import bench_attention  # evals/bench_attention.py: its case builders (nothing is timed)
import torch

from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.timemodel import predict_kernel_time


HEADS = 24  # HunyuanVideo / Wan 14B-like width; the model's ratios barely depend on it


def cases(seq_len: int, head_dim: int, block: int = 128):
    gen = torch.Generator().manual_seed(0)
    yield "dense", 1.0, BlockSparseMask.full(q_len=seq_len, kv_len=seq_len, q_block_size=block, kv_block_size=block)
    for density in (0.1, 0.25, 0.5):
        yield "random", density, bench_attention.random_case(seq_len, HEADS, block, density, gen).mask
        rad = bench_attention.radial_case(seq_len, block, density)
        if rad is not None:
            yield "radial", density, rad.mask
        yield "gna", density, bench_attention.gna_case(seq_len, block, density).mask
        q = torch.randn(1, seq_len, 1, head_dim, generator=gen)
        k = torch.randn(1, seq_len, 1, head_dim, generator=gen)
        yield "vmoba", density, bench_attention.vmoba_case(q, k, block, density).mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args(argv)
    print("| kind | S | d | block density | partial tiles | model H100 bf16 us | vs our dense kernel "
          "| vs FA3 (750-600 TFLOP/s) | model A100 bf16 us | vs our dense kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.seq_lens:
        for d in args.head_dims:
            for kind, _, mask in cases(seq, d):
                heads = HEADS if mask.shape[1] == 1 else mask.shape[1]
                h = predict_kernel_time(mask, batch=1, heads=heads, head_dim=d, dtype=torch.bfloat16, arch="h100")
                a = predict_kernel_time(mask, batch=1, heads=heads, head_dim=d, dtype=torch.bfloat16, arch="a100")
                fa3 = "-" if h.speedup_vs_fa3 is None else f"{h.speedup_vs_fa3[0]:.2f}-{h.speedup_vs_fa3[1]:.2f}"
                print(f"| {kind} | {seq} | {d} | {mask.density():.3f} | {h.partial_tiles / max(1, h.visited_tiles):.2f} "
                      f"| {h.seconds * 1e6:.1f} | {h.speedup:.2f} | {fa3} | {a.seconds * 1e6:.1f} | {a.speedup:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
