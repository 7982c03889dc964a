"""Sparse attention under diffusers' native context parallelism (Ulysses), two CPU
processes over gloo: the same output as one process, forward and backward, on Wan
(video-only attention) and FLUX (joint attention: text and image shards interleave after
the all-to-all)."""

import json
import os
import socket
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "radial": dict(block_size=16, decay_factor=1.0),
    "gna": dict(kernel_size=(3, 5, 5), block_size=16),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(2, 3, 4)),
    "agent": dict(agent_cell=(1, 4, 4)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_vs_parallel(model, inputs, cases, world, kind="ulysses", backward=True) -> dict:
    """Per method: (max |output - one process|, max |summed input gradient - one process|
    (0 without ``backward``), density) of ``model`` under context parallelism of ``kind``
    ("ulysses" or "ring") over ``world`` ranks."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import sparsegen

    def run(name, options):
        options = dict(options)
        with sparsegen.apply(model, options.pop("method", name), **options) as handle:
            x = inputs["hidden_states"].clone().requires_grad_(backward)
            out = model(**{**inputs, "hidden_states": x})[0]
            if backward:
                out.square().sum().backward()
            return out.detach(), x.grad.detach() if backward else torch.zeros(()), handle.step_densities()[0][1]

    single = {name: run(name, options) for name, options in cases.items()}
    model.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": world}))
    results = {}
    for name, options in cases.items():
        out, grad, density = run(name, options)
        ref_out, ref_grad, _ = single[name]
        # Each rank's input gradient covers the work on its own shard (as with diffusers' dense
        # context parallelism): their sum is the one-process gradient.
        grad = grad.clone()
        dist.all_reduce(grad)
        results[name] = ((out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item(), density)
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # CPU only: diffusers' mesh setup divides by the device count
    from diffusers import ContextParallelConfig

    import sparsegen
    from tiny_models import tiny_wan_transformer

    torch.manual_seed(0)
    t = tiny_wan_transformer(layers=2)  # 2 heads: one per rank
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 5, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=torch.tensor([500]),
                  return_dict=False)
    from sparsegen.methods.paro import ParoPlan
    from sparsegen.reorder import ORDERS

    # A PARO plan with a different order and mask per head: each rank must take its own heads'.
    gp = torch.Generator().manual_seed(1)
    masks = (torch.rand(1, 2, 2, 20, 20, generator=gp) < 0.4) | torch.eye(20, dtype=torch.bool)
    plan = ParoPlan(model_class="WanTransformer3DModel", grid=(5, 8, 8), num_layers=2, num_heads=2, block_size=16,
                    orders=[[ORDERS[3], ORDERS[4]], [ORDERS[0], ORDERS[5]]], masks=masks, buckets=[(0.0, 1.0)],
                    calibration_steps=1, density=0.5)
    cases = {**CASES, "paro": dict(plan=plan)}
    results = _one_vs_parallel(t, inputs, cases, world)
    # FLUX: joint attention, text first; diffusers shards the text and the image tokens
    # separately, so the gathered sequence interleaves them per rank (the segment map's job).
    from tiny_models import tiny_transformer_and_inputs

    flux, flux_inputs = tiny_transformer_and_inputs("flux")
    flux_cases = {"dense": {}, "gna": dict(kernel_size=(1, 5, 5), block_size=16), "vmoba": CASES["vmoba"],
                  "agent": CASES["agent"]}
    results.update({f"flux-{name}": r for name, r in _one_vs_parallel(flux, flux_inputs, flux_cases, world).items()})
    # LTX-Video: video-only self-attention, the grid read from the forward's arguments. (Diffusers'
    # own Ulysses fails on LTX's text cross-attention, without sparsegen too: in the forward when
    # an encoder_attention_mask is passed, in the backward always; so: unmasked text, forward.)
    ltx, ltx_inputs = tiny_transformer_and_inputs("ltx_video")
    ltx_inputs = dict(ltx_inputs, encoder_hidden_states=ltx_inputs["encoder_hidden_states"][:, :4],
                      encoder_attention_mask=None)
    ltx_cases = {"dense": {}, "radial": CASES["radial"], "gna": CASES["gna"]}
    results.update({f"ltx-{name}": r for name, r in _one_vs_parallel(ltx, ltx_inputs, ltx_cases, world,
                                                                                 backward=False).items()})
    # PARO with uneven heads (0 and 1 visit every block, 2 and 3 only the diagonal): contiguous
    # slices put all the work on rank 0; balance_heads gives each rank one heavy, one light head.
    torch.manual_seed(0)
    t4 = tiny_wan_transformer(layers=1, heads=4)
    eye = torch.eye(20, dtype=torch.bool)
    uneven = torch.stack([torch.ones(20, 20, dtype=torch.bool)] * 2 + [eye] * 2)[None, None]
    plan4 = ParoPlan(model_class="WanTransformer3DModel", grid=(5, 8, 8), num_layers=1, num_heads=4, block_size=16,
                     orders=[["HWF", "FHW", "WHF", "FWH"]], masks=uneven, buckets=[(0.0, 1.0)], calibration_steps=1,
                     density=0.5)
    with sparsegen.apply(t4, "paro", plan=plan4):
        ref4 = t4(**inputs)[0]
    t4.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for balance in (False, True):
        with sparsegen.apply(t4, "paro", plan=plan4, balance_heads=balance) as handle:
            out4 = t4(**inputs)[0]
            stats = handle.parallel_stats[0]
        results[f"paro-balance-{balance}"] = [(out4 - ref4).abs().max().item(), stats["imbalance_contiguous"],
                                              stats["imbalance"], stats["heads_per_rank"]]
    # VMoBA selects its blocks per call, so its heads' work is known only after a call: the
    # ranks gather it on the device, and balance_heads gives the next call's heads from it.
    torch.manual_seed(0)
    t4v = tiny_wan_transformer(layers=1, heads=4)
    with torch.no_grad():  # heads 2, 3 get zero queries: equal block scores, so they visit every block
        to_q = t4v.blocks[0].attn1.to_q
        to_q.weight[to_q.weight.shape[0] // 2:] = 0
        to_q.bias[to_q.bias.shape[0] // 2:] = 0
    vmoba = dict(CASES["vmoba"], selection="threshold", threshold=0.3)
    with sparsegen.apply(t4v, "vmoba", **vmoba):
        ref4v = t4v(**inputs)[0]
    t4v.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with sparsegen.apply(t4v, "vmoba", balance_heads=True, **vmoba) as handle:
        for call in ("first", "second"):
            err = (t4v(**inputs)[0] - ref4v).abs().max().item()
            stats = {k: v.tolist() if torch.is_tensor(v) else v for k, v in handle.parallel_stats[0].items()}
            results[f"vmoba-balance-{call}"] = dict(stats, err=err)
    # Ring attention: each rank holds a query shard; static masks (radial, GNA) run the rank's
    # rows against the gathered keys. Methods that need the whole sequence are refused.
    torch.manual_seed(0)
    ring = tiny_wan_transformer(layers=2)
    # The first layer dense: a sparse method's dense calls under ring are served by sparsegen too
    # (diffusers' own ring needs an attention backend that returns the LSE; native does not).
    ring_cases = {"radial": CASES["radial"], "gna": CASES["gna"], "gna-dense-layer": dict(CASES["gna"], method="gna", dense_layers=1)}
    results.update({f"ring-{name}": r for name, r in _one_vs_parallel(ring, inputs, ring_cases, world, "ring").items()})
    with sparsegen.apply(ring, "gna", **CASES["gna"]) as handle:
        ring(**inputs)
        results["ring-stats"] = handle.parallel_stats[1]
    with sparsegen.apply(ring, "vmoba", **CASES["vmoba"]):
        try:
            ring(**inputs)
            results["ring-vmoba"] = "ran"
        except ValueError as e:
            results["ring-vmoba"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_ulysses_and_ring_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    from sparsegen.methods.base import AttentionGeometry
    from sparsegen.parallel import greedy_head_assignment
    from sparsegen.patching import make_config

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "'vmoba' cannot run under ring attention" in results.pop("ring-vmoba")
        err, contiguous, imbalance, heads = results.pop("paro-balance-False")
        assert err <= 1e-5 and contiguous == imbalance > 1.8 and heads == [[0, 1], [2, 3]]
        err, contiguous, imbalance, heads = results.pop("paro-balance-True")
        assert err <= 1e-5 and contiguous > 1.8 and imbalance == 1.0 and heads == [[0, 2], [1, 3]]
        first, second = results.pop("vmoba-balance-first"), results.pop("vmoba-balance-second")
        assert first["err"] <= 1e-5 and second["err"] <= 1e-5, (first, second)
        assert first["heads_per_rank"] == [[0, 1], [2, 3]]  # no earlier call: contiguous slices
        assert first["imbalance"] == first["imbalance_contiguous"] > 1.0
        assert second["head_work"] == first["head_work"]  # the same inputs select the same blocks
        assert second["heads_per_rank"] == greedy_head_assignment(first["head_work"], 2) != [[0, 1], [2, 3]]
        assert first["imbalance_contiguous"] > 1.2 and second["imbalance"] < 1.05, (first, second)
        ring_stats = results.pop("ring-stats")
        gna = make_config("gna", **CASES["gna"]).make_method()
        work = gna.shard_work(AttentionGeometry(5, 8, 8), 2)
        assert ring_stats == {"transformer": 0, "ranks": 2, "rank_blocks": work,
                              "imbalance": max(work) * 2 / sum(work)}
        assert set(results) == {*CASES, "paro", "flux-dense", "flux-gna", "flux-vmoba", "flux-agent",
                                "ltx-dense", "ltx-radial", "ltx-gna",
                                "ring-radial", "ring-gna", "ring-gna-dense-layer"}
        for name, (out_err, grad_err, density) in results.items():
            assert out_err <= 1e-5, (rank, name, out_err)
            assert grad_err <= 1e-4, (rank, name, grad_err)
            assert density == 1.0 if name.endswith("dense") else 0 < density < 1, (rank, name, density)


def _example_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import importlib.util

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # CPU only: diffusers' mesh setup divides by the device count
    spec = importlib.util.spec_from_file_location("context_parallel_example",
                                                  os.path.join(HERE, "..", "examples", "context_parallel.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    statuses = [example.main(["--method", method, "--frames", "9", "--steps", "2", "--dense-steps", "1", "--check"])
                for method in ("radial", "gna", "vmoba")]
    statuses.append(example.main(["--method", "radial", "--frames", "9", "--steps", "1", "--check", "--atol", "-1"]))
    with open(os.path.join(out_dir, f"example{rank}.json"), "w") as f:
        json.dump(statuses, f)
    dist.destroy_process_group()


def test_the_example_runs_on_two_processes_and_its_check_fails_on_mismatch(tmp_path, capfd):
    import torch.multiprocessing as mp

    mp.spawn(_example_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    printed = capfd.readouterr().out
    for rank in range(2):
        # radial, GNA and VMoBA agree with one process; an impossible tolerance (-1) must report a mismatch.
        assert json.loads((tmp_path / f"example{rank}.json").read_text()) == [0, 0, 0, 1], printed
    assert "MISMATCH" in printed
    for method in ("radial", "gna", "vmoba"):
        assert f"{method} with Ulysses x2 vs one process" in printed
        # Sparse after its first step (a check of dense steps only would prove nothing).
        densities = printed.split(f"{method}: 9 frames, 2 steps on 2 processes; per-step attention density ")[1]
        densities = densities.split("\n")[0]
        assert densities.startswith("[1.0, ") and 0 < float(densities.strip("[]").split(", ")[1]) < 1, densities
