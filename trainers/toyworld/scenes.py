"""The toy world's scenes: one coloured shape on a plain background, drawn procedurally at 32x32.

Everything here is deterministic: a scene is fully described by its ``Scene`` record, and the
records of a data set come from a numpy ``Generator`` seeded by the caller, so the same seed
draws the same pixels on every machine (PIL's polygon/ellipse rasteriser and the box-filter
downsample are integer/exact float code, independent of the CPU).

Vocabulary: 5 shapes x 6 colours, the background one of the 5 colours other than the shape's,
so 150 captions "a {colour} {shape} on a {background} background". ``HELD_OUT_SHAPE`` (star) is
left out of diffusion training: it is the concept users teach in the demo.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # drawn at 128 px, box-filtered to 32 px: anti-aliased edges like a real photo
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
HELD_OUT_SHAPE = "star"
# Saturated, pairwise far apart in RGB (min distance ~150), so a colour stays recognisable after
# the +-COLOUR_JITTER per-channel jitter and the VAE's blur.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 50),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_JITTER = 12  # per-channel uniform jitter, per image, for shape and background separately
MIN_RADIUS, MAX_RADIUS = 7.0, 11.0  # shape "radius" in px: circumscribed circle of the shape
MARGIN = 1.0  # px kept free between the shape's circumscribed circle and the image border
CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    """One scene: what is drawn (the labels) and where (centre and radius in pixels)."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float
    shape_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    @property
    def caption(self) -> str:
        """The scene's caption, e.g. "a red circle on a blue background"."""
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    """The caption of a (shape, colour, background) triple."""
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """``(shape, colour, background)`` of a toy-world caption; ValueError naming the text if not one."""
    m = CAPTION_RE.match(text.strip())
    if m is None or m.group(2) not in SHAPES or m.group(1) not in COLOURS or m.group(3) not in COLOURS:
        raise ValueError(
            f"{text!r} is not a toy-world caption; expected 'a {{colour}} {{shape}} on a {{background}} "
            f"background' with shape in {SHAPES} and colours in {COLOUR_NAMES}"
        )
    return m.group(2), m.group(1), m.group(3)


def all_triples(shapes: Iterable[str] = SHAPES) -> list[tuple[str, str, str]]:
    """Every valid ``(shape, colour, background)`` (background != colour), in vocabulary order."""
    return [(s, c, b) for s in shapes for c in COLOUR_NAMES for b in COLOUR_NAMES if b != c]


def training_shapes() -> tuple[str, ...]:
    """The shapes the diffusion model is trained on: all but the held-out one."""
    return tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    d = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    r, g, b = (int(np.clip(v + e, 0, 255)) for v, e in zip(rgb, d))
    return (r, g, b)


def sample_scene(triple: tuple[str, str, str], rng: np.random.Generator) -> Scene:
    """A scene of ``triple`` with random position, size and colour jitter drawn from ``rng``."""
    shape, colour, background = triple
    radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    lo, hi = radius + MARGIN, SIZE - radius - MARGIN
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return Scene(shape, colour, background, cx, cy, radius, _jitter(COLOURS[colour], rng), _jitter(COLOURS[background], rng))


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The outline of a polygonal shape inscribed in the circle (cx, cy, r); y grows downwards."""
    if shape == "square":
        h = r / math.sqrt(2)  # corners on the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, apex up, centroid at (cx, cy)
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":  # five points, inner radius 0.45 r: thin enough to differ from a pentagon
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    if shape == "cross":  # a plus sign; arm half-width 0.3 r keeps it apart from a square
        w = 0.3 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; valid shapes: {SHAPES}")


def shape_mask(scene: Scene) -> np.ndarray:
    """The shape's coverage in [0, 1] per pixel (SIZE x SIZE float32), anti-aliased."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    s = SUPERSAMPLE
    # Continuous coordinates scale by s: 32-px geometry lands on the 128-px canvas, then each
    # s x s block averages back to one pixel (exact box filter).
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(shape_polygon(scene.shape, cx, cy, r), fill=255)
    arr = np.asarray(canvas, dtype=np.float32).reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))
    return arr / 255.0


def render(scene: Scene) -> np.ndarray:
    """The scene as an ``(SIZE, SIZE, 3)`` uint8 RGB array."""
    m = shape_mask(scene)[..., None]
    fg = np.asarray(scene.shape_rgb, dtype=np.float32)
    bg = np.asarray(scene.background_rgb, dtype=np.float32)
    return np.clip(np.rint(m * fg + (1 - m) * bg), 0, 255).astype(np.uint8)


def render_pil(scene: Scene) -> Image.Image:
    """The scene as a PIL RGB image."""
    return Image.fromarray(render(scene), mode="RGB")


@dataclass(frozen=True)
class SceneSet:
    """A rendered data set: ``images`` (N, SIZE, SIZE, 3) uint8 and integer labels per attribute."""

    images: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    background: np.ndarray
    scenes: tuple[Scene, ...]

    @property
    def captions(self) -> list[str]:
        """The caption of each image, in order."""
        return [s.caption for s in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)


def make_scenes(n_per_triple: int, seed: int, shapes: Sequence[str] = SHAPES) -> SceneSet:
    """``n_per_triple`` scenes of every valid triple over ``shapes``, in a seeded shuffled order.

    Balanced by construction (every caption equally often), so no class is learnt better just
    because it was drawn more often.
    """
    rng = np.random.default_rng(seed)
    triples = [t for t in all_triples(shapes) for _ in range(n_per_triple)]
    order = rng.permutation(len(triples))
    scenes = tuple(sample_scene(triples[i], rng) for i in order)
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return SceneSet(
        images=images,
        shape=np.array([SHAPES.index(s.shape) for s in scenes], dtype=np.int64),
        colour=np.array([COLOUR_NAMES.index(s.colour) for s in scenes], dtype=np.int64),
        background=np.array([COLOUR_NAMES.index(s.background) for s in scenes], dtype=np.int64),
        scenes=scenes,
    )


def to_tensor_range(images: np.ndarray) -> "np.ndarray":
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the VAE's and checker's input range."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0
