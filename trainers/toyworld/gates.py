"""The toy world's quality gates, measured with its own ground truth (the checker).

* Prompt accuracy: the base model draws every caption with fixed seeds (DDIM, 25 steps,
  guidance 5, through the project's own ``trainers.evaluate.generate``); an image is right when
  the checker sees the shape, colour and background the caption names. Reported separately for
  the trained shapes and the held-out star (which the base model has never been taught).
* CLIP AUC per attribute: for held-out rendered scenes, the cosine similarity of an image to its
  true caption (positives) versus to the same caption with one attribute swapped to every other
  valid value (negatives); AUC is the Mann-Whitney probability that a positive outranks a
  negative (ties count one half).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from trainers.evaluate import EvalSettings, generate
from trainers.models import BaseModel
from trainers.toyworld.checker import Checker, judge
from trainers.toyworld.scenes import COLOUR_NAMES, HELD_OUT_SHAPE, SHAPES, SIZE, SceneSet, all_triples, caption

GATE_STEPS = 25
GATE_GUIDANCE = 5.0
PROMPT_ACCURACY_GATE = 0.90
CLIP_AUC_GATE = 0.95
ATTRIBUTES = ("shape", "colour", "background")


@dataclass(frozen=True)
class PromptAccuracy:
    """Share of generated images the checker finds right, overall and per attribute."""

    prompts: int
    images: int
    all_correct: float
    shape: float
    colour: float
    background: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def prompt_accuracy(model: BaseModel, checker: Checker, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 64) -> PromptAccuracy:
    """Generate every (prompt, seed) at 25 DDIM steps, guidance 5, and judge it with the checker."""
    settings = EvalSettings(
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        sampler="ddim",
        steps=GATE_STEPS,
        guidance_scale=GATE_GUIDANCE,
        resolution=SIZE,  # stated: the toy VAE downsamples by 4, so 32 px <-> 8x8 latents
        batch_size=batch_size,
    )
    images = generate(model, settings)
    verdicts = judge(checker, [g.image for g in images], [g.prompt for g in images])
    n = len(verdicts)
    return PromptAccuracy(
        prompts=len(prompts),
        images=n,
        all_correct=sum(v.correct for v in verdicts) / n,
        shape=sum(v.shape_ok for v in verdicts) / n,
        colour=sum(v.colour_ok for v in verdicts) / n,
        background=sum(v.background_ok for v in verdicts) / n,
    )


def trained_prompts() -> list[str]:
    """Every caption the diffusion model was trained on (all shapes but the held-out one)."""
    return [caption(*t) for t in all_triples() if t[0] != HELD_OUT_SHAPE]


def held_out_prompts() -> list[str]:
    """Every caption of the held-out shape."""
    return [caption(*t) for t in all_triples([HELD_OUT_SHAPE])]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(positive > negative) + P(equal) / 2, exact over all pairs."""
    pos, neg = np.sort(pos.astype(np.float64)), np.sort(neg.astype(np.float64))
    below = np.searchsorted(neg, pos, side="left")
    below_or_eq = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (below_or_eq - below)).sum() / (len(pos) * len(neg)))


def _swaps(triple: tuple[str, str, str], attribute: str) -> list[tuple[str, str, str]]:
    """Valid triples that differ from ``triple`` in ``attribute`` only."""
    s, c, b = triple
    if attribute == "shape":
        return [(o, c, b) for o in SHAPES if o != s]
    if attribute == "colour":
        return [(s, o, b) for o in COLOUR_NAMES if o not in (c, b)]
    return [(s, c, o) for o in COLOUR_NAMES if o not in (b, c)]


@torch.no_grad()
def clip_auc(clip: Any, tokenizer: Any, processor: Any, data: SceneSet) -> dict[str, float]:
    """True-vs-swapped-caption AUC per attribute for a CLIP loaded by ``load_clip``."""
    from PIL import Image

    texts = [caption(*t) for t in all_triples()]
    row = {t: i for i, t in enumerate(texts)}
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    txt = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    pixels = processor(images=[Image.fromarray(im) for im in data.images], return_tensors="pt")["pixel_values"]
    img = clip.get_image_features(pixel_values=pixels).pooler_output
    sim = (torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T).numpy()
    out = {}
    for attribute in ATTRIBUTES:
        pos: list[float] = []
        neg: list[float] = []
        for i, scene in enumerate(data.scenes):
            triple = (scene.shape, scene.colour, scene.background)
            pos.append(sim[i, row[caption(*triple)]])
            neg.extend(sim[i, row[caption(*o)]] for o in _swaps(triple, attribute))
        out[attribute] = auc(np.array(pos), np.array(neg))
    return out
