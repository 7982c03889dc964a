"""Training data for LoRA: a folder of captioned videos, or the built-in procedural generator.

A video folder holds the videos and one metadata file, the layout diffusers' and
finetrainers' video training scripts read::

    my_videos/
        metadata.csv        path,caption            (or metadata.jsonl: {"path": ..., "caption": ...})
                            clips/a.mp4,"a cat walking through tall grass"
        clips/a.mp4 ...

The path column may be named ``path`` or ``file_name`` (relative to the folder), the
caption column ``caption`` or ``text``. Each video is decoded with imageio (its first
``frames`` frames), scaled so it covers ``height x width`` and center-cropped: videos
are never upscaled, and one that is too short, too small, missing or unreadable stops
the run with a message naming the file.

Latents and text embeddings are computed once and cached on disk (one safetensors per
video plus ``index.json``), in a folder named by a hash of everything they depend on:
the VAE and text encoder (class, config, weight fingerprint), the frames and size, and
the data (metadata content and each video's size and modification time). Training then
reads only the cache and runs only the transformer.

``--data toy`` streams fresh videos from the built-in model's generator
(``sparsegen.toy.data``): step ``s`` of a run with global batch ``B`` renders the videos
of seeds ``TOY_SEED_BASE + s*B ... + B - 1``, the same for every ``--seed`` and every
number of processes, never one of the evaluation or validation seeds. Encoding them is
a lossless reshape and a small prompt encoder, so nothing is cached.
``--data toy:N`` uses a fixed set of the first N of those videos instead, cached like a
folder, so a run can revisit its data (epochs).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import models
from .recipe import module_identity

__all__ = ["VideoEntry", "read_video_folder", "decode_video", "resize_and_crop", "DataSource", "ToyStream",
           "CachedSet", "prepare_data", "METADATA_FILES", "TOY_SEED_BASE", "CACHE_INDEX"]

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
PATH_COLUMNS = ("path", "file_name")
CAPTION_COLUMNS = ("caption", "text")
# Toy training videos come from this offset in the generator's training seed range: the
# built-in model itself trained on seeds 0 .. 43,199 of it, and the validation and
# evaluation ranges are disjoint from the whole training range.
TOY_SEED_BASE = 500_000_000
CACHE_FORMAT = "sparsegen-lora-cache"
CACHE_VERSION = 1
CACHE_INDEX = "index.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
_TOY_SET = re.compile(r"toy:(\d+)")
_MAX_LISTED_PROBLEMS = 10


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One row of a video folder's metadata: ``path`` (absolute), ``caption``, and where it
    was written (``source`` as in the file, ``line`` number)."""

    path: Path
    caption: str
    source: str
    line: int


# ------------------------------------------------------------------ video folder
def _metadata_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise ValueError(f"--data {str(folder)!r} is not a folder: pass a folder of videos with metadata.csv or "
                         "metadata.jsonl, 'toy' (fresh generated videos) or 'toy:N' (a fixed set of N)")
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(f"{folder} has no {' or '.join(METADATA_FILES)}: write one with a `path` (or `file_name`) "
                         "column naming each video relative to the folder and a `caption` (or `text`) column")
    if len(present) > 1:
        raise ValueError(f"{folder} has both {present[0].name} and {present[1].name}; keep one of them")
    return present[0]


def _read_rows(metadata: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line number, row)]) of a metadata.csv or metadata.jsonl."""
    if metadata.suffix == ".csv":
        with open(metadata, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            return list(reader.fieldnames or []), rows
    rows, columns = [], []
    with open(metadata, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metadata}, line {number}: not a JSON object ({e.msg}); each line must be like "
                                 '{"path": "clips/a.mp4", "caption": "..."}') from None
            if not isinstance(row, dict):
                raise ValueError(f"{metadata}, line {number}: expected a JSON object, got {type(row).__name__}")
            columns.extend(k for k in row if k not in columns)
            rows.append((number, row))
    return columns, rows


def read_video_folder(folder) -> list[VideoEntry]:
    """The captioned videos a folder's metadata lists, every file checked to exist.

    Raises:
        ValueError: no or two metadata files, missing columns, no rows, or rows whose file
            is missing or caption empty (all such rows listed, by line and file).
    """
    folder = Path(folder)
    metadata = _metadata_file(folder)
    columns, rows = _read_rows(metadata)
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    for col, names in ((path_col, PATH_COLUMNS), (caption_col, CAPTION_COLUMNS)):
        if col is None:
            raise ValueError(f"{metadata} has no {' or '.join(repr(n) for n in names)} column (its columns: "
                             f"{columns}); rename the column")
    if not rows:
        raise ValueError(f"{metadata} lists no videos; add one row per video")
    entries, problems = [], []
    for line, row in rows:
        rel, caption = row.get(path_col), row.get(caption_col)
        if not isinstance(rel, str) or not rel.strip():
            problems.append(f"line {line}: empty {path_col!r}")
            continue
        path = (folder / rel).resolve()
        if not path.is_file():
            problems.append(f"line {line}: {rel}: no such file ({path})")
        elif not isinstance(caption, str) or not caption.strip():
            problems.append(f"line {line}: {rel}: empty {caption_col!r}")
        else:
            entries.append(VideoEntry(path, caption.strip(), rel, line))
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - _MAX_LISTED_PROBLEMS} more)" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        raise ValueError(f"{metadata}: {len(problems)} row(s) cannot be used: {listed}{more}. Fix the paths (relative "
                         f"to {folder}) and captions, or remove those rows")
    return entries


def resize_and_crop(frames: torch.Tensor, *, height: int, width: int, source: str = "video") -> torch.Tensor:
    """Scale frames (F, 3, H, W) in [0, 1] so they cover ``height x width`` (aspect kept),
    then center-crop to it.

    Raises:
        ValueError: a video smaller than the target on either side (it is never upscaled).
    """
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    if scale > 1.0:
        raise ValueError(f"{source}: {w}x{h} pixels is smaller than the training size {width}x{height}; videos are "
                         "not upscaled (the model would learn blur): use larger videos or lower --height/--width")
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = torch.nn.functional.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True,
                                                 align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top:top + height, left:left + width].clamp(0.0, 1.0)


def decode_video(path, *, frames: int, height: int, width: int, source: Optional[str] = None) -> torch.Tensor:
    """The first ``frames`` frames of a video file, resized and cropped (:func:`resize_and_crop`).

    Returns:
        float32 (3, frames, height, width) in [-1, 1] (the layout of diffusers' video VAEs).
    Raises:
        ValueError: the file cannot be decoded, has fewer than ``frames`` frames or is too small;
            the message names ``source`` (default: the path).
    """
    import imageio.v3 as iio

    name = source or str(path)
    got = []
    try:
        for frame in iio.imiter(path):
            got.append(np.asarray(frame))
            if len(got) == frames:
                break
    except Exception as e:  # imageio raises OSError, ValueError or plugin-specific errors for bad files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{name}: cannot decode it with imageio ({reason}); re-encode it (e.g. H.264 mp4) or remove "
                         "it from the metadata") from e
    if len(got) < frames:
        raise ValueError(f"{name}: has {len(got)} frame(s), fewer than --frames {frames}; remove it from the metadata "
                         "or train with fewer frames")
    video = np.stack(got)
    if video.ndim == 3:  # grayscale
        video = np.repeat(video[..., None], 3, axis=-1)
    video = video[..., :3]
    scale = float(np.iinfo(video.dtype).max) if np.issubdtype(video.dtype, np.integer) else 1.0
    t = torch.from_numpy(video.astype(np.float32) / scale).permute(0, 3, 1, 2)  # (F, 3, H, W)
    t = resize_and_crop(t, height=height, width=width, source=name)
    return (t * 2.0 - 1.0).permute(1, 0, 2, 3).contiguous()


# ----------------------------------------------------------------------- sources
class DataSource:
    """Where training batches come from.

    ``batch(step, positions)`` returns (latents (b, C, T, h, w) fp32, prompt_embeds (b, L, D))
    for the global sample positions a process trains on at ``step``; ``empty_embeds``
    (L, D) is the empty prompt (caption dropout, unconditional validation);
    ``first_caption`` serves as the default validation prompt; ``describe()`` goes into
    the recipe and summary.
    """

    empty_embeds: torch.Tensor
    first_caption: str

    def batch(self, step: int, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


def _toy_seeds(positions: Sequence[int]) -> list[int]:
    from ..toy.data import SEED_RANGE_SIZE, SEED_RANGES

    seeds = [SEED_RANGES["train"] + TOY_SEED_BASE + int(p) for p in positions]
    if seeds and max(seeds) >= SEED_RANGES["train"] + SEED_RANGE_SIZE:
        raise ValueError("the run asks for more toy videos than the generator's training seed range holds; "
                         "lower --steps or --batch-size")
    return seeds


class ToyStream(DataSource):
    """Fresh generated videos every step (see the module docstring)."""

    def __init__(self, pipe, *, frames: int, height: int, width: int):
        self.pipe, self.frames, self.height, self.width = pipe, frames, height, width
        self.empty_embeds = models.encode_prompts(pipe, [""])[0]
        self.first_caption = models.model_defaults(pipe)["prompt"]

    def batch(self, step, positions):
        from ..toy.data import render_batch

        videos, prompts, _ = render_batch(_toy_seeds(positions), num_frames=self.frames, height=self.height,
                                          width=self.width)
        return models.encode_videos(self.pipe, videos), models.encode_prompts(self.pipe, prompts)

    def describe(self) -> dict:
        return {"source": "toy", "videos": "fresh every step", "seed_base": TOY_SEED_BASE}


class CachedSet(DataSource):
    """A fixed set of encoded videos read from a cache folder; sample positions walk
    through one seeded permutation per epoch."""

    def __init__(self, folder: Path, index: dict, *, seed: int):
        self.folder, self.index, self.seed = Path(folder), index, seed
        self.entries = index["entries"]
        self.empty_embeds = load_file(str(self.folder / EMPTY_PROMPT_FILE))["prompt_embeds"]
        self.first_caption = self.entries[0]["caption"]
        self._orders: dict[int, list[int]] = {}

    @classmethod
    def open(cls, folder, *, seed: int = 0) -> "CachedSet":
        """The cached set in ``folder`` (one holding ``index.json``)."""
        index_path = Path(folder) / CACHE_INDEX
        if not index_path.is_file():
            raise ValueError(f"{folder} holds no {CACHE_INDEX}: not a train-lora data cache (or an unfinished one)")
        return cls(folder, json.loads(index_path.read_text()), seed=seed)

    def __len__(self) -> int:
        return len(self.entries)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.entries), generator=g).tolist()}
        return self._orders[epoch]

    def indices(self, positions: Sequence[int]) -> list[int]:
        n = len(self.entries)
        return [self._order(int(p) // n)[int(p) % n] for p in positions]

    def batch(self, step, positions):
        tensors = [load_file(str(self.folder / self.entries[i]["file"])) for i in self.indices(positions)]
        return (torch.stack([t["latents"] for t in tensors]).float(),
                torch.stack([t["prompt_embeds"] for t in tensors]))

    def describe(self) -> dict:
        return {"source": self.index["key"]["data"], "videos": len(self.entries), "cache": str(self.folder)}


# ------------------------------------------------------------------------- cache
def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _build_cache(folder: Path, key: dict, items: list[dict], load: Callable[[int], tuple[torch.Tensor, str]], pipe,
                 *, rank: int, world: int, barrier: Callable[[], None], log: Callable[[str], None]) -> dict:
    """Encode every item into ``folder`` (process ``rank`` takes items ``i % world == rank``),
    then write the index (main process). Returns the index."""
    index_path = folder / CACHE_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("key") == key:
            log(f"[sparsegen] train-lora: using cached latents and text embeddings in {folder}")
            return index
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        log(f"[sparsegen] train-lora: encoding {len(items)} video(s) once into {folder}")
    mine = range(rank, len(items), world)
    from tqdm.auto import tqdm

    for i in tqdm(mine, desc="encoding", disable=rank != 0, leave=False):
        video, caption = load(i)
        try:
            embeds = models.encode_prompts(pipe, [caption])[0]
        except ValueError as e:
            raise ValueError(f"{items[i]['source']}: caption {caption!r}: {e}") from None
        latents = models.encode_videos(pipe, video[None])[0]
        _atomic_save({"latents": latents, "prompt_embeds": embeds}, folder / items[i]["file"])
    if rank == 0:
        _atomic_save({"prompt_embeds": models.encode_prompts(pipe, [""])[0]}, folder / EMPTY_PROMPT_FILE)
    barrier()
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "entries": items}
    if rank == 0:
        tmp = index_path.with_name(CACHE_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_path)
    barrier()
    return index


def _encoders_identity(pipe) -> dict:
    encoder = pipe.toy_prompt_encoder if models.is_toy(pipe) else pipe.text_encoder
    return {"vae": module_identity(pipe.vae), "text_encoder": None if encoder is None else module_identity(encoder)}


def prepare_data(data: str, pipe, *, frames: int, height: int, width: int, seed: int, cache_dir: Path,
                 rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                 log: Callable[[str], None] = print) -> DataSource:
    """The data source named by ``--data``: "toy", "toy:N" or a video folder (see the module docstring).

    Raises:
        ValueError: bad data (the message names the file and says what to do).
    """
    if data == "toy":
        if not models.is_toy(pipe):
            raise ValueError("--data toy renders the built-in model's procedural videos and captions, which only "
                             "the built-in model (--model toy) understands; pass a video folder for this model")
        return ToyStream(pipe, frames=frames, height=height, width=width)
    key = {"frames": frames, "height": height, "width": width, **_encoders_identity(pipe)}
    toy_set = _TOY_SET.fullmatch(data)
    if toy_set:
        count = int(toy_set.group(1))
        if count < 1 or not models.is_toy(pipe):
            raise ValueError(f"--data {data}: a fixed set of N >= 1 generated videos for the built-in model "
                             "(--model toy)")
        seeds = _toy_seeds(range(count))
        from ..toy.data import render_video

        items = [{"file": f"{i:06d}.safetensors", "source": f"toy seed {s}",
                  "caption": render_video(s, num_frames=1, height=height, width=width).prompt}
                 for i, s in enumerate(seeds)]
        key["data"] = {"toy": count, "seed_base": TOY_SEED_BASE}

        def load(i):
            from ..toy.data import render_batch

            videos, prompts, _ = render_batch([seeds[i]], num_frames=frames, height=height, width=width)
            return videos[0], prompts[0]
    else:
        entries = read_video_folder(data)
        items = [{"file": f"{i:06d}.safetensors", "source": e.source, "caption": e.caption}
                 for i, e in enumerate(entries)]
        metadata = _metadata_file(Path(data))
        key["data"] = {"folder": str(Path(data).resolve()),
                       "metadata_sha256": hashlib.sha256(metadata.read_bytes()).hexdigest(),
                       "files": [[e.source, e.path.stat().st_size, e.path.stat().st_mtime_ns] for e in entries]}

        def load(i):
            e = entries[i]
            return decode_video(e.path, frames=frames, height=height, width=width, source=str(e.path)), e.caption
    key = json.loads(json.dumps(key))  # as the index will read it back (tuples as lists)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / digest
    index = _build_cache(folder, key, items, load, pipe, rank=rank, world=world, barrier=barrier, log=log)
    return CachedSet(folder, index, seed=seed)
