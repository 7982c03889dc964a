"""Radial attention through ``sparsegen.apply`` on tiny Wan 2.1 (T2V and I2V) and HunyuanVideo models."""

from __future__ import annotations

import pytest
import torch

import sparsegen
from sparsegen.testing import CallRecorder
from sparsegen.kernels.reference import reference_attention
from sparsegen.methods.base import AttentionGeometry
from sparsegen.methods.radial import radial_block_mask

from tiny_models import (TEXT_DIM, run_wan, text_embeds, tiny_hunyuan_inputs, tiny_hunyuan_transformer,
                         tiny_wan_pipeline)


def _check_against_reference(seen, block_size, decay_factor):
    assert seen, "no sparse attention call was made"
    for layer, step, geom, q, k, v, out in seen:
        mask = radial_block_mask(frames=geom.frames, tokens_per_frame=geom.height * geom.width,
                                 block_size=block_size, decay_factor=decay_factor)
        assert 0.0 < mask.density() < 1.0, "the test geometry must make radial genuinely sparse"
        ref, _ = reference_attention(q, k, v, mask)
        assert (out.double() - ref).abs().max().item() < 1e-5, (layer, step)
        dense, _ = reference_attention(q, k, v, None)
        assert (out.double() - dense).abs().max().item() > 1e-4, "the mask must change the output"


def test_radial_on_wan_t2v_layers_equal_reference_and_schedule():
    pipe = tiny_wan_pipeline()
    # 17 frames at 128 x 128: 5 latent frames of 8 x 8 tokens = 320 tokens, 10 blocks of 32.
    rec = CallRecorder("radial", block_size=32, decay_factor=0.5, dense_steps=1, backend="torch")
    with sparsegen.apply(pipe, rec) as h:
        seen = h.method.calls
        run_wan(pipe, frames=17, height=128, width=128, steps=3, guidance=2.0)
        # 3 layers x 2 sparse steps (step 0 is dense); Wan runs CFG's conditional and
        # unconditional halves as two forwards, and both count as the same step.
        assert [(layer, step) for layer, step, *_ in seen] == [(i, s) for s in (1, 2) for _ in range(2) for i in range(3)]
        assert {g for _, _, g, *_ in seen} == {AttentionGeometry(5, 8, 8)}
        dens = dict(h.step_densities())
        assert dens[0] == 1.0 and 0.0 < dens[1] < 1.0
        _check_against_reference(seen, 32, 0.5)


def test_radial_on_wan22_patches_both_transformers():
    pipe = tiny_wan_pipeline(two_transformers=True)
    with sparsegen.apply(pipe, CallRecorder("radial", block_size=32, backend="torch")) as h:
        seen = h.method.calls
        run_wan(pipe, frames=17, height=128, width=128, steps=4)
        # boundary_ratio 0.5: the high-noise transformer serves the first steps, the other the rest.
        assert len(seen) == 4 * 3
        _check_against_reference(seen, 32, 1.0)


def _tiny_wan_i2v_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, image_dim=24, added_kv_proj_dim=32,
    ).eval()


def test_radial_on_wan_i2v_leaves_image_cross_attention_untouched():
    model = _tiny_wan_i2v_transformer()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 8, 5, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=text_embeds(1), encoder_hidden_states_image=torch.randn(1, 7, 24, generator=g),
                  return_dict=False)
    with torch.no_grad():
        base = model(**inputs)[0]
        with sparsegen.apply(model, "dense", backend="torch"):
            assert torch.allclose(model(**inputs)[0], base, atol=1e-6, rtol=0)
        with sparsegen.apply(model, CallRecorder("radial", block_size=32, backend="torch")) as h:
            seen = h.method.calls
            sparse = model(**inputs)[0]
        assert torch.equal(model(**inputs)[0], base)
    # Only self-attention (attn1) is routed: one call per block; the 7 image tokens never reach the method.
    assert [layer for layer, *_ in seen] == [0, 1]
    assert all(q.shape[1] == 5 * 8 * 8 for *_, q, _k, _v, _o in seen)
    _check_against_reference(seen, 32, 1.0)
    assert not torch.allclose(sparse, base, atol=1e-4)


def test_radial_on_hunyuan_video_tokens_sparse_text_dense():
    model = tiny_hunyuan_transformer()
    inputs = tiny_hunyuan_inputs()
    with torch.no_grad():
        base = model(**inputs)[0]
        with sparsegen.apply(model, CallRecorder("radial", block_size=32, backend="torch")) as h:
            seen = h.method.calls
            sparse = model(**inputs)[0]
        assert torch.equal(model(**inputs)[0], base)
    # 2 dual-stream + 2 single-stream blocks; the method sees the 320 video tokens only.
    assert [layer for layer, *_ in seen] == [0, 1, 2, 3]
    assert {geom for _, _, geom, *_ in seen} == {AttentionGeometry(5, 8, 8)}
    _check_against_reference(seen, 32, 1.0)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, base, atol=1e-4)


def test_radial_geometry_it_cannot_serve_is_refused_with_a_fix():
    pipe = tiny_wan_pipeline()
    # 64 x 64 pixels: 4 x 4 = 16 tokens per latent frame, smaller than a 128-token block.
    with sparsegen.apply(pipe, "radial", backend="torch"):
        with pytest.raises(ValueError, match=r"tokens_per_frame=16 with block_size=128.*use block_size="):
            run_wan(pipe, frames=17, height=64, width=64, steps=1)
