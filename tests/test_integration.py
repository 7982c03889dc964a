"""apply/remove, schedule, geometry and adapters on tiny offline diffusers pipelines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import sparsegen
from sparsegen.joint import sparse_self_attention
from sparsegen.kernels import BlockSparseMask, block_sparse_attention
from sparsegen.kernels.reference import reference_attention
from sparsegen.methods.base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod

from tiny_models import TEXT_DIM, run_wan, text_embeds, tiny_hunyuan_transformer, tiny_wan_pipeline


@dataclass(frozen=True)
class BandConfig(MethodConfig):
    """A simple banded block mask with a first-column sink: exercises the plumbing."""

    method: ClassVar[str] = "test_band"
    block: int = 32
    width: int = 1
    min_frames: int = 1


class BandMethod(SparseAttentionMethod):
    config_cls = BandConfig
    uses_step = True  # the tests read the step of every call

    def __init__(self, config):
        super().__init__(config)
        self.seen: list = []  # (layer, step, geometry, q, k, v, out)
        self.record = False

    def check_model(self, *, model_class, num_layers, transformer_index):
        # The signature of methods written before check_model took multi_resolution: still called.
        self.models = [*getattr(self, "models", []), (model_class, num_layers, transformer_index)]

    def check_geometry(self, geometry):
        if geometry.frames < self.config.min_frames:
            raise ValueError(f"test_band needs at least {self.config.min_frames} latent frames, got {geometry.frames}")

    def mask_for(self, n, device="cpu"):
        def build():
            nb = -(-n // self.config.block)
            i = torch.arange(nb)
            blocks = (i[:, None] - i[None, :]).abs() <= self.config.width
            blocks[:, 0] = True
            return BlockSparseMask.from_block_matrix(blocks, q_len=n, kv_len=n, q_block_size=self.config.block,
                                                     kv_block_size=self.config.block)
        return self.cached((n, str(device)), build)

    def attention(self, q, k, v, call):
        m = self.mask_for(call.geometry.num_tokens, q.device)
        call.stats["density"] = m.density()
        out, lse = block_sparse_attention(q, k, v, m, return_lse=True, backend=call.backend)
        if self.record:
            self.seen.append((call.layer, call.step, call.geometry, q.clone(), k.clone(), v.clone(), out.clone()))
        else:
            self.seen.append((call.layer, call.step, call.geometry))
        return out, lse


sparsegen.register_method(BandConfig, BandMethod)


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


def _run(pipe, **kw):
    kw.setdefault("frames", 17)
    kw.setdefault("height", 128)
    kw.setdefault("width", 128)
    kw.setdefault("steps", 3)
    return run_wan(pipe, **kw)


def test_dense_through_plugin_equals_unpatched(wan):
    base = _run(wan, guidance=2.0)
    with sparsegen.apply(wan, "dense"):
        dense = _run(wan, guidance=2.0)
    assert (dense - base).abs().max().item() <= 1e-6


def test_remove_restores_bit_identical_outputs(wan):
    import diffusers.models.transformers.transformer_wan as tw

    dispatch_before = tw.dispatch_attention_fn
    set_ts_before = wan.scheduler.set_timesteps
    base = _run(wan)
    h = sparsegen.apply(wan, "test_band", width=1, backend="torch")
    assert h.method.models == [("WanTransformer3DModel", 3, 0)]  # the tiny pipeline's 3 layers
    sparse = _run(wan)
    assert (sparse - base).abs().max().item() > 1e-4, "the sparse method had no effect"
    h.remove()
    h.remove()  # idempotent
    assert tw.dispatch_attention_fn is dispatch_before
    assert "set_timesteps" not in vars(wan.scheduler) and wan.scheduler.set_timesteps == set_ts_before
    assert not hasattr(wan.transformer, "_sparsegen_handle")
    assert torch.equal(_run(wan), base)


def test_sparse_layer_equals_reference_with_method_mask(wan):
    with sparsegen.apply(wan, "test_band", width=1, backend="torch") as h:
        h.method.record = True
        _run(wan, steps=2)
        assert len(h.method.seen) == 2 * 3  # 2 steps x 3 layers
        for layer, step, geom, q, k, v, out in h.method.seen:
            mask = h.method.mask_for(geom.num_tokens)
            ref, _ = reference_attention(q, k, v, mask)
            assert (out.double() - ref).abs().max().item() < 1e-5, (layer, step)
            dense_ref, _ = reference_attention(q, k, v, None)
            assert (out.double() - dense_ref).abs().max().item() > 1e-4  # the mask really is sparse


def test_resolution_change_between_calls_gets_new_mask(wan):
    with sparsegen.apply(wan, "test_band", width=1, backend="torch") as h:
        h.method.record = True
        _run(wan, height=128, width=128, steps=1)
        _run(wan, height=96, width=160, frames=9, steps=1)
        geoms = {g for _, _, g, *_ in h.method.seen}
        assert geoms == {AttentionGeometry(5, 8, 8), AttentionGeometry(3, 6, 10)}
        for _, _, geom, q, k, v, out in h.method.seen:
            assert q.shape[1] == geom.num_tokens
            ref, _ = reference_attention(q, k, v, h.method.mask_for(geom.num_tokens))
            assert (out.double() - ref).abs().max().item() < 1e-5


def test_cfg_batch2_steps_and_schedule(wan):
    cfg = BandConfig(width=1, dense_steps=1, dense_last_steps=1, dense_layers=(1,), backend="torch")
    with sparsegen.apply(wan, cfg) as h:
        _run(wan, steps=4, guidance=3.0, batch=2)
        # Wan runs the conditional and unconditional passes separately: both on the same step.
        seen = [(layer, step) for layer, step, _ in h.method.seen]
        assert sorted(set(seen)) == [(0, 1), (0, 2), (2, 1), (2, 2)]
        assert all(seen.count(x) == 2 for x in set(seen))
        assert h.num_steps == 4
        stats = {s["step"]: s for s in h.step_stats}
        assert sorted(stats) == [0, 1, 2, 3]
        assert stats[0]["sparse_calls"] == 0 and stats[3]["sparse_calls"] == 0
        assert stats[1]["sparse_calls"] == 4 and stats[1]["dense_calls"] == 2
        # A new generation starts again at step 0.
        h.method.seen.clear()
        _run(wan, steps=4, guidance=1.0)
        assert sorted({step for _, step, _ in h.method.seen}) == [1, 2]


def test_two_pipelines_carry_different_configs():
    p1, p2 = tiny_wan_pipeline(seed=0), tiny_wan_pipeline(seed=0)
    ref1 = _run(p1, steps=2)
    h1 = sparsegen.apply(p1, "test_band", width=1, backend="torch")
    h2 = sparsegen.apply(p2, "test_band", width=3, dense_layers=1, backend="torch")
    try:
        a1, a2 = _run(p1, steps=2), _run(p2, steps=2)
        assert {layer for layer, *_ in h1.method.seen} == {0, 1, 2}
        assert {layer for layer, *_ in h2.method.seen} == {1, 2}
        assert not torch.equal(a1, a2)
        # Interleaving does not leak state: p1 alone reproduces its own result.
        h2.remove()
        assert torch.equal(_run(p1, steps=2), a1)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(_run(p1, steps=2), ref1)


def test_wan22_two_transformers_are_patched():
    pipe = tiny_wan_pipeline(two_transformers=True)
    with sparsegen.apply(pipe, "test_band", width=1, backend="torch") as h:
        calls = {"t1": 0, "t2": 0}
        pipe.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("t1", calls["t1"] + 1))
        pipe.transformer_2.register_forward_pre_hook(lambda *a: calls.__setitem__("t2", calls["t2"] + 1))
        _run(pipe, steps=4)
        assert calls["t1"] > 0 and calls["t2"] > 0
        # Every transformer call ran its 3 layers sparsely, on one shared step counter.
        assert len(h.method.seen) == 3 * (calls["t1"] + calls["t2"])
        assert sorted({step for _, step, _ in h.method.seen}) == [0, 1, 2, 3]
    assert not hasattr(pipe.transformer_2, "_sparsegen_handle")


def test_bare_transformer_and_reset_schedule():
    from tiny_models import tiny_wan_transformer

    t = tiny_wan_transformer()
    x = torch.randn(1, 4, 5, 16, 16)
    enc = text_embeds(1)
    with torch.no_grad():
        base = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]
        with sparsegen.apply(t, "test_band", width=1, dense_steps=1, backend="torch") as h:
            d0 = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]  # step 0: dense
            t(x, torch.tensor([800.0]), enc, return_dict=False)           # step 1: sparse
            assert h.step == 1
            h.reset_schedule()
            again = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]
            assert h.step == 0
    assert torch.equal(d0, base) and torch.equal(again, base)


def test_hunyuan_joint_layer_equals_reference():
    """Video->video sparse, video->text dense (padding masked), text->all dense, exactly."""
    torch.manual_seed(0)
    geom = AttentionGeometry(3, 4, 6)
    nv, nt, b, h, d = geom.num_tokens, 10, 2, 2, 16
    method = BandMethod(BandConfig(block=16, width=1, backend="torch"))
    q, k, v = (torch.randn(b, nv + nt, h, d) for _ in range(3))
    valid = torch.ones(b, nt, dtype=torch.bool)
    valid[0, 6:] = False
    call = AttentionCall(geometry=geom, backend="torch")
    out = sparse_self_attention(method, q, k, v, call, text_tokens=nt, text_key_valid=valid)
    tok = torch.ones(b, 1, nv + nt, nv + nt, dtype=torch.bool)
    tok[:, :, :nv, :nv] = method.mask_for(nv).to_dense()[0]
    tok[:, :, :, nv:] &= valid[:, None, None, :]
    ref, _ = reference_attention(q, k, v, BlockSparseMask.from_dense(tok, q_block_size=16, kv_block_size=16))
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_hunyuan_pipeline_patched_and_restored():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan_transformer(), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    pe = torch.randn(1, 12, TEXT_DIM)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[:, 7:] = 0

    def run():
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=torch.randn(1, 16, generator=torch.Generator().manual_seed(1)),
                    prompt_attention_mask=mask, num_frames=17, height=128, width=128, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    base = run()
    with sparsegen.apply(pipe, "test_band", width=10_000, backend="torch") as h:
        full = run()  # the band covers everything: equals dense up to float error
        assert len(h.method.seen) == 2 * 4  # 2 steps x (2 dual + 2 single blocks)
    assert (full - base).abs().max().item() < 1e-5
    with sparsegen.apply(pipe, "test_band", width=1, backend="torch"):
        sparse = run()
    assert (sparse - base).abs().max().item() > 1e-4
    assert torch.equal(run(), base)


# ------------------------------------------------------------------ errors


def test_unsupported_pipeline_lists_supported():
    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"no adapter for Linear; supported models: wan .*hunyuan_video"):
        sparsegen.apply(NotAPipeline(), "dense")
    with pytest.raises(ValueError, match="has no `transformer` attribute"):
        sparsegen.apply(object(), "dense")


def test_bad_options(wan):
    with pytest.raises(ValueError, match=r"dense_steps=-1 is invalid: must be an integer >= 0"):
        sparsegen.apply(wan, "test_band", dense_steps=-1)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['decay'\]"):
        sparsegen.apply(wan, "test_band", decay=0.3)
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available"):
        sparsegen.apply(wan, "nope")
    with pytest.raises(TypeError, match="not both"):
        sparsegen.apply(wan, BandConfig(), width=2)
    assert not hasattr(wan.transformer, "_sparsegen_handle")


def test_geometry_the_method_cannot_serve(wan):
    with sparsegen.apply(wan, "test_band", min_frames=4, backend="torch"):
        _run(wan, frames=17, steps=1)  # 5 latent frames: fine
        with pytest.raises(ValueError, match="needs at least 4 latent frames, got 3"):
            _run(wan, frames=9, steps=1)


def test_double_apply_and_compiled_refused(wan):
    with sparsegen.apply(wan, "dense"):
        with pytest.raises(ValueError, match=r"already patched by sparsegen .* call handle.remove\(\) first"):
            sparsegen.apply(wan, "dense")
    compiled = torch.compile(wan.transformer)
    with pytest.raises(ValueError, match="already compiled with torch.compile; call sparsegen.apply before"):
        sparsegen.apply(compiled, "dense")


def test_config_json_round_trip():
    cfg = BandConfig(width=3, dense_layers=[2, 0], dense_steps=4, backend="torch")
    again = sparsegen.config_from_dict(cfg.to_dict())
    assert again == cfg and again.dense_layers == (0, 2)
    assert BandConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="config is for method 'dense'"):
        BandConfig.from_dict({"method": "dense"})
