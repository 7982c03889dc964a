"""Generalized neighborhood attention: definition, block-sparse realization, kernels, CLI, method."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import sparsegen
import sparsegen.neighborhood as nbh
from sparsegen.cli import main as cli_main
from sparsegen.joint import sparse_self_attention
from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.reference import reference_attention
from sparsegen.methods import AttentionCall, AttentionGeometry, config_from_dict
from sparsegen.methods.gna import GNAConfig, GNAMethod
from sparsegen.neighborhood import (
    NeighborhoodSpec,
    axis_neighborhood_mask,
    choose_tiles,
    neighborhood_attention,
    neighborhood_layout,
    neighborhood_mask,
)
from sparsegen.testing import CallRecorder, FP32_GRADIENT_FACTOR, assert_close_to_golden, random_sweep_size

from tiny_models import text_embeds, tiny_hunyuan_transformer, tiny_wan_pipeline


def _keys(n, kernel, stride=1, dilation=1, causal=False):
    """Attended keys of every query along one axis, as lists."""
    m = axis_neighborhood_mask(n, kernel, stride, dilation, causal)
    return [torch.nonzero(row).squeeze(1).tolist() for row in m]


# ------------------------------------------------------------------ token-level definition
def test_windows_shift_at_borders_and_keep_kernel_size():
    keys = _keys(8, 3)
    assert keys[0] == [0, 1, 2] and keys[3] == [2, 3, 4] and keys[7] == [5, 6, 7]
    assert all(len(k) == 3 for k in keys)


def test_even_kernel_reaches_one_further_left():
    # k = 4: L = 2, R = 1; the center is clamped to [2, n - 2].
    keys = _keys(8, 4)
    assert keys[4] == [2, 3, 4, 5] and keys[0] == [0, 1, 2, 3] and keys[7] == [4, 5, 6, 7]
    assert keys[1] == [0, 1, 2, 3] and keys[6] == [4, 5, 6, 7]


def test_stride_groups_share_one_window():
    # n = 10, k = 4, s = 2: leaders 1, 3, 5, 7, 9 -> centers 2, 3, 5, 7, 8.
    keys = _keys(10, 4, stride=2)
    expected = [[0, 1, 2, 3], [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [6, 7, 8, 9]]
    assert keys == [w for w in expected for _ in range(2)]
    # stride == kernel is blocked attention; a short last group's window shifts left.
    assert _keys(9, 3, stride=3) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[6, 7, 8]] * 3
    assert _keys(8, 3, stride=3)[6:] == [[5, 6, 7]] * 2


def test_dilation_groups():
    keys = _keys(10, 3, dilation=2)
    assert keys[0] == [0, 2, 4] and keys[5] == [3, 5, 7] and keys[9] == [5, 7, 9] and keys[8] == [4, 6, 8]
    # n = 11, d = 3: groups {0,3,6,9}, {1,4,7,10}, {2,5,8} (the last one is shorter).
    keys = _keys(11, 3, dilation=3)
    assert keys[8] == [2, 5, 8] and keys[10] == [4, 7, 10] and keys[0] == [0, 3, 6]


def test_causal_truncates_at_the_start():
    keys = _keys(8, 3, causal=True)
    assert keys[0] == [0] and keys[1] == [0, 1] and keys[5] == [3, 4, 5]
    # With stride 2 the group leader (last query of the group) anchors the window.
    keys = _keys(8, 3, stride=2, causal=True)
    assert keys[:4] == [[0], [0, 1], [1, 2], [1, 2, 3]] and keys[6:] == [[5, 6], [5, 6, 7]]
    assert _keys(7, 2, dilation=2, causal=True)[5] == [3, 5]


def test_axes_combine_with_and_and_full_kernel_is_dense():
    m = neighborhood_mask((4, 5), (3, 3))
    grid_idx = lambda r, c: r * 5 + c
    assert sorted(torch.nonzero(m[grid_idx(0, 0)]).squeeze(1).tolist()) == [
        grid_idx(r, c) for r in range(3) for c in range(3)]
    assert sorted(torch.nonzero(m[grid_idx(3, 4)]).squeeze(1).tolist()) == [
        grid_idx(r, c) for r in range(1, 4) for c in range(2, 5)]
    assert m.sum(1).eq(9).all()
    assert neighborhood_mask((3, 4, 5), (3, 4, 5)).all()
    assert neighborhood_mask((3, 4, 5), (3, 4, 5), is_causal=(True, False, False)).sum() == sum(
        (t + 1) * 20 * 20 for t in range(3))


def test_non_causal_rows_see_exactly_prod_kernel_keys():
    rng = random.Random(7)
    for _ in range(3 * random_sweep_size()):
        grid = tuple(rng.randint(1, 9) for _ in range(3))
        dil = tuple(rng.randint(1, n) for n in grid)
        ker = tuple(rng.randint(1, n // d) for n, d in zip(grid, dil))
        stride = tuple(rng.randint(1, k) for k in ker)
        m = neighborhood_mask(grid, ker, stride, dil)
        assert m.sum(1).eq(math.prod(ker)).all(), (grid, ker, stride, dil)


# ------------------------------------------------------------------ block-sparse realization
def _tiled_definition(layout):
    """Token definition in tiled order: bool (Lq, Lk), padding rows and columns False."""
    spec = layout.spec
    ref = neighborhood_mask(spec.grid, spec.kernel_size, spec.stride, spec.dilation, spec.is_causal)
    n = spec.num_tokens
    qp, kp = layout.q_layout.perm, layout.kv_layout.perm
    padded = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    padded[:n, :n] = ref
    return padded[qp][:, kp], qp < n


def _check_block_mask(layout):
    mask = layout.mask
    assert isinstance(mask, BlockSparseMask)
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    assert (qbs, kbs) == (math.prod(layout.q_tile), math.prod(layout.kv_tile))
    definition, real_rows = _tiled_definition(layout)
    dense = mask.to_dense()[0, 0]
    assert torch.equal(dense[real_rows], definition[real_rows]), "block mask differs from the definition"
    assert not dense[:, layout.kv_layout.perm == layout.spec.num_tokens].any(), "padding keys attended"
    # Visited blocks: exactly those the definition touches; full blocks carry no tile.
    lq, lk = definition.shape
    d_blocks = definition.view(lq // qbs, qbs, lk // kbs, kbs).permute(0, 2, 1, 3)
    r_blocks = real_rows.view(-1, qbs)[:, None, :, None]
    touched = d_blocks.flatten(2).any(-1)
    complete = (d_blocks | ~r_blocks).flatten(2).all(-1)
    state = mask.block_state()[0, 0]
    assert torch.equal(state > 0, touched)
    assert torch.equal(state == 1, touched & complete)
    if mask.tile_ids is not None:
        assert mask.tiles.shape[1:] == (qbs, kbs)
        valid = torch.arange(mask.kv_indices.shape[-1]) < mask.kv_num_blocks[..., None]
        assert mask.tiles.shape[0] <= int(((mask.tile_ids >= 0) & valid).sum())


def _random_spec(rng):
    nd = rng.randint(1, 3)
    grid = tuple(rng.randint(1, 40 if nd == 1 else 10) for _ in range(nd))
    dil = tuple(rng.choice([1, 1, 2, 3]) if n >= 3 else 1 for n in grid)
    ker = tuple(rng.randint(1, n // d) for n, d in zip(grid, dil))
    stride = tuple(rng.randint(1, k) for k in ker)
    causal = tuple(rng.random() < 0.3 for _ in grid)
    return grid, ker, stride, dil, causal


def test_block_mask_equals_definition_random_sweep():
    rng = random.Random(2024)
    for case in range(8 * random_sweep_size()):
        grid, ker, stride, dil, causal = _random_spec(rng)
        tile = kv_tile = None
        if case % 3:
            tile = tuple(rng.choice([1, 2, 3, 4]) for _ in grid)
            kv_tile = tile if case % 3 == 1 else tuple(rng.choice([1, 2, 4]) for _ in grid)
        layout = neighborhood_layout(grid, ker, stride, dil, causal, tile=tile, kv_tile=kv_tile)
        _check_block_mask(layout)
        assert layout.attended_pairs == int(neighborhood_mask(grid, ker, stride, dil, causal).sum())


def test_builder_never_forms_a_token_mask(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the block builder must not evaluate the token-level definition")

    monkeypatch.setattr(nbh, "neighborhood_mask", forbidden)
    monkeypatch.setattr(nbh, "axis_neighborhood_mask", forbidden)
    nbh._layout_cached.cache_clear()
    layout = neighborhood_layout((9, 11, 13), (4, 5, 3), (2, 3, 1), (1, 2, 3), (True, False, False), tile=(2, 4, 4))
    assert layout.mask.num_partial_blocks() > 0 and layout.mask.tiles.shape[1:] == (32, 32)
    # 28k tokens: a dense mask would be 800M entries; the tiled one stays small.
    layout = neighborhood_layout((16, 40, 44), (5, 9, 9), (1, 3, 3), tile=(1, 8, 16))
    stored = layout.mask.tiles.numel() + layout.mask.kv_indices.numel()
    assert stored < layout.spec.num_tokens ** 2 / 100


def test_aligned_tiles_leave_no_partial_blocks():
    # Windows [start - 4, start + 7] of 4-wide stride groups along columns: aligned to 4-tiles.
    layout = neighborhood_layout((12, 16), (4, 12), (4, 4), tile=(4, 4))
    assert layout.mask.num_partial_blocks() == 0 and layout.mask.tile_ids is None
    _check_block_mask(layout)


def test_choose_tiles_minimizes_computed_work():
    spec = NeighborhoodSpec.make((24, 40), (7, 9), (1, 3))
    q_tile, kv_tile = choose_tiles(spec, block_size=32)
    best = neighborhood_layout(spec.grid, spec.kernel_size, spec.stride, tile=q_tile, kv_tile=kv_tile).stats()
    for tile in [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16), (1, 32)]:
        other = neighborhood_layout(spec.grid, spec.kernel_size, spec.stride, tile=tile).stats()
        assert best["computed_pairs"] <= other["computed_pairs"], tile
    assert math.prod(q_tile) == math.prod(kv_tile) == 32


# ------------------------------------------------------------------ outputs vs the definition
# (grid, kernel, stride, dilation, causal, tile, kv_tile): odd grids, even kernels, strides,
# dilations, causal axes and their combinations; tiles small enough to make many blocks.
OUTPUT_CASES = {
    "1d-even-stride-dilation": ((37,), 6, 2, 2, False, (8,), None),
    "1d-causal-stride": ((29,), 5, 3, 1, True, (4,), None),
    "2d-mixed": ((9, 11), (4, 5), (2, 3), (1, 2), (False, True), (2, 4), None),
    "2d-aligned": ((12, 16), (4, 12), (4, 4), 1, False, (4, 4), None),
    "2d-qkv-tiles-differ": ((10, 13), (3, 6), (1, 2), 1, (True, False), (4, 4), (2, 8)),
    "3d-mixed": ((5, 6, 7), (3, 4, 3), (1, 2, 3), (1, 1, 2), (True, False, False), (2, 2, 4), None),
    "3d-auto-tile": ((5, 7, 9), (3, 3, 5), (2, 1, 2), 1, False, None, None),
    "3d-full-kernel": ((3, 5, 6), (3, 5, 6), 1, 1, False, (1, 4, 4), None),
}


def _expected(q, k, v, grid, ker, stride, dil, causal):
    """(golden fp64, eager in q's dtype) dense masked attention with the token definition."""
    tok = neighborhood_mask(grid, ker, stride, dil, causal)
    n = tok.shape[0]
    mask = BlockSparseMask.from_dense(tok, q_block_size=n, kv_block_size=n)
    golden = reference_attention(q, k, v, mask)
    eager = reference_attention(q, k, v, mask, dtype=q.dtype)
    return golden, eager


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_output_equals_dense_masked_attention(name, backend):
    grid, ker, stride, dil, causal, tile, kv_tile = OUTPUT_CASES[name]
    torch.manual_seed(list(OUTPUT_CASES).index(name))
    n = math.prod(grid)
    q, k, v = (torch.randn(2, n, 2, 16) for _ in range(3))
    out, lse = neighborhood_attention(q, k, v, grid=grid, kernel_size=ker, stride=stride, dilation=dil,
                                      is_causal=causal, tile=tile, kv_tile=kv_tile, backend=backend,
                                      return_lse=True)
    (golden, golden_lse), (eager, eager_lse) = _expected(q, k, v, grid, ker, stride, dil, causal)
    what = f"{name} {backend} grid={grid} fp32"
    assert_close_to_golden(out, eager, golden, what=what)
    assert_close_to_golden(lse, eager_lse, golden_lse, what=what + " lse")
    if name == "3d-full-kernel":
        dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        assert (out - dense.transpose(1, 2)).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_fp16(backend):
    grid, ker, stride, dil, causal = (6, 5, 7), (3, 2, 5), (2, 1, 3), 1, (False, True, False)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, math.prod(grid), 2, 32).half() for _ in range(3))
    out = neighborhood_attention(q, k, v, grid=grid, kernel_size=ker, stride=stride, dilation=dil,
                                 is_causal=causal, tile=(2, 2, 4), backend=backend)
    (golden, _), (eager, _) = _expected(q, k, v, grid, ker, stride, dil, causal)
    assert out.dtype == torch.float16
    assert_close_to_golden(out, eager, golden, what=f"fp16 {backend} grid={grid}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_equal_dense_masked_attention(backend):
    grid, ker, stride, dil, causal = (5, 6, 7), (3, 4, 3), (1, 2, 3), (1, 1, 2), (True, False, False)
    torch.manual_seed(11)
    n = math.prod(grid)
    inputs = [torch.randn(1, n, 2, 16) for _ in range(3)]
    grad_out = torch.randn(1, n, 2, 16)
    tok = neighborhood_mask(grid, ker, stride, dil, causal)
    mask = BlockSparseMask.from_dense(tok, q_block_size=n, kv_block_size=n)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
        fn(*leaves).backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    ours = grads(lambda q, k, v: neighborhood_attention(q, k, v, grid=grid, kernel_size=ker, stride=stride,
                                                        dilation=dil, is_causal=causal, tile=(2, 2, 4),
                                                        backend=backend), torch.float32)
    golden = grads(lambda q, k, v: reference_attention(q, k, v, mask)[0], torch.float64)
    eager = grads(lambda q, k, v: reference_attention(q, k, v, mask, dtype=torch.float32)[0], torch.float32)
    for name, a, e, g in zip("qkv", ours, eager, golden):
        assert_close_to_golden(a, e, g, factor=FP32_GRADIENT_FACTOR, what=f"d{name} {backend} grid={grid} fp32")


def test_functional_api_errors():
    q = torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \(batch, prod\(grid\)=30, heads, head_dim\) for grid=\(5, 6\)"):
        neighborhood_attention(q, q, q, grid=(5, 6), kernel_size=3)
    with pytest.raises(ValueError, match=r"q must be a \(batch, tokens, heads, head_dim\) tensor, got \(20, 2\)"):
        neighborhood_attention(q[0, :, :, 0], q, q, grid=20, kernel_size=3)
    with pytest.raises(ValueError, match=r"axis 1: kernel_size=5 \* dilation=2 > 5"):
        neighborhood_attention(q, q, q, grid=(4, 5), kernel_size=(3, 5), dilation=(1, 2))
    with pytest.raises(ValueError, match=r"axis 0: stride=4 > kernel_size=3"):
        neighborhood_attention(q, q, q, grid=(4, 5), kernel_size=3, stride=4)
    with pytest.raises(ValueError, match=r"is_causal=\(True,\) must be a bool or 2 bools"):
        neighborhood_attention(q, q, q, grid=(4, 5), kernel_size=3, is_causal=(True,))
    with pytest.raises(ValueError, match="kv_tile was given without tile"):
        neighborhood_attention(q, q, q, grid=(4, 5), kernel_size=3, kv_tile=(2, 2))
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of"):
        neighborhood_attention(q, q, q, grid=(4, 5), kernel_size=3, backend="cuda")
    assert sparsegen.neighborhood_attention is neighborhood_attention


# ------------------------------------------------------------------ CLI
def _cli(argv, capsys):
    rc = cli_main(["mask", "gna", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_flux_published_configuration(capsys):
    rc, out, _ = _cli(["--grid", "256,256", "--kernel-size", "80", "--stride", "16", "--json"], capsys)
    assert rc == 0
    stats = json.loads(out)
    # Chosen tile (16, 8): a query tile lies in one 16 x 16 stride group, whose 80 x 80
    # window covers 80 / 16 = 5 key tiles along rows and 80 / 8 = 10 along columns.
    assert stats["tile"] == [16, 8] and stats["tile_chosen"] is True
    assert stats["partial_blocks"] == 0
    assert stats["full_blocks"] == (16 * 5) * (32 * 10)
    assert stats["density"] == pytest.approx((80 / 256) ** 2, abs=1e-12)
    assert stats["speedup_bound"] == pytest.approx((256 / 80) ** 2)
    rc, out, _ = _cli(["--grid", "256,256", "--kernel-size", "80", "--stride", "16", "--tile", "16,16", "--json"], capsys)
    assert rc == 0 and json.loads(out)["partial_blocks"] == 0 and json.loads(out)["tile_chosen"] is False
    # A tile spanning two stride groups cannot be perfectly block-sparse.
    rc, out, _ = _cli(["--grid", "256,256", "--kernel-size", "80", "--stride", "16", "--tile", "32,4", "--json"], capsys)
    assert rc == 0 and json.loads(out)["partial_blocks"] > 0


def test_cli_hunyuan_video_published_configuration(capsys):
    argv = ["--grid", "30,48,80", "--kernel-size", "18,24,24", "--stride", "16,8,8", "--json"]
    nbh._layout_cached.cache_clear()
    rc, out, _ = _cli(argv, capsys)
    assert rc == 0
    stats = json.loads(out)
    # Tile (2, 8, 8): windows of 18 / 2 = 9, 24 / 8 = 3 and 24 / 8 = 3 key tiles per axis,
    # for 15 x 6 x 10 query tiles.
    assert stats["tile"] == [2, 8, 8] and stats["partial_blocks"] == 0
    assert stats["full_blocks"] == (15 * 9) * (6 * 3) * (10 * 3)
    assert stats["density"] == pytest.approx(18 / 30 * 24 / 48 * 24 / 80, abs=1e-12)
    assert stats["speedup_bound"] == pytest.approx(1 / 0.09)


def test_cli_text_png_and_errors(capsys, tmp_path):
    png = tmp_path / "gna.png"
    rc, out, _ = _cli(["--grid", "9,11", "--kernel-size", "4,5", "--stride", "2,3", "--is-causal", "0,1", "--png", str(png)],
                      capsys)
    assert rc == 0
    assert "chosen automatically for the least wasted work" in out and "partial blocks" in out and "speedup bound" in out
    from PIL import Image

    expected = neighborhood_layout((9, 11), kernel_size=(4, 5), stride=(2, 3), is_causal=(False, True))
    expected.mask.render(str(tmp_path / "expected.png"))
    with Image.open(png) as img, Image.open(tmp_path / "expected.png") as ref:
        assert img.size == ref.size and img.tobytes() == ref.tobytes()
    rc, out, _ = _cli(["--grid", "9,11", "--kernel-size", "3", "--tile", "2,4"], capsys)
    assert rc == 0 and "tile q=(2, 4) kv=(2, 4), given;" in out
    rc, _, err = _cli(["--grid", "9,11", "--kernel-size", "3,3,3"], capsys)
    assert rc == 2 and "--kernel-size has 3 values but --grid has 2 axes; give 1 or 2" in err
    rc, _, err = _cli(["--grid", "9,11", "--kernel-size", "10"], capsys)
    assert rc == 2 and "kernel_size=10 * dilation=1 > 9" in err


# ------------------------------------------------------------------ method config
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"GNAConfig.kernel_size=None is invalid: is required"):
        GNAConfig()
    with pytest.raises(ValueError, match=r"GNAConfig.kernel_size=\(3, 3, 3, 3\) is invalid"):
        GNAConfig(kernel_size=(3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"GNAConfig.stride=0 is invalid"):
        GNAConfig(kernel_size=3, stride=0)
    with pytest.raises(ValueError, match=r"GNAConfig.stride=\(1, 6, 2\) is invalid: must not exceed kernel_size"):
        GNAConfig(kernel_size=(3, 5, 5), stride=(1, 6, 2))
    with pytest.raises(ValueError, match=r"GNAConfig.is_causal='yes' is invalid"):
        GNAConfig(kernel_size=3, is_causal="yes")
    with pytest.raises(ValueError, match=r"GNAConfig.tile=\(2, 2\) is invalid"):
        GNAConfig(kernel_size=3, tile=(2, 2))
    with pytest.raises(ValueError, match=r"GNAConfig.kv_tile=\(2, 2, 2\) is invalid: needs tile"):
        GNAConfig(kernel_size=3, kv_tile=(2, 2, 2))
    with pytest.raises(ValueError, match=r"GNAConfig.block_size=100 is invalid: must be a power of two"):
        GNAConfig(kernel_size=3, block_size=100)
    cfg = GNAConfig(kernel_size=[18, 24, 24], stride=(16, 8, 8), is_causal=[True, False, False])
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


def test_config_to_grid():
    g = AttentionGeometry(5, 8, 8)
    assert GNAConfig(kernel_size=(5, 5)).spec_for(g).kernel_size == (5, 5, 5)       # spatial-only
    assert GNAConfig(kernel_size=3, dilation=(2, 2)).spec_for(g).dilation == (1, 2, 2)
    image = GNAConfig(kernel_size=3, stride=2).spec_for(AttentionGeometry(1, 8, 8))
    assert image.kernel_size == (1, 3, 3) and image.stride == (1, 2, 2)
    with pytest.raises(ValueError, match=r"does not fit the token grid \(5, 8, 8\) .* axis 0: kernel_size=7"):
        GNAConfig(kernel_size=(7, 3, 3)).spec_for(g)


# ------------------------------------------------------------------ through sparsegen.apply
WAN_GNA = dict(kernel_size=(3, 5, 3), stride=(1, 2, 3), dilation=(1, 1, 2), is_causal=(True, False, False))


def _check_calls(seen, opts, expected_calls):
    assert len(seen) == expected_calls
    for _, _, geom, q, k, v, out in seen:
        args = [opts[f] for f in ("kernel_size", "stride", "dilation", "is_causal")]
        golden, eager = _expected(q, k, v, geom.grid, *args)
        assert_close_to_golden(out, eager[0], golden[0], what=f"layer output geometry {geom.grid}")
        dense, _ = reference_attention(q, k, v, None)
        assert (out.double() - dense).abs().max().item() > 1e-3, "the neighborhood really is sparse"


def test_wan_pipeline_layers_equal_reference_and_errors():
    from tiny_models import run_wan

    pipe = tiny_wan_pipeline()
    with sparsegen.apply(pipe, CallRecorder("gna", backend="torch", **WAN_GNA)) as h:
        seen = h.method.calls
        run_wan(pipe, frames=17, height=128, width=128, steps=2)
        _check_calls(seen, WAN_GNA, expected_calls=2 * 3)
        assert {c.geometry for c in seen} == {AttentionGeometry(5, 8, 8)}
        densities = h.step_densities()
        assert [step for step, _ in densities] == [0, 1] and all(0 < d < 1 for _, d in densities)
    with pytest.raises(ValueError, match=r"GNAConfig.kernel_size=\(3, 3, 3, 3\) is invalid"):
        sparsegen.apply(pipe, "gna", kernel_size=(3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"GNAConfig has no option\(s\) \['window'\]"):
        sparsegen.apply(pipe, "gna", kernel_size=3, window=5)
    # A grid the window does not fit: 3 latent frames for a 3-frame window with dilation 2.
    with sparsegen.apply(pipe, "gna", kernel_size=3, dilation=(2, 1, 1), backend="torch"):
        with pytest.raises(ValueError, match=r"does not fit the token grid \(3, 8, 8\) .* axis 0: kernel_size=3 "
                                             r"\* dilation=2 > 3"):
            run_wan(pipe, frames=9, height=128, width=128, steps=1)
    assert not hasattr(pipe.transformer, "_sparsegen_handle")


def test_hunyuan_transformer_layers_equal_reference():
    model = tiny_hunyuan_transformer()
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 3, 10, 14)  # tokens (3, 5, 7) after 1 x 2 x 2 patches
    text = text_embeds(1, tokens=6)
    kwargs = dict(timestep=torch.tensor([500]), encoder_hidden_states=text,
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                  pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3500.0]), return_dict=False)
    opts = dict(kernel_size=(2, 3, 4), stride=(1, 2, 2), dilation=1, is_causal=False)
    with torch.no_grad():
        base = model(latents, **kwargs)[0]
        with sparsegen.apply(model, CallRecorder("gna", backend="torch", **opts)) as h:
            seen = h.method.calls
            sparse = model(latents, **kwargs)[0]
    _check_calls(seen, opts, expected_calls=4)  # 2 dual-stream + 2 single-stream blocks
    assert (sparse - base).abs().max().item() > 1e-4


def test_joint_text_attention_with_gna_equals_reference():
    """HunyuanVideo's joint layer: video->video GNA, video->text dense (padding masked), text->all."""
    torch.manual_seed(1)
    geom = AttentionGeometry(3, 5, 7)
    nv, nt, b, h, d = geom.num_tokens, 9, 2, 2, 16
    opts = dict(kernel_size=(2, 2, 3), stride=(1, 2, 2), dilation=(1, 2, 2), is_causal=(True, False, False))
    method = GNAMethod(GNAConfig(backend="torch", **opts))
    q, k, v = (torch.randn(b, nv + nt, h, d) for _ in range(3))
    valid = torch.ones(b, nt, dtype=torch.bool)
    valid[1, 5:] = False
    out = sparse_self_attention(method, q, k, v, AttentionCall(geometry=geom, backend="torch"), text_tokens=nt,
                                text_key_valid=valid)
    tok = torch.ones(b, 1, nv + nt, nv + nt, dtype=torch.bool)
    tok[:, :, :nv, :nv] = neighborhood_mask(geom.grid, *opts.values())
    tok[:, :, :, nv:] &= valid[:, None, None, :]
    mask = BlockSparseMask.from_dense(tok, q_block_size=nv + nt, kv_block_size=nv + nt)
    golden, _ = reference_attention(q, k, v, mask)
    eager, _ = reference_attention(q, k, v, mask, dtype=torch.float32)
    assert_close_to_golden(out, eager, golden, what="joint GNA attention")
