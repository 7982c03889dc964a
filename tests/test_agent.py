"""Agent attention: the formula against a float64 reference, agent construction (pooled
queries, ToMe bipartite merging with AgentSD's counts), the method on tiny video DiTs, and
the layer calibration."""

import pytest
import torch

import sparsegen
from sparsegen.agent import agent_attention, bipartite_merge, pool_agents, pooled_agent_count
from sparsegen.methods.agent import AgentConfig
from sparsegen.testing import assert_close_to_golden, sqnr_db
from tiny_models import (run_cogvideox, run_wan, text_embeds, tiny_cogvideox_pipeline, tiny_hunyuan_inputs,
                         tiny_hunyuan_transformer, tiny_wan_pipeline)


def reference(q, k, v, a, k2=0.3, ks=0.075, kt=None, vt=None, dtype=torch.float64):
    """The formula, plainly, in ``dtype``: O = softmax(Q A^T s^k2) softmax(A K^T s) V + ks V."""
    q, k, v, a = (t.to(dtype).transpose(1, 2) for t in (q, k, v, a))
    keys, values = k, v
    if kt is not None:
        keys = torch.cat([k, kt.to(dtype).transpose(1, 2)], 2)
        values = torch.cat([v, vt.to(dtype).transpose(1, 2)], 2)
    s = q.shape[-1] ** -0.5
    gathered = torch.softmax(a @ keys.transpose(-1, -2) * s, -1) @ values
    out = torch.softmax(q @ a.transpose(-1, -2) * s ** k2, -1) @ gathered + ks * v
    return out.transpose(1, 2)


@pytest.mark.parametrize("n,m", [(97, 1), (97, 7), (1000, 7), (1000, 64)])
def test_agent_attention_matches_the_formula(n, m):
    g = torch.Generator().manual_seed(n + m)
    q, k, v = (torch.randn(2, n, 3, 40, generator=g) for _ in range(3))
    a = torch.randn(2, m, 3, 40, generator=g)
    out = agent_attention(q, k, v, a, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_golden(out, reference(q, k, v, a, dtype=torch.float32), reference(q, k, v, a),
                           what=f"agent attention N={n} M={m} fp32")
    other = agent_attention(q, k, v, a, k_scale2=1.0, k_shortcut=0.0, backend="torch")
    assert_close_to_golden(other, reference(q, k, v, a, 1.0, 0.0, dtype=torch.float32), reference(q, k, v, a, 1.0, 0.0),
                           what="k_scale2=1, no shortcut")


def test_agent_attention_in_the_triton_interpreter():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 97, 2, 32, generator=g, dtype=torch.float16) for _ in range(3))
    a = torch.randn(1, 7, 2, 32, generator=g, dtype=torch.float16)
    out = agent_attention(q, k, v, a, backend="triton")
    assert_close_to_golden(out, reference(q, k, v, a, dtype=torch.float16).to(torch.float16), reference(q, k, v, a),
                           what="agent attention triton fp16")


def test_int8_agent_attention_stays_close():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1000, 2, 64, generator=g) for _ in range(3))
    a = q[:, ::16].clone()
    sq = sqnr_db(agent_attention(q, k, v, a, backend="torch", quant="int8"), reference(q, k, v, a).float())
    assert sq > 30, f"int8 agent attention (1, 1000, 2, 64): SQNR {sq:.1f} dB"


def test_agent_attention_is_differentiable_on_the_torch_backend():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 97, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    a = torch.randn(1, 7, 2, 16, generator=g, requires_grad=True)
    w = torch.randn(1, 97, 2, 16, generator=g)
    (agent_attention(q, k, v, a, backend="torch") * w).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, a)]
    (reference(*leaves) * w.double()).sum().backward()
    for t, ref in zip((q, k, v, a), leaves):
        assert torch.allclose(t.grad.double(), ref.grad, atol=1e-4, rtol=1e-3), (t.grad.double() - ref.grad).abs().max()


def test_text_keys_are_gathered_by_the_agents():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 97, 2, 16, generator=g) for _ in range(3))
    kt, vt = (torch.randn(2, 5, 2, 16, generator=g) for _ in range(2))
    a = torch.randn(2, 7, 2, 16, generator=g)
    out = agent_attention(q, k, v, a, backend="torch", extra_keys=(kt, vt, None))
    assert_close_to_golden(out, reference(q, k, v, a, kt=kt, vt=vt, dtype=torch.float32),
                           reference(q, k, v, a, kt=kt, vt=vt), what="agents over video + text keys")
    valid = torch.tensor([[True] * 3 + [False] * 2] * 2)
    masked = agent_attention(q, k, v, a, backend="torch", extra_keys=(kt, vt, valid))
    expect = reference(q, k, v, a, kt=kt[:, :3], vt=vt[:, :3])
    assert torch.allclose(masked.double(), expect, atol=1e-5)


def test_pooled_agents_average_each_cell_partial_cells_included():
    grid, cell = (3, 5, 7), (2, 4, 4)
    x = torch.randn(1, 105, 2, 3)
    agents = pool_agents(x, grid=grid, cell=cell)
    assert agents.shape == (1, pooled_agent_count(grid, cell), 2, 3) == (1, 2 * 2 * 2, 2, 3)
    xg = x.view(1, 3, 5, 7, 2, 3)
    expect = torch.stack([xg[:, t:t + 2, h:h + 4, w:w + 4].mean((1, 2, 3))
                          for t in (0, 2) for h in (0, 4) for w in (0, 4)], 1)
    assert torch.allclose(agents, expect, atol=1e-6)


def test_tome_merging_reproduces_agentsd_counts():
    x = torch.randn(2, 4096, 16)
    m = bipartite_merge(x, height=64, width=64, sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    # 256 destinations, 3840 sources; r = 1638; agent_r = min(3840, 3891) = 3840.
    assert (m.num_merged, m.num_agents, m.agents_active) == (2458, 256, True)
    assert m.merge(x).shape == (2, 2458, 16) and m.agents(x).shape == (2, 256, 16)
    assert m.unmerge(m.merge(x)).shape == x.shape
    # The agent path switches itself off when agents are not fewer than half the merged tokens:
    # agent_ratio 0.5 leaves 2048 agents, and 2 x 2048 >= 2458.
    off = bipartite_merge(x, height=64, width=64, sx=4, sy=4, ratio=0.4, agent_ratio=0.5)
    assert not off.agents_active and off.num_agents == 0 and off.agents(x) is None
    # Nothing merged: unmerge(merge(x)) is x.
    none = bipartite_merge(x, height=64, width=64, ratio=0.0, agent_ratio=0.9)
    assert torch.equal(none.unmerge(none.merge(x)), x)


def test_tome_merging_averages_sources_into_their_destination():
    # 2 x 2 grid, one window: destination token 0; sources 1, 2, 3; token 3 equals token 0.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0]]])
    m = bipartite_merge(x, height=2, width=2, sx=2, sy=2, ratio=0.25, agent_ratio=0.5)
    merged = m.merge(x)
    assert merged.shape == (1, 3, 2)
    assert torch.allclose(merged[0, -1], torch.tensor([1.0, 0.0]))  # mean of tokens 0 and 3
    back = m.unmerge(merged)
    assert torch.allclose(back[0, 3], back[0, 0])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    y = torch.randn(1, 256, 4)
    a = bipartite_merge(y, height=16, width=16, generator=g1, ratio=0.3, agent_ratio=0.6)
    b = bipartite_merge(y, height=16, width=16, generator=g2, ratio=0.3, agent_ratio=0.6)
    assert torch.equal(a.merge(y), b.merge(y))


WAN_RUN = dict(height=128, width=128, steps=5)


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_wan_pipeline()
    return pipe, run_wan(pipe, **WAN_RUN)


def test_agent_method_on_wan_follows_agentsds_early_steps_rule(wan):
    pipe, ref = wan
    with sparsegen.apply(pipe, "agent") as handle:
        out = run_wan(pipe, **WAN_RUN)
        densities = handle.step_densities()
    # 5 x 8 x 8 tokens, cells 1 x 4 x 4: 20 agents; steps 0, 1 (ceil(0.4 * 5)) use them.
    assert [round(d, 4) for _, d in densities] == [0.125, 0.125, 1.0, 1.0, 1.0]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run_wan(pipe, **WAN_RUN), ref)
    with sparsegen.apply(pipe, "agent", agent_steps=0.0):
        assert torch.equal(run_wan(pipe, **WAN_RUN), ref)


def test_agent_method_on_joint_models():
    pipe = tiny_cogvideox_pipeline()
    ref = run_cogvideox(pipe, steps=3)
    with sparsegen.apply(pipe, "agent", agent_steps=1.0):
        out = run_cogvideox(pipe, steps=3)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run_cogvideox(pipe, steps=3), ref)
    t, inputs = tiny_hunyuan_transformer(), tiny_hunyuan_inputs()
    ref = t(**inputs)[0]
    with sparsegen.apply(t, "agent", agent_cell=(1, 2, 2)):
        out = t(**inputs)[0]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(t(**inputs)[0], ref)


def test_layer_calibration_keeps_layers_under_the_error_bound(wan):
    pipe, ref = wan
    def kw():
        return dict(prompt_embeds=text_embeds(1, seed=1), num_frames=17, num_inference_steps=5, guidance_scale=1.0,
                    output_type="latent", height=128, width=128, generator=torch.Generator().manual_seed(0))

    loose = sparsegen.calibrate(pipe, "agent", max_rel_error=10.0, agent_cell=(1, 2, 2), **kw())
    assert isinstance(loose, AgentConfig) and loose.layers == (0, 1, 2) and loose.agent_cell == (1, 2, 2)
    errors = loose.layer_errors
    assert len(errors) == 3 and all(0 < e < 10 for e in errors)
    bound = sorted(errors)[1]
    chosen = sparsegen.calibrate(pipe, "agent", max_rel_error=bound, agent_cell=(1, 2, 2), **kw())
    assert chosen.layers == tuple(i for i, e in enumerate(errors) if e <= bound) and len(chosen.layers) == 2
    with sparsegen.apply(pipe, chosen) as handle:
        run_wan(pipe, **WAN_RUN)
        stats = handle.step_stats
    assert int(stats[0]["sparse_calls"]) == 2 and int(stats[0]["dense_calls"]) == 1


def test_bad_agent_options_say_what_to_do():
    with pytest.raises(ValueError, match="agent_cell"):
        AgentConfig(agent_cell=(1, 0, 4))
    with pytest.raises(ValueError, match="agent_steps"):
        AgentConfig(agent_steps=1.5)
    with pytest.raises(ValueError, match="quant"):
        AgentConfig(quant="int4")
    with pytest.raises(ValueError, match="at most half the tokens"):
        AgentConfig(agent_cell=(1, 1, 1)).make_method().check_geometry(
            sparsegen.methods.AttentionGeometry(2, 4, 4))
    with pytest.raises(ValueError, match="agent attention is self-attention"):
        agent_attention(torch.zeros(1, 4, 1, 8), torch.zeros(1, 5, 1, 8), torch.zeros(1, 5, 1, 8),
                        torch.zeros(1, 1, 1, 8))
