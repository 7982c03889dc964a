"""Ahead-of-time GPU gate: compile every shipped kernel build on the CPU and read its SASS.

No GPU is needed. For each :class:`~.tuning.ShippedConfig` (kernel x dtype x head dim x
quant mode x mask block x variant, per architecture in :data:`.tuning.GATE_ARCHS`) the
kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` with the compile-time arguments, integer specialization and compile options the
launchers use (:func:`.triton_attention.kernel_constexprs`,
:data:`.tuning.LAUNCH_OPTIONS`), and its SASS is read with the ``cuobjdump`` shipped in
the triton wheel. In the same run the gate compiles a reference dense attention kernel
in the shape of Triton's fused-attention tutorial (:mod:`.triton_dense`) for each
(arch, forward kind, dtype, head dim) and measures it the same way.

What is measured, per build (the speed-of-light report):

* ``loop_instructions``: SASS instructions of the innermost loop that contains the
  tensor-core instructions (a loop is the range from a backward branch's target to the
  branch). A block-sparse kernel has two such loops, in program order: the full-block
  loop, then the partial-block loop (``partial_loop_instructions``);
* ``issue_clocks_per_unit``: loop instructions x warps / 4 (an SM issues one
  instruction per clock on each of its 4 schedulers), divided by the units of work one
  iteration does, a unit being one 64 x 64 (query x key) tile at the build's head dim:
  the clocks the SM spends issuing one unit of work, for full blocks (and
  ``partial_issue_clocks_per_unit`` for partial blocks);
* ``mma_clocks_per_unit``: the clocks the SM's tensor cores need for that unit's matrix
  products at the architecture's dense peak (:data:`MMA_FLOPS_PER_CLOCK`); a loop whose
  issue clocks exceed this is issue-bound;
* ``replicated_mma``: from the TTGIR, whether an MMA accumulator layout covers more rows
  or columns than its tensor (warps computing the same products twice);
  ``cross_warp_rows``: whether the forward's row statistics (max, sum) cross warps
  (warps side by side along the key axis);
* ``loads_in_flight``: from the TTGIR, for each wait on the loops' asynchronous copies,
  how many copy groups it leaves outstanding (>= 1: the next tiles' K/V, or Q/dO, loads
  are in flight while the current tile computes);
* ``registers``, ``shared_bytes``, ``ctas_per_sm`` (occupancy from registers, shared
  memory, warps and the architecture's per-SM limits), spills, tensor-core mnemonics.

A build passes when it compiles; uses tensor cores where it multiplies matrices (on
sm_90 the warpgroup instructions ``HGMMA`` / ``IGMMA`` for every 16-bit and INT8 build,
the fp32 (TF32) builds and sm_80-class builds ``HMMA`` / ``IMMA`` at least;
``bwd_preprocess`` has no matrix product); does not spill; fits its shared memory;
computes no MMA twice; keeps the next tiles' loads in flight in every loop of the
forward and backward kernels; keeps the forward's row statistics inside warps; and, for the
float and INT8 forwards, issues at most :data:`MAX_ISSUE_RATIO` times the reference's
issue clocks per unit on full blocks.

Usage::

    python -m sparsegen.kernels.gpu_check                 # every build, readable table (the full gate)
    python -m sparsegen.kernels.gpu_check --json          # JSON list, one object per build
    python -m sparsegen.kernels.gpu_check --speed         # the speed-of-light table only (forwards vs reference)
    python -m sparsegen.kernels.gpu_check --dump DIR      # also write cubin, SASS and TTGIR per build
    python -m sparsegen.kernels.gpu_check --kernel fwd --kernel fwd_quant --no-int64 --write-clocks kernels/gate_clocks.py
                                                          # the time model's table of clocks per unit

The exit code is 1 if any build fails. Compiles run in a pool of worker processes
(``--jobs``, default 2) started with ``TRITON_INTERPRET=0`` so the kernels are real
``JITFunction`` objects even when the caller runs Triton's interpreter (the test suite).
Importing this module imports neither triton nor anything CUDA-specific.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from . import tuning

__all__ = ["BuildResult", "MAX_ISSUE_RATIO", "ISSUE_RATIO_EXCEPTIONS", "issue_ratio_limit", "clocks_table", "write_clocks", "MMA_FLOPS_PER_CLOCK", "check_builds", "check_shipped",
           "parse_sass", "mma_loops", "parse_mma_layouts", "replication", "ctas_per_sm", "main"]

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FLOAT_SCALARS = ("qk_scale", "sm_scale", "p_scale_inv")
_HALF_MMA = ("HMMA", "HGMMA")
_INT_MMA = ("IMMA", "IGMMA")
_TENSOR_CORE_OPS = _HALF_MMA + _INT_MMA
_SPILL_OPS = ("LDL", "STL")
_BATCH_STRIDES = ("stride_qb", "stride_kb", "stride_vb", "stride_ob", "stride_gb", "stride_dkb", "stride_dqb")

# A block-sparse forward may spend at most this many issue clocks per unit of work on
# full blocks, relative to the reference dense kernel compiled in the same run.
MAX_ISSUE_RATIO = 1.3

# Forward builds held to a higher ratio, each with the measured reason (never raised
# silently: every entry shows in the gate's report and in evals/RESULTS.md). Keys:
# (arch, kernel, quant mode, output dtypes, head dims, mask blocks); values: (limit, reason).
ISSUE_RATIO_EXCEPTIONS: dict[tuple, tuple[float, str]] = {
    (90, "fwd", "none", ("fp32",), (72, 96, 128), (128,)): (
        1.55,
        "fp32 (TF32) on sm_90 at head dim >= 72: a 128 x 64 tile with the next tiles' loads in flight (3 stages) "
        "needs 3 x 64 KB of K/V tiles plus 64 KB of Q in shared memory, over the 227 KB limit; the build pipelines "
        "32-key tiles, which spread the per-tile work over half the keys (the reference fits 128 x 64 only with "
        "2 stages, without loads in flight)",
    ),
    (90, "fwd", "none", ("fp32",), (72, 96, 128), (64,)): (
        2.5,
        "fp32 (TF32) on sm_90, 64-token blocks at head dim >= 72: 64-row tiles of 64 or 32 keys spill registers "
        "(the padded head dim's masked loads), except 32 keys at head dim 128; 72 and 96 use 16-key tiles",
    ),
    (90, "fwd_quant", "pv-int8", ("fp16", "bf16", "fp32"), (72,), (64, 128)): (
        1.6,
        "INT8 P·V on sm_90 at head dim 72: 64-key tiles spill 16-64 bytes in the partial-block loop with a "
        "16-bit output (the head dim pads to 128 columns); the build uses 32-key tiles",
    ),
}


# Dense tensor-core FLOP per clock per SM (multiply-add = 2), by arch and operand kind:
# sm_80 A100 (312 TFLOP/s = 108 SMs x 1.41 GHz x 2048), sm_86 / sm_89 the data-center
# parts (A10 / A40, L40S: 1024 per SM with fp32 accumulation; GeForce cards halve it),
# sm_90 H100 SXM (989 TFLOP/s = 132 SMs x 1.83 GHz x 4096). TF32 is half the 16-bit
# rate, INT8 twice.
MMA_FLOPS_PER_CLOCK = {
    80: {"16bit": 2048, "tf32": 1024, "int8": 4096},
    86: {"16bit": 1024, "tf32": 512, "int8": 2048},
    89: {"16bit": 1024, "tf32": 512, "int8": 2048},
    90: {"16bit": 4096, "tf32": 2048, "int8": 8192},
}
# Per-SM limits for occupancy: registers, shared memory (bytes), resident warps, resident CTAs.
_SM_LIMITS = {
    80: dict(registers=65536, shared=167936, warps=64, ctas=32),
    86: dict(registers=65536, shared=102400, warps=48, ctas=16),
    89: dict(registers=65536, shared=102400, warps=48, ctas=24),
    90: dict(registers=65536, shared=233472, warps=64, ctas=32),
}
_RESERVED_SHARED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA (sm_80 and later)


@dataclass
class BuildResult:
    """Outcome of compiling one kernel build for one architecture (one JSON object)."""

    name: str
    arch: int
    kernel: str
    dtype: str
    head_dim: int
    quant: str                       # "none", "pv-half" or "pv-int8" (fwd_quant only)
    mask_block: int
    block_m: int
    block_n: int
    partial_block: int
    num_warps: int
    num_stages: int
    int64_strides: bool = False
    has_dlse: bool = True
    outputs: int = 3                 # bwd_dkdv: 3 both gradients, 1 dV only, 2 dK only
    compiled: bool = False
    error: str = ""
    tensor_core: list[str] = field(default_factory=list)    # tensor-core mnemonics found in the SASS
    required_tensor_core: list[list[str]] = field(default_factory=list)  # each group: one of these must appear
    spill_bytes: int = 0             # stack frame + local memory bytes (spills live there)
    local_memory_instructions: int = 0  # LDL / STL instructions in the SASS
    shared_bytes: int = 0
    shared_limit: int = 0
    registers: int = 0
    ctas_per_sm: int = 0
    mma_loops: list[int] = field(default_factory=list)  # instructions of each innermost MMA loop
    loop_instructions: int = 0       # the full-block MMA loop (the first)
    partial_loop_instructions: int = 0
    issue_clocks_per_unit: float = 0.0
    partial_issue_clocks_per_unit: float = 0.0
    mma_clocks_per_unit: float = 0.0
    replicated_mma: bool = False
    cross_warp_rows: bool = False
    loads_in_flight: list[int] = field(default_factory=list)  # per in-loop wait: copy groups left in flight
    mma_layouts: list[str] = field(default_factory=list)
    reference_issue_clocks_per_unit: float = 0.0   # forwards: the dense reference of the same run
    issue_ratio: float = 0.0
    issue_ratio_limit: float = 0.0
    issue_ratio_exception: str = ""  # why this build is held to a higher limit (ISSUE_RATIO_EXCEPTIONS)
    compile_seconds: float = 0.0     # compile (or Triton cache hit) + cuobjdump
    problems: list[str] = field(default_factory=list)
    passed: bool = False


@dataclass(frozen=True)
class ReferenceConfig:
    """The dense yardstick for one (arch, forward kind, dtype, head dim, quant mode)."""

    kind: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    pv_int8: bool

    @property
    def key(self) -> tuple:
        return (self.arch, self.kind, self.dtype, self.head_dim, self.pv_int8)

    @property
    def name(self) -> str:
        quant = ("-qk8-pv8" if self.pv_int8 else "-qk8-pvhalf") if self.kind == "fwd_quant" else ""
        return f"reference-dense{quant}-{_DTYPE_NAMES[self.dtype]}-d{self.head_dim}"


# ----------------------------------------------------------------------- specification


def _quant_label(kernel: str, pv_int8: bool) -> str:
    if kernel != "fwd_quant":
        return "none"
    return "pv-int8" if pv_int8 else "pv-half"


def required_tensor_core(kernel: str, pv_int8: bool = False, *, arch: int = 80,
                         dtype: torch.dtype = torch.float16) -> list[list[str]]:
    """Groups of tensor-core mnemonics a build must contain (one of each group).

    ``bwd_preprocess`` computes rowsum(O * dO) without a matrix product: nothing required.
    On sm_90 every 16-bit and INT8 product must use the warpgroup MMAs (HGMMA / IGMMA);
    fp32 builds (TF32) and sm_80-class builds accept the warp-level MMAs too.
    """
    if kernel == "bwd_preprocess":
        return []
    hopper = arch >= 90
    half = ["HGMMA"] if hopper and dtype != torch.float32 else list(_HALF_MMA)
    if kernel == "fwd_quant":
        ints = ["IGMMA"] if hopper else list(_INT_MMA)
        if pv_int8:
            return [ints]
        return [ints, ["HGMMA"] if hopper else list(_HALF_MMA)]
    return [half]


def _pointer_types(kernel: str, dtype: torch.dtype, pv_int8: bool) -> dict[str, str]:
    """Element types of each pointer argument, as the launchers pass them."""
    dt = _PTR_TYPES[dtype]
    layout = {"Num": "*i32", "NumFull": "*i32", "KvIdx": "*i32", "QIdx": "*i32", "TileIds": "*i32", "Tiles": "*u8"}
    if kernel == "fwd":
        return {**layout, "Q": dt, "QS": "*fp32", "K": dt, "KS": "*fp32", "V": dt, "VS": "*fp32", "Out": dt,
                "Lse": "*fp32"}
    if kernel == "fwd_quant":
        return {**layout, "Q": "*i8", "QS": "*fp32", "K": "*i8", "KS": "*fp32",
                "V": "*i8" if pv_int8 else dt, "VS": "*fp32", "Out": dt, "Lse": "*fp32"}
    if kernel == "bwd_preprocess":
        return {"Out": dt, "DOut": dt, "DLse": "*fp32", "Delta": "*fp32"}
    grads = {"DK": dt, "DV": dt} if kernel == "bwd_dkdv" else {"DQ": dt}
    return {**layout, "Q": dt, "K": dt, "V": dt, "DOut": dt, "Lse": "*fp32", "Delta": "*fp32", **grads}


def _data_stride_divisible(kernel: str, arg: str, head_dim: int, pv_int8: bool) -> bool:
    """Whether a specialized data stride is divisible by 16 in a launch (Triton specializes on it).

    The data stride equal to the head dim is the head stride of (B, S, H, D) tensors and
    the sequence stride of the quantizer's (B, H, S, D) int8 tensors (Q, K, and V with
    INT8 P·V): divisible for head dims 64, 96, 128, not 72. The others are multiples of
    H * D or S * D, divisible by 16 for the models the shipped head dims come from.
    """
    head_major = kernel == "fwd_quant" and (arg in ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks",
                                                    "stride_kh") or (pv_int8 and arg.startswith("stride_v")))
    if head_major:
        return arg.endswith("s") and head_dim % 16 == 0 or not arg.endswith("s")
    if arg.endswith("h"):
        return head_dim % 16 == 0
    return True


def _compile_spec(kernel: str, dtype: torch.dtype, head_dim: int, pv_int8: bool, fn, constexprs: dict,
                  int64_strides: bool = False):
    """(signature, attrs) of ``fn`` for a build, matching the launchers' specialization."""
    ptrs = _pointer_types(kernel if kernel != "reference" else "fwd", dtype, pv_int8)
    no_spec = set(getattr(fn, "do_not_specialize", ()))
    names = list(fn.arg_names)
    no_spec_names = {names[i] if isinstance(i, int) else i for i in no_spec}
    signature, attrs = {}, {}
    for i, arg in enumerate(names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg] = ptrs[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i64" if int64_strides and arg in _BATCH_STRIDES else "i32"
            if (arg not in no_spec_names and arg.startswith("stride_")
                    and _data_stride_divisible(kernel, arg, head_dim, pv_int8)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    untyped = [a for a in names if a not in constexprs and a != "H" and a[0].isupper() and a not in ptrs]
    if untyped:
        raise RuntimeError(f"gpu_check has no element type for pointer arguments {untyped} of {fn.__name__}")
    return signature, attrs


# ----------------------------------------------------------------------- SASS and TTGIR reading


def cuobjdump_path() -> Path:
    """The cuobjdump bundled with the installed triton wheel (``TRITON_CUOBJDUMP_PATH`` overrides)."""
    import triton

    try:
        return Path(triton.knobs.nvidia.cuobjdump.path)
    except Exception:  # older triton without the knob: the wheel's layout
        return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _run_cuobjdump(cubin: Path) -> str:
    """``cuobjdump -res-usage -sass``: resource lines and the disassembly in one call."""
    out = subprocess.run([str(cuobjdump_path()), "-res-usage", "-sass", str(cubin)], capture_output=True, text=True,
                         check=True)
    return out.stdout


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")
_TARGET_RE = re.compile(r"0x([0-9a-f]+)")


def parse_res_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the (single) kernel in a cubin."""
    m = _RES_RE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{text[:500]}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, base mnemonic, operands) of every instruction in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(2), m.group(4)) for m in _INSTR_RE.finditer(text)]


def parse_sass_opcodes(text: str) -> dict[str, int]:
    """Count of each base mnemonic (``HMMA.16816.F32`` -> ``HMMA``) in ``cuobjdump -sass`` output."""
    counts: dict[str, int] = {}
    for _, op, _ in parse_sass(text):
        counts[op] = counts.get(op, 0) + 1
    return counts


def mma_loops(instructions: list[tuple[int, str, str]]) -> list[int]:
    """Instruction counts of the innermost loops containing tensor-core instructions, in address order.

    A loop is the address range from the target of a backward branch (``BRA`` to a lower
    or equal address) to the farthest branch back to it; innermost means it contains no
    other such loop that has tensor-core instructions.
    """
    addrs = [a for a, _, _ in instructions]
    ends: dict[int, int] = {}
    for addr, op, args in instructions:
        if op == "BRA":
            m = _TARGET_RE.search(args)
            if m and int(m.group(1), 16) <= addr:
                target = int(m.group(1), 16)
                ends[target] = max(ends.get(target, addr), addr)
    with_mma = []
    for start, end in ends.items():
        body = [op for a, op, _ in instructions if start <= a <= end]
        if any(op in _TENSOR_CORE_OPS for op in body):
            with_mma.append((start, end, len(body)))
    inner = [(s, e, n) for s, e, n in with_mma
             if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2, _ in with_mma)]
    del addrs
    return [n for _, _, n in sorted(inner)]


_MMA_DEF_RE = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+),[^}]*warpsPerCTA = \[(\d+), (\d+)\]"
                         r"[^}]*instrShape = \[(\d+), (\d+)", re.M)
# The accumulator (result) type of a dot: ``... = tt.dot ... -> tensor<RxCxf32, #mma>`` (or ttng.warp_group_dot).
_DOT_RESULT_RE = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) [^\n]*?-> tensor<(\d+)x(\d+)x\w+, #(\w+)>")


def parse_mma_layouts(ttgir: str) -> dict[str, tuple[int, int, int, int, int]]:
    """{layout name: (version, warps along rows, warps along columns, rows per warp, columns per instruction)}."""
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 7)) for m in _MMA_DEF_RE.finditer(ttgir)}


def replication(ttgir: str) -> tuple[bool, bool, list[str]]:
    """(replicated MMA, cross-warp rows, layouts) from the TTGIR's dot results.

    A dot's accumulator (rows x cols) in an MMA layout with warpsPerCTA [wr, wc] is
    covered by wr x 16 rows and wc x instrShape[1] columns; a coverage larger than the
    tensor means warps hold, and compute, the same elements. ``wc > 1`` means a row is
    spread over warps, so row reductions cross warps.
    """
    layouts = parse_mma_layouts(ttgir)
    replicated, cross = False, False
    for m in _DOT_RESULT_RE.finditer(ttgir):
        lay = layouts.get(m.group(3))
        if lay is None:
            continue
        rows, cols = int(m.group(1)), int(m.group(2))
        _, wr, wc, per_warp, per_instr = lay
        if rows < wr * per_warp or cols < wc * per_instr:
            replicated = True
        if wc > 1:
            cross = True
    desc = [f"{name}: v{v} warpsPerCTA=[{wr},{wc}] instr={r}x{c}" for name, (v, wr, wc, r, c) in layouts.items()]
    return replicated, cross, desc


_WAIT_RE = re.compile(r"ttg\.async_wait %[^{\n]*\{num = (\d+)")


def loads_in_flight(ttgir: str) -> list[int]:
    """For each wait on async copies inside a loop: how many copy groups it leaves in flight.

    Triton's software pipeliner issues the copies of the next tiles and, before a tile
    computes, waits until only ``num`` groups are outstanding; ``num = 0`` means the next
    tiles' loads are not in flight while this one computes. Waits without operands (the
    drains after a loop) are left out; a loop without async copies has no waits at all.
    """
    return [int(n) for n in _WAIT_RE.findall(ttgir)]


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory and warps."""
    lim = _SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = lim["registers"] // max(1, regs_per_warp * num_warps)
    by_smem = lim["shared"] // (shared_bytes + _RESERVED_SHARED_PER_CTA)
    by_warps = lim["warps"] // num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim["ctas"]))


def _mma_kind(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 else "16bit"


def mma_clocks_per_unit(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, pv_int8: bool = False,
                        outputs: int = 3) -> float:
    """Tensor-core clocks per 64 x 64 unit at the padded head dim: the kernel's matrix products at the dense peak.

    Forward: Q·K^T and P·V (2 products); dQ: Q·K^T, dO·V^T, dS·K (3); dK/dV: 4 (its dV
    launch alone 2, its dK launch 3).
    """
    rate = MMA_FLOPS_PER_CLOCK[arch]
    gemm = 2 * 64 * 64 * tuning.padded_head_dim(head_dim)
    if kernel == "fwd_quant":
        return gemm / rate["int8"] + gemm / (rate["int8"] if pv_int8 else rate["16bit"])
    products = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": {3: 4, 1: 2, 2: 3}[outputs]}.get(kernel, 0)
    return products * gemm / rate[_mma_kind(dtype)]


# ----------------------------------------------------------------------- one build


def _worker_init() -> None:
    # Compiling needs real JITFunctions: the interpreter replaces them when this is set.
    os.environ["TRITON_INTERPRET"] = "0"
    # The launch options pin FP fusion; this only silences Triton's warning about its default.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile(fn, kernel, dtype, head_dim, pv_int8, constexprs, arch, num_warps, num_stages, int64_strides=False):
    import triton
    from triton.backends.compiler import GPUTarget

    if not hasattr(fn, "cache_key"):
        raise RuntimeError("kernels were built for Triton's interpreter; run with TRITON_INTERPRET unset")
    signature, attrs = _compile_spec(kernel, dtype, head_dim, pv_int8, fn, constexprs, int64_strides)
    src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **tuning.LAUNCH_OPTIONS})


def _read(compiled, dump: Optional[str], stem: str) -> tuple[str, str]:
    """(cuobjdump output, TTGIR) of a compiled kernel; with ``dump`` also written to DIR/stem.{cubin,sass,ttgir}."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = _run_cuobjdump(cubin)
    ttgir = compiled.asm["ttgir"]
    if dump:
        out = Path(dump)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
        (out / f"{stem}.sass").write_text(text)
        (out / f"{stem}.ttgir").write_text(ttgir)
    return text, ttgir


def _measure(res: BuildResult, compiled, text: str, ttgir: str, units_full: float, units_partial: float) -> None:
    usage, instrs = parse_res_usage(text), parse_sass(text)
    ops: dict[str, int] = {}
    for _, op, _ in instrs:
        ops[op] = ops.get(op, 0) + 1
    res.registers = usage["registers"]
    res.spill_bytes = usage["stack"] + usage["local"]
    res.local_memory_instructions = sum(ops.get(o, 0) for o in _SPILL_OPS)
    res.shared_bytes = int(compiled.metadata.shared) + usage["static_shared"]
    res.tensor_core = sorted(o for o in ops if o in _TENSOR_CORE_OPS)
    res.ctas_per_sm = ctas_per_sm(res.arch, res.registers, res.num_warps, res.shared_bytes)
    res.mma_loops = mma_loops(instrs)
    if res.mma_loops:
        # The kernels walk full blocks first; ptxas keeps the loops in program order.
        res.loop_instructions = res.mma_loops[0]
        res.partial_loop_instructions = res.mma_loops[-1]
        res.issue_clocks_per_unit = round(res.loop_instructions * res.num_warps / 4 / units_full, 1)
        res.partial_issue_clocks_per_unit = round(res.partial_loop_instructions * res.num_warps / 4 / units_partial, 1)
    res.replicated_mma, res.cross_warp_rows, res.mma_layouts = replication(ttgir)
    res.loads_in_flight = loads_in_flight(ttgir)


def _compile_one(job: tuple) -> BuildResult:
    """Compile one build (``("build", ShippedConfig, dump)``) or reference (``("reference", ReferenceConfig, dump)``)."""
    what, cfg, dump = job
    t0 = time.perf_counter()
    if what == "reference":
        res = _reference_result(cfg)
    else:
        t = cfg.tiles
        res = BuildResult(
            name=cfg.name, arch=cfg.arch, kernel=cfg.kernel, dtype=_DTYPE_NAMES[cfg.dtype], head_dim=cfg.head_dim,
            quant=_quant_label(cfg.kernel, cfg.pv_int8), mask_block=cfg.mask_block, block_m=t.block_m,
            block_n=t.block_n, partial_block=t.partial_tile(cfg.kernel) if cfg.kernel != "bwd_preprocess" else 0,
            num_warps=t.num_warps, num_stages=t.num_stages, int64_strides=cfg.int64_strides, has_dlse=cfg.has_dlse,
            outputs=cfg.outputs,
            required_tensor_core=required_tensor_core(cfg.kernel, cfg.pv_int8, arch=cfg.arch, dtype=cfg.dtype),
            shared_limit=tuning.SHARED_MEMORY_LIMIT[cfg.arch],
        )
    try:
        if what == "reference":
            _compile_reference(res, cfg, dump)
        else:
            from .triton_attention import KERNELS, kernel_constexprs

            constexprs = kernel_constexprs(cfg.kernel, cfg.dtype, cfg.head_dim, cfg.tiles, q_block=cfg.mask_block,
                                           kv_block=cfg.mask_block, arch=cfg.arch, pv_int8=cfg.pv_int8,
                                           has_dlse=cfg.has_dlse, outputs=cfg.outputs)
            compiled = _compile(KERNELS[cfg.kernel], cfg.kernel, cfg.dtype, cfg.head_dim, cfg.pv_int8, constexprs,
                                cfg.arch, t.num_warps, t.num_stages, cfg.int64_strides)
            res.compiled = True
            text, ttgir = _read(compiled, dump, f"{cfg.name}-sm{cfg.arch}")
            t = cfg.tiles
            _measure(res, compiled, text, ttgir, t.block_m * t.block_n / 4096,
                     t.owned(cfg.kernel) * t.partial_tile(cfg.kernel) / 4096)
            if cfg.kernel != "bwd_preprocess":
                res.mma_clocks_per_unit = round(mma_clocks_per_unit(cfg.kernel, cfg.arch, cfg.dtype, cfg.head_dim,
                                                                    cfg.pv_int8, cfg.outputs), 1)
    except Exception as e:  # a failed build is a result, not a crash of the gate
        res.error = f"{type(e).__name__}: {e}"[:2000]
    res.compile_seconds = round(time.perf_counter() - t0, 2)
    return res


def _reference_result(cfg: ReferenceConfig) -> BuildResult:
    from .triton_dense import REFERENCE_TILES

    bm, bn, warps = REFERENCE_TILES
    return BuildResult(
        name=cfg.name, arch=cfg.arch, kernel=f"reference_{cfg.kind}", dtype=_DTYPE_NAMES[cfg.dtype],
        head_dim=cfg.head_dim, quant=_quant_label(cfg.kind, cfg.pv_int8), mask_block=0, block_m=bm, block_n=bn,
        partial_block=0, num_warps=warps, num_stages=0,
        required_tensor_core=required_tensor_core(cfg.kind, cfg.pv_int8, arch=cfg.arch, dtype=cfg.dtype),
        shared_limit=tuning.SHARED_MEMORY_LIMIT[cfg.arch],
    )


def _compile_reference(res: BuildResult, cfg: ReferenceConfig, dump: Optional[str]) -> None:
    """The tutorial-shaped dense kernel with the most pipeline stages (3, 2, 1) that fits and does not spill."""
    from .triton_dense import _dense_fwd_kernel, dense_constexprs

    constexprs = dense_constexprs(cfg.kind, cfg.dtype, cfg.head_dim, pv_int8=cfg.pv_int8)
    for stages in (3, 2, 1):
        compiled = _compile(_dense_fwd_kernel, cfg.kind, cfg.dtype, cfg.head_dim, cfg.pv_int8, constexprs, cfg.arch,
                            res.num_warps, stages)
        res.compiled, res.num_stages = True, stages
        text, ttgir = _read(compiled, None, "")
        _measure(res, compiled, text, ttgir, res.block_m * res.block_n / 4096, res.block_m * res.block_n / 4096)
        if res.shared_bytes <= res.shared_limit and not res.spill_bytes and not res.local_memory_instructions:
            break
    if dump:
        _read(compiled, dump, f"{cfg.name}-sm{cfg.arch}")
    res.mma_clocks_per_unit = round(mma_clocks_per_unit(cfg.kind, cfg.arch, cfg.dtype, cfg.head_dim, cfg.pv_int8), 1)


def issue_ratio_limit(arch: int, kernel: str, quant: str, dtype: str, head_dim: int,
                      mask_block: int) -> tuple[float, str]:
    """(limit, reason) on a forward build's full-block issue clocks relative to the reference's."""
    for (a, k, qm, dts, dims, blocks), (limit, reason) in ISSUE_RATIO_EXCEPTIONS.items():
        if (a, k, qm) == (arch, kernel, quant) and dtype in dts and head_dim in dims and mask_block in blocks:
            return limit, reason
    return MAX_ISSUE_RATIO, ""


def _judge(res: BuildResult, reference: Optional[BuildResult]) -> None:
    problems = []
    if not res.compiled:
        problems.append(f"does not compile ({res.error.splitlines()[0] if res.error else 'unknown error'})")
    else:
        if res.error:
            problems.append(f"could not be measured ({res.error.splitlines()[0]})")
        for group in res.required_tensor_core:
            if not any(op in res.tensor_core for op in group):
                problems.append(f"no tensor-core instruction among {group} (found {res.tensor_core or 'none'})")
        if res.spill_bytes or res.local_memory_instructions:
            problems.append(f"spills: {res.spill_bytes} bytes of stack/local memory, "
                            f"{res.local_memory_instructions} LDL/STL instructions")
        if res.shared_bytes > res.shared_limit:
            problems.append(f"shared memory {res.shared_bytes} B exceeds sm_{res.arch}'s limit {res.shared_limit} B")
        if res.replicated_mma:
            problems.append(f"replicated MMA work: an accumulator layout covers more than its tensor "
                            f"({'; '.join(res.mma_layouts)}); use fewer warps or taller tiles")
        if res.kernel in ("fwd", "fwd_quant", "bwd_dq", "bwd_dkdv"):
            if not res.loads_in_flight or min(res.loads_in_flight) < 1:
                problems.append(f"the next tiles' loads are not in flight while a tile computes (async waits leave "
                                f"{res.loads_in_flight or 'no'} copy groups outstanding); use more pipeline stages")
        if res.kernel in ("fwd", "fwd_quant"):
            if res.cross_warp_rows:
                problems.append(f"row statistics cross warps ({'; '.join(res.mma_layouts)})")
            if res.required_tensor_core and not res.mma_loops:
                problems.append("no loop with tensor-core instructions found in the SASS")
            if reference is None or not reference.issue_clocks_per_unit:
                problems.append("no reference dense kernel measured for this build")
            else:
                res.reference_issue_clocks_per_unit = reference.issue_clocks_per_unit
                res.issue_ratio = round(res.issue_clocks_per_unit / reference.issue_clocks_per_unit, 3)
                res.issue_ratio_limit, res.issue_ratio_exception = issue_ratio_limit(
                    res.arch, res.kernel, res.quant, res.dtype, res.head_dim, res.mask_block)
                if res.issue_ratio > res.issue_ratio_limit:
                    problems.append(f"full-block loop issues {res.issue_clocks_per_unit:.0f} clocks per unit, "
                                    f"{res.issue_ratio:.2f}x the reference dense kernel's "
                                    f"{reference.issue_clocks_per_unit:.0f} (limit {res.issue_ratio_limit}x)")
    res.problems = problems
    res.passed = not problems


# ----------------------------------------------------------------------- many builds


def references_for(configs: Iterable[tuning.ShippedConfig]) -> list[ReferenceConfig]:
    """The dense yardsticks the forward builds among ``configs`` are compared with."""
    seen: dict[tuple, ReferenceConfig] = {}
    for c in configs:
        if c.kernel in ("fwd", "fwd_quant"):
            ref = ReferenceConfig(c.kernel, c.arch, c.dtype, c.head_dim, c.pv_int8 and c.kernel == "fwd_quant")
            seen.setdefault(ref.key, ref)
    return list(seen.values())


def _reference_key(r: BuildResult) -> tuple:
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[r.dtype]
    return (r.arch, r.kernel.removeprefix("reference_") if r.kernel.startswith("reference_") else r.kernel, dtype,
            r.head_dim, r.quant == "pv-int8")


def check_builds(configs: Iterable[tuning.ShippedConfig], *, jobs: int = 2, dump: Optional[str] = None,
                 with_references: bool = True) -> list[BuildResult]:
    """Compile and judge ``configs`` (and their reference dense kernels) in ``jobs`` worker processes.

    Returns the builds' results in input order, followed by the references' (kernel
    ``reference_fwd`` / ``reference_fwd_quant``, judged on tensor cores, spills and
    shared memory only).
    """
    configs = list(configs)
    refs = references_for(configs) if with_references else []
    work = [("reference", r, dump) for r in refs] + [("build", c, dump) for c in configs]
    if not work:
        return []
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited triton state
    # The workers must import triton with the interpreter off: unpickling their start-up
    # arguments can import it before the initializer runs, so they are started from an
    # environment that says so (restored right after).
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(work))), mp_context=ctx,
                                 initializer=_worker_init) as pool:
            done = list(pool.map(_compile_one, work, chunksize=1))
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    ref_results, results = done[:len(refs)], done[len(refs):]
    by_key = {_reference_key(r): r for r in ref_results}
    for r in ref_results:
        _judge(r, None)
        r.problems = [p for p in r.problems if not p.startswith(("no reference", "row statistics"))]
        r.passed = not r.problems
    for r in results:
        _judge(r, by_key.get(_reference_key(r)))
    return results + ref_results


def check_shipped(archs: Sequence[int] = tuning.GATE_ARCHS, *, jobs: int = 2, dump: Optional[str] = None,
                  int64_strides: bool = True) -> list[BuildResult]:
    """Every shipped configuration for ``archs``, with the reference dense kernels."""
    return check_builds(tuning.shipped_configurations(archs, int64_strides=int64_strides), jobs=jobs, dump=dump)


def _table(results: list[BuildResult]) -> str:
    head = (f"{'build':58} {'sm':>3} {'ok':>4} {'regs':>4} {'cta':>3} {'spill':>5} {'smem':>7} {'loop':>5} "
            f"{'issue/u':>7} {'ref/u':>6} {'ratio':>5} {'part/u':>6} {'mma/u':>6} {'tensor cores':14} problems")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.name:58} {r.arch:>3} {'yes' if r.passed else 'NO':>4} {r.registers:>4} {r.ctas_per_sm:>3} "
            f"{r.spill_bytes:>5} {r.shared_bytes:>7} {r.loop_instructions:>5} {r.issue_clocks_per_unit:>7.0f} "
            f"{r.reference_issue_clocks_per_unit:>6.0f} {r.issue_ratio:>5.2f} {r.partial_issue_clocks_per_unit:>6.0f} "
            f"{r.mma_clocks_per_unit:>6.0f} {','.join(r.tensor_core) or '-':14} {'; '.join(r.problems)}")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed}/{len(results)} builds pass")
    return "\n".join(lines)


def speed_table(results: list[BuildResult]) -> str:
    """Markdown table of the forwards' issue clocks per unit against the reference (full and partial blocks).

    A ratio limit other than :data:`MAX_ISSUE_RATIO` is an :data:`ISSUE_RATIO_EXCEPTIONS` entry.
    """
    lines = ["| arch | kernel | dtype | d | mask block | tile (rows x keys, warps, stages) | full-block issue clocks / unit "
             "| reference | ratio (limit) | partial-block issue clocks / unit | tensor-core clocks / unit | regs | "
             "CTAs / SM | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.kernel not in ("fwd", "fwd_quant") or r.int64_strides:
            continue
        kind = r.kernel if r.quant == "none" else f"fwd int8 ({r.quant})"
        part = f", partial x {r.partial_block}" if r.partial_block not in (r.block_n, 0) else ""
        lines.append(f"| sm_{r.arch} | {kind} | {r.dtype} | {r.head_dim} | {r.mask_block} | {r.block_m} x {r.block_n}"
                     f"{part}, {r.num_warps}, {r.num_stages} | {r.issue_clocks_per_unit:.0f} | "
                     f"{r.reference_issue_clocks_per_unit:.0f} | {r.issue_ratio:.2f} ({r.issue_ratio_limit:g}) | "
                     f"{r.partial_issue_clocks_per_unit:.0f} | {r.mma_clocks_per_unit:.0f} | {r.registers} | "
                     f"{r.ctas_per_sm} | {'yes' if r.passed else 'NO'} |")
    return "\n".join(lines)


_CLOCKS_HEADER = '''"""Issue and tensor-core clocks per 64 x 64 unit of the forward builds, as the GPU gate measured them.

Generated by ``{command}`` from the SASS of each build (:mod:`.gpu_check`); rerun it after
changing a kernel or the tuning table (tests/test_gpu_check.py compares a subset with a
fresh compile). Read by the GPU time model (:mod:`.timemodel`).
"""

ARCHS = {archs}

# (arch, kernel, dtype, head dim, mask block): (full-block issue clocks per unit,
# partial-block issue clocks per unit, tensor-core clocks per unit, build).
# kernel "fwd_quant" is INT8 Q·K with half-precision P·V, "fwd_quant_pv8" with INT8 P·V.
CLOCKS = {{
{rows}}}
'''

CLOCKS_COMMAND = "python -m sparsegen.kernels.gpu_check --kernel fwd --kernel fwd_quant --no-int64 --write-clocks PATH"


def clocks_table(results: Iterable[BuildResult]) -> dict[tuple, tuple]:
    """{(arch, kernel, dtype, head dim, mask block): (full, partial, tensor-core clocks per unit, build)} of the
    forward builds (int32-stride specializations) among ``results``."""
    table = {}
    for r in results:
        if r.kernel not in ("fwd", "fwd_quant") or r.int64_strides or not r.compiled:
            continue
        kernel = "fwd_quant_pv8" if r.quant == "pv-int8" else r.kernel
        table[(r.arch, kernel, r.dtype, r.head_dim, r.mask_block)] = (
            r.issue_clocks_per_unit, r.partial_issue_clocks_per_unit, r.mma_clocks_per_unit, r.name)
    return table


def write_clocks(results: Iterable[BuildResult], path: str) -> None:
    """Write :mod:`.gate_clocks` (the time model's input) from the gate's results."""
    table = clocks_table(results)
    rows = "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(table.items()))
    archs = tuple(sorted({k[0] for k in table}))
    Path(path).write_text(_CLOCKS_HEADER.format(command=CLOCKS_COMMAND.replace("PATH", "kernels/gate_clocks.py"),
                                                archs=archs, rows=rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegen.kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per build and arch")
    parser.add_argument("--speed", action="store_true",
                        help="print only the forwards' speed-of-light table (markdown) after the verdict line")
    parser.add_argument("--arch", type=int, action="append", choices=tuning.GATE_ARCHS,
                        help="check only this architecture (repeatable; default: all gated)")
    parser.add_argument("--kernel", action="append", choices=tuning.KERNELS,
                        help="check only this kernel (repeatable; default: all)")
    parser.add_argument("--no-int64", action="store_true", help="skip the int64-stride specializations")
    parser.add_argument("--dump", metavar="DIR", help="write <build>-sm<arch>.{cubin,sass,ttgir} per build to DIR")
    parser.add_argument("--write-clocks", metavar="PATH",
                        help="write the forwards' clocks per unit as the time model's table (kernels/gate_clocks.py)")
    parser.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    configs = tuning.shipped_configurations(tuple(args.arch) if args.arch else tuning.GATE_ARCHS,
                                            int64_strides=not args.no_int64)
    if args.kernel:
        configs = [c for c in configs if c.kernel in args.kernel]
    results = check_builds(configs, jobs=args.jobs, dump=args.dump)
    elapsed = time.perf_counter() - t0
    if args.write_clocks:
        write_clocks(results, args.write_clocks)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    elif args.speed:
        failed = sum(not r.passed for r in results)
        print(f"{len(results) - failed}/{len(results)} builds pass; checked in {elapsed:.1f} s with {args.jobs} workers\n")
        print(speed_table(results))
    else:
        print(_table(results))
        print(f"checked in {elapsed:.1f} s with {args.jobs} workers")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
