"""Radial attention: definition, fast block builder, published sparsities, method, CLI."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.reference import reference_attention
from sparsegen.cli import main as cli_main
from sparsegen.methods import AttentionCall, AttentionGeometry, config_class, config_from_dict
from sparsegen.methods.radial import (
    PRESETS,
    RadialConfig,
    RadialMethod,
    kept_blocks_per_distance,
    radial_block_mask,
    radial_block_matrix,
    radial_block_rule,
    radial_pair_width,
    radial_token_mask,
    unservable_query_block,
)
from sparsegen.testing import assert_close_to_golden, random_sweep_size


def _slow_blocks(frames, tpf, bs, decay, sink, unit=128):
    tok = radial_token_mask(frames=frames, tokens_per_frame=tpf, block_size=bs, decay_factor=decay, sink=sink,
                            decimation_unit=unit)
    return radial_block_rule(tok, frames=frames, tokens_per_frame=tpf, block_size=bs)


# ------------------------------------------------------------------ definition
def test_pair_width_follows_power_of_two_decay_and_decimation():
    w = lambda d, tpf=3600, bs=128, decay=1.0: radial_pair_width(d, tokens_per_frame=tpf, block_size=bs,
                                                                   decay_factor=decay)
    # P = 4096 for 3600 tokens: width halves each time dist.bit_length() grows.
    assert [w(d) for d in (0, 1, 2, 3, 4, 7, 8, 15, 16, 31)] == [3600, 3600, 1024, 1024, 512, 512, 256, 256, 128, 128]
    # w0 = 64 for dist 32..63 (keep even distances), 32 for 64..127 (multiples of 4).
    assert (w(32), w(33), w(62), w(63)) == (128, None, 128, None)
    assert (w(64), w(65), w(66), w(68)) == (128, None, None, 128)
    # Decay scales the band, floored to whole tokens, never below the block size.
    assert (w(2, decay=0.95), w(5, decay=0.95), w(5, decay=0.2)) == (972, 486, 128)
    assert w(20, bs=64, decay=0.2) == 64
    # The decimation threshold stays 128 with 64-token blocks: w0 = 64 -> even distances only.
    assert (w(40, bs=64), w(41, bs=64)) == (64, None)
    # 3840 tokens -> P = 4096 as well; 1560 -> 2048 (dist 17: w0 = 64 -> odd distances dropped).
    assert w(2, tpf=3840) == 1024 and w(17, tpf=1560) is None and w(16, tpf=1560) == 128


def test_token_mask_spot_checks():
    # 600 tokens/frame: P = 1024. Pair (4, 2), dist 2: width = 256 * 0.95 = 243.2 -> 243.
    m = radial_token_mask(frames=6, tokens_per_frame=600, block_size=64, decay_factor=0.95)
    assert m.shape == (3600, 3600)
    r, c = 4 * 600 + 300, 2 * 600 + 300
    assert m[r, c + 243] and not m[r, c + 244] and m[r, c - 243] and not m[r, c - 244]
    assert m[:, :600].all(), "the sink frame is attended in full"
    assert m[600:1200, 1200:1800].all(), "adjacent frames are attended in full"
    nosink = radial_token_mask(frames=6, tokens_per_frame=600, block_size=64, decay_factor=0.95, sink=False)
    # Pair (5, 0), dist 5: w0 = 128 (not decimated), width max(121.6, 64) -> 121.
    assert nosink[3000, 121] and not nosink[3000, 122]
    assert torch.equal(nosink[:, 600:], m[:, 600:])
    # 60 tokens/frame: P = 64. Dist d has w0 = 64 / 2**d.bit_length() < 128 and is kept only
    # when d % (2 * 2**d.bit_length()) == 0: never for d >= 1, so only the diagonal remains.
    small = radial_token_mask(frames=9, tokens_per_frame=60, block_size=32, decay_factor=1.0, sink=False)
    pair = lambda i, j: small[i * 60:(i + 1) * 60, j * 60:(j + 1) * 60]
    assert pair(1, 0).sum() == 0 and pair(4, 0).sum() == 0 and pair(8, 7).sum() == 0
    # 130 tokens/frame: P = 256, w0 < 128 from dist 2: only the power-of-two distances survive.
    mid = radial_token_mask(frames=9, tokens_per_frame=130, block_size=32, decay_factor=1.0, sink=False)
    kept = [d for d in range(1, 9) if mid[d * 130:(d + 1) * 130, :130].any()]
    assert kept == [1, 2, 4, 8]
    assert pair(3, 3).all()


# --------------------------------------------------------- fast == definition
@pytest.mark.parametrize("tpf", [60, 100, 130, 240])
def test_fast_builder_equals_token_definition_then_block_rule(tpf):
    checked = 0
    for frames, bs, decay, sink in itertools.product(range(5, 10), (32, 64, 128), (0.2, 0.95, 1.0), (True, False)):
        fast = radial_block_matrix(frames=frames, tokens_per_frame=tpf, block_size=bs, decay_factor=decay, sink=sink)
        slow = _slow_blocks(frames, tpf, bs, decay, sink)
        assert torch.equal(fast, slow), f"{frames=} {tpf=} {bs=} {decay=} {sink=}: {(fast != slow).sum()} blocks differ"
        checked += 1
    assert checked == 5 * 3 * 3 * 2


@pytest.mark.parametrize("unit", [4, 16, 32, 256])
def test_fast_builder_equals_definition_with_other_decimation_units(unit):
    for frames, tpf, bs, decay in itertools.product((6, 17), (40, 64, 130), (16, 32), (0.5, 1.0)):
        kw = dict(frames=frames, tokens_per_frame=tpf, block_size=bs, decay_factor=decay)
        fast = radial_block_matrix(**kw, decimation_unit=unit)
        assert torch.equal(fast, _slow_blocks(frames, tpf, bs, decay, True, unit)), f"{kw} {unit=}"


def test_small_frames_keep_a_band_that_shrinks_with_distance_with_a_small_decimation_unit():
    """The built-in model's geometry: 64 tokens per latent frame (P = 128)."""
    kw = dict(frames=17, tokens_per_frame=64, block_size=16, decay_factor=1.0)
    per = lambda unit: kept_blocks_per_distance(radial_block_matrix(**kw, decimation_unit=unit), frames=17,
                                                tokens_per_frame=64, block_size=16)
    # The published unit 128 drops every pair but the diagonal (and the sink).
    assert [per(128)[d] for d in range(16)] == [16] + [0] * 15
    # Unit 16: whole frame at distance 1, band +-32 tokens (14 of 16 blocks) at 2-3, +-16
    # (10 blocks) at 4-7, then only even distances.
    assert [per(16)[d] for d in range(16)] == [16, 16, 14, 14, 10, 10, 10, 10, 10, 0, 10, 0, 10, 0, 10, 0]
    # Published settings are untouched by the option's default.
    assert RadialConfig().decimation_unit == 128
    with pytest.raises(ValueError, match=r"RadialConfig.decimation_unit=24 is invalid: must be a power of two"):
        RadialConfig(decimation_unit=24)
    with pytest.raises(ValueError, match=r"decimation_unit must be a power of two"):
        radial_block_mask(**kw, decimation_unit=0)


def test_fast_builder_random_awkward_geometries():
    rng = random.Random(1234)
    for _ in range(random_sweep_size(12)):
        frames = rng.randint(1, 11)
        tpf = rng.randint(6, 1100)
        bs = 16 * rng.randint(1, 12)
        while 3 * tpf <= bs:
            bs -= 16
        decay = round(rng.uniform(0.05, 3.0), 3)
        sink = rng.random() < 0.5
        if frames * tpf > 8000:
            frames = max(1, 8000 // tpf)
        fast = radial_block_matrix(frames=frames, tokens_per_frame=tpf, block_size=bs, decay_factor=decay, sink=sink)
        slow = _slow_blocks(frames, tpf, bs, decay, sink)
        assert torch.equal(fast, slow), f"{frames=} {tpf=} {bs=} {decay=} {sink=}"


def test_partial_last_block_counts_its_real_rows():
    # 5 x 130 = 650 tokens: the last 128-block holds 10 rows. Judged against 128 rows it
    # could never be kept; against its 10 real rows it keeps the sink and its own frame.
    blocks = radial_block_matrix(frames=5, tokens_per_frame=130, block_size=128, decay_factor=1.0)
    assert blocks.shape == (6, 6)
    last = blocks[-1]
    assert last[0] and last[1] and last[-1]
    assert torch.equal(blocks, _slow_blocks(5, 130, 128, 1.0, True))


# -------------------------------------------------------- published sparsities
@pytest.mark.parametrize("name,frames,tpf,expected", [
    ("HunyuanVideo 253 frames", 64, 3600, 0.808),
    ("HunyuanVideo 509 frames", 128, 3600, 0.883),
    ("Wan 2.1 161 frames", 41, 3840, 0.736),
])
def test_published_sparsities(name, frames, tpf, expected):
    mask = radial_block_mask(frames=frames, tokens_per_frame=tpf, block_size=128, decay_factor=1.0, sink=True)
    nb = frames * tpf // 128
    assert mask.shape == (1, 1, nb, nb)
    assert abs(mask.sparsity() - expected) <= 0.005, f"{name}: sparsity {mask.sparsity():.4f}, paper {expected}"


# ------------------------------------------------------------------- the mask
def test_block_mask_layout_and_purity():
    kw = dict(frames=7, tokens_per_frame=130, block_size=64, decay_factor=0.5)
    a, b = radial_block_mask(**kw), radial_block_mask(**kw)
    assert isinstance(a, BlockSparseMask)
    assert (a.q_len, a.kv_len, a.q_block_size, a.kv_block_size) == (910, 910, 64, 64)
    assert a.shape == (1, 1, 15, 15) and not a.has_tiles
    assert torch.equal(a.to_block_matrix()[0, 0], radial_block_matrix(**kw))
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert 0 < a.density() < 1


def test_unservable_geometry_is_refused_with_a_block_size_suggestion():
    # 30 tokens per frame, blocks of 128: no frame owns more than a third of a block.
    assert unservable_query_block(frames=8, tokens_per_frame=30, block_size=128) == 0
    assert not radial_block_matrix(frames=8, tokens_per_frame=30, block_size=128, decay_factor=1.0)[0].any()
    with pytest.raises(ValueError, match=r"tokens_per_frame=30 with block_size=128: query block 0 .*use block_size=80"):
        radial_block_mask(frames=8, tokens_per_frame=30, block_size=128, decay_factor=1.0)
    assert radial_block_mask(frames=8, tokens_per_frame=30, block_size=80, decay_factor=1.0).density() > 0
    with pytest.raises(ValueError, match="use dense attention for this geometry"):
        radial_block_mask(frames=8, tokens_per_frame=5, block_size=64, decay_factor=1.0)


def test_single_frame_is_dense():
    mask = radial_block_mask(frames=1, tokens_per_frame=1000, block_size=128, decay_factor=0.2)
    assert mask.density() == 1.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="frames must be >= 1, got frames=0"):
        radial_block_mask(frames=0, tokens_per_frame=100, block_size=64, decay_factor=1.0)
    with pytest.raises(TypeError, match=r"tokens_per_frame must be an int, got 2.5"):
        radial_block_mask(frames=2, tokens_per_frame=2.5, block_size=64, decay_factor=1.0)
    with pytest.raises(ValueError, match=r"decay_factor must be a finite number > 0, got decay_factor=0"):
        radial_block_mask(frames=2, tokens_per_frame=100, block_size=64, decay_factor=0)
    with pytest.raises(ValueError, match=r"decay_factor=nan"):
        radial_block_mask(frames=2, tokens_per_frame=100, block_size=64, decay_factor=float("nan"))
    with pytest.raises(ValueError, match=r"N=20000 exceeds 16384. Use radial_block_mask"):
        radial_token_mask(frames=2, tokens_per_frame=10000, block_size=128, decay_factor=1.0)


# -------------------------------------------------------------------- config
def test_config_defaults_validation_and_round_trip():
    cfg = RadialConfig()
    assert (cfg.method, cfg.decay_factor, cfg.block_size, cfg.sink) == ("radial", 1.0, 128, True)
    assert (cfg.dense_steps, cfg.dense_layers) == (0, 0)
    for kwargs, pattern in [
        (dict(decay_factor=0), r"RadialConfig.decay_factor=0 is invalid: must be a finite number > 0"),
        (dict(decay_factor=-0.5), r"decay_factor=-0.5 is invalid"),
        (dict(decay_factor=float("inf")), r"decay_factor=inf is invalid"),
        (dict(decay_factor="0.2"), r"decay_factor='0.2' is invalid"),
        (dict(decay_factor=True), r"decay_factor=True is invalid"),
        (dict(block_size=100), r"RadialConfig.block_size=100 is invalid: must be a positive multiple of 16"),
        (dict(block_size=0), r"block_size=0 is invalid"),
        (dict(block_size=128.0), r"block_size=128.0 is invalid"),
        (dict(sink="yes"), r"RadialConfig.sink='yes' is invalid: must be True or False"),
        (dict(dense_steps=-1), r"RadialConfig.dense_steps=-1 is invalid"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            RadialConfig(**kwargs)
    cfg = RadialConfig(decay_factor=0.2, block_size=64, sink=False, dense_steps=12, dense_layers=[3, 1])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert RadialConfig.from_json(cfg.to_json()) == cfg
    assert isinstance(RadialConfig(decay_factor=1).decay_factor, float)
    # One name lookup resolves the config class; the config knows its method.
    assert config_class("radial") is RadialConfig and RadialConfig.method_class() is RadialMethod
    assert isinstance(cfg.make_method(), RadialMethod)
    with pytest.raises(ValueError, match=r"RadialConfig.version=2 is invalid: this sparsegen reads config version 1"):
        config_from_dict({**cfg.to_dict(), "version": 2})


def test_presets():
    wan = RadialConfig.preset("wan2.1")
    assert (wan.decay_factor, wan.dense_steps, wan.dense_layers, wan.block_size) == (0.2, 12, 1, 128)
    assert RadialConfig.preset("wan2.2").block_size == 64
    assert RadialConfig.preset("hunyuanvideo", dense_steps=2).dense_steps == 2
    assert set(PRESETS) >= {"wan2.1", "wan2.2", "hunyuanvideo"} and RadialConfig.presets is PRESETS
    with pytest.raises(ValueError, match=r"RadialConfig has no preset 'mochi'; presets: \["):
        RadialConfig.preset("mochi")


# -------------------------------------------------------------------- method
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_layer_equals_reference_masked_attention(dtype):
    # 5 frames of 6 x 10 tokens: N = 300, not a multiple of the 32-token block.
    geom = AttentionGeometry(frames=5, height=6, width=10)
    method = RadialMethod(RadialConfig(decay_factor=0.5, block_size=32, backend="torch"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 3, 16, generator=g).to(dtype) for _ in range(3))
    call = AttentionCall(geometry=geom, backend="torch")
    out, lse = method.attention(q, k, v, call)
    mask = radial_block_mask(frames=5, tokens_per_frame=60, block_size=32, decay_factor=0.5)
    assert torch.equal(method.static_mask(geom).to_block_matrix(), mask.to_block_matrix())
    assert 0.0 < mask.density() < 1.0, "the geometry must give a genuinely sparse mask"
    assert call.stats["density"] == pytest.approx(mask.density())
    golden, golden_lse = reference_attention(q, k, v, mask, dtype=torch.float64)
    eager, eager_lse = reference_attention(q, k, v, mask, dtype=dtype)  # same-dtype eager: the error budget
    what = f"radial (2, 300, 3, 16) {dtype}"
    assert_close_to_golden(out, eager, golden, what=what)
    assert_close_to_golden(lse, eager_lse, golden_lse, what=what + " lse")
    # The mask really restricts attention: dense attention gives a different output.
    dense, _ = reference_attention(q, k, v, None, dtype=torch.float64)
    assert (dense - golden).abs().max() > 1e-2


def test_mask_cached_per_geometry_and_rebuilt_for_a_new_one():
    method = RadialMethod(RadialConfig(block_size=32, backend="torch"))
    a, b = AttentionGeometry(5, 6, 10), AttentionGeometry(7, 6, 10)
    assert method.static_mask(a) is method.static_mask(a)
    assert method.static_mask(b).q_len == 420 and method.static_mask(a).q_len == 300
    q = torch.randn(1, 420, 2, 16)
    out, _ = method.attention(q, q, q, AttentionCall(geometry=b, backend="torch"))
    assert out.shape == q.shape
    with pytest.raises(ValueError, match=r"expects q of shape \(batch, 300, heads, head_dim\) for geometry \(5, 6, 10\)"):
        method.attention(q, q, q, AttentionCall(geometry=a, backend="torch"))


def test_check_geometry():
    method = RadialMethod(RadialConfig())
    method.check_geometry(AttentionGeometry(1, 30, 52))  # one frame: dense, fine
    method.check_geometry(AttentionGeometry(21, 30, 52))
    with pytest.raises(ValueError, match=r"tokens_per_frame=16 with block_size=128.*use block_size=32.*\(9, 4, 4\)"):
        method.check_geometry(AttentionGeometry(9, 4, 4))
    RadialMethod(RadialConfig(block_size=32)).check_geometry(AttentionGeometry(9, 4, 4))


# ----------------------------------------------------------------------- CLI
def _run_cli(argv, capsys):
    rc = cli_main(["mask", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_json_per_distance_hand_derived(capsys):
    # 256 tokens per frame = 2 aligned blocks of 128; P = 512. dist 0-1 whole frame;
    # 2-3 band 128 (every block of the 2x2 pair box passes); 4-7 w0 = 64: even only;
    # 8-11 w0 = 32: multiples of 4 only.
    rc, out, _ = _run_cli(["radial", "--frames", "12", "--tokens-per-frame", "256", "--block-size", "128",
                           "--decay-factor", "1", "--json"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert res["per_distance"] == {"0": 4, "1": 4, "2": 4, "3": 4, "4": 4, "5": 0, "6": 4, "7": 0,
                                   "8": 4, "9": 0, "10": 0}
    assert res["total_blocks"] == 24 * 24
    blocks = radial_block_matrix(frames=12, tokens_per_frame=256, block_size=128, decay_factor=1.0)
    assert res["kept_blocks"] == int(blocks.sum())
    assert res["density"] == pytest.approx(res["kept_blocks"] / res["total_blocks"])
    rc, out, _ = _run_cli(["radial", "--frames", "12", "--tokens-per-frame", "256", "--no-sink", "--json"], capsys)
    res = json.loads(out)
    assert list(res["per_distance"]) == [str(d) for d in range(12)] and res["per_distance"]["11"] == 0


def test_cli_text_png_and_errors(capsys, tmp_path):
    from PIL import Image

    png = tmp_path / "radial.png"
    rc, out, _ = _run_cli(["radial", "--frames", "9", "--tokens-per-frame", "130", "--block-size", "64",
                           "--decay-factor", "0.5", "--png", str(png)], capsys)
    assert rc == 0
    mask = radial_block_mask(frames=9, tokens_per_frame=130, block_size=64, decay_factor=0.5)
    assert f"density {mask.density():.4f}" in out
    assert f"{mask.num_visited_blocks()} of {19 * 19} blocks kept" in out
    per = kept_blocks_per_distance(mask.to_block_matrix()[0, 0], frames=9, tokens_per_frame=130, block_size=64)
    assert f"  d=7    {per[7]}" in out and "d=8" not in out
    with Image.open(png) as im:
        assert im.size == (19 * 8, 19 * 8)
    rc, out, err = _run_cli(["radial", "--frames", "4", "--tokens-per-frame", "10"], capsys)
    assert rc == 2 and out == ""
    assert "tokens_per_frame=10 with block_size=128" in err and "use block_size=16" in err
