"""`sparsegen generate` end to end on the built-in model (offline)."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from sparsegen import cli
from sparsegen.cli.generate import main as generate_main
from sparsegen.generate import method_config, psnr


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


def test_repeats_alternate_runs_and_report_medians(tmp_path, capsys):
    summary_path = tmp_path / "s.json"
    assert generate_main(["--steps", "2", "--frames", "9", "--out", str(tmp_path / "r.mp4"), "--compare-dense",
                          "--repeats", "3", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert len(summary["seconds_runs"]) == len(summary["dense_seconds_runs"]) == 3
    assert summary["seconds"] == pytest.approx(float(np.median(summary["seconds_runs"])))
    assert summary["dense_seconds"] == pytest.approx(float(np.median(summary["dense_seconds_runs"])))
    assert summary["speedup"] == pytest.approx(summary["dense_seconds"] / summary["seconds"])
    log = capsys.readouterr().out
    order = [line.split(" run")[0] for line in log.splitlines() if "run (run" in line]
    assert order == ["[sparsegen] dense", "[sparsegen] radial"] * 3, order
    assert "medians of alternating runs" in log
    with pytest.raises(SystemExit, match="repeats must be an int >= 1, got 0"):
        generate_main(["--steps", "1", "--repeats", "0", "--out", str(tmp_path / "x.mp4")])


def test_method_flags_come_from_the_config_fields_and_parse_by_type(capsys):
    parser = cli.build_parser(["generate", "--method", "radial"])
    args = parser.parse_args(["generate", "--decay-factor", "0.5", "--no-sink", "--dense-layers", "0,2",
                              "--backend", "torch"])
    from sparsegen.cli.options import config_options
    from sparsegen.methods.radial import RadialConfig

    assert config_options(args, RadialConfig) == {"decay_factor": 0.5, "sink": False, "dense_layers": (0, 2),
                                                  "backend": "torch"}
    # Only the chosen method's options exist; the same name is the same option in every command.
    with pytest.raises(SystemExit):
        cli.build_parser(["generate"]).parse_args(["generate", "--kernel-size", "3"])
    assert "unrecognized arguments: --kernel-size 3" in capsys.readouterr().err
    args = cli.build_parser(["generate", "--method", "gna"]).parse_args(
        ["generate", "--method", "gna", "--kernel-size", "3,5,5", "--is-causal", "1,0,0", "--tile", "none"])
    assert (args.kernel_size, args.is_causal, args.tile) == ((3, 5, 5), (True, False, False), None)
    with pytest.raises(SystemExit):
        cli.build_parser(["generate"]).parse_args(["generate", "--decay-factor", "fast"])
    assert "expected a number, got 'fast'" in capsys.readouterr().err


def test_presets_are_overridden_field_by_field_and_the_log_says_so():
    lines = []
    cfg = method_config("radial", preset="wan2.1", options={"dense_steps": 4}, log=lines.append)
    assert (cfg.decay_factor, cfg.dense_layers, cfg.dense_steps) == (0.2, 1, 4)
    assert lines == ["[sparsegen] radial: preset 'wan2.1' (decay_factor=0.2, dense_layers=1) and your dense_steps=4"]
    with pytest.raises(ValueError, match=r"method 'radial' has no preset 'mochi'; presets: \["):
        method_config("radial", preset="mochi")
    assert method_config("radial", log=lines.append) == method_config("radial", options={})


def test_built_in_model_named_preset_long():
    from sparsegen.toy.pipeline import NAMED_PRESETS, PRESETS

    lines = []
    cfg = method_config("gna", preset="long", options={"dense_steps": 0}, model_presets=PRESETS,
                        model_named_presets=NAMED_PRESETS, log=lines.append)
    assert (cfg.kernel_size, cfg.tile, cfg.block_size, cfg.dense_layers, cfg.dense_steps) == (
        (3, 8, 8), (1, 8, 8), 64, 0, 0)
    assert lines[0].startswith("[sparsegen] gna: the built-in model's preset 'long' (")
    with pytest.raises(ValueError, match=r"method 'radial' has no preset 'long'; presets: \[.*'wan2.1'"):
        method_config("radial", preset="long", model_named_presets=NAMED_PRESETS)
    with pytest.raises(ValueError, match=r"method 'gna' has no preset 'short'; presets: \[.*'long'"):
        method_config("gna", preset="short", model_named_presets=NAMED_PRESETS)


def test_quickstart_command_at_small_size(tmp_path):
    """The Quickstart's flags (gna, the built-in model's "long" preset, alternating runs) on 17 frames, 2 steps."""
    summary_path = tmp_path / "q.json"
    assert cli.main(["generate", "--method", "gna", "--preset", "long", "--frames", "17", "--steps", "2",
                     "--compare-dense", "--repeats", "2", "--out", str(tmp_path / "q.mp4"),
                     "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["kernel_size"] == [3, 8, 8] and summary["method"]["dense_steps"] == 1
    assert len(summary["seconds_runs"]) == len(summary["dense_seconds_runs"]) == 2 and summary["speedup"] > 0
    # 5 latent frames, each attending 3 whole frames (the window shifts at the ends): 15 of 25 blocks in the
    # sparse step; step 0 of each stage is dense.
    assert summary["step_density"] == pytest.approx([1.0, 0.6, 1.0, 0.6])
    assert 10 < summary["psnr_vs_dense"] < 80


def test_generate_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_main(["--bogus", "1", "--out", str(tmp_path / "x.mp4")])
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"outside the toy model.s vocabulary: \[.cat.*Use the grammar"):
        generate_main(["--prompt", "a cat on a sofa", "--steps", "1", "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit, match=r"RadialConfig.decay_factor=-1.0 is invalid"):
        generate_main(["--decay-factor", "-1", "--steps", "1", "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit, match="0"):
        generate_main(["--method", "vmoba", "--help"])
    assert "--top-k" in capsys.readouterr().out


def test_built_in_model_preset_with_a_user_option_overriding_one_field(tmp_path, capsys):
    from sparsegen.toy.pipeline import PRESETS

    summary_path = tmp_path / "s.json"
    assert generate_main(["--steps", "6", "--frames", "9", "--out", "", "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["block_size"] == PRESETS["radial"]["block_size"] == 64
    assert summary["method"]["dense_steps"] == 5
    assert summary["step_density"][:5] == [1.0] * 5 and summary["step_density"][5] < 1.0
    assert summary["step_density"][6:11] == [1.0] * 5 and summary["step_density"][11] < 1.0  # second stage
    # An option given overrides that field only: the rest of the model's preset stays.
    capsys.readouterr()
    assert generate_main(["--steps", "2", "--frames", "9", "--out", "", "--json", str(summary_path),
                          "--dense-steps", "1"]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["method"]["block_size"] == 64 and summary["method"]["dense_steps"] == 1
    assert "radial: the built-in model's preset (block_size=64) and your dense_steps=1" in capsys.readouterr().out
