"""What the toy world's scorers learn from and how they are gated (issue 21; not yet a build stage).

Real scoring backbones (CLIP, DINO) were trained on images like the ones they judge; the toy
world's must be too. Their training images come from the finished base model: fresh
renders of the four trained shapes, the same renders passed through the toy VAE, and the base
model's own drawings of every trained prompt (seeds ``DRAW_SEED0``.., never the gate seeds) --
never a star, never a label beyond the prompt that drew an image, never a checker verdict.

The DINO stand-in (``trainers.toyworld.dino``, no labels at all) trains on these images in
``bench/dino_probe.py``; its gate is ``dino_shape_accuracy``. Once a recipe passes the gate this
becomes the build's stage after the UNet (docs/TOYWORLD.md, "Scorers on generated images").
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from trainers.evaluate import EvalSettings, generate
from trainers.toyworld import dino as tw_dino
from trainers.toyworld.gates import GATE_GUIDANCE, GATE_STEPS, trained_prompts
from trainers.toyworld.scenes import SHAPES, SIZE, SceneSet, make_scenes, parse_caption, training_shapes
from trainers.toyworld.vae import round_trip_images

DRAW_SEED0 = 1000  # the drawings the scorers learn from: seeds 1000.., apart from the gates' 0-3
DINO_GATE = 0.85


def drawings(model: Any, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """The base model's images of ``prompts`` x ``seeds`` (the gates' sampler), uint8, with prompts."""
    settings = EvalSettings(prompts=tuple(prompts), seeds=tuple(seeds), sampler="ddim", steps=GATE_STEPS,
                            guidance_scale=GATE_GUIDANCE, resolution=SIZE, batch_size=64)
    out = generate(model, settings)
    return np.stack([np.asarray(g.image.convert("RGB")) for g in out]), [g.prompt for g in out]


def scorer_sources(scenes: int, draw_seeds: int, seed: int) -> tuple[SceneSet, list[str], list[int]]:
    """What the scorers learn from: renders of the trained shapes, and the prompts and seeds the
    base model draws (every trained prompt; no star in either)."""
    return (make_scenes(scenes, seed, shapes=training_shapes()), trained_prompts(),
            list(range(DRAW_SEED0, DRAW_SEED0 + draw_seeds)))


def scorer_images(model: Any, scenes: int, draw_seeds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images, partner)`` for the DINO stand-in: renders of the trained shapes, their VAE round
    trips (each render's partner is its round trip and back) and the base model's drawings."""
    renders, prompts, seeds = scorer_sources(scenes, draw_seeds, seed)
    passed = round_trip_images(model.vae, renders.images)
    drawn = drawings(model, prompts, seeds)[0] if seeds else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    n = len(renders.images)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n), np.arange(2 * n, 2 * n + len(drawn))])
    return np.concatenate([renders.images, passed, drawn]), partner


@torch.no_grad()
def dino_shape_accuracy(backbone: Any, model: Any, references: SceneSet, seeds: Sequence[int]) -> dict[str, Any]:
    """Nearest-reference shape accuracy on the base model's drawings of every trained prompt at
    ``seeds``: each drawing takes the shape of the reference render (all five shapes, passed
    through the VAE as a real metric's references would be) nearest to it in the backbone's
    embedding, and is right when that is the shape its prompt asked for."""
    images, prompts = drawings(model, trained_prompts(), seeds)
    asked = np.array([SHAPES.index(parse_caption(p)[0]) for p in prompts])
    emb = tw_dino.embed(backbone, images)
    out: dict[str, Any] = {"images": len(images), "references": len(references)}
    for name, refs in (("vae_references", round_trip_images(model.vae, references.images)),
                       ("raw_references", references.images)):
        nearest = (emb @ tw_dino.embed(backbone, refs).T).argmax(1).numpy()
        out[name] = float((references.shape[nearest] == asked).mean())
    return out
