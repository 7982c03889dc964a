"""Tile sizes, warps and stages of the Triton kernels, per GPU architecture.

The single source for the launchers (:mod:`.triton_attention`) and for the
ahead-of-time GPU gate (:mod:`.gpu_check`), which compiles every configuration listed
here for every architecture in :data:`GATE_ARCHS` and checks tensor-core use, no
register spills, shared memory within the architecture's limit, no replicated MMA work
and, for the forwards, the SASS instructions issued per unit of work against a
reference dense kernel. Change a number here and run ``python -m
sparsegen.kernels.gpu_check`` before shipping it.

Tables are keyed by (kernel, operand family, head dim) and hold the tiles for the
largest mask block the shipped methods build (128 tokens):

* kernels: ``fwd``, ``fwd_quant``, ``bwd_preprocess``, ``bwd_dkdv``, ``bwd_dq``;
* operand families: ``"16bit"`` (fp16 and bf16 share tiles), ``"fp32"``, and for
  ``fwd_quant`` ``"pv_half"`` / ``"pv_int8"``;
* head dim: the shipped head dims have entries of their own; any other head dim uses
  the entry of its padded head dim (rounded up to a power of two, at least 64).

A program's tile must lie inside one mask block, so a smaller mask block shrinks the
tile (:func:`fit_tile`) and, with it, the warps: the accumulator's rows are split
across warps 16 rows per warp (Triton lays chained dots out that way, FlashAttention's
choice), so more warps than ``rows / 16`` would compute the same rows twice. An entry
may name its own tiles for 64-token mask blocks where the fitted ones are not the best
passing build. The gate compiles the builds of every mask block size in
:data:`GATED_MASK_BLOCKS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

__all__ = [
    "TileConfig",
    "ShippedConfig",
    "SHIPPED_HEAD_DIMS",
    "SHIPPED_DTYPES",
    "GATE_ARCHS",
    "GATED_MASK_BLOCKS",
    "SHARED_MEMORY_LIMIT",
    "LAUNCH_OPTIONS",
    "MIN_TILE",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "arch_of",
    "padded_head_dim",
    "triton_dtype",
    "fit_tile",
    "split_head_dim",
    "table_config",
    "select",
    "shipped_configurations",
]

# Head dims real diffusion transformers use (CogVideoX / LTX / SD3: 64; PixArt, Latte: 72;
# Allegro: 96; Wan, HunyuanVideo, Flux, Mochi: 128). Other head dims up to MAX_HEAD_DIM
# run with the tiles of their padded head dim but are not compiled by the gate.
SHIPPED_HEAD_DIMS = (64, 72, 96, 128)
SHIPPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A100 / A10-class (sm_80 / sm_86), L40S / RTX 4090 (sm_89), H100 (sm_90).
GATE_ARCHS = (80, 86, 89, 90)
# Mask block sizes the shipped methods build: radial 128 (64 for Wan 2.2), PARO 64, GNA and
# VMoBA tiles of 128 tokens (their block_size option; 64 where configured).
GATED_MASK_BLOCKS = (64, 128)
# Opt-in maximum dynamic shared memory per block (bytes), from the CUDA programming guide
# (compute capability table): 163 KB (sm_80), 99 KB (sm_86, sm_89), 227 KB (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Compile options every launch passes, so the gate compiles the same code as the runtime
# whatever the environment says (Triton reads TRITON_DEFAULT_FP_FUSION otherwise, and its
# default is announced to change): fused multiply-adds on, as the exponent's
# ``s * scale - max`` relies on.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
# tl.dot needs 16 rows/columns; INT8 dots need 32 along the reduction axis.
MIN_TILE = 16
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128

KERNELS = ("fwd", "fwd_quant", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one kernel.

    Attributes:
        block_m: query rows per tile. block_n: key columns per tile.
        num_warps, num_stages: as Triton takes them.
        partial_block: tile width of the partial-block loop along the walked axis (key
            columns; query rows for ``bwd_dkdv``), None for the full loop's. Narrower
            partial tiles keep the token-tile mask's registers from spilling the kernel.
        split_dkdv: ``bwd_dkdv`` only: compute dV and dK in two launches with one
            accumulator each, where two do not fit in registers.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    partial_block: Optional[int] = None
    split_dkdv: bool = False

    def partial_tile(self, kernel: str) -> int:
        """Tile width of the partial-block loop along the walked axis."""
        return self.partial_block or self.walked(kernel)

    def walked(self, kernel: str) -> int:
        """Tile width along the axis the kernel's loops walk (keys; queries for ``bwd_dkdv``)."""
        return self.block_m if kernel == "bwd_dkdv" else self.block_n

    def owned(self, kernel: str) -> int:
        """Rows of the kernel's accumulators: the tokens one program owns."""
        return self.block_n if kernel == "bwd_dkdv" else self.block_m


T = TileConfig


def _per_head_dim(**by_dim: TileConfig) -> dict[int, TileConfig]:
    return {int(k[1:]): v for k, v in by_dim.items()}


def _entries(kernel: str, family: str, by_dim: dict[int, TileConfig]) -> dict[tuple[str, str, int], TileConfig]:
    return {(kernel, family, hd): cfg for hd, cfg in by_dim.items()}


def _same(cfg: TileConfig, dims=SHIPPED_HEAD_DIMS) -> dict[int, TileConfig]:
    return {hd: cfg for hd in dims}


# {arch: {(kernel, family, head dim): (tiles for 128-token mask blocks, tiles for 64-token
# mask blocks or None: the 128-token tiles fitted)}}. Each entry is the passing build with
# the fewest issue clocks per unit among a searched candidate list (row tiles 128 / 64 / 32,
# walked tiles 64 / 32 / 16, narrower partial tiles, 3-4 stages, split dK/dV): tensor
# cores, no spills (ptxas caps at 255 registers per thread), shared memory within the
# limit, no replicated MMA, the next tiles' loads in flight (at least 3 stages), and for
# the forwards issue clocks per unit within the gate's ratio of the reference dense
# kernel (or the documented exception, gpu_check.ISSUE_RATIO_EXCEPTIONS).
_P = None  # "fit the 128-token tiles"
_PREP = T(64, 16, 4, 1)  # rowsum(O * dO): no loop, no pipeline


def _rows(**entries) -> dict[tuple[str, str, int], tuple[TileConfig, Optional[TileConfig]]]:
    """``fwd_16bit=(d64, d72, d96, d128)``, each a (128-token, 64-token) pair, -> table rows."""
    rows = {}
    for name, per_dim in entries.items():
        kernel, family = name.rsplit("_", 1) if not name.startswith("fwd_quant") else ("fwd_quant", name[10:])
        for hd, cfg in zip(SHIPPED_HEAD_DIMS, per_dim):
            rows[(kernel, family, hd)] = cfg
        if family in ("16bit", "fp32"):
            rows[("bwd_preprocess", family, 64)] = rows[("bwd_preprocess", family, 128)] = (_PREP, _P)
    return rows


# Shorthands for the table: B(t) for "t for 128-token blocks, fitted for 64", B(t, s) for
# "t for 128-token blocks, s for 64".
def B(t: TileConfig, small: Optional[TileConfig] = _P) -> tuple[TileConfig, Optional[TileConfig]]:
    return (t, small)


_TABLE: dict[int, dict[tuple[str, str, int], tuple[TileConfig, Optional[TileConfig]]]] = {
    90: _rows(
        fwd_16bit=(B(T(128, 64, 8, 3, 32)), B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3)),
                   B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3)), B(T(128, 64, 8, 3))),
        fwd_fp32=(B(T(128, 64, 8, 3, 32)), B(T(128, 32, 8, 3, 16), T(64, 16, 4, 3)),
                  B(T(128, 32, 8, 3, 16), T(64, 16, 4, 3)), B(T(128, 32, 8, 3, 16), T(64, 32, 4, 3, 16))),
        fwd_quant_pv_half=(B(T(128, 64, 8, 3)), B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)), B(T(128, 64, 8, 3)),
                           B(T(128, 64, 8, 3))),
        fwd_quant_pv_int8=(B(T(128, 64, 8, 3)), B(T(128, 32, 8, 3), T(64, 32, 4, 3)),
                           B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)), B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32))),
        bwd_dkdv_16bit=(B(T(64, 64, 4, 3, 16)), B(T(32, 64, 4, 3, 16)), B(T(32, 64, 4, 3, 16)),
                        B(T(32, 64, 4, 3, 16))),
        bwd_dkdv_fp32=(B(T(64, 64, 4, 3, 16)), B(T(16, 64, 4, 3, None, True)), B(T(16, 64, 4, 3, None, True)),
                       B(T(32, 64, 4, 3, 16, True))),
        bwd_dq_16bit=(B(T(64, 64, 4, 3)), B(T(64, 64, 4, 3, 16)), B(T(64, 64, 4, 3, 16)), B(T(64, 64, 4, 3))),
        bwd_dq_fp32=(B(T(64, 64, 4, 3)), B(T(64, 32, 4, 3, 16)), B(T(64, 32, 4, 3, 16)), B(T(64, 32, 4, 3, 16))),
    ),
    80: _rows(
        fwd_16bit=(B(T(128, 64, 8, 4, 32), T(64, 64, 4, 3)), B(T(64, 64, 4, 3)), B(T(64, 64, 4, 3)),
                   B(T(128, 64, 8, 3), T(64, 64, 4, 4))),
        fwd_fp32=(B(T(128, 64, 8, 4), T(64, 64, 4, 3, 32)), B(T(64, 64, 4, 3, 32)), B(T(64, 64, 4, 3, 32)),
                  B(T(64, 64, 4, 3, 32))),
        fwd_quant_pv_half=(B(T(128, 64, 8, 4, 32), T(64, 64, 4, 3)), B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)),
                           B(T(128, 64, 8, 3)), B(T(128, 64, 8, 3))),
        fwd_quant_pv_int8=(B(T(128, 64, 8, 4), T(64, 64, 4, 3)), B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)),
                           B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)), B(T(128, 64, 8, 3))),
        bwd_dkdv_16bit=(B(T(64, 64, 4, 4, 16)), B(T(64, 64, 4, 3, None, True), T(64, 32, 2, 3, 16, True)),
                        B(T(64, 64, 4, 3, None, True), T(64, 32, 2, 3, 16, True)), B(T(64, 64, 4, 3, None, True))),
        bwd_dkdv_fp32=(B(T(32, 32, 2, 3, 16)), B(T(32, 64, 4, 3, None, True)), B(T(32, 64, 4, 3, None, True)),
                       B(T(32, 64, 4, 3, None, True))),
        bwd_dq_16bit=(B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3))),
        bwd_dq_fp32=(B(T(32, 32, 2, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3))),
    ),
    # sm_86 / sm_89: sm_80's tensor-core instructions with 99 KB of shared memory per block.
    86: _rows(
        fwd_16bit=(B(T(128, 64, 8, 4, 32), T(64, 64, 4, 3)), B(T(64, 64, 4, 3, 32)), B(T(64, 64, 4, 3, 32)),
                   B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3, 32))),
        fwd_fp32=(B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)),
                  B(T(64, 32, 4, 3))),
        fwd_quant_pv_half=(B(T(128, 64, 8, 4, 32), T(64, 64, 4, 3)), B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3, 32)),
                           B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3, 32)), B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3, 32))),
        fwd_quant_pv_int8=(B(T(128, 64, 8, 4), T(64, 64, 4, 3)), B(T(128, 64, 8, 3, 32), T(64, 64, 4, 3, 32)),
                           B(T(128, 64, 8, 3), T(64, 64, 4, 3, 32)), B(T(128, 64, 8, 3))),
        bwd_dkdv_16bit=(B(T(64, 64, 4, 4, 16)), B(T(16, 32, 2, 3)), B(T(16, 32, 2, 3)), B(T(32, 64, 4, 3))),
        bwd_dkdv_fp32=(B(T(32, 32, 2, 3, 16)), B(T(16, 32, 2, 3, None, True)), B(T(16, 32, 2, 3, None, True)),
                       B(T(16, 32, 2, 3, None, True))),
        bwd_dq_16bit=(B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3)), B(T(64, 32, 4, 3))),
        bwd_dq_fp32=(B(T(32, 32, 2, 3)), B(T(32, 16, 2, 3)), B(T(32, 16, 2, 3)), B(T(32, 16, 2, 3))),
    ),
}
_TABLE[89] = dict(_TABLE[86])
del T, B


def arch_of(device: torch.device) -> int:
    """Table key for a device: 90 (Hopper), 89 (Ada), 86 (consumer Ampere), else 80 (and the CPU interpreter).

    Newer GPUs, which the gate does not compile for, take the table whose shared-memory
    budget they have: data-center Blackwell (sm_100, 227 KB per block) Hopper's, consumer
    Blackwell (sm_120, 99 KB) Ada's.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major in (9, 10):
            return 90
        if major >= 11 or (major, minor) == (8, 9):
            return 89
        if (major, minor) in ((8, 6), (8, 7)):
            return 86
    return 80


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a power of two, at least 64 (tiles are padded with masked loads)."""
    p = 64
    while p < head_dim:
        p *= 2
    return p


def triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def fit_tile(tile: int, mask_block: Optional[int]) -> int:
    """Largest power of two <= ``tile`` that covers ``mask_block`` with little waste.

    Sub-tiles walk a mask block; when the block is not a multiple of the tile, the last
    sub-tile is masked. Prefer the largest tile whose padding stays within 1/8 of the
    block, else the smallest tile (``MIN_TILE``).
    """
    if mask_block is None:
        return tile
    t = tile
    while t >= MIN_TILE:
        padded = -(-mask_block // t) * t
        if (padded - mask_block) * 8 <= mask_block:
            return t
        t //= 2
    return MIN_TILE


def split_head_dim(arch: int, block_m: int, block_d: int) -> bool:
    """Whether the forward keeps its output accumulator as two head-dim halves (``SPLIT_D``).

    On sm_80-class tensor cores Triton spreads the warps of a chained dot along the
    longer side of its (rows, head dim) accumulator; with fewer rows than head-dim
    columns (64 x 128) it puts warps side by side on the same rows, and every row max
    and sum then crosses warps through shared memory. Two (rows, head dim / 2) halves
    keep each row inside one warp. sm_90's warpgroup MMAs always stack warps along rows.
    """
    return arch < 90 and block_m < block_d


def _family(kernel: str, dtype: torch.dtype, pv_int8: bool) -> str:
    if kernel == "fwd_quant":
        return "pv_int8" if pv_int8 else "pv_half"
    return "fp32" if dtype == torch.float32 else "16bit"


def _entry(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, pv_int8: bool):
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    if arch not in _TABLE:
        raise ValueError(f"no tuned configurations for sm_{arch}; tuned archs are {sorted(_TABLE)}")
    family = _family(kernel, dtype, pv_int8)
    for hd in (head_dim, padded_head_dim(head_dim)):
        if (kernel, family, hd) in _TABLE[arch]:
            return _TABLE[arch][(kernel, family, hd)]
    raise ValueError(
        f"no tuned configuration for ({kernel!r}, {family!r}, head_dim={head_dim}) on sm_{arch}; "
        f"head dims up to {MAX_HEAD_DIM} are supported"
    )


def table_config(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, *, pv_int8: bool = False) -> TileConfig:
    """The table's entry for 128-token mask blocks, before fitting to a mask's block sizes."""
    return _entry(kernel, arch, dtype, head_dim, pv_int8)[0]


def _fit(cfg: TileConfig, kernel: str, q_block: Optional[int], kv_block: Optional[int]) -> TileConfig:
    if kernel == "bwd_preprocess":
        return cfg
    min_n = 32 if kernel == "fwd_quant" else MIN_TILE
    bm = fit_tile(cfg.block_m, q_block)
    bn = max(fit_tile(cfg.block_n, kv_block), min_n)
    walked_block = q_block if kernel == "bwd_dkdv" else kv_block
    part = cfg.partial_block
    if part is not None:
        part = max(fit_tile(part, walked_block), min_n)
    fitted = TileConfig(bm, bn, cfg.num_warps, cfg.num_stages, part, cfg.split_dkdv)
    if part is not None and fitted.walked(kernel) == part:
        fitted = replace(fitted, partial_block=None)
    # 16 accumulator rows per warp: more warps would duplicate rows (module docstring).
    warps = cfg.num_warps
    while warps > 1 and fitted.owned(kernel) < 16 * warps:
        warps //= 2
    return replace(fitted, num_warps=warps)


def select(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
           q_block: Optional[int] = None, kv_block: Optional[int] = None, pv_int8: bool = False) -> TileConfig:
    """Launch parameters for ``kernel`` on ``device``, fitted to the mask's block sizes."""
    return config_for(kernel, arch_of(device), dtype, head_dim, q_block=q_block, kv_block=kv_block, pv_int8=pv_int8)


def config_for(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, *, q_block: Optional[int] = None,
               kv_block: Optional[int] = None, pv_int8: bool = False) -> TileConfig:
    """:func:`select` for an architecture key instead of a device (what the gate compiles)."""
    cfg, small = _entry(kernel, arch, dtype, head_dim, pv_int8)
    if small is not None and max(q_block or 128, kv_block or 128) <= 64:
        cfg = small
    return _fit(cfg, kernel, q_block, kv_block)


@dataclass(frozen=True)
class ShippedConfig:
    """One kernel build the GPU gate compiles: what it is, for which arch, with which tiles.

    ``mask_block`` is the mask's query and key block size (a compile-time constant of
    the kernels); ``has_dlse`` the preprocess' variant with a gradient flowing into the
    LSE; ``int64_strides`` the specialization Triton compiles when a batch stride (S * H
    * D elements) passes 2^31; ``outputs`` the dK/dV kernel's launch (3 both, 1 dV, 2 dK).
    """

    kernel: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    pv_int8: bool
    tiles: TileConfig
    mask_block: int = 128
    has_dlse: bool = True
    int64_strides: bool = False
    outputs: int = 3

    @property
    def name(self) -> str:
        dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        quant = ""
        if self.kernel == "fwd_quant":
            quant = "-qk8-pv8" if self.pv_int8 else "-qk8-pvhalf"
        t = self.tiles
        part = f"p{t.partial_block}" if t.partial_block else ""
        part += "x2" if t.split_dkdv else ""
        block = "" if self.kernel == "bwd_preprocess" else f"-b{self.mask_block}"
        extra = ("" if self.has_dlse else "-nodlse") + ("-i64" if self.int64_strides else "")
        extra += {3: "", 1: "-dv", 2: "-dk"}[self.outputs]
        return (f"{self.kernel}{quant}-{dt}-d{self.head_dim}{block}-m{t.block_m}n{t.block_n}{part}"
                f"w{t.num_warps}s{t.num_stages}{extra}")


def shipped_configurations(archs=GATE_ARCHS, *, int64_strides: bool = True) -> Iterator[ShippedConfig]:
    """Every (kernel, dtype, head dim, quant mode, mask block, variant) build the launchers can choose.

    The INT4-range Q·K mode runs the INT8 kernel unchanged (values in int8 storage), so it
    has no build of its own. With ``int64_strides`` each build also comes with the
    specialization for batch strides past 2^31.
    """
    for arch in archs:
        for kernel in KERNELS:
            for dtype in SHIPPED_DTYPES:
                for hd in SHIPPED_HEAD_DIMS:
                    for pv_int8 in ((False, True) if kernel == "fwd_quant" else (False,)):
                        if kernel == "bwd_preprocess":
                            variants = [(128, dlse) for dlse in (True, False)]
                        else:
                            variants = [(mb, True) for mb in GATED_MASK_BLOCKS]
                        for mb, dlse in variants:
                            tiles = config_for(kernel, arch, dtype, hd, q_block=mb, kv_block=mb, pv_int8=pv_int8)
                            for i64 in ((False, True) if int64_strides else (False,)):
                                for outputs in ((1, 2) if tiles.split_dkdv else (3,)):
                                    yield ShippedConfig(kernel, arch, dtype, hd, pv_int8, tiles, mb, dlse, i64, outputs)
