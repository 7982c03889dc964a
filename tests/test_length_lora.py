"""evals/length_lora.py --quick: two LoRAs of 2 steps at 33 frames (sparse- and dense-trained),
evaluated in the four variants; the page, JSON, CSV and model cards it writes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("dense", "sparse", "sparse + LoRA", "dense + LoRA")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("length_lora")
    cmd = [sys.executable, str(REPO / "evals" / "length_lora.py"), "--quick", "--out", str(tmp / "loras"),
           "--eval-dir", str(tmp / "eval"), "--results", str(tmp / "page.md"),
           "--threads", str(torch.get_num_threads())]  # as many threads as this test session uses
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The markdown table under ``heading``: {first cell: the other cells}."""
    after = text.split(heading, 1)[1]
    rows = {}
    for line in after.split("\n")[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[1:]
    return rows


def _finite(cell: str) -> float:
    """A cell holding a number, or 'hits/prompts (share)': the number (the share)."""
    m = re.fullmatch(r"(\d+)/(\d+) \((\S+)\)", cell)
    text = m.group(3) if m else cell
    assert NUMBER.match(text), f"not a number: {cell!r}"
    value = float(text)
    assert math.isfinite(value)
    return value


def test_page_has_every_variant_with_finite_numbers(quick):
    text = (quick / "page.md").read_text()
    assert text.startswith("# Length extension on the built-in model")
    command = text.split("Produced by:", 1)[1].split("```")[1].strip()
    assert command.startswith("python evals/length_lora.py --quick --out ")
    assert "## 33 frames (2x; 9 latent frames, 576 tokens)" in text

    denoising = _table(text, "### One-call denoising (PSNR, dB)")
    assert list(denoising) == ["variant", *VARIANTS]
    assert denoising["variant"] == ["sigma 0.5"]
    assert all(5.0 < _finite(denoising[v][0]) < 60.0 for v in VARIANTS)

    sampled = _table(text, "### Sampled videos: prompt following and temporal consistency")
    assert list(sampled) == ["variant", *VARIANTS, "generator"]
    for variant in VARIANTS:
        values = [_finite(c) for c in sampled[variant]]
        assert all(0.0 <= v <= 1.0 for v in values[:4]), (variant, values)  # shares of prompts and of frames
        assert values[4] >= 0.0 and values[5] > 0.0  # jitter (px), seconds per video
        density = values[6]
        assert (density == 1.0) if variant.startswith("dense") else (0.0 < density < 1.0), (variant, density)
    # The generator's own 33-frame videos, read back: the ceiling of every check.
    assert sampled["generator"][:4] == ["2/2 (1.00)", "2/2 (1.00)", "1.00", "1.00"]
    assert _finite(sampled["generator"][4]) < 0.5 and sampled["generator"][5:] == ["-", "-"]

    times = _table(text, "### Time (this run)")
    for row in ("training step, s (median)", "generation without LoRA, s / video (median)",
                "generation with LoRA, s / video (median)"):
        assert all(_finite(c) > 0.0 for c in times[row]), (row, times[row])

    loras = _table(text, "| LoRA | trained with |")
    assert [cells[0] for cells in loras.values()] == ["sparse attention", "dense attention"]
    assert all(cells[1] == "2" for cells in loras.values())
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (quick / link).stat().st_size > 1000, link


def test_variants_differ_as_they_should_and_outputs_are_complete(quick):
    result = json.loads((quick / "eval" / "length_lora.json").read_text())
    assert result["quick"] and [r["frames"] for r in result["lengths"]] == [33]
    r = result["lengths"][0]
    per_video = {v: r["denoising"][v]["0.5"]["per_video"] for v in VARIANTS}
    assert all(len(p) == 2 and all(math.isfinite(x) for x in p) for p in per_video.values())
    # Each variant is what it says: the mask changes the prediction, and so does each LoRA.
    assert per_video["sparse"] != per_video["dense"]
    assert per_video["sparse + LoRA"] != per_video["sparse"]
    assert per_video["dense + LoRA"] != per_video["dense"]
    assert r["sparse_config"]["method"] == "radial" and r["sparse_config"]["decimation_unit"] == 16
    assert r["sparse_config"]["block_size"] == 16 and r["sparse_config"]["dense_layers"] == 2
    t = r["training_step_seconds"]
    assert len(t["dense"]) == len(t["sparse"]) == result["settings"]["timing_steps"]
    assert t["sparse_over_dense"] == pytest.approx(t["median_sparse"] / t["median_dense"])
    for variant in VARIANTS:
        s = r["sampled"][variant]
        assert len(s["seconds_per_video"]) == 2 and s["median_seconds_per_video"] > 0
    load = result["load_average"]
    assert math.isfinite(load["start"]) and math.isfinite(load["end"])
    assert len(load["warnings"]) == (load["start"] > 1.2) + (load["end"] > 1.2)
    header = (quick / "eval" / "length_lora.csv").read_text().split("\n", 1)[0]
    assert header == "section,variant,frames,key,metric,value,sparsegen,torch"

    for name, attention in (("len33", "sparse"), ("len33-dense", "dense")):
        folder = quick / "loras" / name
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and not (folder / "checkpoints").exists()
        recipe = json.loads((folder / "sparsegen_recipe.json").read_text())
        assert recipe["trained_attention"] == attention and recipe["frames"] == 33
        assert recipe["lora"]["rank"] == 16
        card = (folder / "README.md").read_text()
        assert "python evals/length_lora.py --quick" in card and "| steps | 2 (batch 1: 2 videos) |" in card
        assert (folder / "loss_curve.png").stat().st_size > 1000
        sessions = json.loads((folder / "training_sessions.json").read_text())
        assert [(s["steps_from"], s["steps_to"]) for s in sessions] == [(0, 2)]
