"""Theoretical FLOPs: VMoBA's published numbers, and FLOPs of other methods' masks."""

from __future__ import annotations

import json

import pytest
import torch

from sparsegen.cli import main as cli_main
from sparsegen.flops import (
    MODELS,
    dense_attention_flops,
    mask_attention_flops,
    method_mask,
    method_transformer_flops,
    transformer_flops,
    vmoba_transformer_flops,
)
from sparsegen.kernels import BlockSparseMask
from sparsegen.methods import AttentionGeometry
from sparsegen.methods.gna import GNAConfig
from sparsegen.methods.radial import RadialConfig, radial_block_mask
from sparsegen.neighborhood import neighborhood_layout

WAN = MODELS["wan2.1-1.3b"]
TOLERANCE = 0.005  # agreement with the published figures within 0.5%

# VMoBA's published theoretical TFLOPs for Wan2.1-1.3B, one forward pass, batch 1 (ANCHORS §2).
PUBLISHED_FULL = {13440: 67.73, 55296: 705.02, 56160: 724.97}
PUBLISHED_VMOBA = {13440: 40.48, 56160: 248.39}


@pytest.mark.parametrize("tokens", sorted(PUBLISHED_FULL))
def test_full_attention_reproduces_published(tokens):
    ours = transformer_flops(WAN, tokens)["total"] / 1e12
    assert ours == pytest.approx(PUBLISHED_FULL[tokens], rel=TOLERANCE)


@pytest.mark.parametrize("tokens", sorted(PUBLISHED_VMOBA))
def test_vmoba_reproduces_published(tokens):
    ours = vmoba_transformer_flops(WAN, tokens)["total"] / 1e12
    assert ours == pytest.approx(PUBLISHED_VMOBA[tokens], rel=TOLERANCE)


def test_published_reduction_at_56160_tokens():
    full = transformer_flops(WAN, 56160)["total"]
    vmoba = vmoba_transformer_flops(WAN, 56160)["total"]
    assert full / vmoba == pytest.approx(2.92, rel=TOLERANCE)


def test_parts_follow_the_stated_per_layer_count():
    s, d, f, t, layers = 13440, 1536, 8960, 300, 30
    parts = transformer_flops(WAN, s)
    assert parts["projections"] == layers * 4 * 2 * s * d * d
    assert parts["self_attention"] == layers * 2 * 2 * s * s * d
    assert parts["cross_attention"] == layers * (2 * 2 * s * d * d + 2 * 2 * t * d * d + 2 * 2 * s * t * d)
    assert parts["ffn"] == layers * 2 * 2 * s * d * f
    # MoBA gating 2 S d B plus attention over c k keys, c = S / B, k = 0.18 B, for B = 7, 40, 60.
    vm = vmoba_transformer_flops(WAN, s)
    per_kind = [2 * s * d * b + 2 * 2 * s * (s / b) * (0.18 * b) * d for b in (7, 40, 60)]
    assert vm["self_attention"] == pytest.approx(10 * sum(per_kind), rel=1e-12)


def _cli(argv, capsys):
    rc = cli_main(["flops", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_paper_table(capsys):
    rc, out, _ = _cli(["--paper", "--json"], capsys)
    assert rc == 0
    rows = json.loads(out)["rows"]
    published = {("full", s): v for s, v in PUBLISHED_FULL.items()} | {("vmoba", s): v for s, v in
                                                                       PUBLISHED_VMOBA.items()}
    assert {(r["method"], r["tokens"]): r["published_tflops"] for r in rows} == published
    for r in rows:
        assert r["tflops"] == pytest.approx(published[(r["method"], r["tokens"])], rel=TOLERANCE)
    rc, out, _ = _cli(["--paper"], capsys)
    assert rc == 0 and "full S= 13440:    67.73 T  published    67.73 T" in out
    assert "vmoba S= 56160:   248.46 T  published   248.39 T  (+0.03%)" in out


def test_cli_tokens_and_latent(capsys):
    rc, out, _ = _cli(["--tokens", "13440", "--latent", "24,36,64", "--json"], capsys)
    assert rc == 0
    rows = json.loads(out)["rows"]
    assert [r["tokens"] for r in rows] == [13440, 24 * 36 * 64]
    assert rows[0]["full"] == transformer_flops(WAN, 13440)["total"]
    assert rows[0]["vmoba"] == vmoba_transformer_flops(WAN, 13440)["total"]
    assert rows[1]["full"] / 1e12 == pytest.approx(PUBLISHED_FULL[55296], rel=TOLERANCE)
    rc, out, _ = _cli(["--tokens", "56160"], capsys)
    assert rc == 0 and "full 724.97 T, vmoba 248.46 T (2.92x fewer)" in out


def test_cli_density_matches_mask_flops(capsys):
    # A radial mask over 8 frames x 128 tokens with 128-token blocks: no ragged blocks, so
    # the FLOPs of the mask are exactly density x dense.
    mask = radial_block_mask(frames=8, tokens_per_frame=128, block_size=128, decay_factor=0.5)
    n = 8 * 128
    flops = mask_attention_flops(mask, head_dim=WAN.head_dim, heads=WAN.heads)
    assert flops == pytest.approx(mask.density() * dense_attention_flops(n, n, WAN.dim), rel=1e-12)
    rc, out, _ = _cli(["--tokens", str(n), "--method", "sparse", "--density", repr(mask.density()), "--json"],
                      capsys)
    assert rc == 0
    row = json.loads(out)["rows"][0]
    assert row["sparse"] == pytest.approx(transformer_flops(WAN, n, self_attention=flops)["total"], rel=1e-12)


# ------------------------------------------------------------------ masks of other methods
def test_mask_flops_count_visited_blocks_and_ragged_tokens():
    # 600 tokens in 64-token blocks: the last block row and column hold 24 tokens.
    mask = radial_block_mask(frames=6, tokens_per_frame=100, block_size=64, decay_factor=0.5)
    pairs = int(mask.to_dense().sum())  # full blocks only: computed == attended == dense count
    assert mask_attention_flops(mask, head_dim=16, heads=3, batch=2) == 4 * 16 * 3 * 2 * pairs
    assert mask_attention_flops(mask, head_dim=16, heads=3, batch=2, count="attended") == 4 * 16 * 3 * 2 * pairs
    # Partial blocks: computed counts the whole block, attended only the tile.
    blocks = torch.tensor([[True, False], [True, True]])
    tile = torch.zeros(4, 4, dtype=torch.bool)
    tile[:, 0] = True
    tile_ids = torch.tensor([[-1, -1], [0, -1]], dtype=torch.int32)
    m = BlockSparseMask.from_block_matrix(blocks, q_len=8, kv_len=7, q_block_size=4, kv_block_size=4,
                                          tile_ids=tile_ids, tiles=tile[None])
    assert mask_attention_flops(m, head_dim=1) == 4 * (16 + 16 + 12)
    assert mask_attention_flops(m, head_dim=1, count="attended") == 4 * (16 + 4 + 12)
    with pytest.raises(ValueError, match=r"count='tokens' must be 'computed' or 'attended'"):
        mask_attention_flops(m, head_dim=1, count="tokens")


def test_gna_mask_flops_consistent_with_density():
    layout = neighborhood_layout((9, 11, 7), (4, 5, 3), (2, 3, 1), tile=(2, 4, 2))
    mask, stats = layout.mask, layout.stats()
    n, heads, d = layout.spec.num_tokens, 2, 64
    assert mask.num_partial_blocks() > 0
    computed = mask_attention_flops(mask, head_dim=d, heads=heads)
    # The tiled sequences are whole blocks: computed work is the block density of the padded grid.
    assert computed == pytest.approx(mask.density() * 4 * d * heads * mask.q_len * mask.kv_len, rel=1e-12)
    assert computed == pytest.approx(dense_attention_flops(n, n, heads * d) / stats["speedup_bound"], rel=1e-12)
    cfg = GNAConfig(kernel_size=(4, 5, 3), stride=(2, 3, 1), tile=(2, 4, 2))
    res = method_transformer_flops(WAN, cfg, AttentionGeometry(9, 11, 7))
    assert res["attended_self_attention"] == pytest.approx(
        WAN.num_layers * stats["token_density"] * dense_attention_flops(n, n, WAN.dim), rel=1e-12)
    assert res["self_attention"] == pytest.approx(
        WAN.num_layers * mask.density() * 4 * WAN.dim * mask.q_len * mask.kv_len, rel=1e-12)
    assert res["total"] == pytest.approx(
        transformer_flops(WAN, n)["total"] - WAN.num_layers * dense_attention_flops(n, n, WAN.dim)
        + res["self_attention"], rel=1e-12)


def test_method_flops_radial_and_cli(capsys):
    geom = AttentionGeometry(21, 30, 52)
    cfg = RadialConfig(decay_factor=0.2)
    mask = method_mask(cfg, geom)
    n = geom.num_tokens
    res = method_transformer_flops(WAN, cfg, geom)
    assert res["method"] == "radial" and res["density"] == mask.density()
    assert res["self_attention"] == WAN.num_layers * mask_attention_flops(mask, head_dim=128, heads=12)
    # Ragged last blocks: the mask's FLOPs sit just below density x dense.
    assert res["self_attention"] == pytest.approx(
        WAN.num_layers * mask.density() * dense_attention_flops(n, n, WAN.dim), rel=0.01)
    rc, out, _ = _cli(["--latent", "21,30,52", "--method", "radial", "--decay-factor", "0.2", "--json"], capsys)
    assert rc == 0
    row = json.loads(out)["rows"][0]
    assert row["radial"] == res["total"] and row["density"] == res["density"] and row["tokens"] == n
    rc, out, _ = _cli(["--latent", "30,48,80", "--method", "gna", "--kernel-size", "18,24,24", "--stride", "16,8,8"],
                      capsys)
    assert rc == 0 and "mask density 0.0900" in out and "gna " in out


def test_cli_errors(capsys):
    cases = [
        (["--method", "sparse", "--tokens", "100"], "--method sparse needs --density"),
        (["--tokens", "100", "--density", "1.5"], "--density must be in (0, 1], got 1.5"),
        ([], "give --tokens S [S ...], --latent T,H,W or --paper"),
        (["--latent", "21,30"], "--latent must be three comma-separated ints T,H,W"),
        (["--tokens", "100", "--blocks", "7,x"], "--blocks must be comma-separated numbers like 7,40,60"),
        (["--method", "gna"], "--method gna builds the method's mask for a token grid: give --latent T,H,W"),
        (["--method", "gna", "--latent", "5,8"], "--latent must be three comma-separated ints"),
        (["--method", "radial", "--latent", "5,8,8", "--decay-factor", "0"], "RadialConfig.decay_factor=0.0 is invalid"),
        (["--method", "gna", "--latent", "5,8,8", "--kernel-size", "7,3,3"], "does not fit the token grid (5, 8, 8)"),
    ]
    for argv, message in cases:
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and message in err, (argv, err)
    # Options of another method, or misspelled, are refused by the parser (usage error, exit 2).
    for argv, message in [(["--method", "radial", "--latent", "5,8,8", "--decay", "1"], "unrecognized arguments"),
                          (["--method", "gna", "--latent", "5,8,8", "--decay-factor", "1"], "unrecognized arguments")]:
        with pytest.raises(SystemExit) as exc:
            _cli(argv, capsys)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


def test_agent_flops_and_dense_layers(capsys):
    from sparsegen.methods.agent import AgentConfig

    geom = AttentionGeometry(21, 30, 52)
    n, agents = geom.num_tokens, 21 * 8 * 13  # cells of (1, 4, 4): ceil(30 / 4) x ceil(52 / 4) per frame
    per_agent_layer = 2 * 2 * (2 * n * agents * WAN.dim)  # A x S and S x A attentions: Q K^T and P V each
    res = method_transformer_flops(WAN, AgentConfig(agent_cell=(1, 4, 4)), geom)
    assert res["agents"] == agents and res["density"] == pytest.approx(2 * agents / n)
    assert res["self_attention"] == pytest.approx(WAN.num_layers * per_agent_layer, rel=1e-12)
    two_dense = method_transformer_flops(WAN, AgentConfig(agent_cell=(1, 4, 4), dense_layers=2), geom)
    assert two_dense["self_attention"] == pytest.approx(
        (WAN.num_layers - 2) * per_agent_layer + 2 * dense_attention_flops(n, n, WAN.dim), rel=1e-12)
    radial = method_transformer_flops(WAN, RadialConfig(decay_factor=0.2, dense_layers=(0, 5)), geom)
    mask = method_mask(RadialConfig(decay_factor=0.2), geom)
    assert radial["self_attention"] == pytest.approx(
        28 * mask_attention_flops(mask, head_dim=128, heads=12) + 2 * dense_attention_flops(n, n, WAN.dim), rel=1e-12)
    rc, out, _ = _cli(["--latent", "21,30,52", "--method", "agent", "--json"], capsys)
    row = json.loads(out)["rows"][0]
    assert rc == 0 and row["agent"] == res["total"] and row["agents"] == agents
    with pytest.raises(ValueError, match="token merging"):
        method_transformer_flops(WAN, AgentConfig.preset("agentsd"), AttentionGeometry(1, 32, 32))


def test_paro_flops_count_the_plan_masks(tmp_path, capsys):
    from sparsegen.methods.paro import PAROConfig, ParoPlan

    grid, block = (3, 8, 16), 64  # 384 tokens: 6 full blocks of 64
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, WAN.num_layers, WAN.heads, 6, 6, generator=g) < 0.5
    masks |= torch.eye(6, dtype=torch.bool)
    plan = ParoPlan(model_class="WanTransformer3DModel", grid=grid, num_layers=WAN.num_layers, num_heads=WAN.heads,
                    block_size=block, orders=[["FHW"] * WAN.heads] * WAN.num_layers, masks=masks,
                    buckets=[(0.0, 0.25), (0.25, 1.0)], calibration_steps=4, density=0.5)
    n = 384
    visited = masks.flatten(1).sum(1).double()  # per bucket, over layers and heads
    expected = (0.25 * visited[0] + 0.75 * visited[1]).item() * block * block * 4 * WAN.head_dim
    res = method_transformer_flops(WAN, PAROConfig(plan=plan), AttentionGeometry(*grid))
    assert res["self_attention"] == pytest.approx(expected, rel=1e-12)
    assert res["density"] == pytest.approx(expected / (WAN.num_layers * dense_attention_flops(n, n, WAN.dim)))
    assert res["buckets"] == [pytest.approx(transformer_flops(WAN, n)["total"] - WAN.num_layers
                                            * dense_attention_flops(n, n, WAN.dim)
                                            + v * block * block * 4 * WAN.head_dim) for v in visited.tolist()]
    plan.save(tmp_path / "plan")
    rc, out, _ = _cli(["--method", "paro", "--plan", str(tmp_path / "plan"), "--json"], capsys)
    row = json.loads(out)["rows"][0]
    assert rc == 0 and row["paro"] == pytest.approx(res["total"]) and row["latent"] == list(grid)
    with pytest.raises(ValueError, match="calibrated for the token grid"):
        method_transformer_flops(WAN, PAROConfig(plan=plan), AttentionGeometry(3, 8, 8))
    small = ParoPlan(model_class="WanTransformer3DModel", grid=grid, num_layers=2, num_heads=WAN.heads,
                     block_size=block, orders=[["FHW"] * WAN.heads] * 2, masks=masks[:1, :2],
                     buckets=[(0.0, 1.0)], calibration_steps=1, density=0.5)
    with pytest.raises(ValueError, match="not for wan2.1-1.3b"):
        method_transformer_flops(WAN, PAROConfig(plan=small), AttentionGeometry(*grid))
