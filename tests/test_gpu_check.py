"""The ahead-of-time GPU gate: a representative subset of the shipped builds, checked like the full gate.

The full gate is the command ``python -m sparsegen.kernels.gpu_check`` (every build of
every architecture, int64 variants included: over a thousand compiles, about half an hour
on 2 cores with a cold cache; its report is kept in evals/results/engine/gpu_check.json).
This unit test compiles a subset that covers each kernel, each architecture family,
both mask blocks, the INT8 modes, the split-head-dim layout, an int64-stride and a
no-dLSE specialization, with their reference dense kernels (about a minute cold), and
checks the report independently of the gate's own verdict. Deliberately bad builds must
be reported as failing, so the gate can fail.

Compiled kernels land in Triton's cache (keyed by kernel source, signature and
options): a rerun with unchanged kernels reads the cached cubins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsegen.kernels import gate_clocks, gpu_check, tuning

_KEYS = {
    "name": str, "arch": int, "kernel": str, "dtype": str, "head_dim": int, "quant": str, "mask_block": int,
    "block_m": int, "block_n": int, "partial_block": int, "num_warps": int, "num_stages": int,
    "int64_strides": bool, "has_dlse": bool, "compiled": bool, "error": str, "tensor_core": list,
    "spill_bytes": int, "local_memory_instructions": int, "shared_bytes": int, "shared_limit": int,
    "registers": int, "ctas_per_sm": int, "mma_loops": list, "loop_instructions": int,
    "issue_clocks_per_unit": float, "partial_issue_clocks_per_unit": float, "mma_clocks_per_unit": float,
    "replicated_mma": bool, "cross_warp_rows": bool, "reference_issue_clocks_per_unit": float,
    "issue_ratio": float, "issue_ratio_limit": float, "issue_ratio_exception": str, "loads_in_flight": list,
    "outputs": int, "problems": list, "passed": bool,
}
_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _subset() -> list[tuning.ShippedConfig]:
    """One build per kernel family and architecture class, picked from the shipped list by name."""
    want = [
        dict(kernel="fwd", arch=90, dtype=torch.bfloat16, head_dim=128, mask_block=128),
        dict(kernel="fwd", arch=90, dtype=torch.float16, head_dim=64, mask_block=64),
        dict(kernel="fwd", arch=80, dtype=torch.bfloat16, head_dim=128, mask_block=64),   # SPLIT_D halves
        dict(kernel="fwd", arch=89, dtype=torch.float32, head_dim=96, mask_block=128),
        dict(kernel="fwd_quant", arch=90, dtype=torch.bfloat16, head_dim=128, mask_block=128, pv_int8=False),
        dict(kernel="fwd_quant", arch=86, dtype=torch.float16, head_dim=72, mask_block=128, pv_int8=True),
        dict(kernel="bwd_dkdv", arch=90, dtype=torch.bfloat16, head_dim=128, mask_block=128, int64_strides=True),
        dict(kernel="bwd_dq", arch=80, dtype=torch.float16, head_dim=96, mask_block=64),
        dict(kernel="bwd_preprocess", arch=89, dtype=torch.float32, head_dim=128, has_dlse=False),
    ]
    shipped = list(tuning.shipped_configurations())
    picked = []
    for w in want:
        w = {"pv_int8": False, "int64_strides": False, "has_dlse": True, **w}
        match = [c for c in shipped if all(getattr(c, k) == v for k, v in w.items())]
        assert len(match) == 1, (w, [c.name for c in match])
        picked += match
    return picked


@pytest.fixture(scope="module")
def subset_report():
    """The gate on the subset, as CI runs it: worker processes, while TRITON_INTERPRET=1 stays set here."""
    cfgs = _subset()
    return cfgs, gpu_check.check_builds(cfgs, jobs=2)


def _recheck(r: dict) -> None:
    """The gate's verdict, re-derived from the raw numbers of one build."""
    what = f"{r['name']} sm_{r['arch']}"
    assert r["compiled"] and not r["error"], what
    assert r["spill_bytes"] == 0 and r["local_memory_instructions"] == 0, what
    assert 0 < r["registers"] <= 255 and r["ctas_per_sm"] >= 1, what
    assert r["shared_bytes"] <= tuning.SHARED_MEMORY_LIMIT[r["arch"]], what
    assert not r["replicated_mma"], what
    tc = set(r["tensor_core"])
    hopper, quant = r["arch"] == 90, r["quant"] != "none"
    kernel = r["kernel"].removeprefix("reference_")
    if kernel == "bwd_preprocess":
        return
    if hopper and r["dtype"] != "fp32":
        assert ("IGMMA" in tc) if quant else ("HGMMA" in tc), f"{what}: no warpgroup MMA: {tc}"
        if r["quant"] == "pv-half":
            assert "HGMMA" in tc, f"{what}: {tc}"
    else:
        assert tc & ({"IMMA", "IGMMA"} if quant else {"HMMA", "HGMMA"}), f"{what}: {tc}"
    assert r["loop_instructions"] > 0 and r["mma_loops"][0] == r["loop_instructions"], what
    if kernel in ("bwd_dq", "bwd_dkdv"):
        assert r["loads_in_flight"] and min(r["loads_in_flight"]) >= 1, f"{what}: loads not in flight"
    units = r["block_m"] * r["block_n"] / 4096
    assert r["issue_clocks_per_unit"] == pytest.approx(r["loop_instructions"] * r["num_warps"] / 4 / units, abs=0.1)
    if r["kernel"] in ("fwd", "fwd_quant"):
        assert not r["cross_warp_rows"], what
        assert len(r["mma_loops"]) == 2, f"{what}: expected a full-block and a partial-block loop: {r['mma_loops']}"
        assert r["reference_issue_clocks_per_unit"] > 0, what
        limit, reason = gpu_check.issue_ratio_limit(r["arch"], r["kernel"], r["quant"], r["dtype"], r["head_dim"],
                                                    r["mask_block"])
        assert (limit, reason) == (r["issue_ratio_limit"], r["issue_ratio_exception"]), what
        assert limit == gpu_check.MAX_ISSUE_RATIO or reason, f"{what}: a raised limit needs its reason"
        assert r["issue_clocks_per_unit"] <= limit * r["reference_issue_clocks_per_unit"], what
        assert all(n >= 1 for n in r["loads_in_flight"]) and len(r["loads_in_flight"]) == 2, what


def test_subset_passes_and_report_is_complete(subset_report):
    cfgs, results = subset_report
    report = [json.loads(json.dumps(gpu_check.asdict(r))) for r in results]
    assert [r["name"] for r in report[:len(cfgs)]] == [c.name for c in cfgs]
    refs = report[len(cfgs):]
    # One yardstick per forward build's (arch, kind, dtype, head dim, quant mode).
    forward_keys = {(c.arch, c.kernel, c.dtype, c.head_dim, c.pv_int8) for c in cfgs if c.kernel.startswith("fwd")}
    assert len(refs) == len(forward_keys) == 6 and all(r["kernel"].startswith("reference_fwd") for r in refs)
    for r in report:
        for key, typ in _KEYS.items():
            assert isinstance(r[key], typ), f"{r['name']} sm_{r['arch']}: {key}={r[key]!r} is not {typ.__name__}"
        _recheck(r)
        assert r["passed"] and not r["problems"], (r["name"], r["arch"], r["problems"])


def test_subset_matches_the_time_models_clock_table(subset_report):
    """gate_clocks.py (the time model's input) holds what the kernels compile to today."""
    _, results = subset_report
    fresh = gpu_check.clocks_table(results)
    assert fresh, "no forward builds in the subset"
    for key, value in fresh.items():
        assert gate_clocks.CLOCKS.get(key) == value, (
            f"{key}: gate_clocks.py has {gate_clocks.CLOCKS.get(key)}, the kernels compile to {value}; regenerate it "
            f"with `{gpu_check.CLOCKS_COMMAND}`")


def test_shipped_configurations_cover_every_specialization():
    """Without compiling: every arch, kernel, dtype, head dim, mask block and variant the launchers can pick."""
    cfgs = list(tuning.shipped_configurations())
    assert {c.arch for c in cfgs} == set(tuning.GATE_ARCHS) == {80, 86, 89, 90}
    names = {(c.name, c.arch) for c in cfgs}
    assert len(names) == len(cfgs)
    for arch in tuning.GATE_ARCHS:
        for kernel in tuning.KERNELS:
            got = [c for c in cfgs if c.arch == arch and c.kernel == kernel]
            assert {c.dtype for c in got} == set(tuning.SHIPPED_DTYPES)
            assert {c.head_dim for c in got} == set(tuning.SHIPPED_HEAD_DIMS)
            assert {c.int64_strides for c in got} == {False, True}
            if kernel == "bwd_preprocess":
                assert {c.has_dlse for c in got} == {False, True}
            else:
                assert {c.mask_block for c in got} == set(tuning.GATED_MASK_BLOCKS)
            for c in got:
                # What the launcher selects for this mask block is what the gate compiles.
                assert c.tiles == tuning.config_for(kernel, arch, c.dtype, c.head_dim, q_block=c.mask_block,
                                                    kv_block=c.mask_block, pv_int8=c.pv_int8)
                if kernel != "bwd_preprocess":
                    assert c.tiles.owned(kernel) >= 16 * c.tiles.num_warps, c.name  # no replicated rows
                    assert c.mask_block % c.tiles.walked(kernel) == 0, c.name


def test_committed_full_gate_report_is_current_and_passing():
    """evals/results/engine/gpu_check.json is the full gate's output for today's tuning table."""
    path = Path(__file__).resolve().parents[1] / "evals" / "results" / "engine" / "gpu_check.json"
    report = json.loads(path.read_text())
    builds = {(r["name"], r["arch"]) for r in report if not r["kernel"].startswith("reference")}
    assert builds == {(c.name, c.arch) for c in tuning.shipped_configurations()}
    assert all(r["passed"] for r in report), [r["name"] for r in report if not r["passed"]][:10]


def test_bad_builds_are_reported_as_failing():
    """64-row tiles with 8 warps on sm_90 (two warpgroups on the same rows), an oversized tile on sm_86, row
    statistics across warps on sm_80."""
    replicated = tuning.ShippedConfig("fwd", 90, torch.float16, 64, False, tuning.TileConfig(64, 64, 8, 3), 64)
    oversized = tuning.ShippedConfig("fwd", 86, torch.float16, 128, False, tuning.TileConfig(128, 64, 8, 4), 128)
    # sm_80-class, 32 rows with 4 warps: warps side by side on the same rows.
    crossing = tuning.ShippedConfig("fwd", 80, torch.bfloat16, 128, False, tuning.TileConfig(32, 64, 4, 3), 64)
    r1, r2, r3 = gpu_check.check_builds([replicated, oversized, crossing], jobs=2, with_references=False)
    assert r1.compiled and r1.replicated_mma and not r1.passed
    assert any("replicated MMA" in p for p in r1.problems), r1.problems
    assert r2.compiled and not r2.passed and r2.shared_bytes > tuning.SHARED_MEMORY_LIMIT[86]
    assert any("shared memory" in p for p in r2.problems), r2.problems
    assert r3.compiled and r3.cross_warp_rows and not r3.replicated_mma and not r3.passed
    assert any("row statistics cross warps" in p for p in r3.problems), r3.problems


def test_cli_dump_writes_cubin_sass_and_ttgir(tmp_path, monkeypatch, capsys):
    cfg = [c for c in tuning.shipped_configurations((80,), int64_strides=False)
           if c.kernel == "bwd_preprocess" and c.head_dim == 64 and c.dtype == torch.float16 and c.has_dlse]
    monkeypatch.setattr(gpu_check.tuning, "shipped_configurations", lambda archs, int64_strides=True: cfg)
    assert gpu_check.main(["--arch", "80", "--dump", str(tmp_path), "--jobs", "1"]) == 0
    stem = f"{cfg[0].name}-sm80"
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.cubin", f"{stem}.sass", f"{stem}.ttgir"}
    assert "REG:" in (tmp_path / f"{stem}.sass").read_text() and "1/1 builds pass" in capsys.readouterr().out


def test_sass_loop_and_layout_parsers():
    sass = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0120*/                   FADD R2, R2, R3 ;
        /*0130*/              @!P0 BRA 0x110 ;
        /*0140*/                   IMMA.16832.S8.S8 R20, R8, R2, R20 ;
        /*0150*/              @!P0 STL [R1+0x4], R14 ;
        /*0160*/               @P1 BRA 0x140 ;
        /*0170*/                   BRA 0x170;
    """
    instrs = gpu_check.parse_sass(sass)
    assert [op for _, op, _ in instrs][:3] == ["MOV", "HMMA", "FADD"]
    assert gpu_check.parse_sass_opcodes(sass) == {"MOV": 1, "HMMA": 1, "FADD": 1, "BRA": 3, "IMMA": 1, "STL": 1}
    assert gpu_check.mma_loops(instrs) == [3, 3]  # 0x110-0x130 and 0x140-0x160; the self-loop has no MMA
    usage = gpu_check.parse_res_usage(
        " Function _bsa_fwd_kernel:\n  REG:168 STACK:24 SHARED:0 LOCAL:8 CONSTANT[0]:568 TEXTURE:0")
    assert usage == {"registers": 168, "stack": 24, "static_shared": 0, "local": 8}
    with pytest.raises(RuntimeError, match="no resource line"):
        gpu_check.parse_res_usage("garbage")
    ttgir = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 4], instrShape = [16, 8]}>
    %s = ttng.warp_group_dot %q, %k, %c {isAsync = true} : !ttg.memdesc<64x128xbf16> * !ttg.memdesc<128x64xbf16> -> tensor<64x64xf32, #mma>
    %t = tt.dot %a, %b, %c : tensor<64x16xf16, #x> * tensor<16x64xf16, #y> -> tensor<64x64xf32, #mma1>
    %r = tt.expand_dims %m {axis = 1 : i32} : tensor<64xf32> -> tensor<64x1xf32, #mma>
"""
    replicated, cross, layouts = gpu_check.replication(ttgir)
    assert replicated and cross and len(layouts) == 2  # 8 warps x 16 rows > 64 rows; [1, 4]: rows across warps
    ok = ttgir.replace("64x64xf32, #mma>", "128x64xf32, #mma>").replace("[1, 4]", "[4, 1]")
    assert gpu_check.replication(ok)[:2] == (False, False)  # the 64x1 expand_dims is not an accumulator


def test_occupancy_arithmetic():
    # 8 warps x 32 threads x 232 registers (rounded to 256-register warp allocations: 7424 per warp).
    assert gpu_check.ctas_per_sm(90, 232, 8, 100_000) == 1
    assert gpu_check.ctas_per_sm(90, 128, 8, 60_000) == 2      # registers allow 2, shared memory 3
    assert gpu_check.ctas_per_sm(86, 64, 4, 20_000) == 4       # shared memory (100 KB per SM) allows 4
    assert gpu_check.ctas_per_sm(80, 255, 8, 200_000) == 0

