"""LoRA training under sparse attention on the built-in model: loss, export, reload, recipe,
sparse gradients, resume, and the objective's pieces."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import ClassVar

import imageio.v3 as imageio
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sparsegen
from sparsegen import cli
from sparsegen.lora import LORA_WEIGHTS_FILE, RECIPE_FILE, Recipe
from sparsegen.lora.data import CachedSet
from sparsegen.lora.objective import add_noise, flow_matching_loss, sample_sigmas, shift_sigma
from sparsegen.lora.train import TrainLoraConfig, train_lora
from sparsegen.toy import pipeline as toy

# A run small enough for CI: 2 fixed generated videos of 17 frames (5 latent frames of
# 8 x 8 tokens; radial at the built-in model's preset skips about half the blocks of the
# sparse layers), rank 8, 12 steps of both videos at a high rate so a few steps show.
SMALL = dict(data="toy:2", frames=17, steps=12, batch_size=2, rank=8, lr=5e-3, warmup_steps=0, log_every=1,
             checkpoint_every=0, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train_lora(TrainLoraConfig(out=str(out), **SMALL), log=lambda *_: None)


def _probe_inputs(batch: int = 2, frames: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 192, (frames - 1) // 4 + 1, 8, 8, generator=g)
    timestep = torch.linspace(200.0, 900.0, batch)
    return latents, timestep, toy.encode_prompt(None, ["a red circle moving right over a striped background"] * batch)


def _held_loss(transformer, source: CachedSet, recipe: Recipe) -> float:
    """The training loss of ``transformer`` on the run's 2 videos at 6 fixed noise levels and
    fixed noise, with the training attention (the recipe's method, every call sparse)."""
    x0, embeds = source.batch(0, [0, 1, 0, 1, 0, 1])
    g = torch.Generator().manual_seed(123)
    sigma = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    noise = torch.randn(x0.shape, generator=g)
    noisy = add_noise(x0, noise, sigma)
    config = dataclasses.replace(recipe.config(), dense_steps=0)
    with sparsegen.apply(transformer, config) as handle, torch.no_grad():
        handle.set_step(0)
        out = transformer(noisy, sigma * 1000.0, embeds, return_dict=False)[0]
    return float(flow_matching_loss(out, x0, noise, sigma, "sample"))


def test_few_sparse_steps_lower_the_loss(trained):
    summary = trained.summary
    assert summary["trained_attention"] == "sparse" and summary["steps_done"] == SMALL["steps"]
    # The sparse layers really skipped blocks (dense layers count as density 1).
    assert 0.3 < summary["attention_density"] < 0.9
    assert [s for s, _ in summary["loss_history"]] == list(range(1, SMALL["steps"] + 1))
    source = CachedSet.open(summary["data"]["cache"])
    recipe = Recipe.load(trained.out)
    base = _held_loss(toy.load_transformer(), source, recipe)
    tuned = _held_loss(trained.pipe.transformer, source, recipe)
    # Most of this loss is the noise's own unpredictability (the base model already fits
    # these videos' distribution); measured 0.375 -> 0.351 (-6.4%). A LoRA that does not
    # train (zero or wrong gradients, not applied) leaves it where it is.
    assert tuned < 0.97 * base, f"loss at fixed noise {base:.4f} -> {tuned:.4f} after {SMALL['steps']} steps"


def test_saved_lora_is_diffusers_format_and_reloads_exactly(trained):
    path = trained.out / LORA_WEIGHTS_FILE
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    # diffusers' key format: "transformer." + module path + ".lora_A/B.weight", no peft adapter name.
    assert all(k.startswith("transformer.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    expected = {f"transformer.blocks.{b}.{a}.{m}" for b in range(6) for a in ("attn1", "attn2")
                for m in ("to_q", "to_k", "to_v", "to_out.0")}
    assert modules == expected and len(keys) == 2 * len(expected)
    assert "lora_adapter_metadata" in metadata
    weights = load_file(str(path))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert weights["transformer.blocks.0.attn1.to_q.lora_A.weight"].shape == (SMALL["rank"], 192)

    fresh = toy.load_pipeline()
    x, t, e = _probe_inputs()
    with torch.no_grad():
        base = fresh.transformer(x, t, e, return_dict=False)[0]
        fresh.load_lora_weights(str(trained.out))  # diffusers alone, no sparsegen involved
        reloaded = fresh.transformer(x, t, e, return_dict=False)[0]
        original = trained.pipe.transformer(x, t, e, return_dict=False)[0]
    assert (reloaded - original).abs().max().item() <= 1e-5
    assert (base - original).abs().max().item() > 1e-3  # the LoRA does change the model


def test_recipe_drives_apply_and_refuses_other_models(trained, caplog):
    recipe = json.loads((trained.out / RECIPE_FILE).read_text())
    assert recipe["format"] == "sparsegen-lora-recipe" and recipe["transformer"] == "transformer"
    assert (recipe["frames"], recipe["height"], recipe["width"]) == (17, 32, 32)
    # The built-in model's radial preset, then the length recipe: 2 dense layers, 2 dense warm-up steps.
    assert recipe["method"]["method"] == "radial" and recipe["method"]["block_size"] == 64
    assert recipe["method"]["dense_layers"] == 2 and recipe["method"]["dense_steps"] == 2

    pipe = toy.load_pipeline()
    with caplog.at_level(logging.WARNING, logger="sparsegen"):
        with sparsegen.apply(pipe, recipe=trained.out) as handle:
            assert handle.config == sparsegen.RadialConfig(block_size=64, dense_layers=2, dense_steps=2)
    assert "no LoRA is loaded" in caplog.text
    pipe.load_lora_weights(str(trained.out))
    with sparsegen.apply(pipe, recipe=trained.out, dense_steps=3) as handle:
        assert handle.config.dense_steps == 3 and handle.config.dense_layers == 2

    with pytest.raises(TypeError, match="either a method or recipe"):
        sparsegen.apply(pipe, "radial", recipe=trained.out)
    other = toy.load_pipeline()
    with torch.no_grad():
        other.transformer.proj_out.weight.mul_(1.1)  # another fine-tune of the same architecture
    with pytest.raises(ValueError, match="other weights.*proj_out"):
        sparsegen.apply(other, recipe=trained.out)
    from tiny_models import tiny_wan_pipeline

    with pytest.raises(ValueError, match="another WanTransformer3DModel architecture"):
        sparsegen.apply(tiny_wan_pipeline(), recipe=trained.out)
    with pytest.raises(ValueError, match="no LoRA recipe"):
        sparsegen.apply(pipe, recipe=trained.out / "checkpoints")


def test_generate_with_lora_uses_its_recipe_and_size(trained, tmp_path):
    summary_path = tmp_path / "s.json"
    assert cli.main(["generate", "--lora", str(trained.out), "--steps", "3", "--out", str(tmp_path / "v.mp4"),
                     "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["lora"] == str(trained.out) and summary["settings"]["frames"] == 17
    assert summary["method"]["dense_steps"] == 2 and summary["method"]["dense_layers"] == 2
    # Step 0 and 1 of each stage dense (the recipe's warm-up), step 2 sparse.
    assert [d == 1.0 for d in summary["step_density"]] == [True, True, False] * 2
    with pytest.raises(SystemExit, match="recipe sets the method"):
        cli.main(["generate", "--lora", str(trained.out), "--method", "gna", "--kernel-size", "3,5,5",
                  "--out", str(tmp_path / "w.mp4")])


@dataclasses.dataclass(frozen=True)
class FullMaskConfig(sparsegen.MethodConfig):
    """Every block visited, through the engine's torch backend (a partial last block too)."""

    method: ClassVar[str] = "full-mask"
    block_size: int = 48


class FullMaskMethod(sparsegen.SparseAttentionMethod):
    config_cls = FullMaskConfig

    def attention(self, q, k, v, call):
        from sparsegen.kernels.mask import block_count

        n, bs = q.shape[1], self.config.block_size
        blocks = torch.ones(block_count(n, bs), block_count(n, bs), dtype=torch.bool)
        mask = sparsegen.BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=bs,
                                                           kv_block_size=bs)
        call.stats["density"] = 1.0
        return sparsegen.block_sparse_attention(q, k, v, mask, return_lse=True, backend="torch")


def test_sparse_backward_equals_dense_at_density_one():
    """LoRA gradients of the whole built-in transformer: the engine's backward (a full mask)
    against diffusers' dense attention, both against an fp64 dense golden."""
    from peft import LoraConfig

    from sparsegen.testing import FP32_GRADIENT_FACTOR, assert_close_to_golden

    transformer = toy.load_transformer().requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # nonzero B so every LoRA matrix gets a gradient
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    x, t, e = _probe_inputs()

    def grads(model, dtype):
        model.zero_grad(set_to_none=True)
        out = model(x.to(dtype), t.to(dtype), e.to(dtype), return_dict=False)[0]
        out.double().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    dense = grads(transformer, torch.float32)
    golden = grads(copy.deepcopy(transformer).double(), torch.float64)
    with sparsegen.apply(transformer, FullMaskConfig()) as handle:
        handle.set_step(0)
        sparse = grads(transformer, torch.float32)
        (stats,) = handle.step_stats
    assert int(stats["sparse_calls"]) == 6 and int(stats["dense_calls"]) == 0  # every layer through the engine
    assert len(sparse) == 96
    for name in dense:
        assert_close_to_golden(sparse[name], dense[name], golden[name], factor=FP32_GRADIENT_FACTOR,
                               what=f"{name} (full mask, fp32)")


def test_resume_continues_exactly(tmp_path):
    tiny = dict(data="toy", frames=5, batch_size=2, rank=4, lr=1e-3, warmup_steps=2, log_every=1,
                checkpoint_every=1, keep_checkpoints=1)
    quiet = dict(log=lambda *_: None)
    # With a validation video on the way (it draws from its own generators, not the run's).
    train_lora(TrainLoraConfig(out=str(tmp_path / "a"), steps=2, validate_every=2, validation_steps=2, **tiny), **quiet)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-0000002"]
    video = imageio.imread(tmp_path / "a" / "validation" / "step-0000002.mp4")
    assert video.shape == (5, 32, 32, 3)
    resumed = train_lora(TrainLoraConfig(out=str(tmp_path / "a"), steps=4, resume="latest", **tiny), **quiet)
    straight = train_lora(TrainLoraConfig(out=str(tmp_path / "b"), steps=4, **tiny), **quiet)
    a = load_file(str(tmp_path / "a" / LORA_WEIGHTS_FILE))
    b = load_file(str(tmp_path / "b" / LORA_WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["loss_history"] == straight.summary["loss_history"]
    assert resumed.summary["steps_this_session"] == 2
    with pytest.raises(ValueError, match="other settings.*rank"):
        train_lora(TrainLoraConfig(out=str(tmp_path / "a"), steps=5, resume="latest", **{**tiny, "rank": 8}), **quiet)


def test_sigma_sampling_is_the_truncated_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    full = sample_sigmas(g, 200_000, shift=3.0)
    g = torch.Generator().manual_seed(1)
    high = sample_sigmas(g, 50_000, shift=3.0, low=0.6, high=1.0)
    assert high.min() >= 0.6 and high.max() <= 1.0
    # Same distribution as the untruncated one conditioned on the range.
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.quantile(high, q), torch.quantile(full[full >= 0.6], q), atol=0.01)
    # Logit-normal then shifted: the median of sigmoid(N(0, 1)) is 0.5, shifted by 3 -> 0.75.
    assert abs(torch.median(full).item() - shift_sigma(torch.tensor(0.5), 3.0).item()) < 0.01
    with pytest.raises(ValueError, match="range"):
        sample_sigmas(g, 4, low=0.5, high=0.5)


def test_flow_matching_loss_is_zero_for_the_true_prediction():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, 2, generator=g), torch.randn(3, 4, 2, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    noisy = add_noise(x0, noise, sigma)
    assert flow_matching_loss(noise - x0, x0, noise, sigma, "flow_prediction") == 0
    assert flow_matching_loss(x0, x0, noise, sigma, "sample") == 0  # at low noise too
    # Above the cap the clean-latent form is the velocity error of the implied velocity.
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    implied = (noisy - x0_hat) / sigma.view(-1, 1, 1, 1, 1)
    expected = (implied - (noise - x0))[1:].square().mean()
    assert torch.allclose(flow_matching_loss(x0_hat[1:], x0[1:], noise[1:], sigma[1:], "sample"),
                          expected, rtol=1e-5)
    # Below it the weight is capped at 1 / 0.2^2.
    low = flow_matching_loss(x0_hat[:1], x0[:1], noise[:1], sigma[:1], "sample")
    assert torch.allclose(low, (x0_hat[:1] - x0[:1]).square().mean() / 0.2**2, rtol=1e-5)


def test_config_and_cli_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="rank=0"):
        TrainLoraConfig(out="x", rank=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainLoraConfig(out="x", caption_dropout=1.0)
    with pytest.raises(ValueError, match="--dense.*drop the method options"):
        TrainLoraConfig(out="x", dense=True, method_options={"decay_factor": 0.5})
    with pytest.raises(SystemExit, match="--frames 6: this model needs 1 \\+ 4 \\* k"):
        cli.main(["train-lora", "--frames", "6", "--steps", "1", "--out", str(tmp_path / "o")])
    # The method's flags are its config fields, as in `sparsegen generate`.
    parser = cli.build_parser(["train-lora", "--method", "gna"])
    args = parser.parse_args(["train-lora", "--method", "gna", "--kernel-size", "3,5,5", "--out", "o"])
    from sparsegen.cli.train_lora import config_from_args

    assert config_from_args(args).method_options == {"kernel_size": (3, 5, 5)}


def _two_expert_pipeline():
    """The built-in model as a Wan 2.2-style pipeline: two experts split at noise level 0.5
    (the second a slightly changed copy, so the two are told apart)."""
    from diffusers import WanPipeline

    base = toy.load_pipeline()
    second = toy.load_transformer()
    with torch.no_grad():
        second.proj_out.weight.mul_(1.05)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, transformer_2=second, boundary_ratio=0.5)
    pipe.toy_prompt_encoder = base.toy_prompt_encoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_wan22_second_transformer_trains_alone_and_loads_into_transformer_2(tmp_path):
    from sparsegen.lora.models import objective_of

    pipe = _two_expert_pipeline()
    assert (objective_of(pipe, "transformer").sigma_low, objective_of(pipe, "transformer").sigma_high) == (0.5, 1.0)
    assert (objective_of(pipe, "transformer_2").sigma_low, objective_of(pipe, "transformer_2").sigma_high) == (0.0, 0.5)
    result = train_lora(TrainLoraConfig(out=str(tmp_path), transformer="transformer_2", self_attention_only=True,
                                        data="toy", frames=5, steps=2, batch_size=1, rank=4, lr=1e-3,
                                        warmup_steps=0, checkpoint_every=0), pipe=pipe, log=lambda *_: None)
    assert not getattr(pipe.transformer, "peft_config", None)  # the high-noise expert is untouched
    recipe = Recipe.load(tmp_path)
    assert recipe.transformer == "transformer_2" and recipe.lora["self_attention_only"]
    keys = load_file(str(tmp_path / LORA_WEIGHTS_FILE)).keys()
    assert keys and all(".attn1." in k for k in keys) and len(keys) == 6 * 4 * 2  # self-attention only

    fresh = _two_expert_pipeline()
    recipe.load_lora(fresh, tmp_path)  # diffusers' load_into_transformer_2=True
    assert fresh.transformer_2.peft_config and not getattr(fresh.transformer, "peft_config", None)
    x, t, e = _probe_inputs()
    with torch.no_grad():
        reloaded = fresh.transformer_2(x, t * 0.4, e, return_dict=False)[0]
        original = result.pipe.transformer_2(x, t * 0.4, e, return_dict=False)[0]
    assert (reloaded - original).abs().max().item() <= 1e-5
    with sparsegen.apply(fresh, recipe=tmp_path) as handle:  # checks transformer_2, patches both experts
        assert len(handle._transformers) == 2
    with pytest.raises(ValueError, match="other weights.*proj_out"):
        sparsegen.apply(fresh.transformer, recipe=tmp_path)  # the high-noise expert is not the one trained


def test_gradient_checkpointing_trains_the_same_lora(tmp_path):
    """Recomputing each block in the backward pass (sparse attention included) changes
    memory, not results."""
    run = dict(data="toy", frames=5, steps=2, batch_size=1, rank=4, lr=1e-3, warmup_steps=0, checkpoint_every=0)
    checkpointed = train_lora(TrainLoraConfig(out=str(tmp_path / "gc"), gradient_checkpointing=True, **run),
                              log=lambda *_: None)
    assert checkpointed.pipe.transformer.gradient_checkpointing
    train_lora(TrainLoraConfig(out=str(tmp_path / "plain"), **run), log=lambda *_: None)
    a = load_file(str(tmp_path / "gc" / LORA_WEIGHTS_FILE))
    b = load_file(str(tmp_path / "plain" / LORA_WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in b) and any(b[k].abs().max() > 0 for k in b if "lora_B" in k)
