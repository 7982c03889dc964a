"""Smoke test of evals/bench_attention.py at a tiny size: outputs and schema, never timings."""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "evals", "bench_attention.py")

# Compiled FlexAttention is left out: a cold torch.compile takes longer than this test's budget.
TINY = ["--seq-lens", "512", "--head-dims", "32", "--densities", "0.5", "--block-size", "64", "--heads", "2",
        "--repeats", "1", "--methods", "dense_sdpa,torch,torch_e2e"]


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args, "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(TINY, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_writes_csv_with_schema(tiny_run):
    import bench_attention
    out, _ = tiny_run
    with open(out / "bench_attention.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert header == bench_attention.CSV_COLUMNS
    for col in ("method", "mask_kind", "seq_len", "heads", "head_dim", "density", "seconds", "ratio_to_dense",
                "ideal_ratio", "model_h100_bf16_speedup", "model_a100_bf16_speedup"):
        assert col in header
    methods_by_kind = {}
    for r in rows:
        methods_by_kind.setdefault(r["mask_kind"], set()).add(r["method"])
    assert methods_by_kind == {
        "dense": {"dense_sdpa"}, "random": {"torch"}, "radial": {"torch"},
        "gna": {"torch", "torch_e2e"}, "vmoba": {"torch", "torch_e2e"}, "agent": {"torch"},
    }
    dense = [r for r in rows if r["method"] == "dense_sdpa"]
    assert len(dense) == 1 and float(dense[0]["model_h100_bf16_speedup"]) == 1.0
    for r in rows:
        assert (int(r["seq_len"]), int(r["heads"]), int(r["head_dim"]), r["dtype"]) == (512, 2, 32, "float32")
        secs, dense_s = float(r["seconds"]), float(r["dense_seconds"])
        assert secs > 0 and dense_s == float(dense[0]["seconds"])
        assert math.isclose(float(r["ratio_to_dense"]), secs / dense_s, rel_tol=1e-9)
        assert 0 < float(r["density"]) <= 1
        assert float(r["ideal_ratio"]) == float(r["density"])
        assert float(r["seconds_min"]) <= secs <= float(r["seconds_max"])
        for arch in ("h100", "a100"):
            assert float(r[f"model_{arch}_bf16_seconds"]) > 0
            assert float(r[f"model_{arch}_bf16_speedup"]) <= 1 / float(r["density"]) + 1e-9
        if r["method"] == "torch":
            assert math.isclose(float(r["target_ratio"]), 1.5 * float(r["density"]), rel_tol=1e-9)
            assert r["meets_target"] in ("True", "False")
        assert r["load_1m_start"] != "" and r["torch_version"] != ""


def test_writes_png_and_summary(tiny_run):
    out, proc = tiny_run
    png = out / "bench_attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert "| kind | S | d | density |" in proc.stdout
    md = (out / "bench_attention.md").read_text()
    assert "Command: `python evals/bench_attention.py --seq-lens 512" in md
    assert "GPU time **model**" in md and "| random | 512 | 2 | 32 |" in md


def test_rejects_bad_flags(tmp_path):
    proc = _run(["--densities", "0,0.5"], tmp_path)
    assert proc.returncode == 2
    assert "--densities must be in (0, 1], got [0.0]" in proc.stderr
    proc = _run(["--kinds", "random,banded"], tmp_path)
    assert proc.returncode == 2
    assert "unknown ['banded']; choose from random,radial,gna,vmoba" in proc.stderr
