"""The GPU time model (sparsegen.kernels.timemodel): gate clocks in, dense = 1, monotone, a hand-computed case."""

import math

import pytest
import torch

from sparsegen.kernels import BlockSparseMask, gate_clocks
from sparsegen.kernels.timemodel import (
    ARCHS,
    FA3_FORWARD_FLOPS,
    GPUArch,
    ModelAssumptions,
    TileClocks,
    predict_kernel_time,
    predict_speedup,
    tile_clocks,
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


def test_h100_peak_is_consistent_with_its_clock_and_sms():
    h = ARCHS["h100"]
    assert h.matmul_flops_16bit == pytest.approx(132 * 1.83e9 * 4096) and 985e12 < h.matmul_flops_16bit < 995e12
    assert ARCHS["a100"].matmul_flops_16bit == pytest.approx(312e12, rel=0.01)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_mask_has_speedup_one(arch, dtype, head_dim):
    m = BlockSparseMask.full(q_len=4096, kv_len=4096)
    p = predict_kernel_time(m, batch=2, heads=3, head_dim=head_dim, dtype=dtype, arch=arch)
    assert p.speedup == 1.0
    assert p.seconds == p.dense_seconds
    assert p.visited_tiles == p.total_tiles == 2 * 3 * 32 * 32
    assert p.partial_tiles == 0


def test_clocks_are_the_gates_measurements():
    """The model's per-unit clocks are the gate table's entries for the build the launcher would pick."""
    key = (90, "fwd", "bf16", 128, 128)
    full, partial, mma, build = gate_clocks.CLOCKS[key]
    c = tile_clocks("h100", torch.bfloat16, 128, 128)
    assert (c.full, c.partial, c.mma, c.build) == (full, partial, mma, build)
    assert c.mma == 512  # 64 x 64 x 128 x 2 products x 2 FLOP / 4096 FLOP per clock
    # Head dims and blocks the gate does not compile take the next gated ones (the tiles they run on).
    assert tile_clocks("h100", torch.bfloat16, 80, 32) == tile_clocks("h100", torch.bfloat16, 96, 64)
    assert tile_clocks("a100", torch.int8, 128, 128).build.startswith("fwd_quant-qk8-pvhalf-bf16-d128-b128")
    # A partial tile costs at least a full one: the partial loop adds the token-tile mask.
    for (arch, kernel, dt, hd, mb), (f, p, m, _) in gate_clocks.CLOCKS.items():
        assert p >= f > 0 and m > 0, (arch, kernel, dt, hd, mb)


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
    assert len({p.dense_seconds for p in preds}) == 1
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

    Toy arch: 2 SMs at 1 GHz, 1e9 B/s HBM, launch 1 us; clocks per unit: full loop 300
    (below the tensor cores' 512: MMA-bound), partial loop 900 (issue-bound). Query block
    0 visits {0, 1}; query block 1 visits {1, 2, 3}, where block 3 is partial.
    """
    arch = GPUArch("toy", gate_arch=90, num_sms=2, clock_hz=1e9, mma_flops_per_clock=4096, hbm_bytes_per_s=1e9,
                   launch_seconds=1e-6)
    clocks = TileClocks(full=300.0, partial=900.0, mma=512.0)
    a = ModelAssumptions(program_overhead_cycles=1000.0)
    blocks = torch.tensor([[True, True, False, False], [False, True, True, True]])
    tile_ids = torch.tensor([[-1, -1, -1, -1], [-1, -1, -1, 0]])
    tiles = torch.ones(1, 64, 64, dtype=torch.bool)
    tiles[0, :, 32:] = False
    m = BlockSparseMask.from_block_matrix(blocks, q_len=128, kv_len=256, q_block_size=64, kv_block_size=64,
                                          tile_ids=tile_ids, tiles=tiles)
    p = predict_kernel_time(m, batch=1, heads=1, head_dim=32, dtype=torch.float16, arch=arch, assumptions=a,
                            clocks=clocks)
    work0 = 2 * 512 + 1000
    work1 = 2 * 512 + 900 + 1000
    compute = max((work0 + work1) / 2, work1) / 1e9
    # HBM: Q in + O out (fp16) + fp32 LSE per program; K and V of the 4 distinct key blocks once.
    hbm = 2 * (64 * 32 * (2 + 2) + 64 * 4) + 4 * (64 * 32 * (2 + 2))
    assert p.hbm_bytes == hbm
    assert p.memory_seconds == pytest.approx(hbm / 1e9, rel=1e-12)
    assert p.compute_seconds == pytest.approx(compute, rel=1e-12)
    assert p.seconds == pytest.approx(max(compute, hbm / 1e9) + 1e-6, rel=1e-12)
    dense = max(max(2 * (4 * 512 + 1000) / 2, 4 * 512 + 1000) / 1e9, hbm / 1e9) + 1e-6
    assert p.dense_seconds == pytest.approx(dense, rel=1e-12)
    assert p.speedup == pytest.approx(dense / p.seconds, rel=1e-12)
    assert (p.visited_tiles, p.partial_tiles, p.total_tiles) == (5, 1, 8)
    assert p.flops == 5 * 4 * 4096 * 32
    assert p.fa3_seconds is None and p.speedup_vs_fa3 is None  # toy arch: no published anchor


def test_long_dense_sequences_stay_compute_bound():
    """No L2 cliff: K and V are read from HBM once per head however long the sequence."""
    for seq in (16384, 131072):
        m = BlockSparseMask.full(q_len=seq, kv_len=seq)
        p = predict_kernel_time(m, batch=1, heads=24, head_dim=128, arch="h100")
        assert p.bound == "compute", (seq, p.compute_seconds, p.memory_seconds)
        kv_once = 24 * seq * 128 * 2 * 2
        assert p.hbm_bytes == 24 * (seq // 128) * (128 * 128 * 4 + 128 * 4) + kv_once


def test_fa3_anchor():
    """Against FlashAttention-3's published 600-750 TFLOP/s (H100, 16-bit, head dim 128); None elsewhere."""
    m = _random_chain(16384, 128, [0.25])[0]
    p = predict_kernel_time(m, batch=1, heads=2, head_dim=128, dtype=torch.bfloat16, arch="h100")
    flops = 4.0 * 2 * 16384 * 16384 * 128
    assert p.fa3_seconds == pytest.approx((flops / FA3_FORWARD_FLOPS[1], flops / FA3_FORWARD_FLOPS[0]))
    assert p.speedup_vs_fa3 == pytest.approx((p.fa3_seconds[0] / p.seconds, p.fa3_seconds[1] / p.seconds))
    # The kernel's own dense time can only reach FA3's if its clocks per unit reach the tensor cores'.
    dense = predict_kernel_time(BlockSparseMask.full(q_len=16384, kv_len=16384), batch=1, heads=2, head_dim=128)
    c = dense.clocks
    assert dense.seconds >= dense.flops / ARCHS["h100"].matmul_flops_16bit * max(c.full, c.mma) / c.mma
    for kw in (dict(arch="a100"), dict(dtype=torch.float32), dict(head_dim=64)):
        q = predict_kernel_time(m, **{**dict(batch=1, heads=2, head_dim=128), **kw})
        assert q.fa3_seconds is None and q.speedup_vs_fa3 is None, kw


def test_rates_per_dtype_and_arch():
    m = _random_chain(4096, 128, [0.25])[0]
    fp32 = predict_kernel_time(m, batch=1, heads=2, head_dim=128, dtype=torch.float32)
    bf16 = predict_kernel_time(m, batch=1, heads=2, head_dim=128, dtype=torch.bfloat16)
    assert fp32.seconds > bf16.seconds  # TF32 tensor cores run at half the 16-bit rate
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
    with pytest.raises(ValueError, match="program_overhead_cycles must be >= 0, got -1"):
        ModelAssumptions(program_overhead_cycles=-1)
    with pytest.raises(ValueError, match="GPUArch.num_sms must be an int >= 1, got 0"):
        GPUArch("x", 90, 0, 1e9, 4096, 1e9)
    with pytest.raises(ValueError, match=r"GPUArch.gate_arch must be one of \(80, 86, 89, 90\), got 70"):
        GPUArch("x", 70, 1, 1e9, 4096, 1e9)
