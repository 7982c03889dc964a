"""Tile sizes, warps and stages of the Triton kernels, per GPU architecture.

The single source for the launchers (:mod:`.triton_attention`) and for the
ahead-of-time GPU check (:mod:`.gpu_check`), which compiles every configuration listed
here for sm_80 and sm_90 and verifies tensor-core use, zero register spills and shared
memory within the architecture's limit. Change a number here and run
``python -m sparsegen.kernels.gpu_check`` before shipping it.

Tables are keyed by (kernel, operand family, head dim):

* kernels: ``fwd``, ``fwd_quant``, ``bwd_preprocess``, ``bwd_dkdv``, ``bwd_dq``;
* operand families: ``"16bit"`` (fp16 and bf16 share tiles), ``"fp32"``, and for
  ``fwd_quant`` ``"pv_half"`` / ``"pv_int8"``;
* head dim: the shipped head dims have entries of their own; any other head dim uses
  the entry of its padded head dim (rounded up to a power of two, at least 64).

The kernels' tiles must cover a mask block with sub-tiles, so a mask block smaller than
the table's tile shrinks it (:func:`fit_tile`): the gate compiles those variants for the
mask block sizes in :data:`GATED_MASK_BLOCKS` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    "MIN_TILE",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "arch_of",
    "padded_head_dim",
    "triton_dtype",
    "fit_tile",
    "table_config",
    "select",
    "shipped_configurations",
]

# Head dims real diffusion transformers use (CogVideoX / LTX / SD3: 64; PixArt, Latte: 72;
# Allegro: 96; Wan, HunyuanVideo, Flux, Mochi: 128). Other head dims up to MAX_HEAD_DIM
# run with the tiles of their padded head dim but are not compiled by the gate.
SHIPPED_HEAD_DIMS = (64, 72, 96, 128)
SHIPPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_ARCHS = (80, 90)
# Mask block sizes the shipped methods build (radial 128 / 64, PARO 64, GNA / VMoBA tiles).
GATED_MASK_BLOCKS = (64, 128)
# Opt-in maximum dynamic shared memory per block (bytes), from the CUDA programming guide.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
# tl.dot needs 16 rows/columns; INT8 dots need 32 along the reduction axis.
MIN_TILE = 16
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128

KERNELS = ("fwd", "fwd_quant", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one kernel: tile rows (queries), tile columns (keys), warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


T = TileConfig


def _per_head_dim(**by_dim: TileConfig) -> dict[int, TileConfig]:
    return {int(k[1:]): v for k, v in by_dim.items()}


def _entries(kernel: str, family: str, by_dim: dict[int, TileConfig]) -> dict[tuple[str, str, int], TileConfig]:
    return {(kernel, family, hd): cfg for hd, cfg in by_dim.items()}


# {arch: {(kernel, family, head dim): TileConfig}}. Each entry is the largest tile (then
# the most pipeline stages) of a preference-ordered candidate list that the gate passes:
# tensor cores, no spills (ptxas caps at 255 registers per thread), shared memory within
# the limit. 128-row tiles spill everywhere except the INT8 kernels and sm_90's
# fp16 / bf16 forward at head dim 64; 8 warps halve the per-thread share of a tile.
# Head dims 72 and 96 compute on 128-wide padded tiles (their own entries: the masked
# columns change register allocation); other head dims use the entry of their padded
# head dim (64 or 128).
_TABLE: dict[int, dict[tuple[str, str, int], TileConfig]] = {
    80: {
        **_entries("fwd", "16bit", _per_head_dim(d64=T(64, 64, 8, 2), d72=T(64, 64, 8, 3), d96=T(64, 64, 8, 3),
                                                 d128=T(64, 64, 8, 3))),
        **_entries("fwd", "fp32", _per_head_dim(d64=T(64, 64, 8, 3), d72=T(64, 32, 8, 2), d96=T(64, 32, 8, 2),
                                                d128=T(64, 32, 8, 2))),
        **_entries("fwd_quant", "pv_half", _per_head_dim(d64=T(128, 64, 8, 3), d72=T(64, 32, 4, 2),
                                                         d96=T(64, 64, 8, 3), d128=T(64, 64, 8, 3))),
        **_entries("fwd_quant", "pv_int8", _per_head_dim(d64=T(128, 64, 8, 3), d72=T(128, 64, 8, 3),
                                                         d96=T(128, 64, 8, 3), d128=T(128, 64, 8, 3))),
        **_entries("bwd_preprocess", "16bit", _per_head_dim(d64=T(64, 16, 4, 1), d128=T(64, 16, 4, 1))),
        **_entries("bwd_preprocess", "fp32", _per_head_dim(d64=T(64, 16, 4, 1), d128=T(64, 16, 4, 1))),
        **_entries("bwd_dkdv", "16bit", _per_head_dim(d64=T(32, 32, 4, 2), d72=T(32, 64, 8, 2), d96=T(32, 64, 8, 2),
                                                      d128=T(32, 64, 8, 2))),
        **_entries("bwd_dkdv", "fp32", _per_head_dim(d64=T(16, 64, 4, 2), d72=T(64, 64, 8, 2), d96=T(64, 64, 8, 2),
                                                     d128=T(64, 64, 8, 2))),
        **_entries("bwd_dq", "16bit", _per_head_dim(d64=T(64, 32, 8, 2), d72=T(64, 64, 8, 2), d96=T(64, 64, 8, 2),
                                                    d128=T(64, 64, 8, 2))),
        **_entries("bwd_dq", "fp32", _per_head_dim(d64=T(32, 32, 4, 2), d72=T(64, 32, 8, 2), d96=T(64, 32, 8, 2),
                                                   d128=T(64, 32, 8, 2))),
    },
    90: {
        **_entries("fwd", "16bit", _per_head_dim(d64=T(128, 64, 8, 3), d72=T(64, 64, 8, 3), d96=T(64, 64, 8, 3),
                                                 d128=T(64, 64, 8, 3))),
        **_entries("fwd", "fp32", _per_head_dim(d64=T(64, 64, 8, 3), d72=T(64, 32, 4, 2), d96=T(64, 32, 8, 2),
                                                d128=T(64, 32, 8, 2))),
        **_entries("fwd_quant", "pv_half", _per_head_dim(d64=T(128, 64, 8, 3), d72=T(64, 64, 8, 3),
                                                         d96=T(64, 64, 8, 3), d128=T(64, 64, 8, 3))),
        **_entries("fwd_quant", "pv_int8", _per_head_dim(d64=T(128, 64, 8, 3), d72=T(64, 64, 8, 3),
                                                         d96=T(64, 64, 8, 3), d128=T(64, 64, 8, 3))),
        **_entries("bwd_preprocess", "16bit", _per_head_dim(d64=T(64, 16, 4, 1), d128=T(64, 16, 4, 1))),
        **_entries("bwd_preprocess", "fp32", _per_head_dim(d64=T(64, 16, 4, 1), d128=T(64, 16, 4, 1))),
        **_entries("bwd_dkdv", "16bit", _per_head_dim(d64=T(64, 64, 8, 2), d72=T(32, 64, 8, 2), d96=T(32, 64, 8, 2),
                                                      d128=T(32, 64, 8, 2))),
        **_entries("bwd_dkdv", "fp32", _per_head_dim(d64=T(32, 64, 8, 2), d72=T(16, 32, 4, 2), d96=T(16, 32, 4, 2),
                                                     d128=T(16, 32, 4, 2))),
        **_entries("bwd_dq", "16bit", _per_head_dim(d64=T(64, 64, 8, 2), d72=T(64, 64, 8, 2), d96=T(64, 64, 8, 2),
                                                    d128=T(64, 64, 8, 2))),
        **_entries("bwd_dq", "fp32", _per_head_dim(d64=T(64, 64, 8, 2), d72=T(64, 16, 4, 2), d96=T(64, 16, 4, 2),
                                                   d128=T(64, 16, 4, 2))),
    },
}
del T


def arch_of(device: torch.device) -> int:
    """Table key for a device: 90 for Hopper, 80 for everything else (and the CPU interpreter)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return 90 if major == 9 else 80
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


def _family(kernel: str, dtype: torch.dtype, pv_int8: bool) -> str:
    if kernel == "fwd_quant":
        return "pv_int8" if pv_int8 else "pv_half"
    return "fp32" if dtype == torch.float32 else "16bit"


def table_config(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, *, pv_int8: bool = False) -> TileConfig:
    """The table's entry before fitting to a mask's block sizes."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    family = _family(kernel, dtype, pv_int8)
    table = _TABLE.get(arch, {})
    for hd in (head_dim, padded_head_dim(head_dim)):
        if (kernel, family, hd) in table:
            return table[(kernel, family, hd)]
    raise ValueError(
        f"no tuned configuration for ({kernel!r}, {family!r}, head_dim={head_dim}) on sm_{arch}; "
        f"tuned archs are {sorted(_TABLE)} and head dims up to {MAX_HEAD_DIM}"
    )


def _fit(cfg: TileConfig, kernel: str, q_block: Optional[int], kv_block: Optional[int]) -> TileConfig:
    min_n = 32 if kernel == "fwd_quant" else MIN_TILE
    bm = fit_tile(cfg.block_m, q_block)
    bn = max(fit_tile(cfg.block_n, kv_block), min_n)
    if (bm, bn) == (cfg.block_m, cfg.block_n):
        return cfg
    return TileConfig(bm, bn, cfg.num_warps, cfg.num_stages)


def select(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
           q_block: Optional[int] = None, kv_block: Optional[int] = None, pv_int8: bool = False) -> TileConfig:
    """Launch parameters for ``kernel`` on ``device``, fitted to the mask's block sizes."""
    return _fit(table_config(kernel, arch_of(device), dtype, head_dim, pv_int8=pv_int8), kernel, q_block, kv_block)


@dataclass(frozen=True)
class ShippedConfig:
    """One kernel build the GPU check compiles: what it is, for which arch, with which tiles."""

    kernel: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    pv_int8: bool
    tiles: TileConfig

    @property
    def name(self) -> str:
        dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        quant = ""
        if self.kernel == "fwd_quant":
            quant = "-qk8-pv8" if self.pv_int8 else "-qk8-pvhalf"
        t = self.tiles
        return (f"{self.kernel}{quant}-{dt}-d{self.head_dim}-m{t.block_m}n{t.block_n}"
                f"w{t.num_warps}s{t.num_stages}")


def shipped_configurations(archs=GATE_ARCHS) -> Iterator[ShippedConfig]:
    """Every (kernel, dtype, head dim, quant mode, tiles) build the launchers can choose.

    The INT4-range Q·K mode runs the INT8 kernel unchanged (values in int8 storage), so it
    has no build of its own.
    """
    for arch in archs:
        for kernel in KERNELS:
            for dtype in SHIPPED_DTYPES:
                for hd in SHIPPED_HEAD_DIMS:
                    for pv_int8 in ((False, True) if kernel == "fwd_quant" else (False,)):
                        base = table_config(kernel, arch, dtype, hd, pv_int8=pv_int8)
                        variants = {base}
                        if kernel != "bwd_preprocess":
                            for mb in GATED_MASK_BLOCKS:
                                variants.add(_fit(base, kernel, mb, mb))
                        for tiles in sorted(variants, key=lambda c: (c.block_m, c.block_n)):
                            yield ShippedConfig(kernel, arch, dtype, hd, pv_int8, tiles)
