"""A GPU time **model** of the block-sparse forward kernel: predicted, never measured.

The project's machines have no GPU, so the CPU benchmark measures the torch path and
this module *predicts* what the Triton forward kernel would take on a GPU from the
mask's visited tiles and the architecture's published peak rates. Everything it
returns is a model output and is labelled so (``model_*`` names, "model" in reports).

What is modelled (one program = one (batch, head, query block), as the kernel launches)::

    per visited tile (q_block_size x kv_block_size, head dim D):
        mma      4 * qbs * kbs * D flops          QK^T and P.V on tensor cores
        exp      qbs * kbs exponentials           special-function units (MUFU)
        alu      SOFTMAX_ALU_OPS * qbs * kbs      scale, max, subtract, sum, rescale (fp32 lanes)
        mask     + qbs * kbs ALU ops              partial tiles only: select on the token tile
        fixed    tile_overhead_cycles             loop bookkeeping, index load, barriers
    per program: program_overhead_cycles          prologue (Q load issue), epilogue (O, LSE)

    program time = sum over its tiles of (mma + (1 - softmax_overlap) * (exp + alu) + fixed)
                   + mask + program overhead          (at one SM's share of the chip's rates)

    compute time = max(sum of program times / SMs,   programs spread evenly over the SMs
                       longest program)              a program never splits across SMs
    memory time  = HBM bytes / HBM bandwidth
    kernel time  = max(compute time, memory time) + launch_seconds

HBM bytes: Q read and O written once per program (plus the fp32 LSE); K and V blocks
are read from HBM once per (batch, head) for every key block some query block of that
head visits, because the programs of one head run at about the same time and the L2
cache serves the repeats. When the K/V of the heads in flight do not fit in L2
(``GPUArch.l2_bytes``), every visited tile reads its K and V blocks from HBM instead.

Assumptions worth knowing (the defaults in :class:`ModelAssumptions`):

* Rates are the architecture's dense peaks: bf16/fp16 tensor-core math (H100 790
  TFLOP/s, A100 312 TFLOP/s), fp32 inputs as TF32 products at half that (what the
  kernel's ``tl.dot`` does with fp32), INT8 at twice the 16-bit rate; ``mma_efficiency`` scales them.
* The softmax is not overlapped with the matrix math (``softmax_overlap=0``), as in a
  FlashAttention-2-style kernel where one warp group does both; FlashAttention-3's
  ping-pong scheduling would raise it towards 1.
* One program per SM at a time; the tile is the mask block (the kernel's sub-tiling of
  a mask block does not change the count of flops or exponentials).
* No wave quantization beyond "a program cannot split", no clock throttling, no
  cache misses on Q, no atomics (forward only).

The speedup over dense is the model's time for an all-visited mask of the same
geometry divided by the model's time for the mask, so the fixed costs are counted on
both sides and a dense mask has speedup exactly 1.

Example::

    >>> m = BlockSparseMask.full(q_len=16384, kv_len=16384)
    >>> p = predict_kernel_time(m, batch=1, heads=24, head_dim=128, dtype=torch.bfloat16, arch="h100")
    >>> p.speedup
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch

from .mask import BlockSparseMask

__all__ = [
    "GPUArch",
    "ModelAssumptions",
    "KernelTimeModel",
    "ARCHS",
    "SOFTMAX_ALU_OPS",
    "predict_kernel_time",
    "predict_speedup",
]

# fp32 ALU operations per score element of the online softmax: scale, running max,
# subtract, row sum, and (amortised) the rescale of the accumulator.
SOFTMAX_ALU_OPS = 5


@dataclass(frozen=True)
class GPUArch:
    """Peak rates of one GPU (model inputs; published figures, not measurements).

    Attributes:
        name: label used in reports.
        matmul_flops_16bit: dense bf16/fp16 tensor-core FLOP/s (multiply-add = 2 flops).
        hbm_bytes_per_s: DRAM bandwidth.
        num_sms: streaming multiprocessors.
        clock_hz: SM clock used to convert cycle counts.
        exp_per_s: exponentials per second over the whole chip (16 per SM per clock).
        alu_ops_per_s: fp32 lane operations per second over the whole chip.
        l2_bytes: L2 cache size.
        launch_seconds: fixed kernel launch latency.
    """

    name: str
    matmul_flops_16bit: float
    hbm_bytes_per_s: float
    num_sms: int
    clock_hz: float
    exp_per_s: float
    alu_ops_per_s: float
    l2_bytes: int
    launch_seconds: float = 4e-6

    def __post_init__(self):
        for f in ("matmul_flops_16bit", "hbm_bytes_per_s", "clock_hz", "exp_per_s", "alu_ops_per_s"):
            val = getattr(self, f)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"GPUArch.{f} must be a positive finite number, got {val!r}")
        if not (isinstance(self.num_sms, int) and self.num_sms >= 1):
            raise ValueError(f"GPUArch.num_sms must be an int >= 1, got {self.num_sms!r}")
        if not (isinstance(self.l2_bytes, int) and self.l2_bytes >= 0):
            raise ValueError(f"GPUArch.l2_bytes must be an int >= 0, got {self.l2_bytes!r}")
        if not (math.isfinite(self.launch_seconds) and self.launch_seconds >= 0):
            raise ValueError(f"GPUArch.launch_seconds must be >= 0, got {self.launch_seconds!r}")

    def matmul_flops(self, dtype: torch.dtype) -> float:
        """Tensor-core FLOP/s for inputs of ``dtype`` (fp32 inputs multiply as TF32, at half the 16-bit rate)."""
        if dtype in (torch.float16, torch.bfloat16):
            return self.matmul_flops_16bit
        if dtype == torch.float32:
            return self.matmul_flops_16bit / 2
        if dtype == torch.int8:
            return self.matmul_flops_16bit * 2
        raise TypeError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, torch.int8; got {dtype}")


# H100 (SXM-class, 132 SMs at 1.83 GHz; rounded to 790 TFLOP/s dense bf16 and 3.0 TB/s)
# and A100 (108 SMs at 1.41 GHz, 312 TFLOP/s, 2.0 TB/s). Exponentials: 16 per SM per clock.
# fp32 lanes: 128 (H100) / 64 (A100) per SM per clock.
ARCHS: dict[str, GPUArch] = {
    "h100": GPUArch("H100", 790e12, 3.0e12, 132, 1.83e9, 16 * 132 * 1.83e9, 128 * 132 * 1.83e9, 50 * 2**20),
    "a100": GPUArch("A100", 312e12, 2.0e12, 108, 1.41e9, 16 * 108 * 1.41e9, 64 * 108 * 1.41e9, 40 * 2**20),
}


@dataclass(frozen=True)
class ModelAssumptions:
    """Knobs of the model (see the module docstring); defaults describe our Triton kernel.

    Attributes:
        mma_efficiency: share of the tensor-core peak the inner loop reaches, in (0, 1].
        softmax_overlap: share of the softmax (exp + ALU) hidden behind the matrix math, [0, 1].
        tile_overhead_cycles: fixed cycles per visited tile (loop, index load, barriers).
        program_overhead_cycles: fixed cycles per program (prologue and epilogue).
    """

    mma_efficiency: float = 1.0
    softmax_overlap: float = 0.0
    tile_overhead_cycles: float = 100.0
    program_overhead_cycles: float = 2000.0

    def __post_init__(self):
        if not (0 < self.mma_efficiency <= 1):
            raise ValueError(f"ModelAssumptions.mma_efficiency must be in (0, 1], got {self.mma_efficiency!r}")
        if not (0 <= self.softmax_overlap <= 1):
            raise ValueError(f"ModelAssumptions.softmax_overlap must be in [0, 1], got {self.softmax_overlap!r}")
        for f in ("tile_overhead_cycles", "program_overhead_cycles"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"ModelAssumptions.{f} must be >= 0, got {getattr(self, f)!r}")


@dataclass(frozen=True)
class KernelTimeModel:
    """A model prediction (not a measurement) for one mask and problem size.

    Attributes:
        arch: architecture name.
        seconds: modelled kernel time for the mask.
        dense_seconds: modelled kernel time for an all-visited mask of the same geometry.
        speedup: dense_seconds / seconds.
        compute_seconds, memory_seconds: the two roofline terms for the mask.
        bound: "compute" or "memory" (which term sets the time).
        visited_tiles, partial_tiles, total_tiles: tile counts over batch and heads.
        flops: tensor-core flops of the visited tiles.
        hbm_bytes: modelled DRAM traffic.
    """

    arch: str
    seconds: float
    dense_seconds: float
    speedup: float
    compute_seconds: float
    memory_seconds: float
    bound: str
    visited_tiles: int
    partial_tiles: int
    total_tiles: int
    flops: float
    hbm_bytes: float
    assumptions: ModelAssumptions = field(default_factory=ModelAssumptions)


def _resolve_arch(arch: Union[str, GPUArch]) -> GPUArch:
    if isinstance(arch, GPUArch):
        return arch
    if isinstance(arch, str) and arch.lower() in ARCHS:
        return ARCHS[arch.lower()]
    raise ValueError(f"arch must be one of {sorted(ARCHS)} or a GPUArch, got {arch!r}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layout_counts(mask: BlockSparseMask, batch: int, heads: int):
    """Per program (batch * heads * Qb): visited and partial tile counts; per (b, h): unique key blocks."""
    b, h, qb, kb = mask.shape
    state = mask.block_state().expand(batch if b == 1 else b, heads if h == 1 else h, qb, kb)
    visited = (state > 0).sum(-1).reshape(-1).double()
    partial = (state == 2).sum(-1).reshape(-1).double()
    unique_kv = (state > 0).any(2).sum(-1).reshape(-1).double()
    return visited, partial, unique_kv


def _time(visited, partial, unique_kv, *, qbs: int, kbs: int, q_blocks: int, head_dim: int, dtype: torch.dtype,
          arch: GPUArch, a: ModelAssumptions):
    """Model time from tile counts. visited/partial: (P,) per program; unique_kv: (B*H,)."""
    n_sm = arch.num_sms
    tile_elems = qbs * kbs
    # One SM's share of each chip-wide rate.
    mma_s = 4.0 * tile_elems * head_dim / (arch.matmul_flops(dtype) * a.mma_efficiency / n_sm)
    softmax_s = (tile_elems / (arch.exp_per_s / n_sm) + SOFTMAX_ALU_OPS * tile_elems / (arch.alu_ops_per_s / n_sm))
    tile_s = mma_s + (1.0 - a.softmax_overlap) * softmax_s + a.tile_overhead_cycles / arch.clock_hz
    mask_s = tile_elems / (arch.alu_ops_per_s / n_sm)
    program_s = visited * tile_s + partial * mask_s + a.program_overhead_cycles / arch.clock_hz
    compute = max(float(program_s.sum()) / n_sm, float(program_s.max()))

    esize = _element_size(dtype)
    programs = visited.numel()
    qo_bytes = programs * (2 * qbs * head_dim * esize + qbs * 4)  # Q in, O out, fp32 LSE out
    kv_block_bytes = 2 * kbs * head_dim * esize  # one K block and one V block
    heads_in_flight = min(unique_kv.numel(), math.ceil(n_sm / q_blocks) + 1)
    kv_per_head = float(unique_kv.max()) * kv_block_bytes
    if heads_in_flight * kv_per_head <= arch.l2_bytes:
        kv_bytes = float(unique_kv.sum()) * kv_block_bytes
    else:
        kv_bytes = float(visited.sum()) * kv_block_bytes
    hbm = qo_bytes + kv_bytes
    memory = hbm / arch.hbm_bytes_per_s
    total = max(compute, memory) + arch.launch_seconds
    flops = float(visited.sum()) * 4.0 * tile_elems * head_dim
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
) -> KernelTimeModel:
    """Model the forward kernel's GPU time for ``mask`` (see the module docstring).

    Args:
        mask: the block layout (B or 1, H or 1, Qb, ...); broadcast dims take ``batch`` / ``heads``.
        batch, heads, head_dim: problem size; q, k, v would be (batch, seq, heads, head_dim).
        dtype: input dtype (bf16/fp16, fp32 as TF32, int8).
        arch: ``"h100"``, ``"a100"`` or a :class:`GPUArch`.
        assumptions: model knobs, default :class:`ModelAssumptions`.

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
    arch.matmul_flops(dtype)  # validates dtype
    a = ModelAssumptions() if assumptions is None else assumptions
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    qb, kb = mask.num_q_blocks, mask.num_kv_blocks
    kw = dict(qbs=qbs, kbs=kbs, q_blocks=qb, head_dim=head_dim, dtype=dtype, arch=arch, a=a)
    visited, partial, unique_kv = _layout_counts(mask, batch, heads)
    t, comp, mem, hbm, flops = _time(visited, partial, unique_kv, **kw)
    programs = batch * heads * qb
    dense_visited = torch.full((programs,), float(kb), dtype=torch.float64)
    t_dense = _time(dense_visited, torch.zeros(programs, dtype=torch.float64),
                    torch.full((batch * heads,), float(kb), dtype=torch.float64), **kw)[0]
    return KernelTimeModel(
        arch=arch.name, seconds=t, dense_seconds=t_dense, speedup=t_dense / t, compute_seconds=comp,
        memory_seconds=mem, bound="compute" if comp >= mem else "memory", visited_tiles=int(visited.sum()),
        partial_tiles=int(partial.sum()), total_tiles=programs * kb, flops=flops, hbm_bytes=hbm, assumptions=a,
    )


def predict_speedup(mask: BlockSparseMask, *, batch: int, heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16, arch: Union[str, GPUArch] = "h100",
                    assumptions: ModelAssumptions | None = None) -> float:
    """Model speedup of the kernel over dense attention (dense-mask model time / mask model time)."""
    return predict_kernel_time(mask, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, arch=arch,
                               assumptions=assumptions).speedup

