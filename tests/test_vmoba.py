"""VMoBA: partitions, block selection, outputs and gradients against a slow reference, config, apply."""

from __future__ import annotations

import math

import pytest
import torch

import sparsegen
from sparsegen.kernels import BlockSparseMask
from sparsegen.kernels.reference import reference_attention
from sparsegen.methods import config_from_dict
from sparsegen.joint import sparse_self_attention
from sparsegen.methods.base import AttentionCall, AttentionGeometry
from sparsegen.methods.vmoba import (
    PRESETS,
    Selection,
    VMoBAConfig,
    VMoBAMethod,
    select_blocks,
    vmoba_attention,
    vmoba_block_scores,
    vmoba_mask,
    vmoba_partition,
)
from sparsegen.testing import CallRecorder, assert_close_to_golden

from tiny_models import TEXT_DIM, run_wan, tiny_hunyuan_inputs, tiny_hunyuan_transformer, tiny_wan_pipeline

# Small blocks so that tiny grids have several blocks of every kind, none dividing (3, 5, 7).
SMALL = dict(temporal_block=1, spatial_block=(2, 3), spatiotemporal_block=(2, 2, 4), top_k=(2, 3, 4), block_size=16)


# ------------------------------------------------------------ slow reference
def ref_extent(grid, layer, cfg):
    """Block extent of the layer kind (layer % 3), clipped to the grid (module definition)."""
    t, h, w = grid
    ext = [(cfg.temporal_block, h, w), (t, *cfg.spatial_block), cfg.spatiotemporal_block][layer % 3]
    return tuple(min(e, n) for e, n in zip(ext, grid))


def ref_blocks(grid, extent):
    """Token lists of the partition blocks, blocks and tokens in row-major order."""
    T, H, W = grid
    et, eh, ew = extent
    blocks = []
    for t0 in range(0, T, et):
        for h0 in range(0, H, eh):
            for w0 in range(0, W, ew):
                blocks.append([(t * H + h) * W + w for t in range(t0, min(t0 + et, T))
                               for h in range(h0, min(h0 + eh, H)) for w in range(w0, min(w0 + ew, W))])
    return blocks


def ref_query_blocks(blocks, block_size):
    """(own block, tokens) of each query block: every block's tokens cut into block_size chunks."""
    return [(p, toks[c:c + block_size]) for p, toks in enumerate(blocks) for c in range(0, len(toks), block_size)]


def ref_threshold_pick(entries, own_entries, tau):
    """Smallest set: own entries first, then others by decreasing normalised score (ties: lower
    index), until the mass reaches tau * total. entries: {key: raw score}."""
    lo, hi = min(entries.values()), max(entries.values())
    if hi <= lo:
        return set(entries)
    norm = {e: (s - lo) / (hi - lo) for e, s in entries.items()}
    total = sum(norm.values())
    chosen = set(own_entries)
    mass = sum(norm[e] for e in own_entries)
    for e in sorted((e for e in entries if e not in own_entries), key=lambda e: (-norm[e], e)):
        if mass >= tau * total:
            break
        chosen.add(e)
        mass += norm[e]
    return chosen


def ref_selection(scores, owners, cfg, layer):
    """Selected (query block, key block) pairs of one (batch, head) from a score table."""
    nq, nb = len(scores), len(scores[0])
    sel = Selection(cfg.selection)
    if sel == Selection.THRESHOLD_GLOBAL:
        entries = {(i, j): scores[i][j] for i in range(nq) for j in range(nb)}
        return ref_threshold_pick(entries, {(i, owners[i]) for i in range(nq)}, cfg.threshold)
    out = set()
    for i in range(nq):
        if sel == Selection.TOPK:
            k = cfg.top_k if isinstance(cfg.top_k, int) else cfg.top_k[layer % 3]
            others = sorted((j for j in range(nb) if j != owners[i]), key=lambda j: (-scores[i][j], j))
            picked = {owners[i], *others[:max(0, k - 1)]}
        else:
            picked = ref_threshold_pick({j: scores[i][j] for j in range(nb)}, {owners[i]}, cfg.threshold)
        out |= {(i, j) for j in picked}
    return out


def ref_token_mask(q, k, grid, layer, cfg):
    """bool (B, H, N, N) in grid order, and fp64 scores (B, H, Qb, P), straight from the definition."""
    blocks = ref_blocks(grid, ref_extent(grid, layer, cfg))
    qblocks = ref_query_blocks(blocks, cfg.block_size)
    owners = [p for p, _ in qblocks]
    b, n, h, _ = q.shape
    q64, k64 = q.double(), k.double()
    tok = torch.zeros(b, h, n, n, dtype=torch.bool)
    all_scores = torch.zeros(b, h, len(qblocks), len(blocks), dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            kmeans = [k64[bb, toks, hh].mean(0) for toks in blocks]
            scores = [[float(q64[bb, toks, hh].mean(0) @ km) for km in kmeans] for _, toks in qblocks]
            all_scores[bb, hh] = torch.tensor(scores, dtype=torch.float64)
            for i, j in ref_selection(scores, owners, cfg, layer):
                rows = torch.tensor(qblocks[i][1])
                tok[bb, hh, rows[:, None], torch.tensor(blocks[j])[None, :]] = True
    return tok, all_scores


def ref_outputs(q, k, v, tok):
    """(golden fp64, eager in q's dtype) dense masked attention: (out, lse) each."""
    n = q.shape[1]
    mask = BlockSparseMask.from_dense(tok, q_block_size=n, kv_block_size=n)
    return reference_attention(q, k, v, mask), reference_attention(q, k, v, mask, dtype=q.dtype)


def method_token_mask(q, k, grid, layer, cfg):
    """The method's mask mapped back to grid order: bool (B, H, N, N)."""
    mask, perm = vmoba_mask(q, k, grid, layer, cfg)
    dense = mask.to_dense().expand(q.shape[0], q.shape[2], -1, -1)
    inv = perm.inverse
    return dense[:, :, inv][:, :, :, inv], mask


# ------------------------------------------------------------------ partitions
@pytest.mark.parametrize("grid", [(4, 6, 8), (3, 5, 7), (1, 3, 2)])
@pytest.mark.parametrize("layer", [0, 1, 2, 5])
def test_partitions_match_brute_force_including_ragged_grids(grid, layer):
    cfg = VMoBAConfig(**{**SMALL, "temporal_block": 3})
    part = vmoba_partition(grid, layer, cfg)
    blocks = ref_blocks(grid, ref_extent(grid, layer, cfg))
    n, bs = math.prod(grid), cfg.block_size
    assert part.kind == layer % 3 and part.num_blocks == len(blocks)
    assert part.block_tokens.tolist() == [len(b) for b in blocks]
    perm = part.permutation.perm
    for p, toks in enumerate(blocks):
        start, stop = int(part.block_offsets[p]), int(part.block_offsets[p + 1])
        assert start % bs == 0 and stop % bs == 0 and stop - start == -(-len(toks) // bs) * bs
        assert perm[start:start + len(toks)].tolist() == toks      # block tokens, row-major inside
        assert (perm[start + len(toks):stop] == n).all()             # then padding
    x = torch.randn(2, n, 3, 4)
    assert torch.equal(part.permutation.invert(part.permutation.apply(x)), x)
    # Query blocks never straddle two partition blocks; tiles keep exactly the real key columns.
    assert part.query_block_owner.tolist() == [p for p, _ in ref_query_blocks(blocks, bs)]
    for i, real in enumerate(part.query_block_tokens.tolist()):
        tid = int(part.kv_tile_ids[i])
        if real == bs:
            assert tid == -1
        else:
            assert part.tiles[tid].sum(0).tolist() == [bs] * real + [0] * (bs - real)


def test_layer_kinds_and_published_block_counts():
    tf = VMoBAConfig.preset("training-free")
    assert [vmoba_partition((21, 30, 52), layer, tf).num_blocks for layer in range(3)] == [7, 24, 72]
    tr = VMoBAConfig.preset("training")
    assert [vmoba_partition((24, 36, 64), layer, tr).num_blocks for layer in range(3)] == [8, 48, 72]
    # 1D blocks are whole frames, 2D blocks span every frame, 3D blocks are cuboids.
    assert [tf.block_extent(layer, (21, 30, 52)) for layer in (0, 1, 2, 3)] == [
        (3, 30, 52), (21, 5, 13), (7, 5, 13), (3, 30, 52)]
    # A grid the blocks do not divide: smaller last blocks (30 rows of 7 -> 7, 7, 7, 7, 2), never refused.
    part = vmoba_partition((10, 30, 40), 2, tf)
    assert part.extent == (7, 5, 13) and part.num_blocks == 2 * 6 * 4
    assert sorted(set(part.block_tokens.tolist())) == sorted({t * h * w for t in (7, 3) for h in (5,)
                                                              for w in (13, 1)})


# ------------------------------------------------------------------ selection
def test_select_blocks_hand_derived_cases():
    owner = torch.tensor([0])
    row = torch.tensor([[[[0.0, 1.0, 2.0, 3.0, 4.0]]]])  # normalised 0, .25, .5, .75, 1; total 2.5

    def picked(scores, own, **kw):
        return select_blocks(scores, own, **kw)[0, 0].nonzero()[:, 1].tolist()

    # threshold 0.25 -> mass 0.625: block 4 (1.0) suffices; 0.5 -> 1.25: blocks 4 and 3.
    assert picked(row, owner, selection="threshold", threshold=0.25) == [0, 4]
    assert picked(row, owner, selection="threshold", threshold=0.5) == [0, 3, 4]
    # The own block's mass counts first: own block 4 alone reaches 0.625.
    assert picked(row, torch.tensor([4]), selection="threshold", threshold=0.25) == [4]
    # Equal scores give no ranking: everything is selected.
    assert picked(torch.ones(1, 1, 1, 5), owner, selection="threshold", threshold=0.25) == [0, 1, 2, 3, 4]
    # top-k counts the own block; ties go to the lower index.
    assert picked(row, torch.tensor([2]), selection="topk", top_k=3) == [2, 3, 4]
    assert picked(torch.zeros(1, 1, 1, 5), torch.tensor([3]), selection="topk", top_k=3) == [0, 1, 3]
    assert picked(row, owner, selection="topk", top_k=99) == [0, 1, 2, 3, 4]
    # Global per head: one budget over all query blocks. Normalised [[0, 1, .25], [.5, 0, .75]],
    # total 2.5; own blocks (0, 0) and (1, 1) have mass 0.
    scores = torch.tensor([[0.0, 4.0, 1.0], [2.0, 0.0, 3.0]]).view(1, 1, 2, 3)
    two = torch.tensor([0, 1])
    g25 = select_blocks(scores, two, selection="threshold_global", threshold=0.25)[0, 0]
    assert g25.tolist() == [[True, True, False], [False, True, False]]    # query block 1 gets nothing more
    g50 = select_blocks(scores, two, selection="threshold_global", threshold=0.5)[0, 0]
    assert g50.tolist() == [[True, True, False], [False, True, True]]
    # Per query block, the same scores give each row its own budget.
    per_q = select_blocks(scores, two, selection="threshold", threshold=0.25)[0, 0]
    assert per_q.tolist() == [[True, True, False], [False, True, True]]


@pytest.mark.parametrize("selection", ["topk", "threshold", "threshold_global"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_mask_equals_slow_reference_selection(selection, layer):
    torch.manual_seed(7 + layer)
    grid = (3, 5, 7)
    cfg = VMoBAConfig(selection=selection, threshold=0.3, **SMALL)
    q, k = torch.randn(2, 105, 2, 16), torch.randn(2, 105, 2, 16)
    tok_ref, scores_ref = ref_token_mask(q, k, grid, layer, cfg)
    tok, mask = method_token_mask(q, k, grid, layer, cfg)
    assert torch.equal(tok, tok_ref)
    assert 0.0 < mask.density() < 1.0
    part = vmoba_partition(grid, layer, cfg)
    perm = part.permutation
    scores = vmoba_block_scores(perm.apply(q), perm.apply(k), part)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores.double(), scores_ref, rtol=1e-5, atol=1e-5)
    # The own block is always attended, for every query token.
    assert tok.diagonal(dim1=-2, dim2=-1).all()


# ------------------------------------------------------------------ outputs and gradients
@pytest.mark.parametrize("selection", ["topk", "threshold", "threshold_global"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_output_equals_reference_masked_attention(selection, layer):
    torch.manual_seed(100 + layer)
    grid = (3, 5, 7)
    cfg = VMoBAConfig(selection=selection, **SMALL)
    q, k, v = (torch.randn(2, 105, 2, 16) for _ in range(3))
    out, lse = vmoba_attention(q, k, v, grid=grid, layer=layer, config=cfg, backend="torch", return_lse=True)
    tok, _ = ref_token_mask(q, k, grid, layer, cfg)
    (golden, golden_lse), (eager, eager_lse) = ref_outputs(q, k, v, tok)
    what = f"vmoba {selection} layer {layer} grid={grid} fp32 torch"
    assert_close_to_golden(out, eager, golden, what=what)
    assert_close_to_golden(lse, eager_lse, golden_lse, what=what + " lse")
    dense, _ = reference_attention(q, k, v, None)
    assert (out.double() - dense).abs().max().item() > 1e-3, "the selection must really be sparse"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unpadded_keys_on_the_torch_path_equal_reference(backend, monkeypatch):
    # Spatial blocks of 6 x 2 x 4 = 48 tokens with 64-token query blocks: the padded layout
    # needs tiles; 48-token key blocks divide every block, which the torch path uses.
    torch.manual_seed(9)
    grid = (6, 4, 8)
    cfg = VMoBAConfig(spatial_block=(2, 4), top_k=3, block_size=64, selection="threshold")
    part = vmoba_partition(grid, 1, cfg)
    assert part.tiles is not None and part.unpadded_keys[1] == 48
    q, k, v = (torch.randn(2, 192, 2, 16) for _ in range(3))
    tok, _ = ref_token_mask(q, k, grid, 1, cfg)
    assert not tok.all()
    import sparsegen.methods.vmoba as vmoba_module

    engine, masks = vmoba_module.block_sparse_attention, []

    def spy(q_, k_, v_, mask, **kw):
        masks.append(mask)
        return engine(q_, k_, v_, mask, **kw)

    monkeypatch.setattr(vmoba_module, "block_sparse_attention", spy)
    out, lse = vmoba_attention(q, k, v, grid=grid, layer=1, config=cfg, backend=backend, return_lse=True)
    # torch: unpadded 48-token key blocks, no tiles; Triton: padded 64-token key blocks with tiles.
    (mask,) = masks
    assert (mask.kv_block_size, mask.kv_len, mask.has_tiles) == ((48, 192, False) if backend == "torch"
                                                                  else (64, 256, True))
    (golden, golden_lse), (eager, eager_lse) = ref_outputs(q, k, v, tok)
    assert_close_to_golden(out, eager, golden, what=f"vmoba unpadded keys {backend} grid={grid} fp32")
    assert_close_to_golden(lse, eager_lse, golden_lse, what=f"vmoba unpadded keys {backend} lse")


def test_output_triton_interpreter():
    torch.manual_seed(3)
    grid = (2, 5, 6)
    cfg = VMoBAConfig(selection="threshold_global", **SMALL)
    q, k, v = (torch.randn(1, 60, 2, 16) for _ in range(3))
    out = vmoba_attention(q, k, v, grid=grid, layer=1, config=cfg, backend="triton")
    tok, _ = ref_token_mask(q, k, grid, 1, cfg)
    assert not tok.all()
    (golden, _), (eager, _) = ref_outputs(q, k, v, tok)
    assert_close_to_golden(out, eager, golden, what=f"vmoba triton grid={grid} fp32")


GRAD_CASES = {
    # padded keys with token tiles: blocks of 16 and 8 tokens in 16-token query blocks
    "padded": ((2, 5, 6), 2, VMoBAConfig(selection="topk", **SMALL)),
    # unpadded 48-token key blocks on the torch path (query blocks of 64)
    "unpadded": ((6, 4, 8), 1, VMoBAConfig(spatial_block=(2, 4), top_k=3, block_size=64)),
}


@pytest.mark.parametrize("backend,case", [("torch", "padded"), ("triton", "padded"), ("torch", "unpadded")])
def test_gradients_equal_reference_autograd(backend, case):
    torch.manual_seed(21)
    grid, layer, cfg = GRAD_CASES[case]
    n = math.prod(grid)
    inputs = [torch.randn(1, n, 2, 16) for _ in range(3)]
    grad_out = torch.randn(1, n, 2, 16)
    tok, _ = ref_token_mask(inputs[0], inputs[1], grid, layer, cfg)
    assert not tok.all()
    mask = BlockSparseMask.from_dense(tok, q_block_size=n, kv_block_size=n)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
        fn(*leaves).backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    ours = grads(lambda q, k, v: vmoba_attention(q, k, v, grid=grid, layer=layer, config=cfg, backend=backend),
                 torch.float32)
    golden = grads(lambda q, k, v: reference_attention(q, k, v, mask)[0], torch.float64)
    eager = grads(lambda q, k, v: reference_attention(q, k, v, mask, dtype=torch.float32)[0], torch.float32)
    for name, a, e, g in zip("qkv", ours, eager, golden):
        assert_close_to_golden(a, e, g, what=f"d{name} vmoba {backend} grid={grid} fp32")


# ------------------------------------------------------------------ config
def test_config_validation_names_field_value_and_range():
    cases = [
        (dict(top_k=0), r"VMoBAConfig.top_k=0 is invalid: must be an int >= 1 or 3 ints"),
        (dict(top_k=(2, 6)), r"VMoBAConfig.top_k=\(2, 6\) is invalid"),
        (dict(selection="best"), r"VMoBAConfig.selection='best' is invalid: must be one of \['topk', 'threshold'"),
        (dict(threshold=0.0), r"VMoBAConfig.threshold=0.0 is invalid: must be a number in \(0, 1\]"),
        (dict(threshold=1.5), r"VMoBAConfig.threshold=1.5 is invalid"),
        (dict(block_size=40), r"VMoBAConfig.block_size=40 is invalid: must be a positive multiple of 16"),
        (dict(temporal_block=0), r"VMoBAConfig.temporal_block=0 is invalid: must be an int >= 1"),
        (dict(spatial_block=(5,)), r"VMoBAConfig.spatial_block=\(5,\) is invalid: must be 2 ints >= 1"),
        (dict(spatiotemporal_block=(7, 0, 13)), r"spatiotemporal_block=\(7, 0, 13\) is invalid: must be 3 ints"),
        (dict(dense_step_fraction=1.0), r"dense_step_fraction=1.0 is invalid: must be a number in \[0, 1\)"),
        (dict(dense_steps=-1), r"VMoBAConfig.dense_steps=-1 is invalid"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            VMoBAConfig(**kwargs)
    with pytest.raises(ValueError, match=r"VMoBAConfig has no preset 'fast'; presets: \['training', 'training-free'\]"):
        VMoBAConfig.preset("fast")


def test_config_json_round_trip_and_presets():
    for name in PRESETS:
        cfg = VMoBAConfig.preset(name, block_size=64, dense_layers=[2, 0])
        back = VMoBAConfig.from_json(cfg.to_json())
        assert back == cfg and config_from_dict(cfg.to_dict()) == cfg
        assert isinstance(back.selection, Selection) and back.spatial_block == cfg.spatial_block
    tf, tr = VMoBAConfig.preset("training-free"), VMoBAConfig.preset("training")
    assert tf.selection == Selection.TOPK and [tf.top_k_for(layer) for layer in range(4)] == [2, 6, 18, 2]
    assert tf.dense_step_fraction == 0.25
    assert tr.selection == Selection.THRESHOLD_GLOBAL and tr.threshold == 0.25 and tr.dense_step_fraction == 0
    assert VMoBAConfig.from_json(VMoBAConfig().to_json()).to_dict()["selection"] == "topk"


def test_dense_step_fraction_schedule():
    cfg = VMoBAConfig.preset("training-free")
    assert [s for s in range(50) if cfg.step_is_dense(s, 50)] == list(range(13))   # steps below 12.5
    assert [s for s in range(40) if cfg.step_is_dense(s, 40)] == list(range(10))
    assert not cfg.step_is_dense(None, None)
    both = VMoBAConfig(dense_step_fraction=0.1, dense_last_steps=2)
    assert [s for s in range(10) if both.step_is_dense(s, 10)] == [0, 8, 9]
    with pytest.raises(ValueError, match=r"dense_step_fraction=0.25 needs the number of denoising steps.*"
                                         r"reset_schedule\(num_steps=...\)"):
        cfg.step_is_dense(3, None)


def test_functional_errors():
    q = torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \(batch, 30, heads, head_dim\) for grid \(2, 3, 5\)"):
        vmoba_attention(q, q, q, grid=(2, 3, 5), layer=0)
    with pytest.raises(ValueError, match=r"grid must be 3 positive ints \(frames, height, width\)"):
        vmoba_mask(q, q, (4, 5), 0)
    with pytest.raises(ValueError, match=r"layer must be an int >= 0, got layer=-1"):
        vmoba_mask(q, q, (1, 4, 5), -1)
    with pytest.raises(TypeError, match=r"config must be a VMoBAConfig, got dict"):
        vmoba_mask(q, q, (1, 4, 5), 0, {"top_k": 2})


# ------------------------------------------------------------------ through sparsegen.apply
def _check_layers(seen, cfg):
    assert seen, "no sparse attention call was made"
    for layer, step, geom, q, k, v, out in seen:
        tok, _ = ref_token_mask(q, k, geom.grid, layer, cfg)
        assert not tok.all(), "the test geometry must make VMoBA sparse"
        (golden, _), (eager, _) = ref_outputs(q, k, v, tok)
        assert_close_to_golden(out, eager, golden, what=f"layer {layer} step {step} grid {geom.grid}")


WAN_OPTS = dict(temporal_block=2, spatial_block=(3, 3), spatiotemporal_block=(2, 4, 4), top_k=(2, 3, 4),
                block_size=16)


def test_wan_pipeline_layers_equal_reference_and_dense_steps():
    pipe = tiny_wan_pipeline()
    # 17 frames at 128 x 128: 5 latent frames of 8 x 8 tokens. 3 steps, the first 25% dense: step 0.
    with sparsegen.apply(pipe, CallRecorder("vmoba", dense_step_fraction=0.25, backend="torch", **WAN_OPTS)) as h:
        seen = h.method.calls
        run_wan(pipe, frames=17, height=128, width=128, steps=3, guidance=2.0)
        # Steps 1 and 2, both CFG passes, layers 0..2 (kinds 1D, 2D, 3D).
        assert [(layer, step) for layer, step, *_ in seen] == [(i, s) for s in (1, 2) for _ in range(2)
                                                               for i in range(3)]
        assert {g for _, _, g, *_ in seen} == {AttentionGeometry(5, 8, 8)}
        dens = dict(h.step_densities())
        assert dens[0] == 1.0 and 0.0 < dens[1] < 1.0 and 0.0 < dens[2] < 1.0
        _check_layers(seen[:3], h.config)   # one call per layer kind keeps the test short
    assert not hasattr(pipe.transformer, "_sparsegen_handle")


def test_wan_pipeline_training_preset_and_odd_grid():
    pipe = tiny_wan_pipeline()
    # 9 frames at 96 x 160: grid (3, 6, 10); the preset's blocks are clipped / ragged, never refused.
    cfg = VMoBAConfig.preset("training", spatial_block=(4, 4), spatiotemporal_block=(2, 4, 4), block_size=16,
                             backend="torch")
    with sparsegen.apply(pipe, CallRecorder(cfg)) as h:
        seen = h.method.calls
        run_wan(pipe, frames=9, height=96, width=160, steps=1)
        assert {g for _, _, g, *_ in seen} == {AttentionGeometry(3, 6, 10)}
        _check_layers(seen[1:3], cfg)


def test_wan22_patches_both_transformers():
    pipe = tiny_wan_pipeline(two_transformers=True)
    with sparsegen.apply(pipe, CallRecorder("vmoba", backend="torch", **WAN_OPTS)) as h:
        seen = h.method.calls
        run_wan(pipe, frames=17, height=128, width=128, steps=2)
        # boundary_ratio 0.5: the high-noise transformer serves step 0, transformer_2 step 1, so the
        # step-1 calls come from transformer_2.
        assert pipe.transformer_2._sparsegen_handle is h and pipe.transformer._sparsegen_handle is h
        assert [(layer, step) for layer, step, *_ in seen] == [(i, s) for s in (0, 1) for i in range(3)]
        _check_layers([seen[0], seen[4]], h.config)


def test_apply_errors_are_clear():
    pipe = tiny_wan_pipeline()
    with pytest.raises(ValueError, match=r"VMoBAConfig.top_k=0 is invalid"):
        sparsegen.apply(pipe, "vmoba", top_k=0)
    with pytest.raises(ValueError, match=r"VMoBAConfig has no option\(s\) \['tau'\]"):
        sparsegen.apply(pipe, "vmoba", tau=0.25)
    with pytest.raises(ValueError, match=r"VMoBAConfig.selection='global' is invalid"):
        sparsegen.apply(pipe, "vmoba", selection="global")
    assert not hasattr(pipe.transformer, "_sparsegen_handle")
    # A bare transformer does not know the number of steps a fraction refers to.
    model = pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, TEXT_DIM), return_dict=False)
    with sparsegen.apply(model, "vmoba", dense_step_fraction=0.25, backend="torch", **WAN_OPTS) as h:
        with pytest.raises(ValueError, match=r"needs the number of denoising steps"):
            with torch.no_grad():
                model(**inputs)
        h.reset_schedule(num_steps=4)
        with torch.no_grad():
            model(**inputs)   # step 0 of 4: dense
        assert h.step_densities() == [(0, 1.0)]


def test_hunyuan_video_tokens_sparse_text_dense():
    model = tiny_hunyuan_transformer()
    inputs = tiny_hunyuan_inputs()
    cfg = VMoBAConfig(selection="threshold", backend="torch", **WAN_OPTS)
    with torch.no_grad():
        base = model(**inputs)[0]
        with sparsegen.apply(model, CallRecorder(cfg)) as h:
            seen = h.method.calls
            sparse = model(**inputs)[0]
        assert torch.equal(model(**inputs)[0], base)
    # 2 dual-stream + 2 single-stream blocks; the method sees the 320 video tokens only.
    assert [layer for layer, *_ in seen] == [0, 1, 2, 3]
    assert {geom for _, _, geom, *_ in seen} == {AttentionGeometry(5, 8, 8)}
    _check_layers(seen, cfg)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, base, atol=1e-4)


def test_joint_text_attention_video_sparse_text_dense():
    """Joint [video, text] attention: video->video VMoBA, video->text dense (padding masked), text->all."""
    torch.manual_seed(5)
    geom = AttentionGeometry(3, 5, 7)
    nv, nt, b, h, d = geom.num_tokens, 9, 2, 2, 16
    cfg = VMoBAConfig(selection="threshold_global", backend="torch", **SMALL)
    q, k, v = (torch.randn(b, nv + nt, h, d) for _ in range(3))
    valid = torch.ones(b, nt, dtype=torch.bool)
    valid[1, 5:] = False
    call = AttentionCall(geometry=geom, layer=2, backend="torch")
    out = sparse_self_attention(VMoBAMethod(cfg), q, k, v, call, text_tokens=nt, text_key_valid=valid)
    assert 0 < call.stats["density"] < 1 and call.stats["blocks"] == 2 * 3 * 2
    tok = torch.ones(b, h, nv + nt, nv + nt, dtype=torch.bool)
    tok[:, :, :nv, :nv] = ref_token_mask(q[:, :nv], k[:, :nv], geom.grid, 2, cfg)[0]
    tok[:, :, :, nv:] &= valid[:, None, None, :]
    (golden, _), (eager, _) = ref_outputs(q, k, v, tok)
    assert_close_to_golden(out, eager, golden, what="joint VMoBA attention")


# ------------------------------------------------------------------ CLI
def test_cli_reports_blocks_padding_and_density(capsys, tmp_path):
    import json

    from sparsegen.cli import main as cli_main

    rc = cli_main(["mask", "vmoba", "--grid", "7,10,26", "--preset", "training-free", "--top-k", "2",
                   "--block-size", "64", "--json", "--png", str(tmp_path / "m.png")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["tokens"] == 1820 and out["inputs"] == "gaussian"
    rows = out["layers"]
    assert [r["kind"] for r in rows] == ["temporal", "spatial", "spatiotemporal"]
    # 7 frames in blocks of 3 -> 3, 3, 1; 10 x 26 in 5 x 13 -> 2 x 2; 7 x 10 x 26 in 7 x 5 x 13 -> 1 x 2 x 2.
    assert [r["blocks"] for r in rows] == [3, 4, 4]
    assert [r["extent"] for r in rows] == [[3, 10, 26], [7, 5, 13], [7, 5, 13]]
    # Padding to 64-token blocks: 780, 780, 260 -> 832, 832, 320; 455 -> 512 (x 4).
    assert [r["padding"] for r in rows] == [52 + 52 + 60, 4 * 57, 4 * 57]
    assert all(r["selected_blocks_per_query_block"] == 2.0 for r in rows)
    assert all(0 < r["token_density"] < r["density"] + 1e-9 < 1 for r in rows[1:])
    assert all((tmp_path / f"m_layer{i}.png").exists() for i in range(3))
    rc = cli_main(["mask", "vmoba", "--grid", "4,5"])
    err = capsys.readouterr().err
    assert rc == 2 and "grid must be 3 positive ints" in err
    rc = cli_main(["mask", "vmoba", "--grid", "4,5,6", "--threshold", "2"])
    assert rc == 2 and "VMoBAConfig.threshold=2.0 is invalid" in capsys.readouterr().err
