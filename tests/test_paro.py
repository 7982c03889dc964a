"""PARO: plans (files, buckets, masks), calibration, the method, refusal of foreign plans."""

import json

import pytest
import torch

import sparsegen
from sparsegen.calibration import _ParoRecorder, choose_orders, select_block_masks, step_buckets
from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.reference import reference_attention
from sparsegen.methods.base import AttentionCall, AttentionGeometry
from sparsegen.methods.paro import PAROConfig, ParoPlan, load_plan, pack_bits, unpack_bits
from sparsegen.reorder import ORDERS, order_permutation
from sparsegen.testing import QUANT_SQNR_FLOOR_DB, assert_close_to_golden, sqnr_db
from tiny_models import run_wan, text_embeds, tiny_cogvideox_pipeline, tiny_wan_pipeline

WAN_GRID = (5, 8, 8)  # 17 frames at 128 x 128 -> 5 latent frames of 8 x 8 tokens
SIZE = dict(height=128, width=128)


def _plan(grid, layers, heads, *, block=16, orders=None, masks=None, buckets=((0.0, 1.0),), model="X", seed=0):
    n = grid[0] * grid[1] * grid[2]
    nb = -(-n // block)
    g = torch.Generator().manual_seed(seed)
    if orders is None:
        orders = [[ORDERS[int(i)] for i in torch.randint(0, 6, (heads,), generator=g)] for _ in range(layers)]
    if masks is None:
        masks = torch.rand(len(buckets), layers, heads, nb, nb, generator=g) < 0.4
        masks |= torch.eye(nb, dtype=torch.bool)
    return ParoPlan(model_class=model, grid=grid, num_layers=layers, num_heads=heads, block_size=block, orders=orders,
                    masks=masks, buckets=buckets, calibration_steps=4, density=0.5)


def test_bit_packing_round_trips_at_odd_widths():
    g = torch.Generator().manual_seed(0)
    for k in (1, 7, 8, 9, 21):
        bits = torch.rand(3, 2, k, generator=g) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-k // 8)
        assert torch.equal(unpack_bits(packed, k), bits)
    assert pack_bits(torch.tensor([True] + [False] * 7)).item() == 128  # most significant bit first


def test_step_buckets_first_half_own_second_half_shared():
    assert step_buckets(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    assert step_buckets(5) == [(0.0, 0.2), (0.2, 0.4), (0.4, 1.0)]
    assert step_buckets(1) == [(0.0, 1.0)]
    assert step_buckets(20, first_half_buckets=2) == [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    plan = _plan((1, 4, 4), 1, 1, buckets=step_buckets(20, first_half_buckets=2))
    # Another step count is mapped by progress through the schedule.
    assert [plan.bucket_index(s, 20) for s in (0, 4, 5, 9, 10, 19)] == [0, 0, 1, 1, 2, 2]
    assert [plan.bucket_index(s, 8) for s in (0, 1, 2, 3, 4, 7)] == [0, 0, 1, 1, 2, 2]


def test_block_selection_keeps_the_most_mass_with_one_global_threshold():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(3, 2, 6, 6, generator=g)
    keep = select_block_masks(mass, 0.5)
    eye = torch.eye(6, dtype=torch.bool)
    assert keep[..., eye].all()  # the diagonal of every (layer, head) is kept
    assert int(keep.sum()) == round(0.5 * mass.numel())
    # Off the diagonal, every kept block has at least the mass of every dropped one.
    off = ~eye.expand_as(mass)
    assert mass[keep & off].min() >= mass[~keep & off].max()
    # Below one block per row, the diagonal alone remains.
    assert torch.equal(select_block_masks(mass, 0.01), eye.expand_as(mass))


def test_choose_orders_rewards_sparsity_and_uniformity():
    sparse = torch.tensor([[[0.1, 0.9, 0.5, 0.5, 0.5, 0.5]]])
    uniform = torch.tensor([[[10.0, 10.0, 10.0, 10.0, 10.0, 10.0]]])
    best, cost = choose_orders(sparse, uniform, 0.5)
    assert best.item() == 1 and cost.shape == (1, 1, 6)
    # With only uniformity counting, the flattest blocks win.
    uniform2 = torch.tensor([[[10.0, 10.0, 2.0, 10.0, 10.0, 10.0]]])
    assert choose_orders(sparse, uniform2, 0.0)[0].item() == 2


def test_calibration_picks_an_order_that_makes_a_same_pixel_pattern_block_diagonal():
    """Heads whose queries attend the same (h, w) pixel in every frame: laid out "HWF" or
    "WHF", each pixel's frames are adjacent and the map is block diagonal."""
    grid, heads, d = (4, 8, 8), 2, 64
    n = 256
    pixel = torch.arange(n) % 64
    x = torch.nn.functional.one_hot(pixel, 64).float() * 12.0  # (N, 64): same pixel -> large score
    q = x[None, :, None, :].expand(1, n, heads, d).contiguous()
    rec = _ParoRecorder(block_size=16, sample_query_blocks=8)
    rec.check_model(model_class="M", num_layers=1, transformer_index=0)
    rec.check_geometry(AttentionGeometry(*grid))
    out, _ = rec.attention(q, q, q, AttentionCall(geometry=AttentionGeometry(*grid), layer=0, num_layers=1))
    assert torch.isfinite(out).all()
    sparse, uniform = rec.order_metrics()
    best, _ = choose_orders(sparse, uniform, 0.5)
    chosen = {ORDERS[i] for i in best.flatten().tolist()}
    assert chosen <= {"HWF", "WHF"}, (chosen, sparse)
    # Row-major, each key block holds one key per query (6% of it set, "sparse" by the 90%
    # rule, but spiky); laid out HWF the mass sits in whole diagonal blocks: flatter blocks.
    assert uniform[0, 0, ORDERS.index("HWF")] < uniform[0, 0, ORDERS.index("FHW")] / 2


def _paro_call(plan, q, k, v, *, quant=None, layer=0, step=0, num_steps=4, backend="torch"):
    method = PAROConfig(plan=plan, quant=quant, backend=backend).make_method()
    call = AttentionCall(geometry=AttentionGeometry(*plan.grid), layer=layer, num_layers=plan.num_layers, step=step,
                         num_steps=num_steps, total_heads=q.shape[2], backend=backend)
    return method.attention(q, k, v, call), call


def test_all_ones_masks_with_any_orders_equal_dense_attention():
    grid, heads, d = (3, 5, 7), 3, 32  # 105 tokens: a partial last block
    nb = -(-105 // 16)
    plan = _plan(grid, 1, heads, masks=torch.ones(1, 1, heads, nb, nb, dtype=torch.bool))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 105, heads, d, generator=g) for _ in range(3))
    (out, lse), call = _paro_call(plan, q, k, v)
    full = BlockSparseMask.full(q_len=105, kv_len=105, q_block_size=105, kv_block_size=105)
    gold, gold_lse = reference_attention(q, k, v, full, dtype=torch.float64)
    eager, _ = reference_attention(q, k, v, full, dtype=torch.float32)
    assert_close_to_golden(out, eager, gold, what="PARO all-ones masks")
    assert torch.allclose(lse.double(), gold_lse, atol=1e-4)
    assert call.stats["density"] == 1.0


def test_paro_attention_equals_dense_attention_with_each_heads_permuted_mask():
    grid, heads, d = (2, 4, 6), 3, 16
    n = 48
    plan = _plan(grid, 2, heads, seed=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, heads, d, generator=g) for _ in range(3))
    (out, _), _ = _paro_call(plan, q, k, v, layer=1)
    reordered = plan.layer_mask(0, 1).to_dense()[0]  # (H, S, S) over reordered positions
    token_mask = torch.stack([reordered[h][order_permutation(grid, o, inverse=True)][
        :, order_permutation(grid, o, inverse=True)] for h, o in enumerate(plan.orders[1])])
    mask = BlockSparseMask.from_block_matrix(token_mask, q_len=n, kv_len=n, q_block_size=1, kv_block_size=1)
    gold, _ = reference_attention(q, k, v, mask, dtype=torch.float64)
    eager, _ = reference_attention(q, k, v, mask, dtype=torch.float32)
    assert_close_to_golden(out, eager, gold, what="PARO layer 1")


@pytest.mark.parametrize("quant", ["int8", "int8-pv8", "int4"])
def test_quantized_paro_meets_the_engines_accuracy_bars(quant):
    grid, heads, d = (4, 8, 8), 2, 64
    n = 256
    plan = _plan(grid, 1, heads, block=64, seed=5)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, heads, d, generator=g) for _ in range(3))
    (out, _), _ = _paro_call(plan, q, k, v, quant=quant)
    (exact, _), _ = _paro_call(plan, q, k, v, backend="reference")
    sq = sqnr_db(out, exact)
    assert sq >= QUANT_SQNR_FLOOR_DB[quant], f"PARO {quant} (1, {n}, {heads}, {d}) fp32: SQNR {sq:.1f} dB"


@pytest.fixture(scope="module")
def wan_plan(tmp_path_factory):
    pipe = tiny_wan_pipeline()
    kw = dict(prompt_embeds=text_embeds(1, seed=1), num_frames=17, num_inference_steps=4, guidance_scale=1.0,
              output_type="latent", **SIZE)
    plan = sparsegen.calibrate(pipe, "paro", density=0.4, block_size=16, **kw)
    return pipe, plan, plan.save(tmp_path_factory.mktemp("plan"))


def test_calibration_writes_a_plan_that_loads_back_identically(wan_plan):
    pipe, plan, directory = wan_plan
    assert plan.model_class == "WanTransformer3DModel" and plan.grid == WAN_GRID
    assert (plan.num_layers, plan.num_heads, plan.calibration_steps) == (3, 2, 4)
    assert plan.buckets == ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0))
    for d in plan.bucket_densities():
        assert abs(d - 0.4) < 1 / 400 + 1e-6  # one global threshold per bucket meets the target
    loaded = load_plan(directory)
    assert torch.equal(loaded.masks, plan.masks) and loaded.orders == plan.orders
    assert (loaded.grid, loaded.buckets, loaded.model_class, loaded.density) == (
        plan.grid, plan.buckets, plan.model_class, plan.density)
    assert set(loaded.metrics) == {"sparse_share", "uniformity", "cost"}
    for name, t in plan.metrics.items():
        assert torch.equal(loaded.metrics[name], t.float())
    meta = json.loads((directory and open(f"{directory}/plan.json").read()))
    assert meta["format"] == "sparsegen-paro-plan" and meta["grid"] == list(WAN_GRID)
    # The config refers to the plan by its directory.
    assert PAROConfig(plan=directory).to_dict()["plan"] == directory


def test_a_plan_of_identity_orders_and_full_masks_gives_the_dense_pipeline(wan_plan):
    pipe, plan, _ = wan_plan
    ref = run_wan(pipe, steps=4, **SIZE)
    full = ParoPlan(model_class=plan.model_class, grid=plan.grid, num_layers=3, num_heads=2, block_size=16,
                    orders=[["FHW", "FHW"]] * 3, masks=torch.ones_like(plan.masks), buckets=plan.buckets,
                    calibration_steps=4, density=1.0)
    with sparsegen.apply(pipe, "paro", plan=full):
        out = run_wan(pipe, steps=4, **SIZE)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("quant", [None, "int8", "int8-pv8", "int4"])
def test_paro_runs_on_its_pipeline_and_remove_restores_it(wan_plan, quant):
    pipe, plan, directory = wan_plan
    ref = run_wan(pipe, steps=4, **SIZE)
    with sparsegen.apply(pipe, "paro", plan=directory, quant=quant) as handle:
        out = run_wan(pipe, steps=4, **SIZE)
        densities = [d for _, d in handle.step_densities()]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(abs(d - 0.4) < 0.01 for d in densities), densities
    assert torch.equal(run_wan(pipe, steps=4, **SIZE), ref)


def test_foreign_plans_are_refused_naming_both_geometries(wan_plan):
    pipe, plan, directory = wan_plan
    cog = tiny_cogvideox_pipeline()
    with pytest.raises(ValueError, match=r"made for WanTransformer3DModel with 3 layers x 2 heads.*not for "
                                         r"CogVideoXTransformer3DModel with 2 layers"):
        sparsegen.apply(cog, "paro", plan=directory)
    with sparsegen.apply(pipe, "paro", plan=directory):
        with pytest.raises(ValueError, match=r"token grid \(5, 8, 8\).*now runs \(5, 4, 4\)"):
            run_wan(pipe, steps=2, height=64, width=64)


def test_bad_plans_and_options_say_what_to_do(tmp_path, wan_plan):
    _, plan, directory = wan_plan
    with pytest.raises(ValueError, match="PARO needs a calibrated plan"):
        PAROConfig()
    with pytest.raises(ValueError, match="not a PARO plan directory"):
        PAROConfig(plan=str(tmp_path))
    with pytest.raises(ValueError, match="quant"):
        PAROConfig(plan=plan, quant="int2")
    meta = json.load(open(f"{directory}/plan.json"))
    (tmp_path / "p").mkdir()
    import shutil

    shutil.copy(f"{directory}/plan.safetensors", tmp_path / "p")
    meta["format_version"] = 99
    (tmp_path / "p" / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        load_plan(tmp_path / "p")
    with pytest.raises(ValueError, match="calibrate knows the methods 'paro' and 'agent'"):
        sparsegen.calibrate(object(), "radial")
    with pytest.raises(ValueError, match="density"):
        sparsegen.calibrate(lambda **kw: None, "paro", density=0.0)


def test_unets_with_several_token_resolutions_are_refused():
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="several token resolutions.*use 'gna' or 'agent'"):
        sparsegen.apply(pipe, "paro", plan=_plan((1, 16, 16), 2, 1, model="UNet2DConditionModel"))
    with pytest.raises(ValueError, match="several token resolutions"):
        sparsegen.calibrate(pipe, "paro", height=64, width=64, num_inference_steps=1)
    with sparsegen.apply(pipe, "dense"):  # nothing was left patched
        pass
