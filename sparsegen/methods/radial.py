"""Radial attention: a static O(n log n) block mask with spatiotemporal energy decay.

Video tokens are ordered frame-major: ``frames`` latent frames of ``tokens_per_frame``
tokens each, ``N = frames * tokens_per_frame``. For query frame ``i`` and key frame
``j`` (``dist = |i - j|``) the token mask of the frame pair is, in *local* token
coordinates (``r``, ``c`` in ``[0, tokens_per_frame)``)::

    sink      j == 0 (with sink=True): every token of the pair is attended
    band      |c - r| <= width(dist)
                 width = tokens_per_frame                               if dist <= 1
                 width = max(P / 2**dist.bit_length() * decay, block)   otherwise
              with P = 2**tokens_per_frame.bit_length() (3600 -> 4096, 3840 -> 4096)
    decimate  w0 = P / 2**dist.bit_length();  if w0 < U the pair is kept only when
              dist % int(U / w0) == 0, with the decimation unit U = 128 tokens in the
              published rule (fixed, whatever the block size)

The mask is then reduced to ``block_size`` x ``block_size`` blocks, one frame pair at a
time, and the pairs' results are OR-ed::

                key frame j-1 | key frame j
                  ....+-------+-------+....     block (a, b) is kept when, for some
    query  i  ....|   |  pair |  pair |         frame pair (i, j) that meets it,
    frame     ----+---(i,j-1)-+-(i,j)-+----     more than 60% of the block's columns
          i+1 ....|   |  pair |  pair |         that have a set token *of that pair*
                  ....+-------+-------+....     have more than a third of the block's
                                                rows set *by that pair*.

"A third of the block's rows" means a third of ``block_size``, or of the real rows of
the last block when ``N`` is not a multiple of the block size. A block that straddles a
frame boundary is therefore judged separately by each frame pair that meets it, with
only that pair's tokens counted, exactly as the official implementation (the published
sparsities come from it) judges it.

Two places where this module and the official code (mit-han-lab/radial-attention,
``radial_attn/attn_mask.py``) differ, neither of which touches the published figures:

* The official code evaluates a frame pair on ``ceil(tokens_per_frame / block)`` blocks
  from the pair's first block, so when a frame spans one block more than that (e.g.
  ``tokens_per_frame=1560``, Wan 480p) the frame's last tokens are ignored by that
  pair. Here a pair is evaluated on every block it meets. With 3600 or 3840 tokens per
  frame and blocks of 64 or 128 no frame spans an extra block, so the masks are equal.
* The official code needs ``N`` to be a multiple of the block size (its kernel call
  fails otherwise); here the last block may be partial and its "third of the rows" is a
  third of its real rows.

Sparsity of the published settings (decay 1.0, sink on, block 128; reproduced by
``tests/test_radial.py``): HunyuanVideo 64 x 3600 tokens 80.8%, 128 x 3600 88.3%;
Wan 2.1 41 x 3840 73.6%.

A geometry where some query block meets no frame with more than a third of the block's
rows (``tokens_per_frame`` at most about ``block_size / 3``) would leave that block with
no key block at all; :func:`radial_block_mask` refuses it and suggests a block size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..kernels import BlockSparseMask, block_sparse_attention
from ..kernels.mask import block_count
from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod, check_int

__all__ = [
    "RadialConfig",
    "RadialMethod",
    "radial_block_mask",
    "radial_block_matrix",
    "radial_token_mask",
    "radial_block_rule",
    "radial_pair_width",
    "kept_blocks_per_distance",
    "unservable_query_block",
    "PRESETS",
    "DEFAULT_DECIMATION_UNIT",
]

# Frame decimation compares the decay length with this token count (the official code
# hard-codes 128 for every block size, including 64 for Wan 2.2). Frames much smaller
# than it (the built-in model's 64 tokens: every pair but the diagonal and the sink is
# decimated) need a smaller unit for the band to shrink with distance: ``decimation_unit``.
DEFAULT_DECIMATION_UNIT = 128
# Block rule, as exact fractions: a column of a block is "dense" when more than
# ROW_SHARE of the block's rows are set; the block is kept when more than KEEP_SHARE of
# its non-empty columns are dense.
ROW_SHARE = (1, 3)
KEEP_SHARE = (3, 5)
# Largest token mask radial_token_mask builds (it is dense (N, N): tests only).
_MAX_TOKEN_MASK_TOKENS = 16384


# ------------------------------------------------------------------- arguments
def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    return value


def _check_decay_factor(decay_factor) -> float:
    """The one check of ``decay_factor`` (the config and the public builders share it)."""
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)):
        raise TypeError(f"decay_factor must be a number, got {decay_factor!r} ({type(decay_factor).__name__})")
    if not (math.isfinite(decay_factor) and decay_factor > 0):
        raise ValueError(f"decay_factor must be a finite number > 0, got decay_factor={decay_factor!r}")
    return float(decay_factor)


def _check_decimation_unit(unit) -> int:
    """The one check of ``decimation_unit`` (the config and the public builders share it)."""
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1 or unit & (unit - 1):
        raise ValueError(f"decimation_unit must be a power of two (128 is the published rule), got "
                         f"decimation_unit={unit!r}")
    return unit


def _check_geometry_args(frames, tokens_per_frame, block_size, decay_factor, decimation_unit) -> float:
    """Arguments of the public builders (the method path is checked by its config)."""
    _check_int("frames", frames, 1)
    _check_int("tokens_per_frame", tokens_per_frame, 1)
    _check_int("block_size", block_size, 1)
    _check_decimation_unit(decimation_unit)
    return _check_decay_factor(decay_factor)


# ------------------------------------------------------------------ definition
def radial_pair_width(dist: int, *, tokens_per_frame: int, block_size: int, decay_factor: float,
                      decimation_unit: int = DEFAULT_DECIMATION_UNIT) -> Optional[int]:
    """Band half-width (in tokens) of a frame pair at temporal distance ``dist``.

    Query token ``r`` and key token ``c`` (local indices in their frames) are attended
    iff ``|c - r| <= width``. ``None`` means the frame pair is dropped by frame
    decimation. The sink (key frame 0) is not handled here.

    Example: ``tokens_per_frame=3600`` (P = 4096), ``decay_factor=1``, block 128:
    dist 0, 1 -> 3600 (whole frame); 2, 3 -> 1024; 4..7 -> 512; 8..15 -> 256;
    16..31 -> 128; 32..63 -> 128 but only even distances; 64..127 -> 128, multiples of 4.
    With ``tokens_per_frame=64`` (P = 128) the published unit 128 decimates every pair at
    distance >= 1 but the even ones; ``decimation_unit=16`` keeps distances 1..7 and then
    every other one.
    """
    group = dist.bit_length()
    decay_length = 2 ** tokens_per_frame.bit_length() / 2 ** group  # a power of two: exact in float
    if decay_length < decimation_unit and dist % int(decimation_unit / decay_length) != 0:
        return None
    if dist <= 1:
        return tokens_per_frame
    width = max(decay_length * decay_factor, block_size)
    # |c - r| is an integer, so |c - r| <= width  <=>  |c - r| <= floor(width).
    return min(math.floor(width), tokens_per_frame)


def radial_token_mask(
    *, frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, sink: bool = True,
    decimation_unit: int = DEFAULT_DECIMATION_UNIT, device="cpu",
) -> torch.Tensor:
    """The token-level radial mask, straight from the definition (slow; small sizes only).

    Returns:
        bool (N, N), N = frames * tokens_per_frame, frame-major; True = attended.

    Raises:
        ValueError: N above 16384 (use :func:`radial_block_mask`), or bad arguments.
    """
    decay = _check_geometry_args(frames, tokens_per_frame, block_size, decay_factor, decimation_unit)
    n, tpf = frames * tokens_per_frame, tokens_per_frame
    if n > _MAX_TOKEN_MASK_TOKENS:
        raise ValueError(
            f"radial_token_mask builds a dense (N, N) mask and is meant for tests; N={n} exceeds "
            f"{_MAX_TOKEN_MASK_TOKENS}. Use radial_block_mask for real sizes."
        )
    local = torch.arange(tpf, device=device)
    offset = (local[None, :] - local[:, None]).abs()  # |c - r|
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    p = 2 ** tpf.bit_length()
    for i in range(frames):
        for j in range(frames):
            rows, cols = slice(i * tpf, (i + 1) * tpf), slice(j * tpf, (j + 1) * tpf)
            if sink and j == 0:
                mask[rows, cols] = True
                continue
            dist = abs(i - j)
            w0 = p / 2 ** dist.bit_length()
            if w0 < decimation_unit and dist % int(decimation_unit / w0) != 0:
                continue
            width = tpf if dist <= 1 else max(w0 * decay, block_size)
            mask[rows, cols] = offset <= width
    return mask


def radial_block_rule(
    token_mask: torch.Tensor, *, frames: int, tokens_per_frame: int, block_size: int
) -> torch.Tensor:
    """Reduce a frame-major token mask to blocks with the radial rule (slow reference).

    For every frame pair (i, j) and every block (a, b) that the pair meets, the pair's
    tokens inside the block are counted: a column is non-empty when one of its rows is
    set, dense when more than a third of the block's rows (``block_size``, or the real
    rows of a partial last block) are set; the block is kept for that pair when more
    than 60% of the non-empty columns are dense. A block is kept when any pair keeps it.

    Args:
        token_mask: bool (N, N), N = frames * tokens_per_frame.
    Returns:
        bool (Qb, Kb) block matrix, Qb = Kb = ceil(N / block_size).
    """
    tpf, bs = tokens_per_frame, block_size
    n = frames * tpf
    if tuple(token_mask.shape) != (n, n):
        raise ValueError(f"token_mask must be (N, N) with N = frames * tokens_per_frame = {n}; "
                         f"got {tuple(token_mask.shape)=}")
    nb = block_count(n, bs)
    real_rows = torch.tensor([min(bs, n - a * bs) for a in range(nb)], device=token_mask.device)
    out = torch.zeros(nb, nb, dtype=torch.bool, device=token_mask.device)
    for i in range(frames):
        a0, a1 = (i * tpf) // bs, ((i + 1) * tpf - 1) // bs + 1
        for j in range(frames):
            b0, b1 = (j * tpf) // bs, ((j + 1) * tpf - 1) // bs + 1
            # The pair's tokens on a block-aligned canvas covering the blocks it meets.
            canvas = torch.zeros((a1 - a0) * bs, (b1 - b0) * bs, dtype=torch.int32, device=token_mask.device)
            r0, c0 = i * tpf - a0 * bs, j * tpf - b0 * bs
            canvas[r0:r0 + tpf, c0:c0 + tpf] = token_mask[i * tpf:(i + 1) * tpf, j * tpf:(j + 1) * tpf]
            counts = canvas.view(a1 - a0, bs, b1 - b0, bs).sum(1)  # (rows blocks, col blocks, bs) per column
            rows = real_rows[a0:a1].view(-1, 1, 1)
            non_empty = (counts > 0).sum(-1)
            dense = (counts * ROW_SHARE[1] > rows * ROW_SHARE[0]).sum(-1)
            out[a0:a1, b0:b1] |= dense * KEEP_SHARE[1] > non_empty * KEEP_SHARE[0]
    return out


# ----------------------------------------------------------- fast block builder
def _distance_widths(frames: int, tpf: int, bs: int, decay: float, unit: int) -> torch.Tensor:
    """int64 (frames,): band width per frame distance, -1 where decimation drops the pair."""
    widths = [radial_pair_width(d, tokens_per_frame=tpf, block_size=bs, decay_factor=decay, decimation_unit=unit)
              for d in range(frames)]
    return torch.tensor([-1 if w is None else w for w in widths], dtype=torch.int64)


def _row_frames(n: int, tpf: int, bs: int):
    """Per query block and slot s, the s-th frame the block meets and its local rows.

    Returns (frame, lo, hi, valid) each (S, Qb) int64/bool, plus real rows (Qb,):
    rows [lo, hi) of ``frame`` (local coordinates) lie in the block.
    """
    nb = block_count(n, bs)
    start = torch.arange(nb, dtype=torch.int64) * bs
    stop = torch.clamp(start + bs, max=n)
    first, last = start // tpf, (stop - 1) // tpf
    slots = int((last - first).max()) + 1
    frame = first[None, :] + torch.arange(slots, dtype=torch.int64)[:, None]
    valid = frame <= last[None, :]
    lo = torch.clamp(start[None, :] - frame * tpf, min=0)
    hi = torch.minimum(stop[None, :] - frame * tpf, torch.full_like(frame, tpf))
    lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
    return frame, lo, hi, valid, stop - start


def unservable_query_block(*, frames: int, tokens_per_frame: int, block_size: int) -> Optional[int]:
    """First query block that the block rule necessarily leaves empty, or None.

    A column can only be dense for a frame pair if that query frame owns more than a
    third of the block's rows; the diagonal pair (i, i) is always whole, so a block is
    non-empty iff one of its frames owns more than a third of its rows. This holds for
    every block whenever ``3 * tokens_per_frame > block_size``.
    """
    n = frames * tokens_per_frame
    _, lo, hi, _, real = _row_frames(n, tokens_per_frame, block_size)
    ok = ((hi - lo) * ROW_SHARE[1] > real[None, :] * ROW_SHARE[0]).any(0)
    bad = (~ok).nonzero()
    return None if bad.numel() == 0 else int(bad[0])


def _unservable_message(frames: int, tpf: int, bs: int, block: int) -> str:
    candidates = [b for b in range(16, min(bs, 3 * tpf), 16) if 3 * tpf > b]
    fix = (f"use block_size={candidates[-1]} (any multiple of 16 below 3 * tokens_per_frame = {3 * tpf} works)"
           if candidates else "use dense attention for this geometry (frames of 5 tokens or fewer)")
    return (
        f"radial attention cannot serve frames={frames}, tokens_per_frame={tpf} with block_size={bs}: query block "
        f"{block} has no frame owning more than a third of its rows, so the block rule (keep a block when more than "
        f"60% of its columns have more than a third of its rows set within one frame pair) keeps no key block for "
        f"it; {fix}"
    )


def radial_block_matrix(
    *, frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, sink: bool = True,
    decimation_unit: int = DEFAULT_DECIMATION_UNIT, device="cpu",
) -> torch.Tensor:
    """The radial block matrix, computed at block level (no token mask is built).

    Equal to ``radial_block_rule(radial_token_mask(...))``. For each (query block, its
    query frame i, key frame j) the set of dense columns of the pair is an interval of
    frame j, so the kept key blocks are a contiguous run: every block inside the interval
    passes the rule, and only the two end blocks need the 60% test. Cost is
    O(query blocks x frames), plus the (Qb, Kb) output.

    Returns:
        bool (Qb, Kb), Qb = Kb = ceil(frames * tokens_per_frame / block_size).
    """
    decay = _check_geometry_args(frames, tokens_per_frame, block_size, decay_factor, decimation_unit)
    return _radial_blocks(frames, tokens_per_frame, block_size, decay, sink, decimation_unit).to(device)


def _radial_blocks(frames: int, tpf: int, bs: int, decay: float, sink: bool, unit: int) -> torch.Tensor:
    """:func:`radial_block_matrix` on the CPU, for arguments already checked."""
    n = frames * tpf
    nb = block_count(n, bs)
    widths = _distance_widths(frames, tpf, bs, decay, unit)
    frame, lo_all, hi_all, valid_all, real_all = _row_frames(n, tpf, bs)
    slots = frame.shape[0]
    key_frames = torch.arange(frames, dtype=torch.int64)
    key_base = key_frames * tpf  # first token of each key frame
    diff = torch.zeros(nb, nb + 1, dtype=torch.int32)
    # Chunk query blocks so the (slots, blocks, frames) work tensors stay ~4M entries.
    chunk = max(1, (1 << 22) // max(1, slots * frames))
    for a0 in range(0, nb, chunk):
        a1 = min(nb, a0 + chunk)
        i = frame[:, a0:a1, None]
        lo, hi = lo_all[:, a0:a1, None], hi_all[:, a0:a1, None]
        real = real_all[None, a0:a1, None]
        need = real * ROW_SHARE[0] // ROW_SHARE[1] + 1  # a dense column has at least this many rows set
        w = widths[(i - key_frames).abs().clamp(max=frames - 1)]
        if sink:
            w[..., 0] = tpf
        ok = valid_all[:, a0:a1, None] & (w >= 0) & (hi - lo >= need) & (2 * w + 1 >= need)
        # Column c of frame j is non-empty iff c in [z0, z1], dense iff c in [h0, h1]
        # (count(c) = |[lo, hi) ∩ [c - w, c + w]| is a trapezoid in c).
        z0, z1 = torch.clamp(lo - w, min=0), torch.clamp(hi - 1 + w, max=tpf - 1)
        h0, h1 = torch.clamp(lo - w + need - 1, min=0), torch.clamp(hi + w - need, max=tpf - 1)
        ok &= h0 <= h1
        first_b = (key_base + h0) // bs
        last_b = (key_base + h1) // bs

        def passes(b):
            c0 = torch.clamp(b * bs - key_base, min=0)
            c1 = torch.clamp((b + 1) * bs - key_base, max=tpf) - 1  # inclusive
            non_empty = torch.clamp(torch.minimum(c1, z1) - torch.maximum(c0, z0) + 1, min=0)
            dense = torch.clamp(torch.minimum(c1, h1) - torch.maximum(c0, h0) + 1, min=0)
            return dense * KEEP_SHARE[1] > non_empty * KEEP_SHARE[0]

        left = first_b + (~passes(first_b)).long()
        right = last_b - (~passes(last_b)).long()
        ok &= left <= right
        rows = torch.arange(a0, a1, dtype=torch.int64)[None, :, None].expand_as(ok)[ok]
        left, right = left[ok], right[ok]
        ones = torch.ones_like(rows, dtype=torch.int32)
        diff.index_put_((rows, left), ones, accumulate=True)
        diff.index_put_((rows, right + 1), -ones, accumulate=True)
    return torch.cumsum(diff, dim=1, dtype=torch.int32)[:, :nb] > 0


def radial_block_mask(
    *, frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, sink: bool = True,
    decimation_unit: int = DEFAULT_DECIMATION_UNIT, device="cpu",
) -> BlockSparseMask:
    """Radial attention mask over the video tokens of one attention call.

    Args:
        frames: latent frames F (after patchify).
        tokens_per_frame: tokens per latent frame (height x width after patchify).
        block_size: query and key block size (128; 64 for Wan 2.2). Any N works: the
            last block may be partial.
        decay_factor: scales the band width of frame pairs at distance >= 2 (1.0 is the
            paper's definition; smaller is sparser).
        sink: key frame 0 is attended in full by every query frame.
        decimation_unit: frame pairs whose decay length falls below this many tokens are
            kept only every ``unit / decay length`` frames (a power of two; 128 is the
            published rule; frames of a few dozen tokens need a smaller one, e.g. 16).
        device: where the mask lives.

    Returns:
        BlockSparseMask with layout (1, 1, Qb, K), q_len = kv_len = F * tokens_per_frame,
        full blocks only (no token tiles), the same for every batch and head.

    Raises:
        TypeError / ValueError: non-integer or non-positive sizes, a decay factor that is
        not a positive finite number, or a geometry whose frames are so small that a
        query block would visit no key block (the message suggests a block size).

    Example::

        >>> m = radial_block_mask(frames=64, tokens_per_frame=3600, block_size=128, decay_factor=1.0)
        >>> round(m.sparsity(), 3)
        0.808
    """
    decay = _check_geometry_args(frames, tokens_per_frame, block_size, decay_factor, decimation_unit)
    return _radial_mask(frames, tokens_per_frame, block_size, decay, sink, decimation_unit).to(device)


def _radial_mask(frames: int, tpf: int, bs: int, decay: float, sink: bool, unit: int) -> BlockSparseMask:
    """:func:`radial_block_mask` on the CPU, for arguments already checked (the geometry's servability included)."""
    bad = unservable_query_block(frames=frames, tokens_per_frame=tpf, block_size=bs)
    if bad is not None:
        raise ValueError(_unservable_message(frames, tpf, bs, bad))
    n = frames * tpf
    return BlockSparseMask.from_block_matrix(_radial_blocks(frames, tpf, bs, decay, sink, unit), q_len=n, kv_len=n,
                                             q_block_size=bs, kv_block_size=bs)


def kept_blocks_per_distance(
    blocks: torch.Tensor, *, frames: int, tokens_per_frame: int, block_size: int, sink: bool = True
) -> dict[int, int]:
    """Kept blocks of one (query frame, key frame) pair per frame distance.

    For distance d the pair is (query frame d + k0, key frame k0) with k0 = 1 when the
    sink is on (so the always-dense sink frame 0 is never the key frame) and 0 otherwise.
    The pair's blocks are those whose query rows meet the query frame and whose key
    columns meet the key frame; a block straddling a frame boundary therefore counts
    for every pair it meets.

    Args:
        blocks: bool (Qb, Kb) block matrix of the mask.
    Returns:
        {distance: kept blocks}, distances 0 .. frames - 1 - k0.
    """
    tpf, bs = tokens_per_frame, block_size
    k0 = 1 if sink and frames > 1 else 0

    def span(f):
        return slice((f * tpf) // bs, ((f + 1) * tpf - 1) // bs + 1)

    return {d: int(blocks[span(d + k0), span(k0)].sum()) for d in range(frames - k0)}


# ------------------------------------------------------------- config, method
# Official settings per model (README and scripts of mit-han-lab/radial-attention), for
# ``RadialConfig.preset``. Steps are counted in the model's usual schedule (50 steps for
# Wan 2.1 and HunyuanVideo, 40 for Wan 2.2).
PRESETS: dict[str, dict] = {
    "wan2.1": dict(decay_factor=0.2, dense_steps=12, dense_layers=1),
    "hunyuanvideo": dict(decay_factor=0.95, dense_steps=12, dense_layers=0),
    "wan2.2": dict(decay_factor=0.8, block_size=64, dense_steps=11, dense_layers=1),
    # Videos 2x-4x longer than the model was trained for, with a length-extension LoRA.
    "extended-length-lora": dict(decay_factor=1.0, dense_steps=2, dense_layers=2),
}


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Radial attention options.

    Args:
        decay_factor: band width scale for frame distances >= 2 (> 0). Default 1.0: the
            paper's definition, its sparsity table and the official scripts' default.
            The official presets use 0.2 (Wan 2.1-14B), 0.95 (HunyuanVideo), 0.8 (Wan 2.2).
        block_size: query/key block size in tokens, a multiple of 16 (default 128, the
            official value; Wan 2.2 uses 64).
        sink: key frame 0 is attended in full by every frame (default True, as in the paper).
        decimation_unit: frame pairs whose decay length (tokens) falls below it are kept
            only every ``unit / length`` frames; a power of two, default 128 (the
            published rule). Frames of a few dozen tokens need a smaller unit for the band
            to shrink with distance instead of dropping every pair but the diagonal.
        dense_steps, dense_last_steps, dense_layers, backend, version: see MethodConfig.
            The defaults keep every step and layer sparse, like the official scripts'
            defaults; the official quality settings are the presets
            (``RadialConfig.preset("wan2.1")``, :data:`PRESETS`).
    """

    method: ClassVar[str] = "radial"
    presets: ClassVar[dict] = PRESETS
    decay_factor: float = 1.0
    block_size: int = 128
    sink: bool = True
    decimation_unit: int = DEFAULT_DECIMATION_UNIT

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        try:
            object.__setattr__(self, "decay_factor", _check_decay_factor(self.decay_factor))
        except (TypeError, ValueError):
            raise ValueError(f"{name}.decay_factor={self.decay_factor!r} is invalid: must be a finite number > 0 "
                             "(e.g. 0.2 to 1.0)") from None
        check_int(name, "block_size", self.block_size, low=16, multiple_of=16, what="e.g. 64 or 128")
        if not isinstance(self.sink, bool):
            raise ValueError(f"{name}.sink={self.sink!r} is invalid: must be True or False")
        try:
            _check_decimation_unit(self.decimation_unit)
        except ValueError:
            raise ValueError(f"{name}.decimation_unit={self.decimation_unit!r} is invalid: must be a power of two "
                             "(128 is the published rule; e.g. 16 for frames of 64 tokens)") from None


class RadialMethod(SparseAttentionMethod):
    """Radial attention over the video tokens; the mask is cached per (geometry, device)."""

    config_cls = RadialConfig
    has_static_mask = True
    serves_frame_causal = True

    def _mask(self, geometry: AttentionGeometry, device) -> tuple[BlockSparseMask, float]:
        """(mask on ``device``, its density as a host float), built once per geometry on the CPU."""
        device = torch.device(device)

        def build():
            if device.type != "cpu":
                mask, density = self._mask(geometry, "cpu")
                return mask.to(device), density
            cfg = self.config
            mask = _radial_mask(geometry.frames, geometry.tokens_per_frame, cfg.block_size, cfg.decay_factor,
                                cfg.sink, cfg.decimation_unit)
            return mask, mask.density()

        return self.cached(("radial_mask", geometry, str(device)), build)

    def static_mask(self, geometry: AttentionGeometry, device="cpu") -> BlockSparseMask:
        """The block mask this method uses for ``geometry`` (cached)."""
        return self._mask(geometry, device)[0]

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        self._mask(geometry, device)

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        """Raise ValueError when a query block would visit no key block (tiny frames).

        One frame (an image) is served, as the dense attention radial's rule gives it
        (a warning says so: the decay is over frames, so nothing is saved)."""
        if geometry.frames == 1:
            logging.getLogger("sparsegen").warning(
                "radial attention on a single frame %s is dense attention (its band decays over frames): nothing is "
                "saved; use 'gna' for images", geometry.grid)
        bs = self.config.block_size
        bad = unservable_query_block(frames=geometry.frames, tokens_per_frame=geometry.tokens_per_frame, block_size=bs)
        if bad is not None:
            raise ValueError(_unservable_message(geometry.frames, geometry.tokens_per_frame, bs, bad)
                             + f" (geometry {geometry.grid}: frames x height x width after patchify)")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Radial block-sparse attention.

        Args:
            q, k, v: (B, N, H, D), N = call.geometry.num_tokens, frame-major.
        Returns:
            out (B, N, H, D) and lse fp32 (B, H, N); ``call.stats["density"]`` is the
            fraction of visited blocks.
        """
        g = call.geometry
        if q.dim() != 4 or q.shape[1] != g.num_tokens:
            raise ValueError(
                f"radial attention expects q of shape (batch, {g.num_tokens}, heads, head_dim) for geometry "
                f"{g.grid}; got {tuple(q.shape)=}"
            )
        mask, density = self._mask(g, q.device) if call.frame_causal is None else self.call_mask(g, q.device, call)
        call.stats["density"] = density
        return block_sparse_attention(q, k, v, mask, return_lse=True, backend=call.backend)
