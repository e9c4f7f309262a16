"""The toy world as a built-in: loading through the real loaders, and the ground-truth metrics.

Ground truth is checked on rendered scenes (whose content is known by construction), so these
tests need no diffusion sampling; tests/test_toyworld.py covers the world itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.evaluate import Evaluator, EvaluatorConfig, load_references
from trainers.metrics import get_metric
from trainers.models import ModelLoadError
from trainers.toyworld import weights_dir
from trainers.toyworld.concept import TOKEN, star_triples
from trainers.toyworld.scenes import render_pil, sample_scene

TW = "builtin:toyworld"


def _img(shape: str, colour: str, background: str, seed: int = 0) -> Image.Image:
    return render_pil(sample_scene((shape, colour, background), np.random.default_rng(seed)))


def _metric(name: str, **over):
    kw = dict(clip=TW, checker=TW, token=TOKEN, concept="star")
    kw.update(over)
    return get_metric(name, **kw)


def test_builtin_toyworld_loads_as_base_model_and_as_clip():
    from trainers.models import load_base_model
    from trainers.scoring_models import load_clip

    model = load_base_model(TW)
    clip, tok, _ = load_clip(TW)
    assert model.unet.config.cross_attention_dim == clip.config.text_config.hidden_size
    assert model.tokenizer(["a red star"])["input_ids"] == tok(["a red star"])["input_ids"]


@pytest.mark.parametrize("spec, role, words", [
    ("builtin:toyworld", "vision model", "not a vision model"),
    ("builtin:tiny-clip", "base model", "builtin:tiny-sd or builtin:toyworld"),
    ("builtin:toyworl", "base model", "builtin:toyworld"),
])
def test_builtin_in_the_wrong_role_names_the_valid_ones(spec, role, words):
    from trainers.models import builtin_dir

    with pytest.raises(ModelLoadError, match=words):
        builtin_dir(spec, role)


def test_damaged_shipped_weights_are_refused_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    import trainers.models as models
    import trainers.toyworld as toyworld

    copy = tmp_path / "weights"
    shutil.copytree(weights_dir(), copy)
    target = copy / "vae" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    monkeypatch.setattr(toyworld, "weights_dir", lambda: copy)
    with pytest.raises(ModelLoadError, match=r"(?s)vae/diffusion_pytorch_model\.safetensors.*git checkout"):
        models.load_base_model(TW)
    assert target.read_bytes() == bytes(raw), "the damaged file was touched"


def test_concept_rate_reads_the_token_as_the_concept_and_judges_every_attribute():
    prompts = [f"a red {TOKEN} on a blue background", f"a white {TOKEN} on a black background",
               f"a green {TOKEN} on a yellow background", "a green circle on a white background"]
    images = [_img("star", "red", "blue"), _img("star", "white", "black"),
              _img("star", "green", "red"),  # wrong background
              _img("circle", "green", "white")]
    r = _metric("concept_rate").score(images, prompts, None)
    assert r.per_item == (1.0, 1.0, 0.0, None)
    assert r.value == pytest.approx(2 / 3)
    drawn_as_cross = _metric("concept_rate").score([_img("cross", "red", "blue")], prompts[:1], None)
    assert drawn_as_cross.value == 0.0


def test_prior_kept_judges_only_the_prompts_without_the_token():
    prompts = [f"a red {TOKEN} on a blue background", "a green circle on a white background",
               "a black square on a red background"]
    images = [_img("cross", "red", "blue"), _img("circle", "green", "white"),
              _img("star", "black", "red")]  # a square prompt drawn as a star: the prior lost
    r = _metric("prior_kept").score(images, prompts, None)
    assert r.per_item == (None, 1.0, 0.0) and r.value == 0.5


def test_ground_truth_metric_without_its_prompts_says_which_to_add():
    with pytest.raises(ValueError, match="prior_kept: no evaluation prompt lacks the token"):
        _metric("prior_kept").score([_img("star", "red", "blue")], [f"a red {TOKEN} on a blue background"], None)
    with pytest.raises(ValueError, match="evaluation.images.checker"):
        _metric("concept_rate", checker=None)


def test_clip_t_scores_the_concept_in_place_of_the_token():
    image = [_img("star", "red", "blue")]
    with_concept = _metric("clip_t").score(image, [f"a red {TOKEN} on a blue background"], None)
    plain = _metric("clip_t", token=None, concept=None).score(image, ["a red star on a blue background"], None)
    assert with_concept.value == pytest.approx(plain.value, abs=1e-4)
    as_token = _metric("clip_t", token=None, concept=None).score(image, [f"a red {TOKEN} on a blue background"], None)
    assert as_token.value != pytest.approx(plain.value, abs=1e-2)


def _config(prompts, metrics=("clip_t", "clip_i", "concept_rate", "prior_kept")) -> EvaluatorConfig:
    return EvaluatorConfig.model_validate({
        "generation": {"prompts": prompts, "token": TOKEN, "seeds": [0], "steps": 2, "resolution": 32},
        "metrics": list(metrics), "clip": TW, "checker": TW, "concept": "star",
        "weights": {m: 0.5 for m in ("clip_t", "clip_i") if m in metrics}})


def test_reference_metrics_score_only_the_concept_images():
    """CLIP-I compares to the star references only the images that should show the star."""
    from trainers.data import DataConfig

    cfg = _config(["a red {token} on a blue background", "a green circle on a white background"])
    refs = load_references(cfg, DataConfig(path="builtin:toystar", resolution=32))
    assert len(refs) == len(star_triples())
    ev = Evaluator(cfg, refs)
    star, circle = _img("star", "red", "blue"), _img("circle", "green", "white")
    prompts = [f"a red {TOKEN} on a blue background", "a green circle on a white background"]
    clip_i = next(m for m in ev.metrics if m.name == "clip_i")
    scored = ev._score(clip_i, [star, circle], prompts)
    alone = clip_i.score([star], prompts[:1], refs)
    assert scored.per_item == (alone.per_item[0], None) and scored.value == alone.value


def test_evaluator_config_refuses_ground_truth_without_what_it_needs():
    with pytest.raises(ValueError, match="prior_kept needs prompts without"):
        _config(["a red {token} on a blue background"])
    with pytest.raises(ValueError, match="concept_rate needs prompts with"):
        _config(["a green circle on a white background"], metrics=("clip_t", "clip_i", "concept_rate"))
    with pytest.raises(ValueError, match="need `checker`"):
        EvaluatorConfig.model_validate({"generation": {"prompts": ["a {token}"], "token": TOKEN},
                                        "metrics": ["clip_t", "concept_rate"]})


def test_evaluator_stores_the_checker_identity_with_the_scores():
    cfg = _config(["a red {token} on a blue background", "a green circle on a white background"],
                  metrics=("clip_t", "concept_rate", "prior_kept"))
    ident = Evaluator(cfg, []).identity()
    assert ident["checker"]["spec"] == TW and len(ident["checker"]["weights_sha256"]) == 64


def test_star_dataset_is_deterministic_and_captioned_with_the_token(tmp_path):
    from trainers.toyworld.concept import write_star_dataset

    a, b = write_star_dataset(tmp_path / "a"), write_star_dataset(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 2 * len(star_triples())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    caps = [(a / f).read_text().strip() for f in files if f.endswith(".txt")]
    assert all(TOKEN in c for c in caps) and len(set(caps)) == len(caps)
    assert all(bg != c for _, c, bg in star_triples())
