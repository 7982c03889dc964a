"""FLUX (packed latents, grid read from the image position ids, text first): tiny pipeline."""

import pytest
import torch

import sparsegen
from tiny_models import run_flux, tiny_flux_pipeline

METHODS = {
    "gna": dict(kernel_size=(5, 5), block_size=16),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(1, 2, 2)),
    "agent": dict(agent_cell=(1, 2, 2), agent_steps=1.0),
}


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    return pipe, run_flux(pipe)


def test_dense_through_the_plugin_equals_unpatched(flux):
    pipe, ref = flux
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_flux(pipe), ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_run_finite_and_remove_restores(flux, method):
    pipe, ref = flux
    with sparsegen.apply(pipe, method, **METHODS[method]) as handle:
        out = run_flux(pipe)
        densities = [d for _, d in handle.step_densities()]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(0 < d < 1 for d in densities), densities
    assert torch.equal(run_flux(pipe), ref)


def test_the_grid_comes_from_the_position_ids_and_a_full_window_is_exact(flux):
    pipe, ref = flux
    with sparsegen.apply(pipe, "gna", kernel_size=(8, 8), block_size=16) as handle:
        out = run_flux(pipe)
        assert handle._geometry[0].grid == (1, 8, 8)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    with sparsegen.apply(pipe, "gna", kernel_size=(5, 5), block_size=16) as handle:
        run_flux(pipe, height=128, width=256)
        assert handle._geometry[0].grid == (1, 8, 16)


def test_ids_that_are_not_one_grid_are_refused(flux):
    pipe, _ = flux
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    ids[:16, 0] = 1  # reference-image tokens, as FLUX Kontext marks them
    inputs = dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), img_ids=ids,
                  txt_ids=torch.zeros(8, 3), guidance=None)
    with sparsegen.apply(t, "gna", kernel_size=(5, 5), block_size=16):
        with pytest.raises(ValueError, match="not one row-major grid"):
            t(**inputs)


def test_flux_is_listed():
    assert any(m["name"] == "flux" and "FluxPipeline" in m["pipelines"] for m in sparsegen.supported_models())
