"""The shipped toy model, its data generator, codec and metrics, and a small quality eval."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsegen
from sparsegen.methods import available_methods
from sparsegen.toy import pipeline as toy
from sparsegen.toy.codec import PixelShuffleVideoCodec
from sparsegen.toy.data import COLOURS, SEED_RANGES, _bounding_radius, evaluation_specs, parse_prompt, render_batch, render_video
from toylab.metrics import measure_video, psnr, ssim
from toylab.probe import record_attention_inputs


REPO = Path(__file__).resolve().parent.parent
PROMPT = "two green squares moving up over a dotted background, camera panning left"


@pytest.fixture(scope="module")
def pipe():
    return toy.load_pipeline()


# ------------------------------------------------------------------ shipped model
def test_shipped_weights_fit_the_size_budget():
    weights = toy.ASSET_DIR / "transformer" / toy.WEIGHTS_FILE
    assert weights.is_file(), f"missing {weights}"
    assert weights.stat().st_size <= toy.MAX_WEIGHTS_BYTES, f"{weights.stat().st_size} bytes > 20 MB"
    for name in ("README.md", "loss_curve.png", "training_summary.json"):
        assert (toy.ASSET_DIR / name).is_file(), f"model card asset {name} missing"


def test_shipped_model_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = toy.load_pipeline()
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.transformer.config.num_layers == toy.TRANSFORMER_CONFIG["num_layers"]
    # The weights are the trained ones, not a fresh initialisation.
    fresh = toy.new_transformer(seed=0)
    trained = dict(pipe.transformer.named_parameters())
    diffs = [float((trained[n] - p).abs().max()) for n, p in fresh.named_parameters()]
    assert max(diffs) > 0.01


def test_generate_shape_range_and_seed_determinism(pipe):
    prompts = [PROMPT, "a red circle moving right over a striped background"]
    a = toy.generate(pipe, prompts, seed=3, num_inference_steps=2)
    assert a.shape == (2, toy.DEFAULT_NUM_FRAMES, toy.DEFAULT_HEIGHT, toy.DEFAULT_WIDTH, 3)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    b = toy.generate(pipe, prompts, seed=3, num_inference_steps=2)
    np.testing.assert_array_equal(a, b)
    # Prompt i uses seed + i: the second video alone, with its own seed, is the same video.
    alone = toy.generate(pipe, prompts[1:], seed=4, num_inference_steps=2)
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)
    other = toy.generate(pipe, prompts[:1], seed=5, num_inference_steps=2)
    assert np.abs(other[0] - a[0]).mean() > 1e-3


def test_two_stage_sampling_keeps_the_first_frame_and_resamples_the_rest(pipe):
    """generate_from_first_frame: frame 0 is the joint sample's first frame, the later
    frames are sampled again conditioned on it (so they differ), every frame in range."""
    prompts = [PROMPT, "a red circle moving right over a striped background"]
    joint = toy.generate(pipe, prompts, seed=3, num_inference_steps=3, sampler="joint")
    staged = toy.generate_from_first_frame(pipe, prompts, seed=3, num_inference_steps=3)
    assert staged.shape == joint.shape and staged.dtype == np.float32
    assert staged.min() >= 0.0 and staged.max() <= 1.0
    np.testing.assert_allclose(staged[:, 0], joint[:, 0], atol=1e-4)
    assert np.abs(staged[:, 1:] - joint[:, 1:]).mean() > 1e-3
    np.testing.assert_array_equal(staged, toy.generate_from_first_frame(pipe, prompts, seed=3, num_inference_steps=3))
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        toy.generate_from_first_frame(pipe, PROMPT)


def test_generate_samples_the_way_the_model_names_and_calls_back_every_step(pipe, tmp_path, monkeypatch):
    """A model directory's sampling.json picks toy.generate's sampler (absent: joint); the
    two-stage sampler calls back after each step of both loops and refuses other pipeline
    options; a broken or unknown sampler is refused with what to do."""
    from sparsegen.toy import pipeline as toy_pipeline

    assert pipe.toy_sampler == toy_pipeline.load_default_sampler()
    prompts = [PROMPT]
    staged = toy.generate_from_first_frame(pipe, prompts, seed=3, num_inference_steps=3)
    calls = []
    monkeypatch.setattr(pipe, "toy_sampler", "first-frame")
    by_default = toy.generate(pipe, prompts, seed=3, num_inference_steps=3,
                              callback_on_step_end=lambda p, i, t, kw: calls.append(i) or {})
    np.testing.assert_array_equal(by_default, staged)
    assert calls == [0, 1, 2, 0, 1, 2]
    joint = toy.generate(pipe, prompts, seed=3, num_inference_steps=3, sampler="joint")
    assert np.abs(joint[:, 1:] - staged[:, 1:]).mean() > 1e-3
    with pytest.raises(TypeError, match="pass sampler='joint'"):
        toy.generate(pipe, prompts, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="sampler='both' must be one of"):
        toy.generate(pipe, prompts, num_inference_steps=2, sampler="both")

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text("{}")
    assert toy_pipeline.load_default_sampler(model) == "joint"
    (model / "sampling.json").write_text('{"sampler": "first-frame"}')
    assert toy_pipeline.load_default_sampler(model) == "first-frame"
    (model / "sampling.json").write_text('{"sampler": "sideways"}')
    with pytest.raises(ValueError, match="must be one of"):
        toy_pipeline.load_default_sampler(model)
    (model / "sampling.json").write_text("first-frame")
    with pytest.raises(ValueError, match="re-export the model or fix the file"):
        toy_pipeline.load_default_sampler(model)


def test_generate_rejects_a_bare_string_and_unknown_words(pipe):
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        toy.generate(pipe, PROMPT)
    with pytest.raises(ValueError, match="outside the toy model's vocabulary"):
        toy.generate(pipe, ["a purple circle moving right over a striped background"])


def test_recording_attention_keeps_the_generation_and_restores_the_registry(pipe):
    before = sparsegen.available_methods()
    plain = toy.generate(pipe, [PROMPT], seed=0, num_inference_steps=2)
    with record_attention_inputs(pipe, steps=[1], layers=[0, 2]) as records:
        recorded = toy.generate(pipe, [PROMPT], seed=0, num_inference_steps=2)
    assert sparsegen.available_methods() == before
    # Exact attention in fp32 vs the model's SDPA: well below one 8-bit display level (1/255).
    assert np.abs(recorded - plain).max() < 1e-3
    assert sorted((r.layer, r.step, r.call_index) for r in records) == [(0, 1, 0), (0, 1, 1), (2, 1, 0), (2, 1, 1)]
    assert records[0].q.shape == (1, 5 * 8 * 8, 6, 32)
    assert not hasattr(pipe.transformer, "_sparsegen_handle")


# ------------------------------------------------------------------------- data
def test_data_is_a_function_of_the_seed():
    a, b, c = render_video(123), render_video(123), render_video(124)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.prompt == b.prompt
    assert a.frames.shape == (17, 32, 32, 3) and a.frames.dtype == np.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0
    assert np.abs(a.frames - c.frames).mean() > 0.01
    forced = render_video(123, spec=PROMPT)
    assert forced.prompt == PROMPT and parse_prompt(forced.prompt) == forced.spec
    np.testing.assert_array_equal(forced.frames, render_video(123, spec=PROMPT).frames)


def test_data_ground_truth_matches_the_prompt():
    v = render_video(7, spec=PROMPT)
    assert v.positions.shape == (17, 2, 2)
    motion = v.positions[-1] - v.positions[0]
    assert (motion[:, 1] < 0).all() and np.allclose(motion[:, 0], 0)  # "up": y decreases
    assert v.camera_velocity[0] < 0 and v.camera_velocity[1] == 0  # panning left
    np.testing.assert_allclose(v.object_colour, COLOURS["green"])


@pytest.mark.parametrize("num_frames", [17, 65])
def test_objects_stay_inside_the_frame_when_their_speed_is_capped(num_frames):
    # Seed 6 at 17 frames draws a speed above what the room allows: the capped trajectory
    # fills the room exactly, and rounding must not make its start range empty.
    for seed in range(6, 30):
        v = render_video(seed, num_frames=num_frames)
        for k, r in enumerate(v.radii):
            reach = _bounding_radius(v.spec.shape, float(r))
            assert (v.positions[:, k] >= reach - 1e-3).all() and (v.positions[:, k] <= 32 - reach + 1e-3).all(), seed


def test_prompt_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not follow the toy grammar"):
        parse_prompt("a red circle moving sideways over a striped background")
    with pytest.raises(ValueError, match=r"seed=-1 must be a non-negative int"):
        render_video(-1)
    with pytest.raises(ValueError, match="must be a positive int"):
        evaluation_specs(0)


# ------------------------------------------------------------------------ codec
def test_codec_round_trip_is_exact():
    codec = PixelShuffleVideoCodec(scale_factor_spatial=4, scale_factor_temporal=4)
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 17, 32, 48, generator=gen) * 2 - 1
    latents = codec.pack(video)
    assert latents.shape == (2, 3 * 4 * 16, 5, 8, 12)
    torch.testing.assert_close(codec.unpack(latents), video, rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(codec.encode(video).latent_dist.mode()).sample, video, rtol=0, atol=0)
    shipped = toy.load_codec()
    torch.testing.assert_close(shipped.denormalize(shipped.normalize(latents)), latents, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"num_frames=16 must be 1 \+ 4 \* k"):
        codec.pack(video[:, :, :16])


# --------------------------------------------------------------------- training
def test_clean_latent_prediction_trains_on_the_velocity_objective():
    """A clean-latent model and the velocity model that implies the same x0 get the same
    loss (above the weight cap), and both prediction types map back to the same x0."""
    from toylab import train as toy_train

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 192, 5, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen)  # an imperfect prediction
    sigma = torch.tensor([0.3, 0.6, 0.95])
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    velocity_hat = (noisy - x0_hat) / s
    torch.testing.assert_close(toy.clean_latents(x0_hat, noisy, sigma, "sample"), x0_hat)
    torch.testing.assert_close(toy.clean_latents(velocity_hat, noisy, sigma, "flow_prediction"), x0_hat, atol=1e-5, rtol=1e-5)

    class Fixed(torch.nn.Module):  # stands in for the transformer: returns a fixed output
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, hidden, timestep, embeds, return_dict=False):
            return (self.output,)

    class Codec:
        def video_to_latents(self, videos):
            return videos

    class Prompts:
        def encode(self, prompts):
            return None

    losses = {
        kind: toy_train.flow_matching_loss(Fixed(out), Prompts(), Codec(), x0, ["p"] * 3, sigma, noise, kind).item()
        for kind, out in (("sample", x0_hat), ("flow_prediction", velocity_hat))
    }
    assert losses["sample"] == pytest.approx(losses["flow_prediction"], rel=1e-5)
    expected = float((((x0 - x0_hat) / s) ** 2).mean())
    assert losses["sample"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        toy_train.TrainConfig(prediction_type="epsilon")


def test_bf16_training_precision_matches_fp32_loss_and_gradients():
    """The bf16 autocast step computes the fp32 loss and gradient to bf16 accuracy
    (and actually runs the transformer's matrix products in bf16)."""
    from toylab import train as toy_train

    transformer, encoder = toy.new_transformer(0), toy.new_prompt_encoder(0)
    codec = PixelShuffleVideoCodec(scale_factor_spatial=toy.SPATIAL_FACTOR, scale_factor_temporal=toy.TEMPORAL_FACTOR)
    videos, prompts, _ = render_batch(range(2))
    sigma = torch.tensor([0.3, 0.9])
    noise = torch.randn(codec.pack(videos).shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("no", "bf16"):
        transformer.zero_grad()
        seen = []
        hook = transformer.proj_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with toy_train.training_precision(mode):
            loss = toy_train.flow_matching_loss(transformer, encoder, codec, videos, prompts, sigma, noise, "sample")
        hook.remove()
        loss.backward()
        results[mode] = (loss.item(), transformer.proj_out.weight.grad.clone(), seen[0])
    assert results["no"][2] == torch.float32 and results["bf16"][2] == torch.bfloat16
    assert results["bf16"][0] == pytest.approx(results["no"][0], rel=2e-2)
    g32, g16 = results["no"][1], results["bf16"][1]
    assert float((g16 - g32).norm() / g32.norm()) < 5e-2
    with pytest.raises(ValueError, match="mixed_precision='fp16'"):
        toy_train.TrainConfig(mixed_precision="fp16")


def test_a_short_training_run_exports_a_loadable_pipeline(tmp_path):
    """Two optimizer steps end to end: the export loads as a WanPipeline whose scheduler
    reads the output as the run's prediction type, and generates a video."""
    from toylab import train as toy_train

    config = toy_train.TrainConfig(steps=2, batch_size=2, warmup_steps=1, validate_every=2, log_every=1, threads=2,
                                   frame_noise_correlation=0.5, per_frame_sigma_probability=0.5,
                                   first_frame_probability=0.5, first_frame_later_min_sigma=0.9)
    summary = toy_train.train(config, tmp_path / "asset", tmp_path / "run", command="test")
    assert summary["steps_done"] == 2 and math.isfinite(summary["final_validation_loss_ema"])
    loaded = toy.load_pipeline(path=tmp_path / "asset")
    assert loaded.scheduler.config.prediction_type == config.prediction_type == "sample"
    video = toy.generate(loaded, ["a red circle moving right over a plain background"], num_inference_steps=2)
    assert video.shape == (1, 17, 32, 32, 3) and np.isfinite(video).all()
    assert (tmp_path / "asset" / "README.md").is_file()
    # Generation draws the noise prior the run trained with.
    assert loaded.toy_frame_noise_correlation == 0.5
    card = (tmp_path / "asset" / "README.md").read_text()
    assert f"{config.frame_noise_correlation} of its variance" in card
    assert "With probability 0.5 a training video's latent frames each get their own" in " ".join(card.split())
    assert "first latent frame is shown nearly clean" in " ".join(card.split())
    assert "moved to 0.9 + 0.1 s" in " ".join(card.split())
    # A model trained to continue a first frame samples in two stages by default.
    assert loaded.toy_sampler == "first-frame" and '"first-frame"' in card


def test_per_frame_noise_levels_reach_each_latent_frame_in_token_order():
    """Per-frame noise levels are drawn per video with the stated probability, reach the
    transformer in its frame-major token order (a frame's level changes that frame's
    output), and with all frames equal give exactly the one-level loss."""
    from toylab import train as toy_train

    sigma = torch.linspace(0.1, 0.9, 400)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(toy_train.per_frame_sigmas(sigma, 5, 0.0, gen), sigma[:, None].expand(-1, 5))
    own = toy_train.per_frame_sigmas(sigma, 5, 1.0, gen)
    assert (own.std(dim=1) > 0).all() and ((own > 0) & (own < 1)).all()
    varied = (toy_train.per_frame_sigmas(sigma, 5, 0.5, gen).std(dim=1) > 0).float().mean().item()
    assert 0.4 < varied < 0.6
    with pytest.raises(ValueError, match="per_frame_sigma_probability=1.5"):
        toy_train.TrainConfig(per_frame_sigma_probability=1.5)
    # First-frame conditioning: chosen videos get a nearly clean frame 0, the rest untouched.
    shown = toy_train.first_frame_sigmas(own, 0.5, gen)
    assert torch.equal(shown[:, 1:], own[:, 1:])
    changed = shown[:, 0] != own[:, 0]
    assert 0.4 < changed.float().mean().item() < 0.6
    assert (shown[changed, 0] <= toy_train.FIRST_FRAME_MAX_SIGMA).all()
    assert torch.equal(toy_train.first_frame_sigmas(own, 0.0, gen), own)
    with pytest.raises(ValueError, match="first_frame_probability=-0.1"):
        toy_train.TrainConfig(first_frame_probability=-0.1)
    # With a floor, the chosen videos' later frames move into [floor, 1], keeping their order.
    floored = toy_train.first_frame_sigmas(own, 0.5, torch.Generator().manual_seed(1), later_min_sigma=0.9)
    plain = toy_train.first_frame_sigmas(own, 0.5, torch.Generator().manual_seed(1))
    moved = floored[:, 0] != own[:, 0]
    assert torch.equal(plain[:, 0], floored[:, 0])
    torch.testing.assert_close(floored[moved, 1:], 0.9 + 0.1 * own[moved, 1:])
    assert torch.equal(floored[~moved], own[~moved])
    with pytest.raises(ValueError, match="first_frame_later_min_sigma=1.0"):
        toy_train.TrainConfig(first_frame_probability=0.5, first_frame_later_min_sigma=1.0)

    levels = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    timesteps = toy.token_timesteps(levels, (5, 8, 8))
    assert timesteps.shape == (1, 320)
    torch.testing.assert_close(timesteps.view(1, 5, 8, 8), (1000 * levels).view(1, 5, 1, 1).expand(1, 5, 8, 8))
    with pytest.raises(ValueError, match=r"must be \(batch, 5\)"):
        toy.token_timesteps(levels[:, :4], (5, 8, 8))

    # Without its blocks the transformer maps each token on its own, so changing latent
    # frame 2's level may change frame 2's output and nothing else.
    transformer = toy.new_transformer(0).eval()
    transformer.blocks = torch.nn.ModuleList()
    hidden = torch.randn(1, 192, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(1, 16, toy.TEXT_DIM)
    moved = levels.clone()
    moved[0, 2] = 0.9
    with torch.no_grad():
        before, after = (transformer(hidden, toy.token_timesteps(x, (5, 8, 8)), embeds, return_dict=False)[0]
                         for x in (levels, moved))
    changed = (after - before).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3, 4]] == 0)

    transformer, encoder = toy.new_transformer(0), toy.new_prompt_encoder(0)
    codec = PixelShuffleVideoCodec(scale_factor_spatial=toy.SPATIAL_FACTOR, scale_factor_temporal=toy.TEMPORAL_FACTOR)
    videos, prompts, _ = render_batch(range(2))
    noise = torch.randn(codec.pack(videos).shape, generator=torch.Generator().manual_seed(0))
    one_level = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        losses = [toy_train.flow_matching_loss(transformer, encoder, codec, videos, prompts, s, noise, "sample").item()
                  for s in (one_level, one_level[:, None].expand(-1, 5))]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_frame_correlated_noise_shares_the_stated_variance_across_latent_frames():
    shape = (64, 192, 5, 8, 8)  # (B, C, T, H, W)
    plain = toy.frame_correlated_noise(shape, torch.Generator().manual_seed(3), 0.0)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    for c in (0.25, 0.5, 0.8):
        noise = toy.frame_correlated_noise(shape, torch.Generator().manual_seed(3), c)
        assert noise.std().item() == pytest.approx(1.0, abs=0.01)
        # correlation between two latent frames at the same cell and channel
        a, b = noise[:, :, 0].flatten(), noise[:, :, 3].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1].item() == pytest.approx(c, abs=0.02)
        # different cells stay independent
        assert abs(torch.corrcoef(torch.stack([a, noise[:, :, 3, 1].flatten().repeat(8)]))[0, 1].item()) < 0.05
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            toy.frame_correlated_noise(shape, None, bad)


def test_generation_uses_the_asset_noise_prior(tmp_path, monkeypatch):
    import shutil

    asset = tmp_path / "toy_wan"
    shutil.copytree(toy.ASSET_DIR, asset)
    (asset / toy.NOISE_PRIOR_FILE).unlink(missing_ok=True)
    assert toy.load_frame_noise_correlation(asset) == 0.0  # models from before the prior: independent frames
    (asset / toy.NOISE_PRIOR_FILE).write_text(json.dumps({"frame_noise_correlation": 0.75}))
    pipe = toy.load_pipeline(path=asset)
    assert pipe.toy_frame_noise_correlation == 0.75
    seen = {}
    original = pipe.__class__.__call__

    def spy(self, *args, latents=None, **kwargs):
        seen["latents"] = latents
        return original(self, *args, latents=latents, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    toy.generate(pipe, ["a red circle moving right over a plain background"], seed=4, num_inference_steps=1)
    expected = toy.frame_correlated_noise((192, 5, 8, 8), torch.Generator().manual_seed(4), 0.75)
    assert torch.equal(seen["latents"][0], expected)
    (asset / toy.NOISE_PRIOR_FILE).write_text(json.dumps({"frame_noise_correlation": 1.5}))
    with pytest.raises(ValueError, match="frame_noise_correlation"):
        toy.load_pipeline(path=asset)
    (asset / toy.NOISE_PRIOR_FILE).write_text(json.dumps({"correlation": 0.5}))
    with pytest.raises(ValueError, match="must be JSON like"):
        toy.load_pipeline(path=asset)


# ---------------------------------------------------------------------- metrics
def _ssim_by_definition(a, b):
    """SSIM over every fully-inside 11x11 window, one channel at a time, straight from the formula."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for f in range(a.shape[0]):
        for ch in range(3):
            x, y = a[f, :, :, ch], b[f, :, :, ch]
            for i in range(x.shape[0] - 10):
                for j in range(x.shape[1] - 10):
                    px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_and_psnr_follow_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.random((2, 16, 18, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(_ssim_by_definition(a, b), rel=1e-9, abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, a) == math.inf
    assert psnr(a, np.full_like(a, a.mean())) < 20
    assert psnr(np.zeros((1, 16, 16, 3)), np.full((1, 16, 16, 3), 0.1)) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:1])


def test_measurements_read_the_generator_ground_truth():
    for spec in evaluation_specs(6):
        v = render_video(SEED_RANGES["evaluation"] + 11, spec=spec)
        m = measure_video(v.frames)
        assert (m.colour, m.direction) == (spec.colour, spec.direction), spec.prompt
        speed = float(np.linalg.norm(v.velocities, axis=1).mean())
        assert abs(np.linalg.norm(m.velocity) - speed) < 0.25 * speed, spec.prompt


def test_motion_consistency_reads_steady_tracks_and_catches_jumps_and_gaps():
    """The generator's objects show in every frame and move on a straight line (jitter well
    under a pixel); the same video with its frames shuffled jumps, and blanking frames
    lowers the share of frames showing an object."""
    for spec in evaluation_specs(4):
        v = render_video(SEED_RANGES["evaluation"] + 23, spec=spec)
        m = measure_video(v.frames)
        assert m.present_fraction == 1.0 and m.track_jitter < 0.5, (spec.prompt, m.track_jitter)
        shuffled = v.frames[np.random.default_rng(0).permutation(len(v.frames))]
        assert measure_video(shuffled).track_jitter > 4 * max(m.track_jitter, 0.25), spec.prompt
        blank = v.frames.copy()
        blank[:5] = blank[:5].mean(axis=-1, keepdims=True)  # grey: no saturated pixel left
        assert measure_video(blank).present_fraction == pytest.approx(1 - 5 / len(v.frames)), spec.prompt
    assert measure_video(np.full((4, 32, 32, 3), 0.4)).track_jitter is None


def test_direction_reversal_agreement_of_the_generator_and_of_noise_set_motion():
    import toy_checks
    specs = evaluation_specs(4)
    seeds = [SEED_RANGES["evaluation"] + 40 + i for i in range(4)]
    forward = np.stack([render_video(s, spec=spec).frames for s, spec in zip(seeds, specs)])
    backward = np.stack([render_video(s, spec=toy_checks.with_other_attribute(spec, "direction")).frames
                         for s, spec in zip(seeds, specs)])
    assert toy_checks.reversal_agreement(forward, backward) == {"reversed": 1.0, "median_cosine": pytest.approx(-1.0, abs=0.01)}
    # Motion that ignores the word (the same videos twice) is never reversed.
    assert toy_checks.reversal_agreement(forward, forward) == {"reversed": 0.0, "median_cosine": pytest.approx(1.0, abs=1e-9)}


def test_object_count_is_exact_while_objects_stay_apart():
    """At 32 x 32 a small triangle's bright interior is a pixel or two; the count must still
    be exact whenever no two objects come within a pixel of touching (occlusion can only
    lower the count, so those videos are left out)."""
    apart = 0
    for i in range(40):
        v = render_video(SEED_RANGES["evaluation"] + 2000 + i)
        reach = [_bounding_radius(v.spec.shape, r) for r in v.radii]
        k = v.spec.count
        if all((np.linalg.norm(v.positions[:, a] - v.positions[:, b], axis=1) > reach[a] + reach[b] + 1.0).all()
               for a in range(k) for b in range(a + 1, k)):
            apart += 1
            assert measure_video(v.frames).count == k, (i, v.spec.prompt)
    assert apart >= 10, f"only {apart} of 40 videos keep their objects apart; the check saw too few"


# ------------------------------------------------------------------ quality eval
def test_quality_eval_quick_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "quality"
    cmd = [sys.executable, str(REPO / "evals" / "quality.py"), "--quick", "--prompts", "1", "--steps", "2",
           "--model-path", str(toy.ASSET_DIR), "--out", str(out), "--results", str(tmp_path / "quality.md"),
           "--threads", str(torch.get_num_threads())]  # as many threads as this test session uses
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    methods = {r["method"]: r for r in result["sweep"]}
    # Shipped methods (module-backed); methods registered in this test process do not reach the subprocess.
    shipped = available_methods(registered=False)
    importable = [m for m in shipped if m not in result["methods_missing"]]
    assert sorted(methods) == sorted(importable) and "dense" in methods and "radial" in methods
    assert methods["dense"]["psnr"] == "inf" and methods["dense"]["ssim"] == 1.0
    assert all(e == 0.0 for e in methods["dense"]["attention_rel_l1_per_layer"].values())
    for name, row in methods.items():
        if name == "dense":
            continue
        assert 0.0 < row["effective_density"] < 1.0, (name, row["effective_density"])
        assert all(e > 0.0 for e in row["attention_rel_l1_per_layer"].values()), name
        assert isinstance(row["psnr"], float) and row["psnr"] > 5.0, name
        assert 0.0 < row["ssim"] < 1.0
        assert (out / f"density_vs_psnr_{name}.png").stat().st_size > 1000
    assert result["long"][0]["frames"] == 33 and 0 < result["long"][0]["effective_density"] < 1
    assert "LPIPS: not computed" in (tmp_path / "quality.md").read_text()
    assert (out / "quality.csv").read_text().startswith("section,method,options")


def test_toy_checks_quick_runs_and_reads_the_ground_truth(tmp_path):
    out, page = tmp_path / "checks", tmp_path / "toy.md"
    cmd = [sys.executable, str(REPO / "evals" / "toy_checks.py"), "--quick", "--prompts", "2", "--steps", "2",
           "--model-path", str(toy.ASSET_DIR), "--out", str(out), "--results", str(page),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "toy_checks.json").read_text())
    # The generator's own videos are the ceiling: colour and direction must read back exactly.
    assert result["real"]["accuracy"]["colour"] == 1.0 and result["real"]["accuracy"]["direction"] == 1.0
    assert set(result["trained"]["accuracy"]) == {"colour", "direction", "count", "background"}
    # Hits and their chance p-values agree with the accuracies (2 prompts: 2 hits at chance
    # 0.25 happen with probability 0.0625, none with probability 1).
    for name in ("real", "trained"):
        for check, acc in result[name]["accuracy"].items():
            assert result[name]["hits"][check] == round(acc * 2)
    assert result["real"]["p_above_chance"]["colour"] == pytest.approx(0.0625)
    layers = toy.TRANSFORMER_CONFIG["num_layers"]
    for name in ("trained", "untrained"):
        profiles = [result["locality"][name][str(layer)] for layer in range(layers)]
        for p in profiles:  # attention mass per distance is a distribution over keys
            # fp32 softmax rows summed over 320 keys: a few ulps of 1.0 per row
            assert sum(p["temporal_mass"]) == pytest.approx(1.0, abs=1e-6)
            assert sum(p["spatial_mass"]) == pytest.approx(1.0, abs=1e-6)
            assert p["local_ratio"] > 0
    # One-call denoising of noised generator videos: the trained model recovers them at low
    # noise far better than its random initialisation does.
    den = result["denoising"]
    assert set(den["trained"]) == {"0.2", "0.5", "0.8", "0.95", "1.0"}
    assert den["trained"]["0.2"] > den["untrained"]["0.2"] + 5.0, den
    # Prompt reliance: the shipped model follows colour, so a changed colour word costs PSNR.
    reliance = result["prompt_reliance"]
    assert {"colour", "shape", "count", "background", "direction", "all (empty prompt)"} <= set(reliance)
    assert min(reliance["colour"].values()) > 0.05, reliance
    text = page.read_text()
    assert "17 frames at 32 x 32" in text and "| colour | 0.25 |" in text and "| trained model PSNR (dB) |" in text
    assert "## Prompt reliance" in text and "| direction |" in text
    # The generator's mean video for a direction drifts along it at the objects' mean speed
    # (0.4-0.8 px per frame at 32 x 32), so the drift measurement can see motion.
    drift = result["pure_noise_drift"]
    assert set(drift) == {"left", "right", "up", "down"}
    assert all(0.3 < d["generator"] < 0.9 and np.isfinite(d["trained"]) for d in drift.values()), drift
    # The held-object check compares against real motion the reader can see.
    held = result["held_object_motion"]
    assert set(held["sigma"]) == {"0.5", "0.7", "0.9"} and all(np.isfinite(v) for v in held["sigma"].values())
    assert 0.3 < held["generator"] < 0.9, held
    assert "An object at rest" in text
    cont = result["first_frame_continuation"]
    assert 0.3 < cont["generator"] < 0.9 and np.isfinite(cont["trained"]) and np.isfinite(cont["reversed"]), cont
    assert "A first frame to continue" in text
    # Motion consistency: the generator's objects show in every frame, move steadily, and
    # reverse exactly when the direction word does (same seed).
    assert result["real"]["mean_present_fraction"] == 1.0 and result["real"]["median_track_jitter"] < 0.5
    assert result["real"]["direction_reversal"] == {"reversed": 1.0, "median_cosine": pytest.approx(-1.0, abs=0.01)}
    assert "| direction word reversed, same noise: motion reverses (share) | - | 1.00 |" in text
    for png in ("samples.png", "attention_locality.png", "denoising.png"):
        assert (tmp_path / "toy" / png).stat().st_size > 1000


def test_above_chance_p_is_the_binomial_upper_tail():
    import toy_checks
    for hits, trials, chance in ((9, 24, 0.25), (14, 24, 0.25), (5, 24, 1 / 3), (24, 24, 0.25), (0, 24, 0.25)):
        tail = sum(math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k) for k in range(hits, trials + 1))
        assert toy_checks.above_chance_p(hits, trials, chance) == pytest.approx(tail, rel=1e-9)
    # What its docstring promises: at 24 prompts, 11 hits are needed at chance 0.25, 13 at 1/3.
    assert toy_checks.above_chance_p(10, 24, 0.25) > 0.05 > toy_checks.above_chance_p(11, 24, 0.25)
    assert toy_checks.above_chance_p(12, 24, 1 / 3) > 0.05 > toy_checks.above_chance_p(13, 24, 1 / 3)


def test_prompt_reliance_changes_exactly_one_attribute():
    import toy_checks
    for spec in evaluation_specs(24):
        for attribute in toy_checks.RELIANCE_ATTRIBUTES:
            if attribute == "pan" and spec.pan is None:
                with pytest.raises(ValueError, match="static camera"):
                    toy_checks.with_other_attribute(spec, attribute)
                continue
            other = toy_checks.with_other_attribute(spec, attribute)
            changed = [f for f in ("count", "colour", "shape", "direction", "background", "pan")
                       if getattr(other, f) != getattr(spec, f)]
            assert changed == [attribute], (spec, attribute, other)
            parse_prompt(other.prompt)  # still grammatical
        assert toy_checks.with_other_attribute(spec, "direction").direction == {
            "left": "right", "right": "left", "up": "down", "down": "up"}[spec.direction]
