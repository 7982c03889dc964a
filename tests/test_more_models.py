"""LTX-Video, Mochi, Allegro, SkyReels-V2, Wan VACE and Wan Animate: tiny transformers built from configs,
driven directly (one forward each): dense through the plugin equals unpatched, every method
runs finite, remove() restores bit-identical output."""

import pytest
import torch

import sparsegen
from tiny_models import tiny_transformer_and_inputs

METHODS = {
    "gna": dict(kernel_size=(3, 5, 5), block_size=16),
    "radial": dict(block_size=16, decay_factor=1.0),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(2, 3, 4)),
    "agent": dict(agent_cell=(1, 4, 4)),
}


@pytest.fixture(scope="module", params=["ltx_video", "mochi", "allegro", "skyreels_v2", "wan_vace", "wan_animate"])
def model(request):
    t, inputs = tiny_transformer_and_inputs(request.param)
    t.eval()
    with torch.no_grad():
        return request.param, t, inputs, t(**inputs)[0]


def test_dense_through_the_plugin_equals_unpatched(model):
    _, t, inputs, ref = model
    with torch.no_grad(), sparsegen.apply(t, "dense"):
        assert torch.equal(t(**inputs)[0], ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_runs_finite_and_remove_restores(model, method):
    name, t, inputs, ref = model
    with torch.no_grad():
        with sparsegen.apply(t, method, **METHODS[method]) as handle:
            out = t(**inputs)[0]
            assert handle._geometry[0].grid == (5, 8, 8)
            assert 0 < handle.step_densities()[0][1] < 1
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
        assert torch.equal(t(**inputs)[0], ref)


def test_a_full_window_is_exact_with_per_sample_text_last():
    """Mochi attends [video, valid text] per sample: GNA over the whole grid is full attention."""
    t, inputs = tiny_transformer_and_inputs("mochi")
    t.eval()
    with torch.no_grad():
        ref = t(**inputs)[0]
        with sparsegen.apply(t, "gna", kernel_size=(5, 8, 8), block_size=16):
            out = t(**inputs)[0]
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


def test_they_are_listed():
    names = {m["name"]: m["pipelines"] for m in sparsegen.supported_models()}
    assert {"ltx_video", "mochi", "allegro", "skyreels_v2"} <= set(names)
    assert {"WanVACEPipeline", "WanAnimatePipeline"} <= set(names["wan"]) and "HunyuanVideoImageToVideoPipeline" in names["hunyuan_video"]


def test_rank_causal_mask_matches_its_token_definition():
    from sparsegen.kernels import BlockSparseMask

    g = torch.Generator().manual_seed(0)
    q_rank, kv_rank = torch.randint(0, 5, (97,), generator=g), torch.randint(0, 5, (83,), generator=g)
    q_rank[0], kv_rank[0] = 4, 0  # every query block sees a key
    mask = BlockSparseMask.rank_causal(q_rank=q_rank.sort().values, kv_rank=kv_rank.sort().values, q_block_size=16,
                                       kv_block_size=32)
    want = kv_rank.sort().values[None, :] <= q_rank.sort().values[:, None]
    assert torch.equal(mask.to_dense()[0, 0], want)
    assert 0 < mask.num_partial_blocks() < mask.num_visited_blocks()  # only straddling blocks carry tiles


@pytest.mark.parametrize("method,options", [
    ("radial", dict(block_size=16, decay_factor=1.0)),
    ("gna", dict(kernel_size=(3, 3, 5), block_size=16)),
    ("gna", dict(kernel_size=(3, 3, 3), block_size=16, tile=(1, 4, 4))),
], ids=["radial", "gna", "gna-tiled"])
def test_frame_causal_calls_attend_the_intersection_of_both_masks(method, options):
    """The method's mask AND diffusion forcing's frame-causal one, against dense masked attention."""
    from sparsegen.methods.base import AttentionCall, AttentionGeometry
    from sparsegen.patching import make_config

    m = make_config(method, **options).make_method()
    g = AttentionGeometry(6, 8, 16)  # 128 tokens per frame (radial's band reaches other frames), blocks of 2 frames
    q, k, v = torch.randn(3, 1, 768, 2, 16).unbind(0)
    call = AttentionCall(geometry=g, frame_causal=2, backend="torch")
    out, _ = m.attention(q, k, v, call)
    plain, _ = m.attention(q, k, v, AttentionCall(geometry=g, backend="torch"))
    # The method's own token-level mask, in the original token order.
    mask = m.static_mask(g)
    q_layout, kv_layout = m.token_layouts(g)
    dense = mask.to_dense()[0, 0]
    if q_layout is not None:
        dense = dense[q_layout.inverse][:, kv_layout.inverse]
    frame_block = torch.arange(768) // 256
    allowed = dense & (frame_block[None, :] <= frame_block[:, None])
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0
    ref = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(out, plain)  # the causal cut changed something
    assert call.stats["density"] < m.static_mask(g).density()


def test_skyreels_diffusion_forcing_runs_sparse_with_its_frame_causal_mask():
    t, inputs = tiny_transformer_and_inputs("skyreels_df")
    with torch.no_grad():
        ref = t(**inputs)[0]
        # A window over the whole grid leaves only the frame-causal mask: the model's own output.
        with sparsegen.apply(t, "gna", kernel_size=(6, 8, 8), block_size=16):
            assert torch.allclose(t(**inputs)[0], ref, atol=2e-5, rtol=1e-4)
        with sparsegen.apply(t, "radial", block_size=16, decay_factor=1.0) as handle:
            out = t(**inputs)[0]
            assert 0 < handle.step_densities()[0][1] < 1
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
        with sparsegen.apply(t, "vmoba", **METHODS["vmoba"]), pytest.raises(ValueError, match="frame-causal mask"):
            t(**inputs)


PIPELINES = {"ltx_video": "gna", "mochi": "agent", "allegro": "vmoba", "skyreels_v2": "radial", "skyreels_df": "gna"}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_tiny_pipelines_dense_equal_sparse_runs_remove_restores(name):
    """Whole pipelines (scheduler steps, CFG batch): the schedule's dense first step, then sparse."""
    from tiny_models import run_pipeline, tiny_video_pipeline

    pipe, kwargs = tiny_video_pipeline(name)
    ref = run_pipeline(pipe, kwargs)
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_pipeline(pipe, kwargs), ref)
    method = PIPELINES[name]
    options = {**METHODS[method], "dense_steps": 1}
    if method == "agent":
        options["agent_steps"] = 1.0  # agents on every step (AgentSD's default stops at 40%)
    with sparsegen.apply(pipe, method, **options) as handle:
        out = run_pipeline(pipe, kwargs)
        densities = handle.step_densities()
    assert [s for s, _ in densities] == [0, 1] and densities[0][1] == 1.0 and 0 < densities[1][1] < 1, densities
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run_pipeline(pipe, kwargs), ref)


def test_asynchronous_diffusion_forcing_counts_the_pipeline_iterations():
    """With ar_step > 0 SkyReels-V2 runs more denoising iterations than scheduler timesteps;
    the step count is the pipeline's, so dense_last_steps makes only the last one dense."""
    from tiny_models import run_pipeline, tiny_video_pipeline

    pipe, kwargs = tiny_video_pipeline("skyreels_df")
    kwargs = dict(kwargs, ar_step=1)  # 2 timesteps, 2 frame blocks staggered by one: 3 iterations
    with sparsegen.apply(pipe, "gna", **METHODS["gna"], dense_last_steps=1) as handle:
        run_pipeline(pipe, kwargs)
        densities = handle.step_densities()
        assert handle.num_steps == pipe._num_timesteps == 3 != len(pipe.scheduler.timesteps)
    assert [s for s, _ in densities] == [0, 1, 2] and densities[2][1] == 1.0
    assert all(0 < d < 1 for _, d in densities[:2]), densities
