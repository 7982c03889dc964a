"""Triton forward kernels (float and quantized) in Triton's interpreter against the references.

conftest.py sets TRITON_INTERPRET=1 (the kernels run on CPU through Triton's
interpreter) and SPARSEGEN_POISON_OUTPUTS=1 (outputs start as NaN, so an element a
kernel forgets to write fails the finiteness checks below).

bf16: the interpreter's ``tl.dot`` returns garbage for bf16 operands (triton 3.x,
DESIGN.md "Verification without a GPU"), and the backend refuses bf16 there with a
message (tested below). Where no bf16 product is involved it runs: the INT8-P·V presets
with bf16 inputs are tested like the others. For the float kernels and the half-P·V
kernel the bf16 builds share every line of code with the fp16 builds (the dtype only
changes the operand type of the dots), so the fp16 cases stand in for them
numerically, and the ahead-of-time gate (tests/test_gpu_check.py) compiles the bf16
builds for sm_80 / sm_90.

fp32: on a GPU the fp32 builds multiply with TF32 operands (see
``triton_attention._dot_precision``); the interpreter ignores the dot precision and
multiplies in fp32, so the fp32 cases here check the algorithm at fp32 accuracy.

Shapes stay small because the interpreter executes every program in Python.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from sparsegen.kernels import BlockSparseMask, block_sparse_attention, can_run_triton
from sparsegen.kernels.quant import LOG2E, PVFormat, quantize_qk, quantize_v, resolve_quant
from sparsegen.kernels.reference import reference_attention
from sparsegen.kernels.triton_attention import layout_offset
from sparsegen.testing import QUANT_SQNR_FLOOR_DB, assert_close_to_golden, sqnr_db
from triton_cases import block_mask as _block_mask, eager_attention as _eager, mixed_mask as _mixed_mask
from triton_cases import qkv as _qkv, window_mask as _window_mask


def _check_lse(lse, eager_lse, gold_lse, what):
    """LSE: -inf exactly where the golden is (empty rows), no NaN, finite values within the derived tolerance."""
    assert lse.dtype == torch.float32 and lse.shape == gold_lse.shape, f"{what}: lse {lse.dtype} {tuple(lse.shape)}"
    assert not torch.isnan(lse).any(), f"{what}: lse has NaN (unwritten or invalid rows)"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse)), f"{what}: -inf rows of lse differ"
    fin = torch.isfinite(gold_lse)
    assert_close_to_golden(lse[fin], eager_lse[fin], gold_lse[fin], what=f"{what} lse")


def _check_forward(q, k, v, mask, what, scale=None):
    out, lse = block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True, scale=scale)
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    gold, gold_lse = reference_attention(q, k, v, mask, scale=sm_scale)
    eager, eager_lse = _eager(q, k, v, mask, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape, what
    assert_close_to_golden(out, eager, gold, what=what)
    _check_lse(lse, eager_lse, gold_lse, what)
    return out, lse


DTYPES = [torch.float32, torch.float16]
F32, F16 = torch.float32, torch.float16

# b, sq, sk, h, d, q_block, kv_block, density, per-head layout, dtype. The long sequences
# run in one dtype each (the interpreter is slow); S = 97 runs in both.
BLOCK_CASES = [
    *[(2, 97, 97, 2, 64, 32, 32, 0.5, True, dt) for dt in DTYPES],
    (1, 1000, 1000, 2, 72, 64, 128, 0.2, True, F16),
    (2, 1025, 1025, 1, 128, 128, 64, 0.15, False, F32),
    (1, 1025, 1025, 2, 96, 64, 64, 0.1, True, F16),
    *[(2, 300, 200, 2, 96, 64, 64, 0.4, False, dt) for dt in DTYPES],  # cross lengths, mask broadcast
    *[(1, 97, 97, 1, 64, 64, 64, 1.0, False, dt) for dt in DTYPES],    # dense
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"b{c[0]}-s{c[1]}x{c[2]}-h{c[3]}-d{c[4]}-blk{c[5]}x{c[6]}"
                                                          f"-p{c[7]}-{str(c[9])[6:]}")
def test_forward_block_masks_match_reference(case):
    b, sq, sk, h, d, qbs, kbs, density, per_head, dtype = case
    seed = sq * 7 + d
    q, k, v = _qkv(b, sq, sk, h, d, dtype, seed)
    mask = _block_mask(b if per_head else 1, h if per_head else 1, sq, sk, qbs, kbs, density, seed)
    _check_forward(q, k, v, mask, f"triton fwd {case} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,sq,sk,d,qbs,kbs", [(2, 200, 200, 64, 64, 32), (1, 120, 170, 96, 48, 80),
                                                (2, 97, 97, 128, 32, 32)], ids=lambda x: str(x))
def test_forward_token_tiles_per_head(b, sq, sk, d, qbs, kbs, dtype):
    """Partial blocks from ``from_mask_mod`` (banded per batch and head); 48 x 80 blocks are not tile multiples."""
    h = 2
    mask = _window_mask(b, h, sq, sk, qbs, kbs)
    assert mask.num_partial_blocks() > 0 and mask.shape[:2] == (b, h)
    q, k, v = _qkv(b, sq, sk, h, d, dtype, seed=sq + d, head_major=True)  # (B, H, S, D) storage: odd strides
    _check_forward(q, k, v, mask, f"triton fwd tiles s{sq}x{sk} d{d} blk{qbs}x{kbs} {dtype}", scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_token_rows_give_zero_output_and_neginf_lse(dtype):
    tok = torch.zeros(2, 1, 97, 97, dtype=torch.bool)
    tok[..., 1:, :5] = True          # query 0 attends nothing, though its block is visited
    tok[1, :, 40:60, 30:90] = True
    tok[1, :, 70:80, :] = False      # a run of empty rows inside a block, batch 1 only
    mask = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    q, k, v = _qkv(2, 97, 97, 1, 64, dtype, seed=3)
    out, lse = _check_forward(q, k, v, mask, f"empty rows {dtype}")
    assert torch.all(out[0, 0] == 0) and torch.all(out[1, 70:80] == 0)
    assert torch.isneginf(lse[:, 0, 0]).all() and torch.isneginf(lse[1, 0, 70:80]).all()
    assert torch.isfinite(lse[0, 0, 1:]).all()


# b, sq, sk, h, d, q_block, kv_block, dtype: lengths that are not block multiples, odd head dims
# (33: no aligned strides; 80: a padded 128-wide tile, split into halves at 64-row tiles).
MIXED_CASES = [
    *[(2, 97, 97, 2, 64, 32, 32, dt) for dt in DTYPES],
    (1, 1000, 1000, 1, 33, 64, 64, F32),
    (1, 1025, 1025, 1, 80, 128, 128, F16),
    (1, 300, 200, 2, 80, 64, 64, F32),
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: f"b{c[0]}-s{c[1]}x{c[2]}-h{c[3]}-d{c[4]}-blk{c[5]}x{c[6]}"
                                                          f"-{str(c[7])[6:]}")
def test_forward_full_and_partial_block_lists(case):
    """The two loops of the kernel: full blocks (no mask work) and partial blocks (tiles, short last block).

    Rows whose blocks are all partial, rows that attend nothing and query blocks without
    any full block all occur; the kernel layout is checked to contain them.
    """
    b, sq, sk, h, d, qbs, kbs, dtype = case
    mask, tok = _mixed_mask(b, h, sq, sk, qbs, kbs, seed=sq + d)
    lay = mask.kernel_layout()
    n_full, n_part = lay.num_full, lay.num - lay.num_full
    assert (n_full > 0).any() and (n_part > 0).any() and ((n_full == 0) & (n_part > 0)).any(), "cases not exercised"
    q, k, v = _qkv(b, sq, sk, h, d, dtype, seed=sq * 3 + d, head_major=d % 2 == 1)
    out, lse = _check_forward(q, k, v, mask, f"triton fwd mixed {case}")
    empty = ~tok.any(-1)  # (b, h, sq)
    assert empty.any() and torch.isneginf(lse[empty]).all()
    assert torch.all(out.transpose(1, 2)[empty] == 0)


@pytest.mark.parametrize("preset", ["int8", "int8-pv8"])
def test_quantized_forward_full_and_partial_block_lists(preset):
    b, s, h, d = 1, 200, 2, 64
    mask, _ = _mixed_mask(b, h, s, s, 64, 64, seed=11)
    q, k, v = _qkv(b, s, s, h, d, torch.float16, seed=12)
    cfg = resolve_quant(preset)
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, mask, backend="triton", quant=preset, return_lse=True)
        emu, emu_lse = block_sparse_attention(q, k, v, mask, backend="torch", quant=preset, return_lse=True)
    gold, gold_lse = _quant_golden(q, k, v, mask, cfg, d ** -0.5)
    assert_close_to_golden(out, emu, gold, factor=2.0, what=f"{preset} mixed lists")
    _check_lse(lse, emu_lse, gold_lse, f"{preset} mixed lists")


def test_negative_scale_matches_reference():
    """The kernels fold a non-negative scale into the exponent; a negative one flips K's sign in the ops layer."""
    mask, _ = _mixed_mask(1, 2, 97, 97, 32, 32, seed=5)
    q, k, v = _qkv(1, 97, 97, 2, 64, torch.float32, seed=6)
    _check_forward(q, k, v, mask, "negative scale", scale=-0.2)


@triton.jit
def _offset_probe(Out, b, h, blk, stride_b, stride_h, stride_blk):
    """Stores the kernels' layout offset of (b, h, blk) (int64 scalar) to Out."""
    tl.store(Out, layout_offset(b, h, blk, stride_b, stride_h, stride_blk))


def test_layout_offsets_are_int64_for_hunyuan_video_sized_masks():
    """A per-batch, per-head layout past 2^31 entries: the kernels' offsets of its last entries are exact.

    HunyuanVideo: 460,800 tokens in blocks of 64 = 7,200 blocks; at full density the lists of
    2 batches x 24 heads hold 2 x 24 x 7,200 x 7,200 = 2.5e9 entries. The layout is built on
    the meta device (no memory), the launchers' stride arguments are taken from it, and the
    kernels' offset helper runs in the interpreter (no attention kernel): an int32 product
    would wrap around.
    """
    from sparsegen.kernels.triton_attention import _layout_args

    bsz, heads, nb = 2, 24, 460800 // 64
    num = torch.empty(bsz, heads, nb, dtype=torch.int32, device="meta")
    idx = torch.empty(bsz, heads, nb, nb, dtype=torch.int32, device="meta")
    lay = BlockSparseMask(num, idx, 460800, 460800, 64, 64).kernel_layout()
    _, strides = _layout_args(lay)
    count_strides, list_strides = strides[:3], strides[3:]
    last = (bsz - 1, heads - 1, nb - 1)
    for st, width in ((list_strides, nb), (count_strides, 1)):
        expect = sum(i * s for i, s in zip(last, st))
        got = torch.zeros(1, dtype=torch.int64)
        _offset_probe[(1,)](got, *last, *st)
        assert int(got) == expect, (st, int(got), expect)
    assert sum(i * s for i, s in zip(last, list_strides)) + nb - 1 >= 2**31  # the case is real


def test_dense_yardstick_kernel_matches_reference():
    """The gate's reference dense kernel (tutorial-shaped) computes attention: float and INT8 variants."""
    from sparsegen.kernels.triton_dense import launch_dense_forward

    b, s, h = 1, 256, 2
    full = BlockSparseMask.full(q_len=s, kv_len=s, q_block_size=128, kv_block_size=64)
    for dtype, d in ((torch.float16, 64), (torch.float32, 72)):
        q, k, v = _qkv(b, s, s, h, d, dtype, seed=d)
        out, lse = torch.empty_like(q), torch.empty(b, h, s)
        launch_dense_forward(q, k, v, d ** -0.5, out, lse)
        gold, gold_lse = reference_attention(q, k, v, full, scale=d ** -0.5)
        eager, eager_lse = _eager(q, k, v, full, d ** -0.5)
        assert_close_to_golden(out, eager, gold, what=f"dense yardstick {dtype} d{d}")
        _check_lse(lse, eager_lse, gold_lse, f"dense yardstick {dtype} d{d}")
    q, k, v = _qkv(b, s, s, h, 64, torch.float16, seed=3)
    for preset in ("int8", "int8-pv8"):
        cfg = resolve_quant(preset)
        qz = quantize_qk(q, k, cfg, 64 ** -0.5)
        v_op, v_scale = quantize_v(v) if cfg.pv == PVFormat.INT8 else (v, None)
        out, lse = torch.empty_like(q), torch.empty(b, h, s)
        launch_dense_forward(qz.q_int, qz.k_int, v_op, 64 ** -0.5, out, lse,
                             quant=(qz.q_scale, qz.k_scale, v_scale, cfg.q_block, cfg.k_block, cfg.p_scale_inv))
        with torch.no_grad():
            emu = block_sparse_attention(q, k, v, full, backend="torch", quant=preset)
        gold, _ = _quant_golden(q, k, v, full, cfg, 64 ** -0.5)
        assert_close_to_golden(out, emu, gold, factor=2.0, what=f"dense yardstick {preset}")


def test_bf16_is_refused_in_the_interpreter_with_the_reason():
    """Not a silent skip: the backend says why bf16 cannot run here (fp16 cases stand in, see module doc)."""
    q, k, v = _qkv(1, 64, 64, 1, 64, torch.bfloat16, seed=0)
    mask = BlockSparseMask.full(q_len=64, kv_len=64, q_block_size=32, kv_block_size=32)
    assert not can_run_triton(q, k, v, mask)
    with pytest.raises(ValueError, match=r"bf16 inputs cannot run in Triton's interpreter.*float16 / float32"):
        block_sparse_attention(q, k, v, mask, backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match=r"bf16 inputs cannot run in Triton's interpreter"):
        block_sparse_attention(q, k, v, mask, backend="triton", quant="int8")  # half P·V: a bf16 product
    assert can_run_triton(q, k, v, mask, resolve_quant("int8-pv8"))


# ---------------------------------------------------------------------------- quantized


def _quant_golden(q, k, v, mask, cfg, sm_scale):
    """fp64 attention on the *same* quantized operands as the kernels, with P exact.

    Q and K are dequantized from ``quantize_qk`` (scores in the log2 domain, hence the
    softmax scale 1/log2(e)), V is the int8-dequantized or half-rounded V. Only the
    rounding of P (fp16 or int8) is left out: the torch backend rounds P against the
    row's final max and the kernel against its running max, so both differ from this
    golden by one P rounding, and the torch backend's error is the budget.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qz = quantize_qk(q, k, cfg, sm_scale)
    qd = qz.q_int.double() * qz.q_scale.double().repeat_interleave(cfg.q_block, -1)[..., :sq, None]
    kd = qz.k_int.double() * qz.k_scale.double().repeat_interleave(cfg.k_block, -1)[..., :sk, None]
    if cfg.pv == PVFormat.INT8:
        v_int, v_scale = quantize_v(v)
        vd = (v_int.double() * v_scale.double()[:, :, None, :]).transpose(1, 2)
    else:
        half = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float16  # the kernel's P·V operand dtype
        vd = v.to(half).double()
    return reference_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd, mask, scale=1.0 / LOG2E)


_SQNR_FLOOR_DB = QUANT_SQNR_FLOOR_DB


QUANT_CASES = [
    # (b, s, h, d, mask kind, preset, dtype)
    *[(2, 97, 2, 64, "tiles", p, dt) for p in ("int8", "int4", "int8-pv8", "int4-pv8") for dt in DTYPES],
    # bf16 runs where the kernel has no bf16 product (module docstring).
    *[(2, 97, 2, 64, "tiles", p, torch.bfloat16) for p in ("int8-pv8", "int4-pv8")],
    (1, 1000, 1, 96, "blocks", "int8", torch.float16),
    (1, 1025, 1, 128, "blocks", "int8-pv8", torch.float32),
    (1, 1025, 1, 72, "blocks", "int4", torch.float32),
]


@pytest.mark.parametrize("b,s,h,d,kind,preset,dtype", QUANT_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_quantized_forward_matches_torch_emulation(b, s, h, d, kind, preset, dtype):
    if kind == "tiles":
        mask = _window_mask(b, h, s, s, 32, 32)
    else:
        mask = _block_mask(b, h, s, s, 128, 64, 0.2, seed=s)
    q, k, v = _qkv(b, s, s, h, d, dtype, seed=s + d + len(preset))
    cfg = resolve_quant(preset)
    what = f"{preset} b{b} s{s} h{h} d{d} {kind} {dtype}"
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, mask, backend="triton", quant=preset, return_lse=True)
        emu, emu_lse = block_sparse_attention(q, k, v, mask, backend="torch", quant=preset, return_lse=True)
    gold, gold_lse = _quant_golden(q, k, v, mask, cfg, d ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape, what
    # err(triton) <= 2 x err(torch emulation) against the same-operand golden; both carry one P rounding.
    assert_close_to_golden(out, emu, gold, factor=2.0, what=what)
    _check_lse(lse, emu_lse, gold_lse, what)
    exact, _ = reference_attention(q, k, v, mask)
    sq = sqnr_db(out, exact)
    assert sq >= _SQNR_FLOOR_DB[preset], f"{what}: SQNR {sq:.1f} dB < {_SQNR_FLOOR_DB[preset]} dB"
    assert math.isfinite(sq)


def test_quantized_empty_rows():
    tok = torch.zeros(1, 1, 97, 97, dtype=torch.bool)
    tok[..., 1:, :40] = True
    mask = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    q, k, v = _qkv(1, 97, 97, 1, 64, torch.float16, seed=9)
    for preset in ("int8", "int8-pv8"):
        with torch.no_grad():
            out, lse = block_sparse_attention(q, k, v, mask, backend="triton", quant=preset, return_lse=True)
        assert torch.all(out[0, 0] == 0) and torch.isneginf(lse[0, 0, 0]), preset
        assert torch.isfinite(out).all() and torch.isfinite(lse[0, 0, 1:]).all(), preset
