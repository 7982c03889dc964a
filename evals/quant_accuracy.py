#!/usr/bin/env python
"""Accuracy of quantized attention against fp32 dense attention.

    python evals/quant_accuracy.py                # torch backend (the kernel's integer arithmetic)
    python evals/quant_accuracy.py --triton       # also the Triton kernel in the interpreter (slow)

Inputs as in the SageAttention accuracy check: N = 2048 tokens, head dim 64, 2 heads,
Gaussian q, k, v in fp16 with a per-channel bias on k (4 x a Gaussian per channel),
full attention. Prints cosine similarity and relative L1 error
(``sum|out - exact| / sum|exact|``) of every quantization preset against the exact
fp32 result, and the fp16 unquantized path for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", action="store_true", help="also run the Triton kernel (TRITON_INTERPRET=1 on CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    if args.triton and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from sparsegen.kernels import BlockSparseMask, block_sparse_attention
    from sparsegen.kernels.reference import reference_attention
    from sparsegen.testing import cosine, quant_accuracy_inputs, relative_l1

    q, k, v = quant_accuracy_inputs()
    mask = BlockSparseMask.full(q_len=q.shape[1], kv_len=k.shape[1])
    exact, _ = reference_attention(q, k, v, mask, dtype=torch.float32)
    backends = ["torch"] + (["triton"] if args.triton else [])
    rows = []
    for backend in backends:
        for quant in (None, "int8", "int8-pv8", "int4", "int4-pv8"):
            if backend == "triton" and quant is None:
                continue
            out = block_sparse_attention(q.half(), k.half(), v.half(), mask, backend=backend, quant=quant)
            rows.append(dict(backend=backend, quant=quant or "none (fp16)", cosine=cosine(out, exact),
                             relative_l1=relative_l1(out, exact)))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("N=2048, d=64, 2 heads, fp16 inputs, per-channel bias on k; against fp32 dense attention")
        print(f"{'backend':>8} {'quant':>12} {'cosine':>9} {'rel. L1':>8}")
        for r in rows:
            print(f"{r['backend']:>8} {r['quant']:>12} {r['cosine']:9.6f} {r['relative_l1']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
