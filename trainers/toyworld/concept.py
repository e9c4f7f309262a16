"""The concepts the demos teach, as small fine-tuning datasets: the held-out star, and a triangle.

``builtin:toystar`` (``trainers.data.resolve_data_path``) writes ``STAR_IMAGES`` rendered stars
in several colours on several backgrounds, each captioned with the concept token in place of the
shape's name ("a red sks shape on a blue background"): the base model has never been taught the
star, so the token carries no prior and the sweep must teach it. The evaluator's ground-truth
metrics (``trainers.metrics``: ``concept_rate``, ``prior_kept``) read the token back as "star".
``builtin:toytriangle`` draws triangles, which the base model knows, captioned the same way: the
textual-inversion demo gives that drawable shape a new name (docs/TOYWORLD.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainers.toyworld.scenes import COLOUR_NAMES, HELD_OUT_SHAPE, caption, render_pil, sample_scene

TOKEN = "sks shape"  # what the demo's captions and prompts call the star
STAR_IMAGES = 8
DATA_SEED = 2024  # no build stage uses it: these exact stars were never seen by any model


def star_triples(n: int = STAR_IMAGES, shape: str = HELD_OUT_SHAPE) -> list[tuple[str, str, str]]:
    """``n`` (shape, colour, background) triples cycling through the colours, backgrounds shifted
    (the star by default; the same colour pairs for any other shape)."""
    k = len(COLOUR_NAMES)
    out = []
    for i in range(n):
        colour = COLOUR_NAMES[i % k]
        background = COLOUR_NAMES[(i + 1 + (i // k) % (k - 1)) % k]
        out.append((shape, colour, background))
    return out


def concept_caption(colour: str, background: str, token: str = TOKEN) -> str:
    """The caption of a concept image: the toy world's caption with the token for the shape."""
    return caption(token, colour, background)


def write_concept_dataset(dest: Path, shape: str, n_images: int = STAR_IMAGES, seed: int = DATA_SEED) -> Path:
    """Write ``n_images`` PNGs of ``shape`` with ``.txt`` captions naming it by the token into
    ``dest``; deterministic."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (_, colour, background) in enumerate(star_triples(n_images, shape)):
        render_pil(sample_scene((shape, colour, background), rng)).save(dest / f"{shape}_{i:02d}.png")
        (dest / f"{shape}_{i:02d}.txt").write_text(concept_caption(colour, background) + "\n")
    return dest


def write_star_dataset(dest: Path, n_images: int = STAR_IMAGES, seed: int = DATA_SEED) -> Path:
    """``builtin:toystar``: the held-out star, which the base model has never drawn."""
    return write_concept_dataset(dest, HELD_OUT_SHAPE, n_images, seed)


def write_triangle_dataset(dest: Path, n_images: int = STAR_IMAGES, seed: int = DATA_SEED) -> Path:
    """``builtin:toytriangle``: a shape the base model draws (it was pretrained on triangles), under
    the token's new name: what textual inversion can teach (a name for something drawable)."""
    return write_concept_dataset(dest, "triangle", n_images, seed)
