#!/usr/bin/env python
"""CPU benchmark of block-sparse attention, with a GPU time model alongside.

Compares, in one run and on the same inputs and masks:

* ``dense_sdpa``  — ``torch.nn.functional.scaled_dot_product_attention`` (no mask), the baseline;
* ``torch``       — ``sparsegen.kernels.block_sparse_attention(..., backend="torch")``;
* ``flex``        — ``block_sparse_attention(..., backend="flex")``: our flex backend (the
  mask converted once to FlexAttention's ``BlockMask``, ``torch.compile(flex_attention)``);
  the warm-up call, which converts the mask and compiles, is excluded from the timed
  calls and reported separately (``first_call_seconds``). It runs after all uncompiled
  measurements, because compiling it in the process slowed the torch path's gathers
  for the rest of the run;
* ``torch_e2e``   — for GNA and VMoBA only: the user-facing call
  (``neighborhood_attention`` / ``vmoba_attention`` on the torch backend), which adds
  the token permutation and, for VMoBA, the block scoring and selection.

Mask kinds: ``random`` (per-head random block masks with a fixed number of key blocks
per query block, diagonal always kept), ``radial`` (``radial_block_mask``; the frame
count and decay factor are searched for the density closest to each target), ``gna``
(``neighborhood_layout`` over a 3D grid, kernel scaled per axis by the cube root of the
target density) and ``vmoba`` (``vmoba_mask``, spatiotemporal layer, top-k set to the
target share of the partition blocks) and ``agent`` (``sparsegen.agent_attention`` with M
agents, the queries averaged over strided groups; its "density" is its work against dense
attention, 2M / N, so M = density x N / 2, and its ``torch`` row is the whole agent call:
two engine calls plus the shortcut). The actual block density of every mask is
recorded; the ideal time ratio to dense is that density.

Inputs: ``torch`` and ``flex`` get q, k, v laid out (batch, seq, heads, head_dim), the
API layout, so their times include their layout handling; ``dense_sdpa`` gets contiguous
(batch, heads, seq, head_dim) copies made outside the timed region.

Output (``--out-dir``, default ``evals/out/bench``): ``bench_attention.csv`` in long
format (one row per method x case; every time is the median of ``--repeats`` calls) and
``bench_attention.png``. Model columns (``model_<arch>_bf16_*``) are predictions of
:mod:`sparsegen.kernels.timemodel` for the GPU kernel in bf16 on that mask: a **model**,
not a measurement.

Examples::

    python evals/bench_attention.py --quick
    python evals/bench_attention.py                      # the full grid (several minutes)
    python evals/bench_attention.py --seq-lens 16384 --head-dims 128 --kinds random,radial
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from sparsegen.agent import agent_attention
from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.kernels.timemodel import predict_kernel_time

FULL = dict(seq_lens=(4096, 16384), head_dims=(64, 128), densities=(0.1, 0.25, 0.5), repeats=5)
QUICK = dict(seq_lens=(2048,), head_dims=(64,), densities=(0.25, 0.5), repeats=3)
ALL_KINDS = ("random", "radial", "gna", "vmoba", "agent")
ALL_METHODS = ("dense_sdpa", "torch", "flex", "torch_e2e")
MODEL_ARCHS = ("h100", "a100")
# The performance target of the torch path: at most this many times density x dense time.
TARGET_FACTOR = 1.5

CSV_COLUMNS = [
    "run_id", "timestamp_utc", "torch_version", "python", "machine", "threads", "load_1m_start", "load_1m_end",
    "method", "backend", "mask_kind", "mask_params", "seq_len", "kernel_seq_len", "batch", "heads", "head_dim",
    "dtype", "block_size", "target_density", "density", "token_density", "repeats", "seconds", "seconds_min",
    "seconds_max", "first_call_seconds", "dense_seconds", "ratio_to_dense", "ideal_ratio", "target_ratio",
    "meets_target", "speedup_vs_dense", "cpu_seconds", "dense_cpu_seconds", "cpu_ratio_to_dense", "meets_target_cpu",
    "max_abs_diff_vs_torch",
] + [f"model_{a}_bf16_{c}" for a in MODEL_ARCHS for c in ("seconds", "dense_seconds", "speedup")]


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One sparse problem: a mask over the kernel's token order and optional end-to-end call."""

    kind: str
    target_density: float
    params: str
    mask: BlockSparseMask
    # Map (B, S, H, D) inputs in grid order to the kernel's token order (identity for random/radial).
    permute_q: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    permute_kv: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    # The user-facing call (q, k, v) -> out, for torch_e2e rows.
    end_to_end: Optional[Callable] = None
    token_density: Optional[float] = None


def _pow2_grid(seq_len: int) -> tuple[int, int, int]:
    """A (T, H, W) grid of ``seq_len`` tokens, as balanced as powers of two allow."""
    if seq_len < 8 or seq_len & (seq_len - 1):
        raise ValueError(f"GNA and VMoBA rows need a power-of-two sequence length >= 8 to form a (T, H, W) "
                         f"grid; got seq_len={seq_len}. Drop them with --kinds random,radial")
    e = seq_len.bit_length() - 1
    t = e // 3
    h = (e - t) // 2
    return (1 << t, 1 << h, 1 << (e - t - h))


def random_case(seq_len: int, heads: int, block: int, density: float, gen: torch.Generator) -> Case:
    nb = math.ceil(seq_len / block)
    per_row = max(1, min(nb, round(density * nb)))
    # Diagonal first, then per_row - 1 other blocks drawn without replacement.
    scores = torch.rand(heads, nb, nb, generator=gen)
    scores += 2.0 * torch.eye(nb)
    keep = scores.topk(per_row, dim=-1).indices
    blocks = torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(-1, keep, True)
    mask = BlockSparseMask.from_block_matrix(blocks, q_len=seq_len, kv_len=seq_len, q_block_size=block,
                                             kv_block_size=block)
    return Case("random", density, f"blocks_per_row={per_row}", mask, token_density=mask.density())


def radial_case(seq_len: int, block: int, density: float) -> Optional[Case]:
    from sparsegen.methods.radial import radial_block_mask

    best = None
    frames_options = [f for f in (4, 8, 16, 32, 64, 128, 256) if seq_len % f == 0 and seq_len // f >= block // 2]
    for frames in frames_options:
        for decay in (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
            for sink in (True, False):
                try:
                    m = radial_block_mask(frames=frames, tokens_per_frame=seq_len // frames, block_size=block,
                                          decay_factor=decay, sink=sink)
                except ValueError:
                    continue
                err = abs(math.log(m.density() / density))
                if best is None or err < best[0] - 1e-12:
                    best = (err, m, f"frames={frames},tokens_per_frame={seq_len // frames},decay={decay},sink={sink}")
    if best is None:
        return None
    return Case("radial", density, best[2], best[1], token_density=best[1].density())


def gna_case(seq_len: int, block: int, density: float) -> Case:
    from sparsegen.neighborhood import neighborhood_attention, neighborhood_layout

    grid = _pow2_grid(seq_len)
    kernel = tuple(max(1, min(n, round(n * density ** (1 / 3)))) for n in grid)
    layout = neighborhood_layout(grid, kernel, block_size=block)
    stats = layout.stats()

    def e2e(q, k, v):
        return neighborhood_attention(q, k, v, grid=grid, kernel_size=kernel, backend="torch")

    return Case("gna", density, f"grid={grid},kernel={kernel},tile={layout.q_tile}", layout.mask,
                permute_q=layout.q_layout.apply, permute_kv=layout.kv_layout.apply, end_to_end=e2e,
                token_density=stats["token_density"])


def vmoba_case(q: torch.Tensor, k: torch.Tensor, block: int, density: float) -> Case:
    from sparsegen.methods.vmoba import VMoBAConfig, vmoba_attention, vmoba_mask

    seq_len = q.shape[1]
    grid = _pow2_grid(seq_len)
    extent = (min(grid[0], 4), min(grid[1], 8), min(grid[2], 8))
    parts = math.prod(math.ceil(g / e) for g, e in zip(grid, extent))
    top_k = max(1, min(parts, round(density * parts)))
    cfg = VMoBAConfig(spatiotemporal_block=extent, top_k=top_k, block_size=block)
    layer = 2  # the spatiotemporal (3D) layer kind
    mask, perm = vmoba_mask(q, k, grid, layer, cfg)

    def e2e(q_, k_, v_):
        return vmoba_attention(q_, k_, v_, grid=grid, layer=layer, config=cfg, backend="torch")

    return Case("vmoba", density, f"grid={grid},block={extent},top_k={top_k}/{parts},layer={layer}", mask,
                permute_q=perm.apply, permute_kv=perm.apply, end_to_end=e2e, token_density=mask.density())


# ---------------------------------------------------------------------------- timing
def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@dataclass
class Timing:
    """Wall-clock times of the timed calls, their process CPU times, the first (warm-up) call's wall time."""

    wall: list[float]
    cpu: list[float]
    first: float


def time_calls(fn: Callable[[], torch.Tensor], repeats: int, warmup: int) -> tuple[Timing, torch.Tensor]:
    """Time ``repeats`` calls after ``warmup`` untimed ones; returns the timing and the last output.

    CPU time (all threads of this process) is recorded next to wall time: on a shared
    machine it is less sensitive to other processes taking turns on the cores.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(wall, cpu, first), out


def _model_columns(mask: BlockSparseMask, batch: int, heads: int, head_dim: int) -> dict:
    cols = {}
    for arch in MODEL_ARCHS:
        p = predict_kernel_time(mask, batch=batch, heads=heads, head_dim=head_dim, dtype=torch.bfloat16, arch=arch)
        cols[f"model_{arch}_bf16_seconds"] = p.seconds
        cols[f"model_{arch}_bf16_dense_seconds"] = p.dense_seconds
        cols[f"model_{arch}_bf16_speedup"] = p.speedup
    return cols


def _allow_recompiles() -> None:
    """Let dynamo compile flex for every case of the run.

    Every mask layout size, tile count and head dim is a new compile of
    ``flex_attention``; past dynamo's default limit of 8 the flex backend would raise.
    Set here, in the script's run, not by the library.
    """
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)


# ---------------------------------------------------------------------------- main loop
def run(args) -> list[dict]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    methods = args.methods
    dtype = torch.float32
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    common = dict(run_id=run_id, timestamp_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  torch_version=torch.__version__, python=platform.python_version(),
                  machine=f"{platform.machine()} {os.cpu_count()} cpus", threads=torch.get_num_threads(),
                  load_1m_start=round(_load(), 2), batch=args.batch, dtype="float32", block_size=args.block_size)
    rows: list[dict] = []

    def emit(row: dict):
        rows.append({**common, **row})
        r = rows[-1]
        ratio = r.get("ratio_to_dense")
        print(f"{r['method']:>10} {r['mask_kind']:>7} S={r['seq_len']:>5} H={r['heads']} d={r['head_dim']:>3} "
              f"density={r['density']:.3f} {r['seconds'] * 1e3:9.1f} ms (cpu {r['cpu_seconds'] * 1e3:9.1f} ms)"
              + (f"  ratio={ratio:.3f} (target <= {r['target_ratio']:.3f})" if r.get("target_ratio") else
                 (f"  ratio={ratio:.3f}" if ratio is not None else ""))
              + (f"  first call (mask conversion + compile) {r['first_call_seconds']:.1f} s"
                 if r["method"] == "flex" else ""), flush=True)

    # Phase 1: dense SDPA, the torch path and the end-to-end calls, before anything is
    # compiled. Compiling FlexAttention in this process slowed the torch path's gathers
    # by up to 4x for the rest of the process (measured on the 2-core machine), so
    # compiled FlexAttention runs in phase 2, on the same inputs and masks.
    pending = []  # (case, q, k, v, shape, dense times) for phase 2
    for seq_len in args.seq_lens:
        for head_dim in args.head_dims:
            h = args.heads
            q = torch.randn(args.batch, seq_len, h, head_dim, generator=gen, dtype=dtype)
            k = torch.randn(args.batch, seq_len, h, head_dim, generator=gen, dtype=dtype)
            v = torch.randn(args.batch, seq_len, h, head_dim, generator=gen, dtype=dtype)
            shape = dict(seq_len=seq_len, heads=h, head_dim=head_dim)
            qd, kd, vd = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            timing, _ = time_calls(lambda: sdpa(qd, kd, vd), args.repeats, args.warmup)
            dense_s = statistics.median(timing.wall)
            dense_cpu = statistics.median(timing.cpu)
            full = BlockSparseMask.full(q_len=seq_len, kv_len=seq_len, q_block_size=args.block_size,
                                        kv_block_size=args.block_size)
            emit(dict(method="dense_sdpa", backend="sdpa", mask_kind="dense", mask_params="", kernel_seq_len=seq_len,
                      target_density=1.0, density=1.0, token_density=1.0, repeats=args.repeats, seconds=dense_s,
                      seconds_min=min(timing.wall), seconds_max=max(timing.wall), first_call_seconds=timing.first,
                      dense_seconds=dense_s, ratio_to_dense=1.0, ideal_ratio=1.0, target_ratio=None,
                      meets_target=None, speedup_vs_dense=1.0, cpu_seconds=dense_cpu, dense_cpu_seconds=dense_cpu,
                      cpu_ratio_to_dense=1.0, meets_target_cpu=None, max_abs_diff_vs_torch=None,
                      **shape, **_model_columns(full, args.batch, h, head_dim)))
            del qd, kd, vd
            for kind in args.kinds:
                for density in args.densities:
                    if kind == "agent":
                        _run_agent(q, k, v, density, shape, (dense_s, dense_cpu), args, emit)
                        continue
                    if kind == "random":
                        case = random_case(seq_len, h, args.block_size, density, gen)
                    elif kind == "radial":
                        case = radial_case(seq_len, args.block_size, density)
                        if case is None:
                            print(f"# no radial mask fits S={seq_len} with block {args.block_size}; skipped")
                            continue
                    elif kind == "gna":
                        case = gna_case(seq_len, args.block_size, density)
                    else:
                        case = vmoba_case(q, k, args.block_size, density)
                    _run_uncompiled(case, q, k, v, shape, (dense_s, dense_cpu), args, emit)
                    pending.append((case, q, k, v, shape, (dense_s, dense_cpu)))
            # Partial results survive an interrupted run (rewritten after every shape).
            write_csv(rows, os.path.join(args.out_dir, "bench_attention.partial.csv"))
    if "flex" in methods:
        _allow_recompiles()
        for case, q, k, v, shape, dense in pending:
            _run_flex(case, q, k, v, shape, dense, args, emit)
        write_csv(rows, os.path.join(args.out_dir, "bench_attention.partial.csv"))
    end = round(_load(), 2)
    for r in rows:
        r["load_1m_end"] = end
    return rows


def _case_rows(case: Case, kernel_seq_len: int, shape, dense, args, emit):
    """Per-case constants and a row writer: row(method, backend, timing, diff=None, target=False)."""
    dense_s, dense_cpu = dense
    density = case.mask.density()
    model = _model_columns(case.mask, args.batch, shape["heads"], shape["head_dim"])
    base = dict(mask_kind=case.kind, mask_params=case.params, kernel_seq_len=kernel_seq_len,
                target_density=case.target_density, density=density, token_density=case.token_density,
                repeats=args.repeats, dense_seconds=dense_s, dense_cpu_seconds=dense_cpu, ideal_ratio=density, **shape,
                **model)

    def row(method, backend, timing: Timing, diff=None, target=False):
        med, cpu = statistics.median(timing.wall), statistics.median(timing.cpu)
        ratio, cpu_ratio = med / dense_s, cpu / dense_cpu
        tr = TARGET_FACTOR * density if target else None
        emit(dict(base, method=method, backend=backend, seconds=med, seconds_min=min(timing.wall),
                  seconds_max=max(timing.wall), first_call_seconds=timing.first, ratio_to_dense=ratio, target_ratio=tr,
                  meets_target=(ratio <= tr) if target else None, speedup_vs_dense=dense_s / med, cpu_seconds=cpu,
                  cpu_ratio_to_dense=cpu_ratio, meets_target_cpu=(cpu_ratio <= tr) if target else None,
                  max_abs_diff_vs_torch=diff))

    return row


def _run_uncompiled(case: Case, q, k, v, shape, dense, args, emit) -> None:
    qp, kp, vp = case.permute_q(q), case.permute_kv(k), case.permute_kv(v)
    row = _case_rows(case, qp.shape[1], shape, dense, args, emit)
    if "torch" in args.methods:
        timing, _ = time_calls(
            lambda: block_sparse_attention(qp, kp, vp, case.mask, backend="torch"), args.repeats, args.warmup)
        row("torch", "torch", timing, target=True)
    if "torch_e2e" in args.methods and case.end_to_end is not None:
        timing, _ = time_calls(lambda: case.end_to_end(q, k, v), args.repeats, args.warmup)
        row("torch_e2e", "torch", timing)


def _run_agent(q, k, v, density, shape, dense, args, emit) -> None:
    """Agent attention with M = density * N / 2 agents (strided query means), torch backend."""
    n = q.shape[1]
    m = max(1, round(density * n / 2))
    stride = n // m
    agents = q[:, : m * stride].reshape(q.shape[0], m, stride, *q.shape[2:]).mean(2)
    # GPU model: the two full attentions' times add up; the dense reference is the N x N kernel's.
    parts = [_model_columns(BlockSparseMask.full(q_len=a, kv_len=b, q_block_size=64, kv_block_size=64), args.batch,
                            shape["heads"], shape["head_dim"]) for a, b in ((m, n), (n, m))]
    full = _model_columns(BlockSparseMask.full(q_len=n, kv_len=n, q_block_size=args.block_size,
                                               kv_block_size=args.block_size), args.batch, shape["heads"],
                          shape["head_dim"])
    model = {}
    for arch in MODEL_ARCHS:
        t = sum(p[f"model_{arch}_bf16_seconds"] for p in parts)
        d = full[f"model_{arch}_bf16_dense_seconds"]
        model.update({f"model_{arch}_bf16_seconds": t, f"model_{arch}_bf16_dense_seconds": d,
                      f"model_{arch}_bf16_speedup": d / t})
    timing, _ = time_calls(lambda: agent_attention(q, k, v, agents, backend="torch"), args.repeats, args.warmup)
    dense_s, dense_cpu = dense
    med, cpu = statistics.median(timing.wall), statistics.median(timing.cpu)
    work = 2 * m / n
    target = TARGET_FACTOR * work
    emit(dict(method="torch", backend="torch", mask_kind="agent", mask_params=f"agents={m}", kernel_seq_len=n,
              target_density=density, density=work, token_density=work, repeats=args.repeats,
              dense_seconds=dense_s, dense_cpu_seconds=dense_cpu, ideal_ratio=work, seconds=med,
              seconds_min=min(timing.wall), seconds_max=max(timing.wall), first_call_seconds=timing.first,
              ratio_to_dense=med / dense_s, target_ratio=target, meets_target=med / dense_s <= target,
              speedup_vs_dense=dense_s / med, cpu_seconds=cpu, cpu_ratio_to_dense=cpu / dense_cpu,
              meets_target_cpu=cpu / dense_cpu <= target, max_abs_diff_vs_torch=None, **shape, **model))


def _run_flex(case: Case, q, k, v, shape, dense, args, emit) -> None:
    qp, kp, vp = case.permute_q(q), case.permute_kv(k), case.permute_kv(v)
    row = _case_rows(case, qp.shape[1], shape, dense, args, emit)
    timing, out = time_calls(lambda: block_sparse_attention(qp, kp, vp, case.mask, backend="flex"),
                             args.repeats, args.warmup)
    diff = None
    if "torch" in args.methods:  # agreement with the torch path (recomputed, untimed)
        torch_out = block_sparse_attention(qp, kp, vp, case.mask, backend="torch")
        diff = float((out - torch_out).abs().max())
    row("flex", "flex", timing, diff)


# ---------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in CSV_COLUMNS})


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["seq_len"] for r in rows})
    kinds = [k for k in ALL_KINDS if any(r["mask_kind"] == k for r in rows)] or ["dense"]
    fig, axes = plt.subplots(len(seqs), len(kinds), figsize=(4.2 * len(kinds), 3.6 * len(seqs)), squeeze=False)
    styles = {"torch": "o-", "flex": "s--", "torch_e2e": "^:"}
    for i, s in enumerate(seqs):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            sel = [r for r in rows if r["seq_len"] == s and r["mask_kind"] == kind]
            xs = [r["density"] for r in sel] or [1.0]
            hi = min(1.0, max(xs) * 1.15)
            ax.plot([0, hi], [0, hi], color="0.6", lw=1, label="ideal (= density)")
            ax.plot([0, hi], [0, TARGET_FACTOR * hi], color="0.6", lw=1, ls="--",
                    label=f"target ({TARGET_FACTOR} x density)")
            for method in ("torch", "flex", "torch_e2e"):
                for d in sorted({r["head_dim"] for r in sel}):
                    pts = sorted((r["density"], r["ratio_to_dense"]) for r in sel
                                 if r["method"] == method and r["head_dim"] == d)
                    if pts:
                        ax.plot(*zip(*pts), styles[method], label=f"{method} d={d}", ms=4)
            ax.set_xlim(0, hi)
            ax.set_ylim(0, None)
            ax.set_title(f"{kind}, S={s} (measured, CPU)", fontsize=9)
            ax.set_xlabel("block density")
            ax.set_ylabel("time / dense SDPA time")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """A Markdown table per case: torch path vs target and vs compiled flex (wall and CPU time), model speedups."""
    lines = ["| kind | S | d | density | dense ms | torch ms | torch / dense | torch / dense (cpu) "
             "| target torch / dense <= 1.5 x density (wall / cpu) | flex ms | flex / dense | torch faster than flex (wall / cpu) "
             "| model H100 bf16 speedup | model A100 bf16 speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cases: dict = {}
    for r in rows:
        if r["method"] != "dense_sdpa":
            key = (r["mask_kind"], r["seq_len"], r["head_dim"], r["target_density"], r["mask_params"])
            cases.setdefault(key, {})[r["method"]] = r

    def ms(r):
        return "-" if r is None else f"{r['seconds'] * 1e3:.1f}"

    def verdict(flag):
        return "met" if flag else "MISSED"

    for key in sorted(cases, key=lambda k: (ALL_KINDS.index(k[0]), k[1], k[2], k[3])):
        c = cases[key]
        any_r = next(iter(c.values()))
        t, f = c.get("torch"), c.get("flex")
        ratio = f"{t['ratio_to_dense']:.3f}" if t else "-"
        cpu_ratio = f"{t['cpu_ratio_to_dense']:.3f}" if t else "-"
        target = (f"{verdict(t['meets_target'])} / {verdict(t['meets_target_cpu'])} (<= {t['target_ratio']:.3f})"
                  if t else "-")
        flex_ratio = f"{f['ratio_to_dense']:.3f}" if f else "-"
        faster = "-"
        if t and f:
            wall_x, cpu_x = f["seconds"] / t["seconds"], f["cpu_seconds"] / t["cpu_seconds"]
            faster = (f"{'yes' if wall_x > 1 else 'NO'} / {'yes' if cpu_x > 1 else 'NO'} "
                      f"({wall_x:.2f}x / {cpu_x:.2f}x)")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {any_r['density']:.3f} | {any_r['dense_seconds'] * 1e3:.1f} "
            f"| {ms(t)} | {ratio} | {cpu_ratio} | {target} | {ms(f)} | {flex_ratio} | {faster} "
            f"| {any_r['model_h100_bf16_speedup']:.2f} | {any_r['model_a100_bf16_speedup']:.2f} |")
    return "\n".join(lines)


def model_summary(rows: list[dict]) -> str:
    """A Markdown table of the GPU time model (bf16) for every case: model outputs, not measurements."""
    lines = ["| kind | S | heads | d | density | model H100 bf16 us | model H100 dense us | model H100 speedup "
             "| model A100 bf16 us | model A100 dense us | model A100 speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    order = ("dense",) + ALL_KINDS
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["head_dim"], order.index(r["mask_kind"]), r["density"])):
        key = (r["mask_kind"], r["seq_len"], r["head_dim"], r["mask_params"], r["density"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(
            f"| {r['mask_kind']} | {r['seq_len']} | {r['heads']} | {r['head_dim']} | {r['density']:.3f} "
            f"| {r['model_h100_bf16_seconds'] * 1e6:.1f} | {r['model_h100_bf16_dense_seconds'] * 1e6:.1f} "
            f"| {r['model_h100_bf16_speedup']:.2f} | {r['model_a100_bf16_seconds'] * 1e6:.1f} "
            f"| {r['model_a100_bf16_dense_seconds'] * 1e6:.1f} | {r['model_a100_bf16_speedup']:.2f} |")
    return "\n".join(lines)


def _csv_list(kind, allowed=None):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            vals = tuple(kind(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not vals:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        if allowed is not None:
            bad = [x for x in vals if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return vals
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small subset: S={QUICK['seq_lens']}, d={QUICK['head_dims']}, densities={QUICK['densities']}, "
                        f"{QUICK['repeats']} repeats (explicit flags still override)")
    p.add_argument("--seq-lens", type=_csv_list(int), help=f"default {FULL['seq_lens']}")
    p.add_argument("--head-dims", type=_csv_list(int), help=f"default {FULL['head_dims']}")
    p.add_argument("--densities", type=_csv_list(float), help=f"target block densities, default {FULL['densities']}")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's default); 1 gives steadier numbers "
                        "on a machine other jobs share")
    p.add_argument("--block-size", type=int, default=128, help="query and key block size (default 128)")
    p.add_argument("--kinds", type=_csv_list(str, ALL_KINDS), default=ALL_KINDS,
                   help=f"mask kinds, default {','.join(ALL_KINDS)}")
    p.add_argument("--methods", type=_csv_list(str, ALL_METHODS), default=ALL_METHODS,
                   help=f"methods, default {','.join(ALL_METHODS)} (dense_sdpa always runs: it is the baseline)")
    p.add_argument("--repeats", type=int, help=f"timed calls per measurement (median), default {FULL['repeats']}")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (>= 1; includes compilation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("seq_lens", "head_dims", "densities", "repeats"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name, low in (("heads", 1), ("batch", 1), ("block_size", 16), ("repeats", 1), ("warmup", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    bad = [d for d in args.densities if not 0 < d <= 1]
    if bad:
        p.error(f"--densities must be in (0, 1], got {bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    command = " ".join(["python", "evals/bench_attention.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"# bench_attention: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {_load():.2f}; command: {command}", flush=True)
    rows = run(args)
    csv_path = os.path.join(args.out_dir, "bench_attention.csv")
    write_csv(rows, csv_path)
    print(f"# wrote {csv_path}")
    if not args.no_plot:
        png = os.path.join(args.out_dir, "bench_attention.png")
        plot(rows, png)
        print(f"# wrote {png}")
    measured = summary(rows)
    model = model_summary(rows)
    md_path = os.path.join(args.out_dir, "bench_attention.md")
    with open(md_path, "w") as f:
        f.write(f"Command: `{command}`\n\nLoad average (1 min) at start / end: {rows[0]['load_1m_start']} / "
                f"{rows[0]['load_1m_end']}; torch {torch.__version__}, {torch.get_num_threads()} threads.\n\n"
                f"Measured on CPU (fp32, median of {args.repeats} calls):\n\n{measured}\n\n"
                f"GPU time **model** (sparsegen.kernels.timemodel, bf16; predicted, not measured):\n\n{model}\n")
    print(f"# wrote {md_path}")
    print("\nMeasured on CPU:\n" + measured)
    print("\nGPU time model (sparsegen.kernels.timemodel, bf16; predicted, not measured):\n" + model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
