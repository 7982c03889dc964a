"""The GPU time model (sparsegen.kernels.timemodel): dense = 1, monotone, a hand-computed case, errors."""

import math

import pytest
import torch

from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.timemodel import (
    ARCHS,
    SOFTMAX_ALU_OPS,
    GPUArch,
    ModelAssumptions,
    predict_kernel_time,
    predict_speedup,
)


def _random_chain(seq_len: int, block: int, densities, heads: int = 2, seed: int = 0):
    """Nested random block masks (each one a superset of the previous), diagonal always kept."""
    nb = seq_len // block
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, nb, nb, generator=g) + 2.0 * torch.eye(nb)
    order = scores.argsort(-1, descending=True)
    masks = []
    for d in densities:
        n = max(1, round(d * nb))
        blocks = torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        masks.append(BlockSparseMask.from_block_matrix(blocks, q_len=seq_len, kv_len=seq_len, q_block_size=block,
                                                       kv_block_size=block))
    return masks


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_mask_has_speedup_one(arch, dtype, head_dim):
    m = BlockSparseMask.full(q_len=4096, kv_len=4096)
    p = predict_kernel_time(m, batch=2, heads=3, head_dim=head_dim, dtype=dtype, arch=arch)
    assert p.speedup == 1.0
    assert p.seconds == p.dense_seconds
    assert p.visited_tiles == p.total_tiles == 2 * 3 * 32 * 32
    assert p.partial_tiles == 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("seq_len", [4096, 16384])
def test_monotone_in_density(arch, seq_len):
    densities = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    masks = _random_chain(seq_len, 128, densities)
    preds = [predict_kernel_time(m, batch=1, heads=2, head_dim=128, arch=arch) for m in masks]
    times = [p.seconds for p in preds]
    speedups = [p.speedup for p in preds]
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert all(a > b for a, b in zip(speedups, speedups[1:])), speedups
    assert speedups[-1] == pytest.approx(1.0, rel=1e-12)
    # The dense time is a property of the geometry, not of the mask.
    assert len({p.dense_seconds for p in preds}) == 1
    # Never better than the ideal 1 / density (fixed costs only reduce the gain).
    for m, s in zip(masks, speedups):
        assert s <= 1.0 / m.density() + 1e-9


def test_partial_tiles_cost_more_than_full_tiles():
    seq, block = 1024, 128
    nb = seq // block
    blocks = torch.eye(nb, dtype=torch.bool) | torch.eye(nb, dtype=torch.bool).roll(1, 1)
    full = BlockSparseMask.from_block_matrix(blocks, q_len=seq, kv_len=seq, q_block_size=block, kv_block_size=block)
    tile = torch.tril(torch.ones(block, block, dtype=torch.bool))[None]
    tile_ids = torch.where(torch.eye(nb, dtype=torch.bool), 0, -1)
    part = BlockSparseMask.from_block_matrix(blocks, q_len=seq, kv_len=seq, q_block_size=block, kv_block_size=block,
                                             tile_ids=tile_ids, tiles=tile)
    pf = predict_kernel_time(full, batch=1, heads=1, head_dim=64)
    pp = predict_kernel_time(part, batch=1, heads=1, head_dim=64)
    assert pp.partial_tiles == nb and pf.partial_tiles == 0
    assert pp.seconds > pf.seconds
    assert pp.dense_seconds == pf.dense_seconds


def test_hand_computed_case():
    """Two query blocks of 64 rows over four key blocks of 64, head dim 32, one head, fp16.

    Arch with round numbers: 2 SMs, 1e12 FLOP/s, 1e10 exp/s, 1e11 ALU op/s, 1 GHz clock,
    1e9 B/s HBM, L2 large, launch 1 us. Query block 0 visits key blocks {0, 1}; query
    block 1 visits {1, 2, 3}, where block 3 is partial.
    """
    arch = GPUArch("toy", matmul_flops_16bit=1e12, hbm_bytes_per_s=1e9, num_sms=2, clock_hz=1e9, exp_per_s=1e10,
                   alu_ops_per_s=1e11, l2_bytes=1 << 30, launch_seconds=1e-6)
    a = ModelAssumptions(mma_efficiency=1.0, softmax_overlap=0.0, tile_overhead_cycles=100.0,
                         program_overhead_cycles=1000.0)
    blocks = torch.tensor([[True, True, False, False], [False, True, True, True]])
    tile_ids = torch.tensor([[-1, -1, -1, -1], [-1, -1, -1, 0]])
    tiles = torch.ones(1, 64, 64, dtype=torch.bool)
    tiles[0, :, 32:] = False
    m = BlockSparseMask.from_block_matrix(blocks, q_len=128, kv_len=256, q_block_size=64, kv_block_size=64,
                                          tile_ids=tile_ids, tiles=tiles)
    p = predict_kernel_time(m, batch=1, heads=1, head_dim=32, dtype=torch.float16, arch=arch, assumptions=a)

    # Per SM rates are half the chip's. One tile: 64 * 64 = 4096 score elements.
    mma = 4 * 4096 * 32 / 0.5e12                       # 1.048576e-6 s
    softmax = 4096 / 0.5e10 + SOFTMAX_ALU_OPS * 4096 / 0.5e11
    tile = mma + softmax + 100 / 1e9
    mask_pass = 4096 / 0.5e11
    program = 1000 / 1e9
    work0 = 2 * tile + program
    work1 = 3 * tile + mask_pass + program
    compute = max((work0 + work1) / 2, work1)
    # HBM: Q in + O out (fp16) + fp32 LSE per program; K and V of the 4 distinct key blocks once.
    hbm = 2 * (2 * 64 * 32 * 2 + 64 * 4) + 4 * (2 * 64 * 32 * 2)
    memory = hbm / 1e9
    expected = max(compute, memory) + 1e-6
    assert p.hbm_bytes == hbm
    assert p.memory_seconds == pytest.approx(memory, rel=1e-12)
    assert p.compute_seconds == pytest.approx(compute, rel=1e-12)
    assert p.seconds == pytest.approx(expected, rel=1e-12)
    assert p.bound == ("compute" if compute >= memory else "memory")
    # Dense: 8 tiles, two programs of 4 tiles, K/V of 4 blocks.
    dense_compute = max(2 * (4 * tile + program) / 2, 4 * tile + program)
    dense = max(dense_compute, hbm / 1e9) + 1e-6
    assert p.dense_seconds == pytest.approx(dense, rel=1e-12)
    assert p.speedup == pytest.approx(dense / expected, rel=1e-12)
    assert (p.visited_tiles, p.partial_tiles, p.total_tiles) == (5, 1, 8)
    assert p.flops == 5 * 4 * 4096 * 32


def test_kv_reads_fall_back_to_hbm_when_l2_is_too_small():
    m = BlockSparseMask.full(q_len=1024, kv_len=1024)
    big = predict_kernel_time(m, batch=1, heads=4, head_dim=64, arch=ARCHS["h100"])
    tiny_l2 = GPUArch(**{**ARCHS["h100"].__dict__, "l2_bytes": 0})
    small = predict_kernel_time(m, batch=1, heads=4, head_dim=64, arch=tiny_l2)
    kv_block = 2 * 128 * 64 * 2
    assert small.hbm_bytes - big.hbm_bytes == 4 * (64 - 8) * kv_block


def test_rates_per_dtype_and_arch():
    h = ARCHS["h100"]
    assert h.matmul_flops(torch.bfloat16) == 790e12
    assert h.matmul_flops(torch.float32) == pytest.approx(790e12 / 2)  # TF32
    assert ARCHS["a100"].matmul_flops(torch.float16) == 312e12
    assert (h.hbm_bytes_per_s, ARCHS["a100"].hbm_bytes_per_s) == (3.0e12, 2.0e12)
    m = _random_chain(4096, 128, [0.25])[0]
    fp32 = predict_kernel_time(m, batch=1, heads=2, head_dim=128, dtype=torch.float32)
    bf16 = predict_kernel_time(m, batch=1, heads=2, head_dim=128, dtype=torch.bfloat16)
    assert fp32.seconds > bf16.seconds
    # A slower chip takes longer on the same mask.
    assert predict_kernel_time(m, batch=1, heads=2, head_dim=128, arch="a100").seconds > bf16.seconds
    assert math.isclose(predict_speedup(m, batch=1, heads=2, head_dim=128), bf16.speedup)


def test_errors_name_the_argument():
    m = BlockSparseMask.full(q_len=256, kv_len=256)
    with pytest.raises(ValueError, match=r"arch must be one of \['a100', 'h100'\].*'v100'"):
        predict_kernel_time(m, batch=1, heads=1, head_dim=64, arch="v100")
    with pytest.raises(TypeError, match="dtype must be one of .*torch.float64"):
        predict_kernel_time(m, batch=1, heads=1, head_dim=64, dtype=torch.float64)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1, got 0"):
        predict_kernel_time(m, batch=1, heads=1, head_dim=0)
    with pytest.raises(TypeError, match="mask must be a BlockSparseMask, got Tensor"):
        predict_kernel_time(torch.ones(2, 2), batch=1, heads=1, head_dim=64)
    per_head = _random_chain(1024, 128, [0.5], heads=2)[0]
    with pytest.raises(ValueError, match=r"mask batch/heads \(1, 2\) must be 1 or equal to batch=1, heads=3"):
        predict_kernel_time(per_head, batch=1, heads=3, head_dim=64)
    with pytest.raises(ValueError, match="softmax_overlap must be in \\[0, 1\\], got 1.5"):
        ModelAssumptions(softmax_overlap=1.5)
    with pytest.raises(ValueError, match="GPUArch.num_sms must be an int >= 1, got 0"):
        GPUArch("x", 1e12, 1e9, 0, 1e9, 1e9, 1e9, 0)
