"""block_sparse_attention: the torch backend against the fp64 reference, errors, dispatch."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsegen.kernels import BlockSparseMask, QuantConfig, block_sparse_attention
from sparsegen.kernels.reference import reference_attention
from sparsegen.testing import (FP32_GRADIENT_FACTOR, assert_close_to_golden, cosine, quant_accuracy_inputs,
                               random_sweep_size, relative_l1, sqnr_db)
from triton_cases import eager_attention


def _case(b, sq, sk, h, d, qbs, kbs, density, seed, dtype=torch.float32, per_head=True, tiles=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, h, d, generator=g).to(dtype)
    v = torch.randn(b, sk, h, d, generator=g).to(dtype)
    nq, nk = -(-sq // qbs), -(-sk // kbs)
    hh = h if per_head else 1
    if tiles:
        tok = torch.rand(b, hh, sq, sk, generator=g) < density * 0.2
        tok[..., :, :8] = True
        mask = BlockSparseMask.from_dense(tok, q_block_size=qbs, kv_block_size=kbs)
    else:
        blocks = torch.rand(b, hh, nq, nk, generator=g) < density
        blocks[..., torch.arange(nq), torch.arange(nq) % nk] = True
        mask = BlockSparseMask.from_block_matrix(blocks, q_len=sq, kv_len=sk, q_block_size=qbs, kv_block_size=kbs)
    return q, k, v, mask


def _eager(q, k, v, mask):
    """Same-dtype plain attention (out, lse): the error budget."""
    return eager_attention(q, k, v, mask, q.shape[-1] ** -0.5)


CASES = [
    # b, sq, sk, h, d, qbs, kbs, density
    (2, 97, 97, 2, 64, 32, 32, 0.5),
    (1, 1000, 1000, 2, 72, 64, 128, 0.3),
    (2, 1025, 1025, 2, 128, 128, 64, 0.25),
    (1, 300, 777, 3, 96, 64, 64, 0.4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-s{c[1]}x{c[2]}-h{c[3]}-d{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_matches_reference(case, dtype):
    q, k, v, mask = _case(*case, seed=int(sum(case) * 100), dtype=dtype)
    out, lse = block_sparse_attention(q, k, v, mask, backend="torch", return_lse=True)
    gold, gold_lse = reference_attention(q, k, v, mask)
    what = f"torch backend {case} {dtype}"
    eager, eager_lse = _eager(q, k, v, mask)
    assert_close_to_golden(out, eager, gold, what=what)
    assert_close_to_golden(lse, eager_lse, gold_lse, what=what + " lse")


@pytest.mark.parametrize("tiles", [False, True])
def test_torch_backend_gradients(tiles):
    q, k, v, mask = _case(2, 150, 130, 2, 32, 32, 32, 0.4, seed=11, tiles=tiles)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(qs, ks, vs, mask, backend="torch", return_lse=True)
    g = torch.Generator().manual_seed(0)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * go).sum() + (lse * gl).sum()).backward()

    def reference_grads(dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        ro, rl = reference_attention(*leaves, mask, dtype=dtype)
        ((ro * go.to(dtype)).sum() + (rl * gl.to(dtype)).sum()).backward()
        return [t.grad for t in leaves]

    golden, eager = reference_grads(torch.float64), reference_grads(torch.float32)
    for name, a, e, g in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), eager, golden):
        assert_close_to_golden(a, e, g, factor=FP32_GRADIENT_FACTOR, what=f"{name} fp32 (tiles={tiles})")


def test_random_sweep_against_reference():
    """Seeded random shapes; SPARSEGEN_SWEEP sets the number of cases."""
    g = torch.Generator().manual_seed(1234)
    for i in range(random_sweep_size(6)):
        b = int(torch.randint(1, 3, (1,), generator=g))
        sq = int(torch.randint(1, 700, (1,), generator=g))
        sk = int(torch.randint(1, 700, (1,), generator=g))
        h = int(torch.randint(1, 4, (1,), generator=g))
        d = [16, 40, 64, 80][int(torch.randint(0, 4, (1,), generator=g))]
        qbs, kbs = [16, 32, 64, 128][int(torch.randint(0, 4, (1,), generator=g))], [16, 32, 64][i % 3]
        q, k, v, mask = _case(b, sq, sk, h, d, qbs, kbs, 0.4, seed=i, tiles=bool(i % 2))
        out = block_sparse_attention(q, k, v, mask, backend="torch")
        gold, _ = reference_attention(q, k, v, mask)
        assert_close_to_golden(out, _eager(q, k, v, mask)[0], gold, what=f"sweep case {i}: {b, sq, sk, h, d, qbs, kbs}")


def test_empty_token_rows_give_zero_output_and_neginf_lse():
    tok = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    tok[..., 1:, :5] = True  # row 0 attends nothing (its block still has other rows)
    mask = BlockSparseMask.from_dense(tok, q_block_size=32, kv_block_size=32)
    q, k, v = (torch.randn(1, 64, 1, 16) for _ in range(3))
    for backend in ("torch", "reference"):
        out, lse = block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
        assert torch.all(out[0, 0] == 0) and torch.isneginf(lse[0, 0, 0]), backend
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset,cos_min,l1_max", [("int8", 0.999, 0.02), ("int8-pv8", 0.999, 0.04)])
def test_int8_accuracy_gaussian_with_k_bias(preset, cos_min, l1_max):
    """ANCHORS §6: N=2048, d=64, Gaussian inputs with a per-channel bias on K."""
    n, d = 2048, 64
    q, k, v = quant_accuracy_inputs(n, d, heads=2, seed=0)
    mask = BlockSparseMask.full(q_len=n, kv_len=n)
    exact, _ = reference_attention(q, k, v, mask, dtype=torch.float32)
    out = block_sparse_attention(q.half(), k.half(), v.half(), mask, backend="torch", quant=preset)
    c, l1 = cosine(out, exact), relative_l1(out, exact)
    assert c >= cos_min and l1 <= l1_max, f"{preset}: cosine {c:.5f}, relative L1 {l1:.4f} (N={n}, d={d}, fp16)"
    # The torch path computes the same arithmetic as the quantized reference.
    qref, _ = reference_attention(q.half(), k.half(), v.half(), mask, quant=QuantConfig(pv=preset.endswith("pv8") and "int8" or "half"))
    assert sqnr_db(out, qref) > 50


def test_int8_smoothing_matters():
    g = torch.Generator().manual_seed(1)
    n, d = 1024, 64
    q = torch.randn(1, n, 1, d, generator=g)
    k = torch.randn(1, n, 1, d, generator=g) + 8.0 * torch.randn(1, 1, 1, d, generator=g)
    v = torch.randn(1, n, 1, d, generator=g)
    mask = BlockSparseMask.full(q_len=n, kv_len=n)
    exact, _ = reference_attention(q, k, v, mask, dtype=torch.float32)
    smooth = block_sparse_attention(q, k, v, mask, backend="torch", quant=QuantConfig())
    raw = block_sparse_attention(q, k, v, mask, backend="torch", quant=QuantConfig(smooth_k=False))
    assert relative_l1(smooth, exact) < 0.5 * relative_l1(raw, exact)


def test_int4_is_coarser_than_int8():
    q, k, v, mask = _case(1, 512, 512, 2, 64, 64, 64, 0.5, seed=5)
    gold, _ = reference_attention(q, k, v, mask)
    s8 = sqnr_db(block_sparse_attention(q, k, v, mask, backend="torch", quant="int8"), gold)
    s4 = sqnr_db(block_sparse_attention(q, k, v, mask, backend="torch", quant="int4"), gold)
    assert s8 > 30 and 5 < s4 < s8 - 10, (s8, s4)


def test_quant_is_inference_only():
    q, k, v, mask = _case(1, 64, 64, 1, 16, 32, 32, 1.0, seed=0)
    with pytest.raises(ValueError, match="inference-only"):
        block_sparse_attention(q.requires_grad_(), k, v, mask, backend="torch", quant="int8")


def test_flex_block_mask_accepted_directly():
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = (torch.randn(1, 200, 2, 32) for _ in range(3))
    fm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 200, 200, device="cpu", BLOCK_SIZE=64)
    out = block_sparse_attention(q, k, v, fm, backend="torch")
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)
    assert (out - ref).abs().max().item() < 1e-5


def test_errors_say_how_to_fix():
    q, k, v, mask = _case(1, 64, 64, 2, 16, 32, 32, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"laid out \(batch, seq, heads, head_dim\).*transpose\(1, 2\)"):
        block_sparse_attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match=r"mask was built for q_len=64, kv_len=64 but the inputs have q_len=32"):
        block_sparse_attention(q[:, :32], k, v, mask)
    with pytest.raises(ValueError, match=r"backend='bogus' is not one of"):
        block_sparse_attention(q, k, v, mask, backend="bogus")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .* use backend='torch'"):
        import os

        old = os.environ.pop("TRITON_INTERPRET", None)
        try:
            block_sparse_attention(q, k, v, mask, backend="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
    with pytest.raises(TypeError, match="must share one of"):
        block_sparse_attention(q, k.double(), v, mask)
    with pytest.raises(ValueError, match=r"quant='int3' is not a known preset"):
        block_sparse_attention(q, k, v, mask, quant="int3")
    with pytest.raises(ValueError, match=r"QuantConfig.q_block must be a power of two"):
        QuantConfig(q_block=100)
    with pytest.raises(TypeError, match="BlockSparseMask or a FlexAttention BlockMask"):
        block_sparse_attention(q, k, v, torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask batch/heads \(1, 3\) must be 1 or equal"):
        m3 = BlockSparseMask.from_block_matrix(torch.ones(3, 2, 2, dtype=torch.bool), q_len=64, kv_len=64,
                                               q_block_size=32, kv_block_size=32)
        block_sparse_attention(q, k, v, m3)


def test_auto_picks_torch_on_cpu_and_logs_why(caplog):
    q, k, v, mask = _case(1, 64, 64, 1, 16, 32, 32, 1.0, seed=0)
    with caplog.at_level(logging.DEBUG, logger="sparsegen.kernels"):
        block_sparse_attention(q, k, v, mask)
    assert "auto chose 'torch'" in caplog.text


def test_quant_config_round_trip():
    cfg = QuantConfig(qk="int4", pv="int8", q_block=64)
    assert QuantConfig.from_json(cfg.to_json()) == cfg
