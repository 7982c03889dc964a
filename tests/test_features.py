"""The plugin next to what users already do with a pipeline: a dtype move after apply, a
LoRA adapter loaded, diffusers' attention backend chosen, offloading, a LoRA training step. Dense through the plugin gives
the same output as without it; sparse runs."""

import pytest
import torch

import sparsegen
from tiny_models import run_wan, tiny_wan_pipeline

SIZE = dict(height=128, width=128, steps=2)
GNA = dict(kernel_size=(3, 5, 5), block_size=16)


def _check(pipe):
    ref = run_wan(pipe, **SIZE)
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_wan(pipe, **SIZE), ref)
    with sparsegen.apply(pipe, "gna", **GNA) as handle:
        out = run_wan(pipe, **SIZE)
        assert all(0 < d < 1 for _, d in handle.step_densities())
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run_wan(pipe, **SIZE), ref)


def test_dtype_move_after_apply():
    pipe = tiny_wan_pipeline()
    handle = sparsegen.apply(pipe, "gna", **GNA)
    pipe.to(torch.bfloat16)
    out = run_wan(pipe, **SIZE)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(0 < d < 1 for _, d in handle.step_densities())
    handle.remove()
    ref = run_wan(pipe, **SIZE)
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_wan(pipe, **SIZE), ref)


def test_with_a_lora_adapter_loaded():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_wan_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    _check(pipe)


def test_with_diffusers_attention_backend_set():
    pipe = tiny_wan_pipeline()
    pipe.transformer.set_attention_backend("native")
    _check(pipe)


def test_model_cpu_offload_after_apply():
    # diffusers' model offload wraps each model's forward in accelerate hooks; on a CPU-only
    # machine the execution device must be named (it is the CPU itself here).
    pytest.importorskip("accelerate")
    pipe = tiny_wan_pipeline()
    with sparsegen.apply(pipe, "gna", **GNA):
        sparse = run_wan(pipe, **SIZE)
    ref = run_wan(pipe, **SIZE)
    handle = sparsegen.apply(pipe, "gna", **GNA)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(run_wan(pipe, **SIZE), sparse)
    assert all(0 < d < 1 for _, d in handle.step_densities())
    handle.remove()
    assert torch.equal(run_wan(pipe, **SIZE), ref)
    with sparsegen.apply(pipe, "dense"):
        assert torch.equal(run_wan(pipe, **SIZE), ref)


@pytest.mark.parametrize("kind,apply_first", [("leaf_level", True), ("block_level", False)])
def test_group_offload(kind, apply_first):
    # Diffusers' group offloading (leaf level: each leaf module's weights moved in for its own
    # forward, as sequential offloading does; block level: one block at a time), enabled before
    # or after apply. The execution device is the CPU itself here (no accelerator).
    pipe = tiny_wan_pipeline()
    with sparsegen.apply(pipe, "gna", **GNA):
        sparse = run_wan(pipe, **SIZE)
    ref = run_wan(pipe, **SIZE)

    def offload():
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type=kind, **({"num_blocks_per_group": 1}
                                                                    if kind == "block_level" else {}))
    if not apply_first:
        offload()
    handle = sparsegen.apply(pipe, "gna", **GNA)
    if apply_first:
        offload()
    assert torch.equal(run_wan(pipe, **SIZE), sparse)
    assert all(0 < d < 1 for _, d in handle.step_densities())
    handle.remove()
    assert torch.equal(run_wan(pipe, **SIZE), ref)


@pytest.mark.parametrize("model", ["wan", "hunyuan_video", "cogvideox", "ltx_video", "mochi", "allegro", "skyreels_v2",
                                   "skyreels_df", "wan_vace", "wan_animate", "flux", "stable_diffusion"])
def test_leaf_group_offload_every_model(model):
    from tiny_models import tiny_transformer_and_inputs

    transformer, inputs = tiny_transformer_and_inputs(model)
    with torch.no_grad(), sparsegen.apply(transformer, "gna", **GNA):
        sparse = transformer(**inputs)[0]
    transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                     offload_type="leaf_level")
    with torch.no_grad(), sparsegen.apply(transformer, "gna", **GNA) as handle:
        assert torch.equal(transformer(**inputs)[0], sparse)
        assert 0 < handle.step_densities()[0][1] < 1


def test_with_lora_weights_loaded_by_diffusers(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_wan_pipeline()
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                              init_lora_weights=False))
    type(source).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(source.transformer))
    pipe = tiny_wan_pipeline()
    base = run_wan(pipe, **SIZE)
    pipe.load_lora_weights(str(tmp_path))
    assert not torch.equal(run_wan(pipe, **SIZE), base)  # the LoRA is live
    _check(pipe)


@pytest.mark.parametrize("model,method", [
    ("hunyuan_video", "gna"), ("cogvideox", "radial"), ("ltx_video", "vmoba"), ("flux", "gna"),
    ("stable_diffusion", "gna"), ("mochi", "gna"), ("wan_vace", "radial"),
])
def test_a_lora_training_step_through_sparse_attention(model, method):
    """peft LoRA on the attention projections; the loss's gradient reaches every LoRA matrix
    through the sparse attention's backward (the length-extension recipe on other models)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    from tiny_models import tiny_transformer_and_inputs

    options = {"gna": dict(kernel_size=(3, 5, 5), block_size=16), "radial": dict(block_size=16, decay_factor=1.0),
               "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                             top_k=(2, 3, 4))}[method]
    if model in ("flux", "stable_diffusion"):
        options["kernel_size"] = (1, 5, 5)
    t, inputs = tiny_transformer_and_inputs(model)
    t.requires_grad_(False)
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    t.train()
    with sparsegen.apply(t, method, **options) as handle:
        handle.set_step(0, 1)
        out = t(**inputs)[0]
        out.square().mean().backward()
        density = handle.step_densities()[0][1]
    lora = [p for n, p in t.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert sum(float(p.grad.abs().sum()) for p in lora) > 0 and 0 < density < 1
