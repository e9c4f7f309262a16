"""The toy world's self-supervised backbone (trainers/toyworld/dino.py): its loss against the
paper's formula, its augmentations, and its saved directory read back by the metric's loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.scoring_models import clear_clip_cache, vision_embeddings
from trainers.toyworld.dino import augment, embed, nt_xent, save_dino, train_dino
from trainers.toyworld.scenes import make_scenes, training_shapes


def test_nt_xent_is_simclrs_loss() -> None:
    """Against SimCLR's eq. (1) written out pair by pair: l(i, j) = -log exp(s_ij / t) /
    sum_{k != i} exp(s_ik / t), averaged over all 2N ordered positive pairs."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    z2 = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    z = torch.cat([z1, z2]).double().numpy()
    t, n, total = 0.3, 5, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denominator)
    assert nt_xent(z1, z2, t).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_augment_is_seeded_in_range_and_takes_colour_away() -> None:
    """Same generator state, same views; values stay in [0, 1]; a view's colours are not the
    image's (the backbone cannot match two views by colour)."""
    scenes = make_scenes(1, seed=3, shapes=training_shapes())
    x = torch.from_numpy(scenes.images[:64].astype(np.float32).transpose(0, 3, 1, 2) / 255)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    # the mean colour of a view against its image's: far apart for most images
    shift = (a.mean((2, 3)) - x.mean((2, 3))).abs().max(1).values
    assert (shift > 0.1).float().mean() > 0.5, shift


def test_saved_backbone_loads_through_the_metrics_loader_with_the_training_embedding(tmp_path: Path) -> None:
    """A few training steps, saved; `vision_embeddings` (the DINO metric's path: AutoModel, the
    saved processor, the class token) gives the embedding the training code computes."""
    for arch in ("vit", "resnet"):
        scenes = make_scenes(1, seed=4, shapes=training_shapes())
        images = scenes.images[:32]
        model = train_dino(images, np.arange(len(images)), steps=2, seed=0, batch=8, arch=arch)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        out = tmp_path / arch
        save_dino(model, out)
        clear_clip_cache()
        via_loader = vision_embeddings(str(out), [Image.fromarray(i) for i in images])
        assert torch.allclose(torch.nn.functional.normalize(via_loader, dim=-1), embed(model, images), atol=1e-5)
    clear_clip_cache()


def test_the_scorers_learn_from_trained_shapes_only_never_at_the_gate_seeds() -> None:
    from trainers.toyworld.build import FULL
    from trainers.toyworld.scenes import HELD_OUT_SHAPE
    from trainers.toyworld.scorers import scorer_sources

    renders, prompts, seeds = scorer_sources(1, 8, 0)
    assert HELD_OUT_SHAPE not in {s.shape for s in renders.scenes} and len(renders) == 120
    assert not [p for p in prompts if HELD_OUT_SHAPE in p] and len(prompts) == 120
    assert len(seeds) == 8 and not set(seeds) & set(FULL.gate_seeds)
