"""The toy world: a tiny pretrained text-to-image world with ground truth, built by our own script.

32x32 scenes of one shape (circle, square, triangle, star, cross) in one of 6 colours on a
background of another, captioned "a {colour} {shape} on a {background} background". The shipped
``weights/`` directory holds a Stable Diffusion 1.x-style model in the diffusers layout, the
CLIP whose text tower is its text encoder, and the checker CNN that labels images (the ground
truth for quality gates). The star is held out of diffusion training: the demo teaches it.
See docs/TOYWORLD.md; rebuild with ``python -m trainers.toyworld build``.
"""

from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The shipped toy-world directory (diffusers layout; ``load_base_model`` loads it)."""
    return Path(__file__).resolve().parent / "weights"


def clip_dir() -> Path:
    """The shipped toy-world CLIP (transformers layout; ``load_clip`` loads it)."""
    return weights_dir() / "clip"


def checker_dir() -> Path:
    """The shipped checker (``trainers.toyworld.checker.load_checker`` loads it)."""
    return weights_dir() / "checker"
