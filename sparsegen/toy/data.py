"""Procedural videos of moving, occluding shapes, each named by a short prompt.

Every video is a pure function of its seed (and of the requested size), and comes
with its ground truth, so a generated video can be checked against what its prompt
asks for.

Prompt grammar (one object class and one colour per video)::

    <count> <colour> <shape>[s] moving <direction> over a <background> background
        [, camera panning <pan>]

    count       a | two | three                      (1, 2 or 3 objects)
    colour      red | green | blue | yellow
    shape       circle | square | triangle
    direction   left | right | up | down             (screen-space motion of the objects)
    background  striped | checkered | dotted | plain  (low-saturation grey textures)
    pan         left | right | up | down              (the camera moves that way, so the
                                                       background drifts the opposite way)

Example: ``"two red circles moving right over a striped background, camera panning up"``.

Conventions of the ground truth:

* pixel coordinates ``(x, y)`` with the origin at the top-left corner of the frame,
  ``x`` to the right, ``y`` down; pixel ``(i, j)`` (row, column) has its centre at
  ``(j + 0.5, i + 0.5)``;
* ``positions[f, k]`` is the area centroid of object ``k`` at frame ``f`` (for the
  triangle: the centroid of the triangle, not of its bounding box);
* objects are drawn in index order, so a higher index occludes a lower one where
  they overlap; ``visible_fraction[f, k]`` is the share of object ``k``'s area left
  visible after occlusion at frame ``f``;
* objects move along the prompt's direction at a constant speed (pixels per frame)
  and stay entirely inside the frame for the whole video: when a long video would
  carry an object out, its speed is lowered so the trajectory fits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Linear RGB in [0, 1]; hues are far apart (0, 53, 129, 224 degrees) and saturation
# is high (>= 0.78), so colour and foreground can be read back from any frame.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.75, 0.26),
    "blue": (0.16, 0.32, 0.90),
    "yellow": (0.90, 0.80, 0.14),
}
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "dotted", "plain")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

# Backgrounds are grey with a small per-channel tint; this bounds their HSV
# saturation, which is what separates them from the objects (see BACKGROUND_MAX_SATURATION).
BACKGROUND_TINT = 0.04
BACKGROUND_LEVEL_RANGE = (0.28, 0.42)  # base grey level
BACKGROUND_CONTRAST_RANGE = (0.14, 0.28)  # amplitude of the texture on top of it
# Object shading: a darker outline ring and a mild gradient towards the centre;
# both scale the colour, so they keep its hue and saturation.
OUTLINE_WIDTH_PX = 1.5
OUTLINE_DARKENING = 0.45
CENTRE_BRIGHTENING = 0.15

# The toy model's frame size (sparsegen.toy.pipeline.DEFAULT_HEIGHT / DEFAULT_WIDTH).
DEFAULT_SIZE_PX = 32
# Sizes and speeds are given for a 64-pixel frame and scale with min(height, width)
# (at 32 x 32: radius 3-4.5 px, 0.4-0.8 px per frame); the outline width does not scale.
REFERENCE_SIZE_PX = 64
RADIUS_RANGE_PX = (6.0, 9.0)
SPEED_RANGE_PX = (0.8, 1.6)  # pixels per frame along the direction of motion
PAN_SPEED_RANGE_PX = (0.5, 1.5)
PAN_PROBABILITY = 0.5

# Disjoint seed ranges, so training, validation, latent statistics and evaluation
# never share a video.
SEED_RANGES: dict[str, int] = {
    "train": 0,
    "validation": 1_000_000_000,
    "statistics": 2_000_000_000,
    "evaluation": 3_000_000_000,
}
SEED_RANGE_SIZE = 1_000_000_000

# Half-size of a square and circumradius of a triangle relative to the object's
# radius, so that the three classes cover similar areas.
SQUARE_HALF_SIDE = 0.88
TRIANGLE_CIRCUMRADIUS = 1.3


def _max_background_saturation() -> float:
    """Largest HSV saturation any background pixel can have: grey level g tinted by
    per-channel factors within [1 - t, 1 + t] gives (max - min) / max <= 2t / (1 + t)."""
    t = BACKGROUND_TINT
    return 2 * t / (1 + t)


def _min_object_saturation() -> float:
    return min((max(c) - min(c)) / max(c) for c in COLOURS.values())


BACKGROUND_MAX_SATURATION = _max_background_saturation()
OBJECT_MIN_SATURATION = _min_object_saturation()


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """The attributes a prompt names. ``pan`` is None for a static camera."""

    count: int
    colour: str
    shape: str
    direction: str
    background: str
    pan: str | None = None

    def __post_init__(self):
        _check_choice("count", self.count, tuple(COUNT_WORDS))
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("direction", self.direction, tuple(DIRECTIONS))
        _check_choice("background", self.background, BACKGROUNDS)
        if self.pan is not None:
            _check_choice("pan", self.pan, tuple(DIRECTIONS))

    @property
    def prompt(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        text = f"{COUNT_WORDS[self.count]} {self.colour} {noun} moving {self.direction} over a {self.background} background"
        if self.pan is not None:
            text += f", camera panning {self.pan}"
        return text


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}; the toy grammar knows only these.")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a prompt of the toy grammar back into its attributes.

    Raises:
        ValueError: if ``prompt`` does not follow the grammar (the message shows it).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.lower().replace(",", " , ").split()
    grammar = (
        "'<a|two|three> <red|green|blue|yellow> <circle|square|triangle>[s] moving <left|right|up|down> "
        "over a <striped|checkered|dotted|plain> background[, camera panning <left|right|up|down>]'"
    )
    try:
        count = {w: c for c, w in COUNT_WORDS.items()}[words[0]]
        colour, noun = words[1], words[2]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        if count > 1 and not noun.endswith("s") or count == 1 and noun.endswith("s"):
            raise KeyError(noun)
        if words[3] != "moving" or words[5:7] != ["over", "a"] or words[8] != "background":
            raise KeyError(prompt)
        direction, background = words[4], words[7]
        pan = None
        if len(words) > 9:
            if words[9:12] != [",", "camera", "panning"] or len(words) != 13:
                raise KeyError(prompt)
            pan = words[12]
        return PromptSpec(count, colour, shape, direction, background, pan)
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"prompt={prompt!r} does not follow the toy grammar {grammar}") from None


def sample_prompt_spec(rng: np.random.Generator) -> PromptSpec:
    """Draw attributes uniformly (camera pan with probability PAN_PROBABILITY)."""
    pan = None
    if rng.random() < PAN_PROBABILITY:
        pan = tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    return PromptSpec(
        count=int(rng.integers(1, 4)),
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        direction=tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        pan=pan,
    )


@dataclasses.dataclass
class ToyVideo:
    """One rendered video and its ground truth.

    Attributes:
        frames: float32 array (F, H, W, 3) in [0, 1].
        spec: the prompt's attributes; ``spec.prompt`` is the prompt.
        positions: float32 (F, K, 2) area centroids (x, y) in pixels, K = spec.count.
        radii: float32 (K,) object radii in pixels.
        velocities: float32 (K, 2) pixels per frame.
        visible_fraction: float32 (F, K) share of each object's area left visible.
        object_colour: float32 (3,) the RGB the objects were painted with (before shading).
        camera_velocity: float32 (2,) camera motion in pixels per frame (zero if static).
        seed: the seed the video was drawn from.
    """

    frames: np.ndarray
    spec: PromptSpec
    positions: np.ndarray
    radii: np.ndarray
    velocities: np.ndarray
    visible_fraction: np.ndarray
    object_colour: np.ndarray
    camera_velocity: np.ndarray
    seed: int

    @property
    def prompt(self) -> str:
        return self.spec.prompt


def _check_size(num_frames, height, width):
    for name, value, low in (("num_frames", num_frames, 1), ("height", height, 16), ("width", width, 16)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")


def _background(kind, rng, xs, ys, scale):
    """Grey texture in [0, 1] evaluated at world coordinates xs, ys (any equal shapes)."""
    level = rng.uniform(*BACKGROUND_LEVEL_RANGE)
    contrast = rng.uniform(*BACKGROUND_CONTRAST_RANGE)
    period = rng.uniform(6.0, 12.0) * scale
    if kind == "striped":
        angle = math.pi / 4 * rng.integers(4)
        u = xs * math.cos(angle) + ys * math.sin(angle)
        # a square wave with soft (about one pixel wide) edges
        pattern = np.clip(3.0 * np.sin(2 * math.pi * u / period), -1, 1) * 0.5 + 0.5
    elif kind == "checkered":
        s = np.sin(math.pi * xs / (period / 2)) * np.sin(math.pi * ys / (period / 2))
        pattern = np.clip(3.0 * s, -1, 1) * 0.5 + 0.5
    elif kind == "dotted":
        dx = (xs / period) % 1.0 - 0.5
        dy = (ys / period) % 1.0 - 0.5
        dist = np.sqrt(dx * dx + dy * dy) * period
        pattern = np.clip(period * 0.22 - dist + 0.5, 0, 1)
    else:  # plain: a gentle gradient so the frame is not constant
        angle = rng.uniform(0, 2 * math.pi)
        u = xs * math.cos(angle) + ys * math.sin(angle)
        pattern = 0.5 + 0.5 * np.sin(u / (40.0 * scale))
    return level + contrast * pattern


def _signed_distance(shape, dx, dy, radius):
    """Signed distance (pixels, negative inside) to the shape centred at the origin
    (area centroid) with the given radius."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius * SQUARE_HALF_SIDE
    # Upward-pointing equilateral triangle with circumradius R around its centroid:
    # the distance to the triangle is approximated by the largest distance to its three
    # edge lines (exact inside and near the edges, which is all the rendering uses).
    inradius = radius * TRIANGLE_CIRCUMRADIUS / 2
    dists = []
    for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        # outward normal of the edge opposite the vertex at angle+pi (y grows downwards)
        nx, ny = math.cos(angle), math.sin(angle)
        dists.append(dx * nx + dy * ny - inradius)
    return np.maximum(np.maximum(dists[0], dists[1]), dists[2])


def _bounding_radius(shape, radius):
    if shape == "circle":
        return radius
    if shape == "square":
        return radius * SQUARE_HALF_SIDE
    return radius * TRIANGLE_CIRCUMRADIUS


def render_video(
    seed: int,
    *,
    num_frames: int = 17,
    height: int = DEFAULT_SIZE_PX,
    width: int = DEFAULT_SIZE_PX,
    spec: PromptSpec | str | None = None,
) -> ToyVideo:
    """Render one video; the same arguments always give the same video.

    Args:
        seed: drives every random choice (attributes unless ``spec`` is given, layout,
            textures, speeds).
        num_frames, height, width: video size (frames F, pixels H x W).
        spec: force the prompt's attributes (a PromptSpec or a prompt string);
            drawn from the seed when None.

    Returns:
        ToyVideo with frames of shape (F, H, W, 3), float32 in [0, 1].

    Raises:
        ValueError: if a size is not a positive int (height, width >= 16) or the
            prompt does not follow the grammar.
    """
    _check_size(num_frames, height, width)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    rng = np.random.default_rng(int(seed))
    drawn = sample_prompt_spec(rng)  # always drawn, so layouts do not depend on `spec`
    if spec is None:
        spec = drawn
    elif isinstance(spec, str):
        spec = parse_prompt(spec)
    elif not isinstance(spec, PromptSpec):
        raise TypeError(f"spec must be a PromptSpec, a prompt string or None, got {type(spec).__name__}")

    scale = min(height, width) / REFERENCE_SIZE_PX
    frame_index = np.arange(num_frames, dtype=np.float64)

    # Camera: the view moves by camera_velocity per frame, so the background drifts the other way.
    camera_velocity = np.zeros(2)
    if spec.pan is not None:
        camera_velocity = np.array(DIRECTIONS[spec.pan]) * rng.uniform(*PAN_SPEED_RANGE_PX) * scale
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    world_x = xs[None] + camera_velocity[0] * frame_index[:, None, None]
    world_y = ys[None] + camera_velocity[1] * frame_index[:, None, None]
    grey = _background(spec.background, rng, world_x, world_y, scale)
    tint = 1.0 + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    frames = grey[..., None] * tint  # (F, H, W, 3)

    # Objects: constant velocity along the prompt's direction, entirely inside the frame.
    direction = np.array(DIRECTIONS[spec.direction])
    count = spec.count
    radii = rng.uniform(*RADIUS_RANGE_PX, size=count) * scale
    speeds = rng.uniform(*SPEED_RANGE_PX, size=count) * scale
    colour = np.array(COLOURS[spec.colour])
    positions = np.zeros((num_frames, count, 2))
    velocities = np.zeros((count, 2))
    axis = 0 if direction[0] != 0 else 1  # 0: horizontal motion, 1: vertical
    extent = (width, height)
    for k in range(count):
        margin = _bounding_radius(spec.shape, radii[k]) + 1.0
        room = extent[axis] - 2 * margin
        speed = min(speeds[k], room / max(num_frames - 1, 1))
        travel = speed * (num_frames - 1)
        # max(): a speed capped to the room can overshoot it by rounding
        start_along = rng.uniform(margin, max(margin, extent[axis] - margin - travel))
        if direction[axis] < 0:
            start_along = extent[axis] - start_along
        start_across = rng.uniform(margin, extent[1 - axis] - margin)
        start = np.zeros(2)
        start[axis], start[1 - axis] = start_along, start_across
        velocities[k] = direction * speed
        positions[:, k] = start + frame_index[:, None] * velocities[k]

    visible_area = np.zeros((num_frames, count))
    full_area = np.zeros((num_frames, count))
    coverages = []
    for k in range(count):
        dx = xs[None] - positions[:, k, 0, None, None]
        dy = ys[None] - positions[:, k, 1, None, None]
        sdf = _signed_distance(spec.shape, dx, dy, radii[k])
        coverage = np.clip(0.5 - sdf, 0.0, 1.0)  # anti-aliased edge, one pixel wide
        depth = np.clip(-sdf, 0.0, None)
        outline = np.clip(OUTLINE_WIDTH_PX + 0.5 - depth, 0.0, 1.0)
        centre = np.clip(depth / radii[k], 0.0, 1.0)
        shade = (1.0 - OUTLINE_DARKENING * outline) * (1.0 - CENTRE_BRIGHTENING + CENTRE_BRIGHTENING * centre)
        frames = frames * (1.0 - coverage[..., None]) + (shade[..., None] * colour) * coverage[..., None]
        coverages.append(coverage)
        full_area[:, k] = coverage.sum(axis=(1, 2))
    for k in range(count):
        visible = coverages[k].copy()
        for j in range(k + 1, count):
            visible *= 1.0 - coverages[j]
        visible_area[:, k] = visible.sum(axis=(1, 2))

    return ToyVideo(
        frames=np.clip(frames, 0.0, 1.0).astype(np.float32),
        spec=spec,
        positions=positions.astype(np.float32),
        radii=radii.astype(np.float32),
        velocities=velocities.astype(np.float32),
        visible_fraction=(visible_area / np.maximum(full_area, 1e-9)).astype(np.float32),
        object_colour=colour.astype(np.float32),
        camera_velocity=camera_velocity.astype(np.float32),
        seed=int(seed),
    )


def render_batch(
    seeds, *, num_frames: int = 17, height: int = DEFAULT_SIZE_PX, width: int = DEFAULT_SIZE_PX
) -> tuple[torch.Tensor, list[str], list[ToyVideo]]:
    """Render several videos as a model-ready batch.

    Returns:
        videos: float32 tensor (B, 3, F, H, W) in [-1, 1] (the layout diffusers' video
            VAEs take);
        prompts: B prompt strings;
        items: the B ToyVideo objects (ground truth).
    """
    items = [render_video(int(s), num_frames=num_frames, height=height, width=width) for s in seeds]
    video = np.stack([it.frames for it in items])  # (B, F, H, W, 3)
    tensor = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous() * 2.0 - 1.0
    return tensor, [it.prompt for it in items], items


def evaluation_specs(n: int) -> list[PromptSpec]:
    """A fixed, balanced prompt set for evaluations (the first n of a fixed sequence).

    Within 16 prompts every colour meets every direction; counts, shapes and backgrounds
    cycle; every other prompt has a camera pan.

    Raises:
        ValueError: if ``n`` is not a positive int.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int (number of prompts)")
    colours, directions = list(COLOURS), list(DIRECTIONS)
    return [
        PromptSpec(
            count=1 + i % 3,
            colour=colours[i % 4],
            shape=SHAPES[(i // 3) % 3],
            direction=directions[(i // 4 + i) % 4],
            background=BACKGROUNDS[(i // 2) % 4],
            pan=None if i % 2 == 0 else directions[(i // 2) % 4],
        )
        for i in range(int(n))
    ]
