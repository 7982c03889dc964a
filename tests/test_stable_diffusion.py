"""Stable Diffusion 1.5 and SDXL (UNet, per-level token grids, SDPA called directly): tiny
pipelines; AgentSD's token merging + agents as the method's "tome" mode."""

import pytest
import torch

import sparsegen
from sparsegen.agent import agent_attention, bipartite_merge
from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.methods.agent import AgentConfig
from sparsegen.methods.base import AttentionCall, AttentionGeometry
from tiny_models import run_sd, tiny_sd_pipeline


@pytest.fixture(scope="module", params=[False, True], ids=["sd15", "sdxl"])
def sd(request):
    xl = request.param
    pipe = tiny_sd_pipeline(xl=xl)
    return xl, pipe, run_sd(pipe, xl=xl, steps=5)


def test_dense_through_the_plugin_equals_unpatched(sd):
    xl, pipe, ref = sd
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_sd(pipe, xl=xl, steps=5), ref)


def test_levels_have_their_own_grids_and_the_highest_resolution_uses_agents(sd):
    xl, pipe, ref = sd
    with sparsegen.apply(pipe, "agent", agent_cell=(1, 2, 2), agent_steps=1.0) as handle:
        out = run_sd(pipe, xl=xl, steps=5)
        levels = {n: (g.grid, f, rank) for n, (g, f, rank) in handle._levels[0].items()}
        first = handle.step_stats[0]
        calls = int(first["sparse_calls"]), int(first["dense_calls"])
    # 128 x 128 pixels -> 16 x 16 latents. SD 1.5-shaped: attention at downsampling 1 and 2;
    # SDXL-shaped: its first level has none, so its highest level with attention is 2.
    expect = {64: ((1, 8, 8), 2, 0), 16: ((1, 4, 4), 4, 1)} if xl else {256: ((1, 16, 16), 1, 0),
                                                                         64: ((1, 8, 8), 2, 1)}
    assert levels == expect
    # Only the level-0 layers use agents (3 of 7: two up-block layers and one down-block layer).
    assert calls == (3, 4), calls
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run_sd(pipe, xl=xl, steps=5), ref)


@pytest.mark.parametrize("method,options", [
    ("gna", dict(kernel_size=(3, 3), block_size=16)),
    ("vmoba", dict(temporal_block=1, spatial_block=(2, 2), spatiotemporal_block=(1, 2, 2), block_size=16,
                   top_k=(1, 2, 2))),
    ("agent", dict(AgentConfig.presets["agentsd"], sx=2, sy=2)),
])
def test_methods_run_on_every_level_where_their_geometry_fits(sd, method, options):
    xl, pipe, ref = sd
    with sparsegen.apply(pipe, method, **options) as handle:
        out = run_sd(pipe, xl=xl, steps=5)
        densities = [d for _, d in handle.step_densities()]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(0 < d < 1 for d in densities), densities
    assert torch.equal(run_sd(pipe, xl=xl, steps=5), ref)


def test_agentsd_tome_mode_equals_merge_attend_unmerge():
    """The method's "tome" mode is exactly: merge q, k, v (keys as the metric), agent
    attention over the merged tokens with the merged agents, unmerge."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 2, 8, generator=g) for _ in range(3))
    cfg = AgentConfig.preset("agentsd", sx=2, sy=2)
    method = cfg.make_method()
    call = AttentionCall(geometry=AttentionGeometry(1, 16, 16), step=0, num_steps=10, backend="torch")
    out, _ = method.attention(q, k, v, call)
    m = bipartite_merge(k.reshape(2, 256, 16), height=16, width=16, sx=2, sy=2, ratio=0.4, agent_ratio=0.95)
    qm, km, vm = (m.merge(t.reshape(2, 256, 16)).view(2, -1, 2, 8) for t in (q, k, v))
    agents = m.agents(q.reshape(2, 256, 16)).view(2, -1, 2, 8)
    expect = m.unmerge(agent_attention(qm, km, vm, agents, backend="torch").reshape(2, -1, 16)).view(2, 256, 2, 8)
    assert torch.allclose(out, expect, atol=1e-6)
    # After agent_steps (0.4 of 10 steps): ToMe only, plain attention over the merged tokens.
    late, _ = method.attention(q, k, v, AttentionCall(geometry=AttentionGeometry(1, 16, 16), step=4, num_steps=10,
                                                      backend="torch"))
    full = BlockSparseMask.full(q_len=qm.shape[1], kv_len=qm.shape[1], q_block_size=64, kv_block_size=64)
    plain = m.unmerge(block_sparse_attention(qm, km, vm, full, backend="torch").reshape(2, -1, 16)).view(2, 256, 2, 8)
    assert torch.allclose(late, plain, atol=1e-6)


def test_tome_mode_refuses_video_and_text():
    with pytest.raises(ValueError, match="several frames"):
        AgentConfig(agents="tome").make_method().check_geometry(AttentionGeometry(3, 8, 8))
    method = AgentConfig(agents="tome").make_method()
    q = torch.zeros(1, 64, 1, 8)
    with pytest.raises(ValueError, match="text tokens jointly"):
        method.attention(q, q, q, AttentionCall(geometry=AttentionGeometry(1, 8, 8)), text=(q[:, :4], q[:, :4], None))


def test_stable_diffusion_is_listed():
    entry = next(m for m in sparsegen.supported_models() if m["name"] == "stable_diffusion")
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline"} <= set(entry["pipelines"])


def test_generate_writes_pngs_for_an_image_pipeline(tmp_path):
    import json

    from sparsegen.cli import main
    from tiny_models import save_tiny_sd_with_text_encoder

    model = save_tiny_sd_with_text_encoder(tmp_path / "sd")
    summary = tmp_path / "summary.json"
    rc = main(["generate", "--model", model, "--method", "agent", "--preset", "agentsd", "--sx", "2", "--sy", "2",
               "--prompt", "a red cat", "--steps", "3", "--height", "128", "--width", "128", "--compare-dense",
               "--out", str(tmp_path / "cat.mp4"), "--json", str(summary)])
    assert rc == 0
    s = json.loads(summary.read_text())
    assert s["out"].endswith("cat.png") and s["side_by_side"].endswith("cat_vs_dense.png")
    from PIL import Image

    assert Image.open(s["out"]).size == (128, 128) and Image.open(s["side_by_side"]).size == (256, 128)
    assert 0 < s["step_density"][0] < 1 and s["psnr_vs_dense"] > 0
