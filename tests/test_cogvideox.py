"""CogVideoX (text first, processors calling F.scaled_dot_product_attention directly)
through the one interception mechanism: tiny 1.0 and 1.5 pipelines built from configs."""

import pytest
import torch

import sparsegen
from tiny_models import run_cogvideox, text_embeds, tiny_cogvideox_pipeline

# The token grids of run_cogvideox's defaults: 1.0 (5, 8, 8); 1.5 patches time by 2: (3, 8, 8).
METHODS = {
    "radial": dict(block_size=16, decay_factor=1.0),
    "gna": dict(kernel_size=(3, 5, 5), block_size=16),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(2, 3, 4)),
}


@pytest.fixture(scope="module", params=["1.0", "1.5"])
def cog(request):
    pipe = tiny_cogvideox_pipeline(version=request.param)
    return request.param, pipe, run_cogvideox(pipe, guidance=2.0)


def test_dense_through_the_plugin_equals_the_unpatched_pipeline(cog):
    import diffusers.models.attention_processor as ap

    _, pipe, ref = cog
    with sparsegen.apply(pipe, "dense"):
        assert ap.F is not torch.nn.functional  # the processor module's own name is redirected ...
        assert torch.equal(run_cogvideox(pipe, guidance=2.0), ref)
    assert ap.F is torch.nn.functional  # ... and restored
    assert torch.nn.functional.scaled_dot_product_attention.__module__ == "torch._C._nn"


@pytest.mark.parametrize("method", [*METHODS, "paro"])
def test_each_method_runs_finite_and_remove_restores_bit_identical_output(cog, method, tmp_path):
    version, pipe, ref = cog
    if method == "paro":
        kw = dict(prompt_embeds=text_embeds(1, seed=1), num_frames=17, height=128, width=128, num_inference_steps=3,
                  guidance_scale=1.0, output_type="latent")
        options = dict(plan=sparsegen.calibrate(pipe, "paro", density=0.5, block_size=16, **kw).save(tmp_path))
    else:
        options = METHODS[method]
    with sparsegen.apply(pipe, method, **options) as handle:
        out = run_cogvideox(pipe, guidance=2.0)
        densities = [d for _, d in handle.step_densities()]
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    assert len(densities) == 3 and all(0 < d < 1 for d in densities), densities
    assert torch.equal(run_cogvideox(pipe, guidance=2.0), ref)


def test_a_full_window_is_exact_with_text_first(cog):
    """GNA with the kernel covering the whole grid is full attention: the text-first joint
    path (video sparse + text dense, merged by LSE) must give the dense output."""
    version, pipe, ref = cog
    grid = (5, 8, 8) if version == "1.0" else (3, 8, 8)
    with sparsegen.apply(pipe, "gna", kernel_size=grid, block_size=16) as handle:
        out = run_cogvideox(pipe, guidance=2.0)
        assert all(d == 1.0 for _, d in handle.step_densities())
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


def test_unpatched_pipelines_are_untouched_while_another_is_patched():
    a, b = tiny_cogvideox_pipeline(seed=0), tiny_cogvideox_pipeline(seed=3)
    ref_b = run_cogvideox(b)
    with sparsegen.apply(a, "gna", **METHODS["gna"]):
        assert torch.equal(run_cogvideox(b), ref_b)


def test_cogvideox_is_listed():
    entry = next(m for m in sparsegen.supported_models() if m["name"] == "cogvideox")
    assert "CogVideoXPipeline" in entry["pipelines"] and "CogVideoXImageToVideoPipeline" in entry["pipelines"]


def test_image_to_video_pipeline_runs_sparse_and_is_restored():
    import numpy as np
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline
    from PIL import Image

    from tiny_models import tiny_cogvideox_transformer

    base = tiny_cogvideox_pipeline()
    # Image-to-video: the image latents are concatenated on the channel axis.
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=base.vae,
                                         transformer=tiny_cogvideox_transformer(0, in_channels=8),
                                         scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))

    def run():
        return pipe(image=image, prompt_embeds=text_embeds(1, seed=1), num_frames=17, height=128, width=128,
                    num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    ref = run()
    with sparsegen.apply(pipe, "gna", **METHODS["gna"]) as handle:
        out = run()
        assert [round(d, 2) for _, d in handle.step_densities()] == [0.45, 0.45]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run(), ref)
