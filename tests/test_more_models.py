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
