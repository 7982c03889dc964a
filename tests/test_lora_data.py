"""LoRA training data: a folder of captioned mp4s (written here with imageio), the on-disk
cache, and the errors bad data gets (each naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from sparsegen.lora.data import CachedSet, decode_video, prepare_data, read_video_folder
from sparsegen.lora.train import TrainLoraConfig, train_lora
from sparsegen.toy import pipeline as toy

CAPTIONS = ["a red circle moving right over a striped background", "two blue squares moving up over a plain background",
            "a green triangle moving left over a dotted background"]
COLOURS = [(200, 40, 40), (40, 60, 220), (40, 190, 70)]  # RGB, one solid colour per video


def write_mp4(path: Path, *, frames: int, height: int, width: int, colour=(128, 128, 128)) -> Path:
    """A solid-colour video with a white square moving right (so frames differ)."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = colour
    for f in range(frames):
        video[f, 4:10, 2 + f:8 + f] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(video), fps=8, codec="libx264", quality=9, macro_block_size=1,
                     ffmpeg_log_level="error")
    return path


def write_folder(root: Path, rows: list[tuple[str, str]], *, kind: str = "csv",
                 columns=("path", "caption")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if kind == "csv":
        import csv

        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def pipe():
    return toy.load_pipeline()


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rows = []
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS)):
        # 40 x 48 pixels: scaled to 32 x 38 to cover 32 x 32, then center-cropped.
        write_mp4(root / "clips" / f"v{i}.mp4", frames=12, height=40, width=48, colour=colour)
        rows.append((f"clips/v{i}.mp4", caption))
    return write_folder(root, rows)


def test_video_folder_is_decoded_encoded_and_cached(video_folder, pipe, tmp_path):
    logs = []
    source = prepare_data(str(video_folder), pipe, frames=9, height=32, width=32, seed=0, cache_dir=tmp_path,
                          log=logs.append)
    assert isinstance(source, CachedSet) and len(source) == 3
    assert [e["source"] for e in source.entries] == ["clips/v0.mp4", "clips/v1.mp4", "clips/v2.mp4"]
    assert any("encoding 3 video(s)" in m for m in logs)
    folder = Path(source.folder)
    assert sorted(p.name for p in folder.iterdir()) == ["000000.safetensors", "000001.safetensors",
                                                      "000002.safetensors", "empty_prompt.safetensors", "index.json"]
    index = json.loads((folder / "index.json").read_text())
    assert (index["key"]["frames"], index["key"]["height"], index["key"]["width"]) == (9, 32, 32)
    assert index["key"]["vae"]["class"] == "PixelShuffleVideoCodec"

    for i in range(3):
        latents, embeds = source.batch(0, [i])  # position i of epoch 0 is a permuted index
        j = source.indices([i])[0]
        assert latents.shape == (1, 192, 3, 8, 8)
        # The codec is lossless: the cached latents decode to the resized, cropped video.
        video = pipe.vae.unpack(pipe.vae.denormalize(latents))[0]  # (3, 9, 32, 32) in [-1, 1]
        expected = decode_video(video_folder / f"clips/v{j}.mp4", frames=9, height=32, width=32)
        assert torch.allclose(video, expected, atol=1e-5)
        # The solid background keeps its colour (H.264 moves it by a few levels at most).
        background = (video[:, :, 20:, :].mean(dim=(1, 2, 3)) + 1) / 2 * 255
        assert torch.allclose(background, torch.tensor(COLOURS[j], dtype=torch.float32), atol=6)
        assert torch.equal(embeds[0], toy.encode_prompt(pipe, [CAPTIONS[j]])[0])

    logs.clear()
    again = prepare_data(str(video_folder), pipe, frames=9, height=32, width=32, seed=0, cache_dir=tmp_path,
                         log=logs.append)
    assert again.folder == source.folder and any("using cached" in m for m in logs)
    # Another size is another cache.
    other = prepare_data(str(video_folder), pipe, frames=5, height=32, width=32, seed=0, cache_dir=tmp_path,
                         log=lambda *_: None)
    assert other.folder != source.folder and other.batch(0, [0])[0].shape == (1, 192, 2, 8, 8)


def test_training_on_a_video_folder(video_folder, tmp_path):
    result = train_lora(TrainLoraConfig(out=str(tmp_path / "out"), data=str(video_folder), frames=9, steps=2,
                                        batch_size=2, rank=4, warmup_steps=0, checkpoint_every=0),
                        log=lambda *_: None)
    assert result.summary["data"]["videos"] == 3 and len(result.summary["loss_history"]) == 2
    assert (tmp_path / "out" / "cache").is_dir()


def test_jsonl_with_file_name_and_text_columns(tmp_path):
    write_mp4(tmp_path / "a.mp4", frames=9, height=32, width=32)
    write_folder(tmp_path, [("a.mp4", CAPTIONS[0])], kind="jsonl", columns=("file_name", "text"))
    (entry,) = read_video_folder(tmp_path)
    assert entry.path == (tmp_path / "a.mp4").resolve() and entry.caption == CAPTIONS[0] and entry.line == 1


def test_metadata_errors_name_the_rows_and_files(tmp_path):
    with pytest.raises(ValueError, match="has no metadata.csv or metadata.jsonl"):
        read_video_folder(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        read_video_folder(tmp_path / "nowhere")
    write_mp4(tmp_path / "ok.mp4", frames=9, height=32, width=32)
    write_folder(tmp_path, [("ok.mp4", CAPTIONS[0]), ("clips/missing.mp4", CAPTIONS[1]), ("ok.mp4", "  ")])
    with pytest.raises(ValueError, match=r"2 row\(s\) cannot be used: line 3: clips/missing.mp4: no such file.*"
                                         r"line 4: ok.mp4: empty 'caption'"):
        read_video_folder(tmp_path)
    write_folder(tmp_path, [("ok.mp4", CAPTIONS[0])], columns=("path", "description"))
    with pytest.raises(ValueError, match="no 'caption' or 'text' column.*'description'"):
        read_video_folder(tmp_path)
    write_folder(tmp_path, [("ok.mp4", CAPTIONS[0])], kind="jsonl")
    with pytest.raises(ValueError, match="both metadata.csv and metadata.jsonl"):
        read_video_folder(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"path": "ok.mp4", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="metadata.jsonl, line 2: not a JSON object"):
        read_video_folder(tmp_path)


@pytest.mark.parametrize("name, make, message", [
    ("short.mp4", lambda p: write_mp4(p, frames=5, height=32, width=32), r"short.mp4: has 5 frame\(s\), fewer than "
                                                                          r"--frames 9"),
    ("tiny.mp4", lambda p: write_mp4(p, frames=9, height=16, width=48), r"tiny.mp4: 48x16 pixels is smaller than the "
                                                                         r"training size 32x32"),
    ("broken.mp4", lambda p: p.write_bytes(b"not a video" * 50), r"broken.mp4: cannot decode it with imageio"),
])
def test_bad_videos_stop_with_the_file_named(tmp_path, pipe, name, make, message):
    write_mp4(tmp_path / "good.mp4", frames=9, height=32, width=32)
    make(tmp_path / name)
    write_folder(tmp_path, [("good.mp4", CAPTIONS[0]), (name, CAPTIONS[1])])
    with pytest.raises(ValueError, match=message):
        prepare_data(str(tmp_path), pipe, frames=9, height=32, width=32, seed=0, cache_dir=tmp_path / "cache",
                     log=lambda *_: None)


def test_captions_and_models_the_data_cannot_serve(tmp_path, pipe):
    write_mp4(tmp_path / "a.mp4", frames=9, height=32, width=32)
    write_folder(tmp_path, [("a.mp4", "a cat walking through tall grass")])
    with pytest.raises(ValueError, match="a.mp4: caption 'a cat walking.*outside the toy model's vocabulary"):
        prepare_data(str(tmp_path), pipe, frames=9, height=32, width=32, seed=0, cache_dir=tmp_path / "c",
                     log=lambda *_: None)
    from tiny_models import tiny_wan_pipeline

    with pytest.raises(ValueError, match="no text encoder"):
        prepare_data(str(tmp_path), tiny_wan_pipeline(), frames=9, height=32, width=32, seed=0,
                     cache_dir=tmp_path / "c", log=lambda *_: None)
    with pytest.raises(ValueError, match="--data toy renders the built-in model's"):
        prepare_data("toy", tiny_wan_pipeline(), frames=9, height=32, width=32, seed=0, cache_dir=tmp_path / "c")
