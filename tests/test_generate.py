"""`sparsegen generate` end to end on the built-in model (offline)."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from sparsegen import cli
from sparsegen.generate import main as generate_main
from sparsegen.generate import method_options_from_argv, psnr


def test_generate_compare_dense_writes_videos_and_summary(tmp_path):
    out, summary_path = tmp_path / "demo.mp4", tmp_path / "summary.json"
    code = cli.main(["generate", "--steps", "3", "--seed", "1", "--out", str(out), "--compare-dense",
                     "--json", str(summary_path), "--block-size", "64", "--dense-steps", "1"])
    assert code == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["method"] == "radial" and summary["method"]["block_size"] == 64
    frames = iio.imread(out)
    side = iio.imread(tmp_path / "demo_vs_dense.mp4")
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8
    assert side.shape == (17, 32, 64, 3)
    # The built-in model samples in two stages of 3 steps: every step is timed, and each
    # stage's step 0 is dense by the schedule while its later steps run the radial mask
    # (sparse at 5 x 64 tokens).
    assert len(summary["step_seconds"]) == 6 and all(s > 0 for s in summary["step_seconds"])
    assert len(summary["step_density"]) == 6
    for stage in (summary["step_density"][:3], summary["step_density"][3:]):
        assert stage[0] == 1.0 and all(0.0 < d < 1.0 for d in stage[1:])
    assert summary["speedup"] == pytest.approx(summary["dense_seconds"] / summary["seconds"], rel=1e-12)
    assert summary["seconds"] >= sum(summary["step_seconds"]) * (1 - 1e-9)
    assert np.isfinite(summary["psnr_vs_dense"]) and summary["psnr_vs_dense"] > 10
    # The left half of the side-by-side video is the dense run, the right half the sparse one.
    assert psnr(side[:, :, 32:].astype(np.float32) / 255, frames.astype(np.float32) / 255) > 40


def test_generate_dense_method_equals_dense_run(tmp_path):
    summary_path = tmp_path / "s.json"
    assert generate_main(["--method", "dense", "--steps", "2", "--frames", "9", "--out", str(tmp_path / "d.mp4"),
                          "--compare-dense", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["psnr_vs_dense"] == float("inf") or summary["psnr_vs_dense"] > 80
    assert summary["step_density"] == [1.0] * 4  # two stages of 2 steps


def test_method_options_are_parsed_by_type_and_unknown_ones_listed():
    assert method_options_from_argv("radial", ["--decay-factor", "0.5", "--sink=false"]) == {
        "decay_factor": 0.5, "sink": False}
    assert method_options_from_argv("radial", ["--dense-layers", "0,2"]) == {"dense_layers": (0, 2)}
    with pytest.raises(ValueError, match=r"method 'radial' has no option --kernel-size; its options are: .*--decay-factor"):
        method_options_from_argv("radial", ["--kernel-size", "3"])
    with pytest.raises(ValueError, match=r"--decay-factor needs a value"):
        method_options_from_argv("radial", ["--decay-factor"])


def test_generate_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"has no option --bogus"):
        generate_main(["--bogus", "1", "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit, match=r"outside the toy model.s vocabulary: \[.cat.*Use the grammar"):
        generate_main(["--prompt", "a cat on a sofa", "--steps", "1", "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(ValueError, match=r"decay_factor"):
        generate_main(["--decay-factor", "-1", "--steps", "1", "--out", str(tmp_path / "x.mp4")])
    assert generate_main(["--method", "radial", "--help-method"]) == 0
    assert "--decay-factor" in capsys.readouterr().out


def test_built_in_model_gets_its_method_options_unless_the_user_gives_any(tmp_path):
    from sparsegen.toy.pipeline import RECOMMENDED_METHOD_OPTIONS

    summary_path = tmp_path / "s.json"
    assert generate_main(["--steps", "6", "--frames", "9", "--out", "", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["block_size"] == RECOMMENDED_METHOD_OPTIONS["radial"]["block_size"] == 64
    assert summary["method"]["dense_steps"] == 5
    assert summary["step_density"][:5] == [1.0] * 5 and summary["step_density"][5] < 1.0
    assert summary["step_density"][6:11] == [1.0] * 5 and summary["step_density"][11] < 1.0  # second stage
    # Any option given replaces the whole recommended set: the method's own defaults apply.
    assert generate_main(["--steps", "2", "--frames", "9", "--out", "", "--json", str(summary_path),
                          "--decay-factor", "0.5"]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["block_size"] == 128 and summary["method"]["dense_steps"] == 0
