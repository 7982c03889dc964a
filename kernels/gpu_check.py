"""Ahead-of-time GPU gate: compile every shipped kernel build for sm_80 and sm_90 on the CPU.

No GPU is needed. For each :class:`~.tuning.ShippedConfig` (kernel x dtype x head dim x
quant mode x tile variant, per architecture) the kernel is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` using the same
compile-time arguments the launchers pass (:func:`.triton_attention.kernel_constexprs`)
and the same integer specialization, and its SASS is read with the ``cuobjdump`` shipped
in the triton wheel. A build passes when:

* it compiles;
* it uses tensor cores where it multiplies matrices: ``HMMA`` / ``HGMMA`` for fp16, bf16
  and fp32 (fp32 runs its dots in TF32 on the tensor cores), ``IMMA`` / ``IGMMA`` for
  the INT8 Q·K (and INT8 P·V) of ``fwd_quant``, plus ``HMMA`` / ``HGMMA`` for its
  half-precision P·V. ``bwd_preprocess`` has no matrix product (a row-wise dot of O and
  dO) and is exempt;
* it does not spill: no stack frame or local memory in ``cuobjdump -res-usage`` and no
  ``LDL`` / ``STL`` instruction in the SASS;
* its shared memory (Triton's dynamic allocation plus any static) is within the
  architecture's opt-in limit (:data:`.tuning.SHARED_MEMORY_LIMIT`).

Usage::

    python -m sparsegen.kernels.gpu_check            # readable table
    python -m sparsegen.kernels.gpu_check --json     # JSON list, one object per build and arch

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

__all__ = ["BuildResult", "check_builds", "check_shipped", "main"]

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FLOAT_SCALARS = ("qk_scale", "sm_scale", "p_scale_inv")
_HALF_MMA = ("HMMA", "HGMMA")
_INT_MMA = ("IMMA", "IGMMA")
_TENSOR_CORE_OPS = _HALF_MMA + _INT_MMA
_SPILL_OPS = ("LDL", "STL")


@dataclass
class BuildResult:
    """Outcome of compiling one kernel build for one architecture (one JSON object)."""

    name: str
    arch: int
    kernel: str
    dtype: str
    head_dim: int
    quant: str                       # "none", "pv-half" or "pv-int8" (fwd_quant only)
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    compiled: bool = False
    error: str = ""
    tensor_core: list[str] = field(default_factory=list)    # tensor-core mnemonics found in the SASS
    required_tensor_core: list[list[str]] = field(default_factory=list)  # each group: one of these must appear
    spill_bytes: int = 0             # stack frame + local memory bytes (spills live there)
    local_memory_instructions: int = 0  # LDL / STL instructions in the SASS
    shared_bytes: int = 0
    shared_limit: int = 0
    registers: int = 0
    compile_seconds: float = 0.0     # compile (or Triton cache hit) + cuobjdump
    problems: list[str] = field(default_factory=list)
    passed: bool = False


# ----------------------------------------------------------------------- specification


def _quant_label(cfg: tuning.ShippedConfig) -> str:
    if cfg.kernel != "fwd_quant":
        return "none"
    return "pv-int8" if cfg.pv_int8 else "pv-half"


def required_tensor_core(kernel: str, pv_int8: bool = False) -> list[list[str]]:
    """Groups of tensor-core mnemonics a build must contain (one of each group).

    ``bwd_preprocess`` computes rowsum(O * dO) without a matrix product: nothing required.
    """
    if kernel == "bwd_preprocess":
        return []
    if kernel == "fwd_quant":
        return [list(_INT_MMA)] if pv_int8 else [list(_INT_MMA), list(_HALF_MMA)]
    return [list(_HALF_MMA)]


def _pointer_types(kernel: str, dtype: torch.dtype, pv_int8: bool) -> dict[str, str]:
    """Element types of each pointer argument, as the launchers pass them."""
    dt = _PTR_TYPES[dtype]
    layout = {"KvNum": "*i32", "KvIdx": "*i32", "TileIds": "*i32", "QNum": "*i32", "QIdx": "*i32",
              "QTileIds": "*i32", "Tiles": "*u8"}
    if kernel == "fwd":
        return {**layout, "Q": dt, "K": dt, "V": dt, "Out": dt, "Lse": "*fp32"}
    if kernel == "fwd_quant":
        return {**layout, "QI": "*i8", "QS": "*fp32", "KI": "*i8", "KS": "*fp32",
                "V": "*i8" if pv_int8 else dt, "VS": "*fp32", "Out": dt, "Lse": "*fp32"}
    if kernel == "bwd_preprocess":
        return {"Out": dt, "DOut": dt, "DLse": "*fp32", "Delta": "*fp32"}
    grads = {"DK": dt, "DV": dt} if kernel == "bwd_dkdv" else {"DQ": dt}
    return {**layout, "Q": dt, "K": dt, "V": dt, "DOut": dt, "Lse": "*fp32", "Delta": "*fp32", **grads}


def _data_stride_divisible(kernel: str, arg: str, head_dim: int, pv_int8: bool) -> bool:
    """Whether a specialized data stride is divisible by 16 in a launch (Triton specializes on it).

    The one data stride equal to the head dim is the head stride of (B, S, H, D) tensors
    and the sequence stride of the quantizer's (B, H, S, D) int8 tensors (``QI``, ``KI``,
    and ``V`` with INT8 P·V): divisible for head dims 64, 96, 128, not 72. The others
    are multiples of H * D or S * D, divisible by 16 for the models the shipped head dims
    come from. Layout strides and sizes are never specialized (``do_not_specialize``).
    """
    head_major = kernel == "fwd_quant" and (arg in ("stride_qis", "stride_kis") or (pv_int8 and arg == "stride_vs"))
    token_major = not (kernel == "fwd_quant" and (arg.startswith(("stride_qi", "stride_ki"))
                                                   or (pv_int8 and arg.startswith("stride_v"))))
    if head_major or (token_major and arg.endswith("h")):
        return head_dim % 16 == 0
    return True


def _compile_spec(cfg: tuning.ShippedConfig, fn, constexprs: dict):
    """(signature, constexprs, attrs) of ``fn`` for ``cfg``, matching the launchers' specialization."""
    ptrs = _pointer_types(cfg.kernel, cfg.dtype, cfg.pv_int8)
    no_spec = set(fn.do_not_specialize) if hasattr(fn, "do_not_specialize") else set()
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
            signature[arg] = "i32"
            if (arg not in no_spec_names and arg.startswith("stride_")
                    and _data_stride_divisible(cfg.kernel, arg, cfg.head_dim, cfg.pv_int8)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    # Scalars are lower case (strides, sizes, scales) or ``H``; every other argument is a pointer.
    untyped = [a for a in names if a not in constexprs and a != "H" and a[0].isupper() and a not in ptrs]
    if untyped:
        raise RuntimeError(f"gpu_check has no element type for pointer arguments {untyped} of {fn.__name__}")
    return signature, attrs


# ----------------------------------------------------------------------- SASS reading


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
_OPCODE_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def parse_res_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the (single) kernel in a cubin."""
    m = _RES_RE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{text[:500]}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def parse_sass_opcodes(text: str) -> dict[str, int]:
    """Count of each base mnemonic (``HMMA.16816.F32`` -> ``HMMA``) in ``cuobjdump -sass`` output."""
    counts: dict[str, int] = {}
    for m in _OPCODE_RE.finditer(text):
        op = m.group(1).split(".")[0]
        counts[op] = counts.get(op, 0) + 1
    return counts


# ----------------------------------------------------------------------- one build


def _worker_init() -> None:
    # Compiling needs real JITFunctions: the interpreter replaces them when this is set.
    os.environ["TRITON_INTERPRET"] = "0"
    # Triton 3.9's default (fused multiply-add on), stated so it does not warn.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile_one(cfg: tuning.ShippedConfig) -> BuildResult:
    """Compile ``cfg`` and read its SASS. Runs in a worker process."""
    t0 = time.perf_counter()
    res = BuildResult(
        name=cfg.name, arch=cfg.arch, kernel=cfg.kernel, dtype=_DTYPE_NAMES[cfg.dtype], head_dim=cfg.head_dim,
        quant=_quant_label(cfg), block_m=cfg.tiles.block_m, block_n=cfg.tiles.block_n,
        num_warps=cfg.tiles.num_warps, num_stages=cfg.tiles.num_stages,
        required_tensor_core=required_tensor_core(cfg.kernel, cfg.pv_int8),
        shared_limit=tuning.SHARED_MEMORY_LIMIT[cfg.arch],
    )
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        from .triton_attention import KERNELS, kernel_constexprs

        fn = KERNELS[cfg.kernel]
        if not hasattr(fn, "cache_key"):
            raise RuntimeError("kernels were built for Triton's interpreter; run with TRITON_INTERPRET unset")
        constexprs = kernel_constexprs(cfg.kernel, cfg.dtype, cfg.head_dim, cfg.tiles, pv_int8=cfg.pv_int8)
        signature, attrs = _compile_spec(cfg, fn, constexprs)
        src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cfg.arch, 32),
                                options={"num_warps": cfg.tiles.num_warps, "num_stages": cfg.tiles.num_stages})
        res.compiled = True
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            dump = _run_cuobjdump(cubin)
        usage, ops = parse_res_usage(dump), parse_sass_opcodes(dump)
        res.registers = usage["registers"]
        res.spill_bytes = usage["stack"] + usage["local"]
        res.local_memory_instructions = sum(ops.get(o, 0) for o in _SPILL_OPS)
        res.shared_bytes = int(kernel.metadata.shared) + usage["static_shared"]
        res.tensor_core = sorted(o for o in ops if o in _TENSOR_CORE_OPS)
    except Exception as e:  # a failed build is a result, not a crash of the gate
        res.error = f"{type(e).__name__}: {e}"[:2000]
    res.compile_seconds = round(time.perf_counter() - t0, 2)
    _judge(res)
    return res


def _judge(res: BuildResult) -> None:
    problems = []
    if not res.compiled:
        problems.append(f"does not compile ({res.error.splitlines()[0] if res.error else 'unknown error'})")
    else:
        for group in res.required_tensor_core:
            if not any(op in res.tensor_core for op in group):
                problems.append(f"no tensor-core instruction among {group} (found {res.tensor_core or 'none'})")
        if res.spill_bytes or res.local_memory_instructions:
            problems.append(f"spills: {res.spill_bytes} bytes of stack/local memory, "
                            f"{res.local_memory_instructions} LDL/STL instructions")
        if res.shared_bytes > res.shared_limit:
            problems.append(f"shared memory {res.shared_bytes} B exceeds sm_{res.arch}'s limit {res.shared_limit} B")
    res.problems = problems
    res.passed = not problems


# ----------------------------------------------------------------------- many builds


def check_builds(configs: Iterable[tuning.ShippedConfig], *, jobs: int = 2) -> list[BuildResult]:
    """Compile and judge ``configs`` in ``jobs`` worker processes (results in input order)."""
    configs = list(configs)
    if not configs:
        return []
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited triton state
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(configs))), mp_context=ctx,
                             initializer=_worker_init) as pool:
        return list(pool.map(_compile_one, configs, chunksize=1))


def check_shipped(archs: Sequence[int] = tuning.GATE_ARCHS, *, jobs: int = 2) -> list[BuildResult]:
    """Every shipped configuration for ``archs``."""
    return check_builds(tuning.shipped_configurations(archs), jobs=jobs)


def _table(results: list[BuildResult]) -> str:
    head = f"{'build':48} {'sm':>3} {'ok':>4} {'regs':>4} {'spill':>5} {'smem':>7} {'tensor cores':16} problems"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:48} {r.arch:>3} {'yes' if r.passed else 'NO':>4} {r.registers:>4} "
                     f"{r.spill_bytes:>5} {r.shared_bytes:>7} {','.join(r.tensor_core) or '-':16} "
                     f"{'; '.join(r.problems)}")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed}/{len(results)} builds pass")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegen.kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per build and arch")
    parser.add_argument("--arch", type=int, action="append", choices=tuning.GATE_ARCHS,
                        help="check only this architecture (repeatable; default: all gated)")
    parser.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = check_shipped(tuple(args.arch) if args.arch else tuning.GATE_ARCHS, jobs=args.jobs)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(_table(results))
        print(f"checked in {elapsed:.1f} s with {args.jobs} workers")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
