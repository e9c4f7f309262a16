"""Class images for DreamBooth's prior preservation: drawn once by the base model, kept by content.

``ensure_class_images`` draws ``n`` images of the class prompt(s) with fixed seeds (image ``i``:
prompt ``i mod len(prompts)``, seed ``class_seed + i``) into
``<cache>/class_images/<key>/class_NNNNN.png`` with a ``.txt`` caption each, atomically. The key
hashes everything the pixels depend on: the base model's weight identity, the prompts, the count,
the seeds, the sampler settings and the resolution; a second call (a second sweep, a resumed one)
with the same key draws nothing. The folder is then an ordinary captioned dataset: it goes
through the same preflight and latent cache as the instance images, so the class latents and
their frozen text embeddings are cached by content too. A sweep that searches the count draws the
largest once and each trial uses the first N (``CachedDataset.head``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers import progress
from trainers.config import DreamBoothSettings
from trainers.paths import cache_root, materialize_dir

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassImages:
    """Where the class images are and how many this call drew (0: all reused)."""

    folder: Path
    generated: int


def class_image_key(model: Any, db: DreamBoothSettings, n: int, resolution: int) -> str:
    """The content key of ``n`` class images of ``model`` under ``db``'s prompts and settings."""
    spec = {"v": FORMAT_VERSION, "model": model.identity, "prompts": list(db.class_prompt or ()), "n": n,
            "seed": db.class_seed, "sampler": db.class_sampler, "steps": db.class_steps,
            "guidance": db.class_guidance_scale, "resolution": resolution}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def ensure_class_images(model: Any, db: DreamBoothSettings, n: int, resolution: int,
                        device: torch.device | str = "cpu", root: Path | None = None) -> ClassImages:
    """The folder of ``n`` class images for ``db.class_prompt``, drawn by ``model`` on ``device``
    unless a folder with the same key exists. The model is sampled in its own dtype (fp32 as
    loaded), only moved to ``device``."""
    from trainers.devices import place
    from trainers.evaluate import EvalSettings, generate

    if not db.class_prompt:
        raise ValueError("dreambooth.class_prompt is not set: nothing to draw class images of")
    key = class_image_key(model, db, n, resolution)
    final = (root or cache_root() / "class_images") / key
    drawn = 0

    def draw(tmp: Path) -> None:
        nonlocal drawn
        for module in (model.unet, model.vae, model.text_encoder):
            place(module, device)
        prompts = db.class_prompt or ()
        for j, prompt in enumerate(prompts):
            index = list(range(j, n, len(prompts)))
            if not index:
                continue
            settings = EvalSettings(prompts=(prompt,), seeds=tuple(db.class_seed + i for i in index),
                                    sampler=db.class_sampler, steps=db.class_steps,
                                    guidance_scale=db.class_guidance_scale, resolution=resolution)
            for i, image in zip(index, generate(model, settings)):
                image.image.save(tmp / f"class_{i:05d}.png")
                (tmp / f"class_{i:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
                drawn += 1
                progress.advance("class images", drawn, n)
        (tmp / ".class_images.json").write_text(json.dumps({"key": key, "n": n, "model": model.identity,
                                                           "prompts": list(prompts)}, indent=1))

    folder = materialize_dir(final, draw)
    return ClassImages(folder, drawn)
