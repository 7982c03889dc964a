"""The ahead-of-time GPU gate: every shipped kernel build compiles for sm_80 and sm_90 cleanly.

``python -m sparsegen.kernels.gpu_check --json`` compiles all shipped configurations
(no subset) on the CPU and reads their SASS; this test runs it as CI would and checks
the report independently of the gate's own verdict. A deliberately oversized build
must be reported as failing, so the gate can fail.

Compiled kernels land in Triton's cache (keyed by kernel source, signature and
options): a rerun with unchanged kernels reads the cached cubins instead of recompiling,
and any change to a kernel or the table compiles afresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sparsegen.kernels import gpu_check, tuning

_KEYS = {
    "name": str, "arch": int, "kernel": str, "dtype": str, "head_dim": int, "quant": str,
    "block_m": int, "block_n": int, "num_warps": int, "num_stages": int,
    "compiled": bool, "error": str, "tensor_core": list, "spill_bytes": int, "local_memory_instructions": int,
    "shared_bytes": int, "shared_limit": int, "registers": int, "problems": list, "passed": bool,
}


@pytest.fixture(scope="module")
def gate_report():
    """Run the CLI once (as CI does). TRITON_INTERPRET=1 stays set: the gate must cope with it."""
    proc = subprocess.run([sys.executable, "-m", "sparsegen.kernels.gpu_check", "--json"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=1200)
    return proc


def test_gate_compiles_every_shipped_configuration_cleanly(gate_report):
    assert gate_report.returncode == 0, (
        f"gate failed (exit {gate_report.returncode}):\n{gate_report.stdout[-3000:]}\n{gate_report.stderr[-3000:]}")
    report = json.loads(gate_report.stdout)
    expected = {(c.name, c.arch) for c in tuning.shipped_configurations()}
    assert {(r["name"], r["arch"]) for r in report} == expected and len(report) == len(expected)
    assert {r["arch"] for r in report} == set(tuning.GATE_ARCHS)
    for r in report:
        for key, typ in _KEYS.items():
            assert isinstance(r[key], typ), f"{r['name']} sm_{r['arch']}: {key}={r[key]!r} is not {typ.__name__}"
        what = f"{r['name']} sm_{r['arch']}"
        # Re-check the verdict from the raw numbers rather than trusting "passed".
        assert r["compiled"] and not r["error"], what
        assert r["spill_bytes"] == 0 and r["local_memory_instructions"] == 0, what
        assert 0 < r["registers"] <= 255, what
        assert r["shared_bytes"] <= tuning.SHARED_MEMORY_LIMIT[r["arch"]], what
        half_mma = {"HMMA", "HGMMA"} & set(r["tensor_core"])
        int_mma = {"IMMA", "IGMMA"} & set(r["tensor_core"])
        if r["kernel"] == "fwd_quant":
            assert int_mma, f"{what}: INT8 Q·K without IMMA/IGMMA: {r['tensor_core']}"
            if r["quant"] == "pv-half":
                assert half_mma, f"{what}: half P·V without HMMA/HGMMA: {r['tensor_core']}"
        elif r["kernel"] != "bwd_preprocess":   # the preprocess has no matrix product
            assert half_mma, f"{what}: no HMMA/HGMMA: {r['tensor_core']}"
        assert r["passed"] and not r["problems"], what


def test_readable_table_without_json():
    """The table form, on one cheap build (the preprocess kernel) per arch."""
    cfgs = [c for c in tuning.shipped_configurations() if c.kernel == "bwd_preprocess" and c.head_dim == 64
            and c.dtype == torch.float16]
    text = gpu_check._table(gpu_check.check_builds(cfgs, jobs=1))
    assert "bwd_preprocess-fp16-d64" in text and f"{len(cfgs)}/{len(cfgs)} builds pass" in text


def test_oversized_tile_is_reported_as_failing(monkeypatch, capsys):
    """128 x 128 tiles at head dim 128 with 4 stages on sm_80: over the shared-memory limit and spilling."""
    bad = tuning.ShippedConfig("fwd", 80, torch.float16, 128, False, tuning.TileConfig(128, 128, 4, 4))
    monkeypatch.setattr(gpu_check.tuning, "shipped_configurations", lambda archs=tuning.GATE_ARCHS: [bad])
    assert gpu_check.main(["--json", "--arch", "80"]) == 1
    (r,) = json.loads(capsys.readouterr().out)
    assert r["compiled"] and not r["passed"]
    assert r["shared_bytes"] > tuning.SHARED_MEMORY_LIMIT[80] or r["spill_bytes"] > 0
    assert any("shared memory" in p or "spills" in p for p in r["problems"]), r["problems"]


def test_sass_and_resource_parsers():
    sass = """
        /*0c40*/                   HMMA.16816.F32 R4, R8, R12, R4 ;     /* 0x0000000c0804723c */
        /*0c50*/              @!P0 STL [R1+0x4], R14 ;                 /* 0x0000040e01008387 */
        /*0c60*/                   IMMA.16832.S8.S8 R20, R8, R2, R20 ;   /* 0x000000020814747c */
        /*0c70*/                   HMMA.16816.F32 R6, R8, R14, R6 ;     /* 0x0000000e0806723c */
    """
    ops = gpu_check.parse_sass_opcodes(sass)
    assert ops == {"HMMA": 2, "STL": 1, "IMMA": 1}
    usage = gpu_check.parse_res_usage(
        " Function _bsa_fwd_kernel:\n  REG:168 STACK:24 SHARED:0 LOCAL:8 CONSTANT[0]:568 TEXTURE:0")
    assert usage == {"registers": 168, "stack": 24, "static_shared": 0, "local": 8}
    with pytest.raises(RuntimeError, match="no resource line"):
        gpu_check.parse_res_usage("garbage")
