"""A GPU time **model** of the block-sparse forward kernel: predicted, never measured.

The project's machines have no GPU, so this module *predicts* what the Triton forward
kernel would take on a GPU from two things that can be known without one: the mask's
visited tiles, and the instructions the compiled kernel issues per tile, read from its
SASS by the ahead-of-time gate (:mod:`.gpu_check`, tabulated in :mod:`.gate_clocks`).
Everything it returns is a model output and is labelled so.

What is modelled (one program = one (batch, head, query block), as the kernel launches)::

    per visited tile of qbs x kbs tokens = u units of 64 x 64 (u = qbs * kbs / 4096):
        full tile      u * max(issue clocks per unit, tensor-core clocks per unit)
        partial tile   u * max(partial-loop issue clocks per unit, tensor-core clocks per unit)
    per program:       program_overhead_cycles (prologue: Q load; epilogue: O, LSE)

    compute time = max(sum of program clocks / SMs,   programs spread evenly over the SMs
                       longest program) / clock       a program never splits across SMs
    memory time  = HBM bytes / HBM bandwidth
    kernel time  = max(compute time, memory time) + launch_seconds

The issue clocks are the SM's: the loop's instructions x warps / 4 schedulers, per unit
(several resident CTAs share the same four schedulers, so the per-SM rate does not
depend on occupancy); the kernel is issue-bound where they exceed the tensor cores'
clocks. Latency that the resident warps fail to hide is not modelled (an optimistic
assumption: a tile is never slower than its issue or tensor-core time).

HBM bytes: Q read and O written once per program (plus the fp32 LSE); K and V of each
key block read from HBM once per (batch, head) that visits it: the programs of one head
run together (the grid's fastest axis is the query block) and the L2 cache serves the
repeats. There is no cliff where long sequences re-read K/V from HBM per tile: attention
with 64 x 64 or larger tiles does ``2 * D`` flops per byte of K/V read from L2, far above
what L2 can starve on these GPUs, so a dense long sequence stays compute-bound (as
FlashAttention measures).

Two comparisons come with each prediction:

* ``speedup``: against this kernel on an all-visited mask of the same geometry (the
  model's own dense time, so fixed costs count on both sides and a dense mask gives 1);
* ``speedup_vs_fa3``: against FlashAttention-3's published dense forward throughput
  (600-750 TFLOP/s, bf16 / fp16, head dim 128, H100; :data:`FA3_FORWARD_FLOPS`), as the
  (low, high) pair at 750 and 600 TFLOP/s. None where no anchor is published (other
  GPUs, dtypes or head dims).

Example::

    >>> m = BlockSparseMask.full(q_len=16384, kv_len=16384)
    >>> p = predict_kernel_time(m, batch=1, heads=24, head_dim=128, dtype=torch.bfloat16, arch="h100")
    >>> p.speedup
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch

from . import gate_clocks
from .mask import BlockSparseMask

__all__ = [
    "GPUArch",
    "ModelAssumptions",
    "KernelTimeModel",
    "TileClocks",
    "ARCHS",
    "FA3_FORWARD_FLOPS",
    "tile_clocks",
    "predict_kernel_time",
    "predict_speedup",
]

# FlashAttention-3's dense forward, bf16 / fp16, head dim 128, H100 SXM: 600-750 TFLOP/s
# (published; the range spans sequence lengths and causal / non-causal).
FA3_FORWARD_FLOPS = (600e12, 750e12)


@dataclass(frozen=True)
class GPUArch:
    """One GPU (model inputs; published figures, not measurements).

    Attributes:
        name: label used in reports.
        gate_arch: the gate's architecture key whose measured clocks apply (80, 86, 89, 90).
        num_sms: streaming multiprocessors.
        clock_hz: SM clock used to convert cycle counts.
        mma_flops_per_clock: dense 16-bit tensor-core FLOP per clock per SM (multiply-add = 2).
        hbm_bytes_per_s: DRAM bandwidth.
        launch_seconds: fixed kernel launch latency.
    """

    name: str
    gate_arch: int
    num_sms: int
    clock_hz: float
    mma_flops_per_clock: int
    hbm_bytes_per_s: float
    launch_seconds: float = 4e-6

    def __post_init__(self):
        for f in ("clock_hz", "hbm_bytes_per_s"):
            val = getattr(self, f)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"GPUArch.{f} must be a positive finite number, got {val!r}")
        for f in ("num_sms", "mma_flops_per_clock"):
            val = getattr(self, f)
            if not (isinstance(val, int) and not isinstance(val, bool) and val >= 1):
                raise ValueError(f"GPUArch.{f} must be an int >= 1, got {val!r}")
        if self.gate_arch not in gate_clocks.ARCHS:
            raise ValueError(f"GPUArch.gate_arch must be one of {gate_clocks.ARCHS}, got {self.gate_arch!r}")
        if not (math.isfinite(self.launch_seconds) and self.launch_seconds >= 0):
            raise ValueError(f"GPUArch.launch_seconds must be >= 0, got {self.launch_seconds!r}")

    @property
    def matmul_flops_16bit(self) -> float:
        """Dense bf16 / fp16 tensor-core peak of the chip, FLOP/s."""
        return self.num_sms * self.clock_hz * self.mma_flops_per_clock


# H100 SXM: 132 SMs x 1.83 GHz x 4096 FLOP/clk/SM = 989 TFLOP/s dense bf16, 3.35 TB/s HBM3.
# A100 SXM: 108 SMs x 1.41 GHz x 2048 = 312 TFLOP/s, 2.0 TB/s HBM2e.
ARCHS: dict[str, GPUArch] = {
    "h100": GPUArch("H100", 90, 132, 1.83e9, 4096, 3.35e12),
    "a100": GPUArch("A100", 80, 108, 1.41e9, 2048, 2.0e12),
}


@dataclass(frozen=True)
class ModelAssumptions:
    """Knobs of the model (see the module docstring).

    Attributes:
        program_overhead_cycles: fixed cycles per program (prologue and epilogue).
    """

    program_overhead_cycles: float = 2000.0

    def __post_init__(self):
        if not self.program_overhead_cycles >= 0:
            raise ValueError(f"ModelAssumptions.program_overhead_cycles must be >= 0, "
                             f"got {self.program_overhead_cycles!r}")


@dataclass(frozen=True)
class TileClocks:
    """SM clocks per 64 x 64 unit of one forward build, as the gate measured them (model inputs).

    Attributes:
        full: issue clocks per unit of the full-block loop.
        partial: issue clocks per unit of the partial-block loop.
        mma: tensor-core clocks per unit at the dense peak.
        build: the gate build they come from.
    """

    full: float
    partial: float
    mma: float
    build: str = ""

    def unit_clocks(self, partial: bool) -> float:
        """Clocks one unit costs: the larger of its issue and tensor-core time."""
        return max(self.partial if partial else self.full, self.mma)


@dataclass(frozen=True)
class KernelTimeModel:
    """A model prediction (not a measurement) for one mask and problem size.

    Attributes:
        arch: architecture name.
        seconds: modelled kernel time for the mask.
        dense_seconds: modelled time of this kernel on an all-visited mask of the same geometry.
        speedup: dense_seconds / seconds.
        fa3_seconds: (low, high) modelled FlashAttention-3 dense time from its published
            throughput (at 750 and 600 TFLOP/s), or None where no anchor applies.
        speedup_vs_fa3: (low, high) = fa3_seconds / seconds, or None.
        compute_seconds, memory_seconds: the two roofline terms for the mask.
        bound: "compute" or "memory" (which term sets the time).
        visited_tiles, partial_tiles, total_tiles: tile counts over batch and heads.
        flops: tensor-core flops of the visited tiles.
        hbm_bytes: modelled DRAM traffic.
        clocks: the gate's clocks used.
    """

    arch: str
    seconds: float
    dense_seconds: float
    speedup: float
    fa3_seconds: Optional[tuple[float, float]]
    speedup_vs_fa3: Optional[tuple[float, float]]
    compute_seconds: float
    memory_seconds: float
    bound: str
    visited_tiles: int
    partial_tiles: int
    total_tiles: int
    flops: float
    hbm_bytes: float
    clocks: TileClocks
    assumptions: ModelAssumptions = field(default_factory=ModelAssumptions)


def _resolve_arch(arch: Union[str, GPUArch]) -> GPUArch:
    if isinstance(arch, GPUArch):
        return arch
    if isinstance(arch, str) and arch.lower() in ARCHS:
        return ARCHS[arch.lower()]
    raise ValueError(f"arch must be one of {sorted(ARCHS)} or a GPUArch, got {arch!r}")


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "int8"}


def tile_clocks(arch: Union[str, GPUArch], dtype: torch.dtype, head_dim: int, mask_block: int,
                table: Optional[Mapping] = None) -> TileClocks:
    """The gate's clocks for the forward build serving (arch, dtype, head dim, mask block).

    ``dtype=torch.int8`` means the INT8 forward (INT8 Q·K, half P·V) with bf16 output.
    Head dims and mask blocks the gate does not compile take the nearest gated one above
    (the tile they run on); ``table`` defaults to :data:`.gate_clocks.CLOCKS`.
    """
    a = _resolve_arch(arch)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")
    table = gate_clocks.CLOCKS if table is None else table
    kernel, dt = ("fwd_quant", "bf16") if dtype == torch.int8 else ("fwd", _DTYPES[dtype])
    dims = sorted({k[3] for k in table if k[0] == a.gate_arch and k[1] == kernel})
    blocks = sorted({k[4] for k in table if k[0] == a.gate_arch and k[1] == kernel})
    if not dims or not blocks:
        raise ValueError(f"the gate clock table has no {kernel} builds for sm_{a.gate_arch}; "
                         "regenerate it with `python -m sparsegen.kernels.gpu_check --write-clocks`")
    hd = next((d for d in dims if d >= head_dim), dims[-1])
    mb = next((b for b in blocks if b >= mask_block), blocks[-1])
    key = (a.gate_arch, kernel, dt, hd, mb)
    if key not in table:
        raise ValueError(f"no gate clocks for {key}; regenerate the table with "
                         "`python -m sparsegen.kernels.gpu_check --write-clocks`")
    full, partial, mma, build = table[key]
    return TileClocks(full, partial, mma, build)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layout_counts(mask: BlockSparseMask, batch: int, heads: int):
    """Per program (batch * heads * Qb): visited and partial tile counts; per (b, h): unique key blocks.

    A tile is partial when the kernel walks it in its partial loop: a token tile, or the
    last key block when the key length does not fill it.
    """
    b, h, qb, kb = mask.shape
    state = mask.block_state().expand(batch if b == 1 else b, heads if h == 1 else h, qb, kb)
    partial_state = state == 2
    if mask.kv_len % mask.kv_block_size:
        partial_state = partial_state.clone()
        partial_state[..., -1] |= state[..., -1] > 0
    visited = (state > 0).sum(-1).reshape(-1).double()
    partial = partial_state.sum(-1).reshape(-1).double()
    unique_kv = (state > 0).any(2).sum(-1).reshape(-1).double()
    return visited, partial, unique_kv


def _time(visited, partial, unique_kv, *, qbs: int, kbs: int, head_dim: int, dtype: torch.dtype, arch: GPUArch,
          clocks: TileClocks, a: ModelAssumptions):
    """Model time from tile counts. visited/partial: (P,) per program; unique_kv: (B*H,)."""
    units = qbs * kbs / 4096.0
    full_c, part_c = units * clocks.unit_clocks(False), units * clocks.unit_clocks(True)
    program_c = (visited - partial) * full_c + partial * part_c + a.program_overhead_cycles
    compute = max(float(program_c.sum()) / arch.num_sms, float(program_c.max())) / arch.clock_hz

    esize = 1 if dtype == torch.int8 else _element_size(dtype)
    out_size = 2 if dtype == torch.int8 else esize
    programs = visited.numel()
    qo_bytes = programs * (qbs * head_dim * (esize + out_size) + qbs * 4)  # Q in, O out, fp32 LSE out
    kv_bytes = float(unique_kv.sum()) * kbs * head_dim * (esize + (esize if dtype != torch.int8 else 2))
    hbm = qo_bytes + kv_bytes
    memory = hbm / arch.hbm_bytes_per_s
    total = max(compute, memory) + arch.launch_seconds
    flops = float(visited.sum()) * 4.0 * qbs * kbs * head_dim
    return total, compute, memory, hbm, flops


def predict_kernel_time(
    mask: BlockSparseMask,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    arch: Union[str, GPUArch] = "h100",
    assumptions: ModelAssumptions | None = None,
    clocks: Optional[TileClocks] = None,
) -> KernelTimeModel:
    """Model the forward kernel's GPU time for ``mask`` (see the module docstring).

    Args:
        mask: the block layout (B or 1, H or 1, Qb, ...); broadcast dims take ``batch`` / ``heads``.
        batch, heads, head_dim: problem size; q, k, v would be (batch, seq, heads, head_dim).
        dtype: input dtype (bf16 / fp16, fp32 as TF32), or ``torch.int8`` for the INT8 forward.
        arch: ``"h100"``, ``"a100"`` or a :class:`GPUArch`.
        assumptions: model knobs, default :class:`ModelAssumptions`.
        clocks: per-unit clocks; default the gate's for this build (:func:`tile_clocks`).

    Returns:
        A :class:`KernelTimeModel` (model output, not a measurement).

    Raises:
        TypeError: ``mask`` is not a BlockSparseMask or ``dtype`` is unsupported.
        ValueError: unknown ``arch``; sizes that are not positive ints or that the mask cannot serve.
    """
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    for name, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        if not (isinstance(val, int) and not isinstance(val, bool) and val >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    mb, mh = mask.shape[:2]
    if mb not in (1, batch) or mh not in (1, heads):
        raise ValueError(f"mask batch/heads ({mb}, {mh}) must be 1 or equal to batch={batch}, heads={heads}")
    arch = _resolve_arch(arch)
    a = ModelAssumptions() if assumptions is None else assumptions
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    if clocks is None:
        clocks = tile_clocks(arch, dtype, head_dim, max(qbs, kbs))
    qb, kb = mask.num_q_blocks, mask.num_kv_blocks
    kw = dict(qbs=qbs, kbs=kbs, head_dim=head_dim, dtype=dtype, arch=arch, clocks=clocks, a=a)
    visited, partial, unique_kv = _layout_counts(mask, batch, heads)
    t, comp, mem, hbm, flops = _time(visited, partial, unique_kv, **kw)
    programs = batch * heads * qb
    dense_partial = float(bool(mask.kv_len % kbs))  # the short last key block
    t_dense = _time(torch.full((programs,), float(kb), dtype=torch.float64),
                    torch.full((programs,), dense_partial, dtype=torch.float64),
                    torch.full((batch * heads,), float(kb), dtype=torch.float64), **kw)[0]
    fa3 = fa3_speed = None
    if arch.gate_arch == 90 and dtype in (torch.float16, torch.bfloat16) and head_dim == 128:
        dense_flops = 4.0 * batch * heads * mask.q_len * mask.kv_len * head_dim
        fa3 = (dense_flops / FA3_FORWARD_FLOPS[1], dense_flops / FA3_FORWARD_FLOPS[0])
        fa3_speed = (fa3[0] / t, fa3[1] / t)
    return KernelTimeModel(
        arch=arch.name, seconds=t, dense_seconds=t_dense, speedup=t_dense / t, fa3_seconds=fa3,
        speedup_vs_fa3=fa3_speed, compute_seconds=comp, memory_seconds=mem,
        bound="compute" if comp >= mem else "memory", visited_tiles=int(visited.sum()),
        partial_tiles=int(partial.sum()), total_tiles=programs * kb, flops=flops, hbm_bytes=hbm, clocks=clocks,
        assumptions=a,
    )


def predict_speedup(mask: BlockSparseMask, *, batch: int, heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16, arch: Union[str, GPUArch] = "h100",
                    assumptions: ModelAssumptions | None = None) -> float:
    """Model speedup of the kernel over itself on a dense mask (dense-mask model time / mask model time)."""
    return predict_kernel_time(mask, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, arch=arch,
                               assumptions=assumptions).speedup
