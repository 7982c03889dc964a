"""Video comparison metrics (PSNR, SSIM) and measurements of what a toy video shows.

Frames are float arrays (F, H, W, 3) in [0, 1] (what ``sparsegen.toy.generate`` returns
per prompt). The measurements read back, from pixels alone, the attributes a prompt of
the toy grammar names (colour, motion direction, object count, background texture), so
generated videos can be scored against the generator's ground truth
(``evals/toy_checks.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsegen.toy.data import (
    BACKGROUND_MAX_SATURATION, CENTRE_BRIGHTENING, COLOURS, DIRECTIONS, OBJECT_MIN_SATURATION, OUTLINE_DARKENING,
    RADIUS_RANGE_PX, REFERENCE_SIZE_PX, TRIANGLE_CIRCUMRADIUS,
)

__all__ = ["psnr", "ssim", "VideoMeasurement", "measure_video", "foreground_mask", "background_features",
           "prompt_following", "motion_consistency", "above_chance_p"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # the constants of Wang et al. (2004)


def _check_pair(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"videos must be (frames, height, width, 3), got {a.shape}")
    return a, b


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over a whole video (inf when identical).

    Args:
        a, b: (F, H, W, 3) arrays in [0, data_range].
    """
    a, b = _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) over frames and colour channels.

    11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over the
    window positions that lie fully inside the frame ("valid" filtering), each colour
    channel of each frame on its own, then averaged.

    Args:
        a, b: (F, H, W, 3) arrays in [0, data_range], H and W >= 11.
    Raises:
        ValueError: shapes differ, are not (F, H, W, 3), or frames are smaller than the window.
    """
    a, b = _check_pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"frames of {a.shape[1:3]} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    x = torch.from_numpy(a).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])  # (F*3, 1, H, W)
    y = torch.from_numpy(b).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)

    def blur(t):  # separable Gaussian, valid positions only
        t = torch.nn.functional.conv2d(t, g.view(1, 1, -1, 1))
        return torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------- measurement
# A pixel is foreground when its HSV saturation lies above the midpoint between the most
# saturated background pixel and the least saturated object colour the renderer can make.
SATURATION_THRESHOLD = 0.5 * (BACKGROUND_MAX_SATURATION + OBJECT_MIN_SATURATION)
MIN_VALUE = 0.1  # saturation is meaningless for near-black pixels
# Interior pixels are brighter than this share of the video's bright foreground level; the
# outline ring is darkened to 1 - OUTLINE_DARKENING = 0.55 of it, the interior keeps >= 0.85.
INTERIOR_BRIGHTNESS = 0.5 * ((1 - OUTLINE_DARKENING) + (1 - CENTRE_BRIGHTENING))
# Connected foreground regions smaller than a quarter of the smallest object's area are noise.
_SMALLEST_OBJECT_AREA = (3 * math.sqrt(3) / 4) * (TRIANGLE_CIRCUMRADIUS * RADIUS_RANGE_PX[0]) ** 2  # the smallest triangle
MIN_OBJECT_AREA_FRACTION = 0.25
# The outline ring keeps its width in pixels (OUTLINE_WIDTH_PX) while objects shrink with the
# frame, so at 32 x 32 the bright interior of a small triangle is 0-3 pixels: an interior
# region is only used to split a foreground region between objects, and a single interior
# pixel is shading/aliasing noise, not an object.
MIN_INTERIOR_REGION_PX = 2


def foreground_mask(frames: np.ndarray) -> np.ndarray:
    """bool (F, H, W): pixels saturated enough to belong to an object."""
    frames = np.asarray(frames, dtype=np.float64)
    hi, lo = frames.max(-1), frames.min(-1)
    sat = (hi - lo) / np.maximum(hi, 1e-6)
    return (sat > SATURATION_THRESHOLD) & (hi > MIN_VALUE)


def _hue_direction(rgb) -> np.ndarray:
    """Unit chroma vector of RGB colours (..., 3) -> (..., 2) (the hue as a direction)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    x = rgb[..., 0] - 0.5 * (rgb[..., 1] + rgb[..., 2])
    y = (math.sqrt(3) / 2) * (rgb[..., 1] - rgb[..., 2])
    v = np.stack([x, y], -1)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _ndimage():
    """scipy.ndimage, needed only by the video measurements (an optional dependency)."""
    try:
        from scipy import ndimage
    except ImportError as exc:
        raise ImportError("toylab.metrics measures videos with scipy.ndimage: "
                          "pip install scipy (or install sparsegen with the 'evals' extra)") from exc
    return ndimage


def _high_pass(frames_grey: np.ndarray, radius: int = 2) -> np.ndarray:
    """Grey frames (F, H, W) minus their (2r+1)^2 box average (edge-replicated)."""
    uniform_filter = _ndimage().uniform_filter

    return frames_grey - uniform_filter(frames_grey, size=(1, 2 * radius + 1, 2 * radius + 1), mode="nearest")


def background_features(frames: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """Orientation-invariant texture features of the background pixels.

    Returns:
        float64 (3,): [log10 of the high-pass energy, gradient anisotropy (largest over
        smallest energy among the 0/45/90/135 degree directions, log10), skewness of the
        background intensity].
    """
    binary_dilation = _ndimage().binary_dilation

    frames = np.asarray(frames, dtype=np.float64)
    fg = foreground_mask(frames) if foreground is None else foreground
    bg = ~binary_dilation(fg, structure=np.ones((1, 5, 5), dtype=bool))  # keep away from object edges
    grey = frames.mean(-1)
    hp = _high_pass(grey)
    inner = bg[:, 1:-1, 1:-1]
    if inner.sum() < 16:
        return np.array([-6.0, 0.0, 0.0])
    energy = float(np.mean(hp[bg] ** 2))
    g = grey
    diffs = [g[:, 1:-1, 2:] - g[:, 1:-1, :-2], g[:, 2:, 1:-1] - g[:, :-2, 1:-1],
             g[:, 2:, 2:] - g[:, :-2, :-2], g[:, 2:, :-2] - g[:, :-2, 2:]]
    directional = np.array([np.mean(d[inner] ** 2) for d in diffs]) + 1e-9
    values = grey[bg]
    centred = values - values.mean()
    skew = float(np.mean(centred**3) / max(np.mean(centred**2), 1e-12) ** 1.5)
    return np.array([math.log10(energy + 1e-9), math.log10(directional.max() / directional.min()), skew])


@dataclass
class VideoMeasurement:
    """What a video shows, read from its pixels.

    Attributes:
        colour: the named colour closest in hue to most foreground pixels (None if no foreground).
        direction: the named direction closest to the foreground centroid's motion (None if
            fewer than two frames have foreground).
        velocity: (2,) fitted centroid motion in pixels per frame (x right, y down).
        count: the most frequent number of objects per frame (foreground regions, each split
            into the regions of its bright interior, i.e. without the darker outline rings,
            when it holds several).
        foreground_fraction: mean share of foreground pixels per frame.
        background: (3,) :func:`background_features`.
        present_fraction: share of frames showing an object (foreground of at least
            MIN_OBJECT_AREA_FRACTION of the smallest object's area); the generator's
            objects are visible in every frame.
        track_jitter: RMS distance in pixels of the per-frame foreground centroid from its
            fitted straight line, over the frames showing an object (0 for steady motion;
            None if fewer than three frames show one).
    """

    colour: str | None
    direction: str | None
    velocity: np.ndarray
    count: int
    foreground_fraction: float
    background: np.ndarray
    present_fraction: float = 0.0
    track_jitter: float | None = None


def measure_video(frames: np.ndarray) -> VideoMeasurement:
    """Read colour, motion, count and background texture from a video (F, H, W, 3) in [0, 1]."""
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    num_frames, height, width = frames.shape[:3]
    fg = foreground_mask(frames)

    colour = None
    if fg.any():
        names = list(COLOURS)
        refs = _hue_direction(np.array([COLOURS[n] for n in names]))  # (4, 2)
        votes = np.argmax(_hue_direction(frames[fg]) @ refs.T, axis=1)
        colour = names[int(np.bincount(votes, minlength=len(names)).argmax())]

    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    present = [f for f in range(num_frames) if fg[f].sum() > 0]
    velocity = np.zeros(2)
    direction = None
    if len(present) >= 2:
        cx = np.array([xs[fg[f]].mean() for f in present])
        cy = np.array([ys[fg[f]].mean() for f in present])
        t = np.array(present, dtype=np.float64)
        velocity = np.array([np.polyfit(t, cx, 1)[0], np.polyfit(t, cy, 1)[0]])
        direction = max(DIRECTIONS, key=lambda d: float(np.dot(velocity, DIRECTIONS[d])))

    showing = [f for f in range(num_frames) if fg[f].sum() >= MIN_OBJECT_AREA_FRACTION * _min_object_area(height, width)]
    track_jitter = None
    if len(showing) >= 3:
        t = np.array(showing, dtype=np.float64)
        centroids = np.array([[xs[fg[f]].mean(), ys[fg[f]].mean()] for f in showing])
        line = np.polynomial.polynomial.polyfit(t, centroids, 1)  # (2 coefficients, x/y)
        residual = centroids - (line[0] + t[:, None] * line[1])
        track_jitter = float(np.sqrt(np.mean(np.sum(residual**2, axis=1))))

    # Each foreground region (4-connected, at least a quarter of the smallest object's area)
    # is one object, unless its bright interior falls apart into several regions: objects are
    # drawn with a darker outline ring (sparsegen.toy.data.OUTLINE_DARKENING), so touching or
    # overlapping objects of one colour separate once the ring is removed. Counting interiors
    # alone would miss small objects whose interior is a pixel or two (32 x 32 frames).
    count = _count_objects(frames, fg)

    return VideoMeasurement(colour=colour, direction=direction, velocity=velocity, count=count,
                            foreground_fraction=float(fg.mean()), background=background_features(frames, fg),
                            present_fraction=len(showing) / num_frames, track_jitter=track_jitter)


def _min_object_area(height: int, width: int) -> float:
    """Area in pixels of the smallest object the generator draws at this frame size."""
    return _SMALLEST_OBJECT_AREA * (min(height, width) / REFERENCE_SIZE_PX) ** 2


def _count_objects(frames: np.ndarray, fg: np.ndarray) -> int:
    """Most frequent per-frame object count of frames (F, H, W, 3) with foreground fg (F, H, W)."""
    label = _ndimage().label

    num_frames, height, width = fg.shape
    min_area = MIN_OBJECT_AREA_FRACTION * _min_object_area(height, width)
    brightness = frames.max(-1)
    interior = fg & (brightness > INTERIOR_BRIGHTNESS * np.percentile(brightness[fg], 90)) if fg.any() else fg
    counts = []
    for f in range(num_frames):
        regions, num_regions = label(fg[f])
        sizes = np.bincount(regions.ravel(), minlength=num_regions + 1)
        inner, _ = label(interior[f])
        inner_sizes = np.bincount(inner.ravel())
        n = 0
        for r in range(1, num_regions + 1):
            if sizes[r] < min_area:
                continue
            # interior regions lie inside one foreground region (interior is a subset of fg)
            parts = np.unique(inner[regions == r])
            parts = parts[parts > 0]
            n += max(1, int((inner_sizes[parts] >= MIN_INTERIOR_REGION_PX).sum()))
        counts.append(n)
    values, freq = np.unique(counts, return_counts=True)
    return int(values[freq == freq.max()].max())  # ties -> the larger count (occlusion only lowers it)



# ------------------------------------------------------------------ summaries over videos
def prompt_following(measurements, specs, attributes=("colour", "direction")) -> dict[str, float]:
    """Share of videos whose measured attribute equals the prompt's.

    Args:
        measurements: one :class:`VideoMeasurement` per video (``measure_video``).
        specs: the videos' prompt attributes (``sparsegen.toy.data.PromptSpec``), same order.
        attributes: which of colour, direction, count to compare.
    Returns:
        {attribute: share in [0, 1]}.
    """
    measurements, specs = list(measurements), list(specs)
    if len(measurements) != len(specs) or not specs:
        raise ValueError(f"need one prompt per measured video, got {len(measurements)} videos and {len(specs)} prompts")
    return {a: float(np.mean([getattr(m, a) == getattr(s, a) for m, s in zip(measurements, specs)]))
            for a in attributes}


def motion_consistency(measurements) -> dict:
    """Object persistence and track steadiness over videos.

    Returns:
        {"mean_present_fraction": mean over videos of the share of frames showing an object,
        "median_track_jitter": median over the videos that have a track (>= 3 frames with an
        object) of its RMS distance in pixels from a straight line, None when none has one}.
    """
    measurements = list(measurements)
    jitter = [m.track_jitter for m in measurements if m.track_jitter is not None]
    return {"mean_present_fraction": float(np.mean([m.present_fraction for m in measurements])),
            "median_track_jitter": float(np.median(jitter)) if jitter else None}


def above_chance_p(hits: int, trials: int, chance: float) -> float:
    """One-sided binomial p-value: the probability of at least ``hits`` of ``trials``
    checks passing by chance alone. With 24 prompts a check needs about 11 hits at chance
    0.25 (and about 13 at 1/3) to get below 0.05."""
    try:
        from scipy.stats import binom
    except ImportError as exc:
        raise ImportError("above_chance_p needs scipy: pip install scipy (or install sparsegen with the 'evals' "
                          "extra)") from exc

    return float(binom.sf(hits - 1, trials, chance))
