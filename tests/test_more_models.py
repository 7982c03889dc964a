"""LTX-Video, Mochi, Allegro, SkyReels-V2 and Wan VACE: tiny transformers built from configs,
driven directly (one forward each): dense through the plugin equals unpatched, every method
runs finite, remove() restores bit-identical output."""

import pytest
import torch

import sparsegen

METHODS = {
    "gna": dict(kernel_size=(3, 5, 5), block_size=16),
    "radial": dict(block_size=16, decay_factor=1.0),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(2, 3, 4)),
    "agent": dict(agent_cell=(1, 4, 4)),
}


def _inputs(g, **extra):
    return dict(hidden_states=torch.randn(1, 4, 5, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                timestep=torch.tensor([500]), return_dict=False, **extra)


def _model(name):
    """(transformer, forward inputs): every model's grid is 5 x 8 x 8 video tokens."""
    import diffusers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    wan_like = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    if name == "ltx_video":
        t = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                 num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                                 num_layers=2, caption_channels=32)
        return t, dict(hidden_states=torch.randn(1, 5 * 8 * 8, 8, generator=g),
                       encoder_hidden_states=torch.randn(1, 6, 32, generator=g), timestep=torch.tensor([500]),
                       encoder_attention_mask=torch.ones(1, 6), num_frames=5, height=8, width=8, return_dict=False)
    if name == "mochi":
        t = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                              pooled_projection_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
                                              time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
        valid = torch.ones(2, 6)
        valid[1, 4:] = 0  # the second sample has 4 valid text tokens: Mochi attends each sample separately
        return t, dict(hidden_states=torch.randn(2, 4, 5, 16, 16, generator=g),
                       encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([500, 500]),
                       encoder_attention_mask=valid, return_dict=False)
    if name == "allegro":
        t = diffusers.AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                                in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
                                                caption_channels=32, sample_height=16, sample_width=16, sample_frames=5)
        return t, _inputs(g)
    if name == "skyreels_v2":
        return diffusers.SkyReelsV2Transformer3DModel(**wan_like), _inputs(g)
    if name == "wan_vace":
        t = diffusers.WanVACETransformer3DModel(**wan_like, vace_layers=[0], vace_in_channels=8)
        return t, _inputs(g, control_hidden_states=torch.randn(1, 8, 5, 16, 16, generator=g))
    raise AssertionError(name)


@pytest.fixture(scope="module", params=["ltx_video", "mochi", "allegro", "skyreels_v2", "wan_vace"])
def model(request):
    t, inputs = _model(request.param)
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
    t, inputs = _model("mochi")
    t.eval()
    with torch.no_grad():
        ref = t(**inputs)[0]
        with sparsegen.apply(t, "gna", kernel_size=(5, 8, 8), block_size=16):
            out = t(**inputs)[0]
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


def test_they_are_listed():
    names = {m["name"]: m["pipelines"] for m in sparsegen.supported_models()}
    assert {"ltx_video", "mochi", "allegro", "skyreels_v2"} <= set(names)
    assert "WanVACEPipeline" in names["wan"] and "HunyuanVideoImageToVideoPipeline" in names["hunyuan_video"]
