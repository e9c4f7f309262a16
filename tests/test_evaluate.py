"""The evaluator: deterministic batched generation and CLIP metrics (tiny models, CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from trainers import evaluate as ev
from trainers import generation
from trainers import metrics as mt
from trainers.evaluate import EvalSettings, generate
from trainers.metrics import get_metric

CLIP = "builtin:tiny-clip"
# builtin:tiny-sd's native size is 64 px (UNet sample_size 8); 2 steps keep each image ~ms.
FAST = dict(steps=2, guidance_scale=3.0)


def _arrays(images: list[ev.GeneratedImage]) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.float32) for g in images]


def _assert_same_images(a: list[ev.GeneratedImage], b: list[ev.GeneratedImage], atol: float) -> None:
    assert [(g.prompt, g.seed) for g in a] == [(g.prompt, g.seed) for g in b]
    for x, y in zip(_arrays(a), _arrays(b)):
        assert np.abs(x - y).max() <= atol


def test_generation_is_prompt_major_at_native_resolution(tiny_model) -> None:
    out = generate(tiny_model, EvalSettings(prompts=("a red cube", "a blue ball"), seeds=(3, 7), **FAST))
    assert [(g.prompt, g.seed) for g in out] == [
        ("a red cube", 3), ("a red cube", 7), ("a blue ball", 3), ("a blue ball", 7)
    ]
    assert all(g.image.size == (64, 64) and g.image.mode == "RGB" for g in out)
    # Different seeds really give different images (the generator is used per image).
    a, b = _arrays(out[:2])
    assert np.abs(a - b).max() > 1


def test_an_image_does_not_depend_on_its_batch(tiny_model) -> None:
    base = dict(prompts=("a red cube", "a blue ball"), seeds=(0, 1, 2), **FAST)
    one = generate(tiny_model, EvalSettings(batch_size=1, **base))
    four = generate(tiny_model, EvalSettings(batch_size=4, **base))
    # Batched vs single UNet/VAE passes differ only at float rounding; a uint8 pixel may flip by 1.
    _assert_same_images(one, four, atol=1.0)


def test_same_checkpoint_prompts_and_seeds_give_same_images_and_scores(tiny_sd_dir) -> None:
    from trainers.models import load_base_model

    settings = EvalSettings(prompts=("a photo of a cat",), seeds=(0, 1), negative_prompt="blurry", **FAST)
    runs = [ev.evaluate(load_base_model("builtin:tiny-sd"), settings, ("clip_t",), clip=CLIP) for _ in range(2)]
    _assert_same_images(runs[0].images, runs[1].images, atol=0.0)
    assert runs[0].scores["clip_t"] == runs[1].scores["clip_t"]


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler"])
def test_each_sampler_runs_and_uses_its_scheduler(tiny_model, sampler, monkeypatch) -> None:
    seen = []
    real = ev.make_sampling_scheduler

    def spy(name, config):
        sched = real(name, config)
        seen.append(type(sched).__name__)
        return sched

    monkeypatch.setattr(generation, "make_sampling_scheduler", spy)  # where generate() looks it up
    out = generate(tiny_model, EvalSettings(prompts=("x",), seeds=(0,), sampler=sampler, **FAST))
    assert len(out) == 1 and np.isfinite(_arrays(out)[0]).all()
    assert seen == [ev.SAMPLERS[sampler][0].__name__]
    if sampler == "dpmsolver++":
        assert ev.make_sampling_scheduler(sampler, tiny_model.scheduler_config).config.algorithm_type == "dpmsolver++"


def test_token_placeholder_is_substituted() -> None:
    s = EvalSettings(prompts=("a photo of {token} on a beach", "plain {x}"), token="sks toy")
    assert s.resolved_prompts() == ("a photo of sks toy on a beach", "plain {x}")


def test_token_substitution_reaches_the_generated_prompt(tiny_model) -> None:
    out = generate(tiny_model, EvalSettings(prompts=("{token} toy",), seeds=(0,), token="sks", **FAST))
    assert out[0].prompt == "sks toy"


def test_placeholder_without_token_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"\{token\}"):
        EvalSettings(prompts=("a photo of {token}",))


def test_bad_sampler_names_the_key_and_valid_choices() -> None:
    with pytest.raises(ValidationError) as e:
        EvalSettings(prompts=("x",), sampler="k_lms")
    msg = str(e.value)
    assert "sampler" in msg and "k_lms" in msg
    assert all(name in msg for name in ("ddim", "dpmsolver++", "euler"))
    with pytest.raises(KeyError, match=r"unknown sampler 'k_lms'.*ddim, dpmsolver\+\+, euler"):
        ev.make_sampling_scheduler("k_lms", {})


def test_unknown_settings_key_and_bad_resolution_are_errors() -> None:
    with pytest.raises(ValidationError, match="stepz"):
        EvalSettings(prompts=("x",), stepz=3)
    with pytest.raises(ValidationError, match="multiple of 8"):
        EvalSettings(prompts=("x",), resolution=60)


def test_unknown_metric_names_the_key_and_valid_choices() -> None:
    with pytest.raises(KeyError, match=r"unknown metric 'fid'; valid metrics: clip_i, clip_t, concept_rate, dino, drift, drift_dino, pickscore, prior_kept"):
        get_metric("fid")


def _tm_clip_score(images: list[Image.Image], prompts: list[str]) -> tuple[float, list[float]]:
    """torchmetrics' own CLIPScore on the tiny-CLIP objects.

    torchmetrics 1.9 cannot load a local directory (only a fixed list of Hub names) and divides
    ``get_*_features(...)`` by its norm, which transformers 5 returns as an output object. So we
    pass its documented callable form with an adapter that returns ``.pooler_output``; every
    step of the score (processing, normalising, x100, mean, clamp) is torchmetrics' code.
    """
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPProcessor

    model, tokenizer, image_processor = mt.get_clip(CLIP)

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model
            self.config = model.config

        def get_image_features(self, pixel_values):
            return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    metric = CLIPScore(model_name_or_path=lambda: (Adapter(), processor))
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in images]
    with torch.no_grad(), pytest.warns(UserWarning, match="longer than"):
        metric.update(tensors, prompts)
        per_item, _ = _clip_score_update(tensors, prompts, Adapter(), processor)
        return float(metric.compute()), per_item.tolist()


def test_clip_t_equals_torchmetrics_clipscore(tiny_model) -> None:
    # The long prompt (> 77 tokens for tiny-clip's char tokenizer) covers torchmetrics' truncation.
    prompts_in = ("a red cube", "a dog on a beach " * 12)
    out = generate(tiny_model, EvalSettings(prompts=prompts_in, seeds=(0, 1), **FAST))
    images, prompts = [g.image for g in out], [g.prompt for g in out]
    ours = get_metric("clip_t", clip=CLIP).score(images, prompts, None)
    theirs, theirs_per_item = _tm_clip_score(images, prompts)
    assert theirs > 0.5  # not the trivial case where both sides clamp to 0
    assert abs(ours.value - theirs) < 1e-4
    assert ours.per_item == pytest.approx(theirs_per_item, abs=1e-4)


def test_clip_t_clamps_the_mean_not_each_item(monkeypatch) -> None:
    # Embeddings chosen so cos = -0.5 and +0.2: torchmetrics clamps only the mean.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[-0.5, 0.75**0.5], [0.2, 0.96**0.5]])
    monkeypatch.setattr(mt, "image_embeddings", lambda spec, images, **kw: img)
    monkeypatch.setattr(mt, "text_embeddings", lambda spec, texts, **kw: txt)
    r = mt.ClipTScore(clip="unused").score([None, None], ["a", "b"], None)  # type: ignore[list-item]
    assert r.per_item == pytest.approx((-50.0, 20.0), abs=1e-4)
    assert r.value == 0.0  # mean -15 clamped at 0
    txt2 = torch.tensor([[0.5, 0.75**0.5], [0.2, 0.96**0.5]])
    monkeypatch.setattr(mt, "text_embeddings", lambda spec, texts, **kw: txt2)
    assert mt.ClipTScore(clip="unused").score([None, None], ["a", "b"], None).value == pytest.approx(35.0, abs=1e-4)


def _noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _gradient_image() -> Image.Image:
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    arr = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 30.0)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_clip_i_is_higher_for_an_image_vs_itself() -> None:
    metric = get_metric("clip_i", clip=CLIP)
    a, b = _noise_image(1), _gradient_image()
    same = metric.score([a], [""], [a])
    other = metric.score([a], [""], [b])
    assert same.value == pytest.approx(1.0, abs=1e-5)  # plain cosine, not x100
    assert other.value < same.value - 1e-3
    # per_item is each image's mean over all references.
    both = metric.score([a, b], ["", ""], [a, b])
    assert both.per_item[0] == pytest.approx((1.0 + other.value) / 2, abs=1e-5)


def test_clip_i_without_references_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference images"):
        get_metric("clip_i", clip=CLIP).score([_noise_image(0)], [""], None)


def test_clip_model_is_loaded_once_across_evaluations(tiny_model, monkeypatch) -> None:
    from trainers import scoring_models

    mt.clear_clip_cache()
    calls: list[str] = []
    real = scoring_models.load_clip

    def counting(spec: str, *args):
        calls.append(spec)
        return real(spec, *args)

    monkeypatch.setattr(scoring_models, "load_clip", counting)
    settings = EvalSettings(prompts=("x",), seeds=(0,), **FAST)
    refs = [_noise_image(0)]
    for _ in range(2):
        result = ev.evaluate(tiny_model, settings, ("clip_t", "clip_i"), references=refs, clip=CLIP)
        assert set(result.scores) == {"clip_t", "clip_i"}
    assert calls == [CLIP]


# ---- DINO-style metric, composite, Evaluator ------------------------------------------------

VIT = "builtin:tiny-vit"


def test_dino_is_the_mean_cls_cosine_to_the_references() -> None:
    from transformers import AutoImageProcessor, ViTModel

    from trainers.models import ensure_builtin

    metric = get_metric("dino", clip=CLIP, vision=VIT)
    a, b, c = _noise_image(1), _gradient_image(), _noise_image(2)
    got = metric.score([a, b], ["", ""], [a, c])
    # Independently: the saved ViT through plain transformers, class token of the last layer.
    root = ensure_builtin("tiny-vit")
    vit = ViTModel.from_pretrained(root).eval()
    proc = AutoImageProcessor.from_pretrained(root, backend="pil")
    with torch.no_grad():
        cls = vit(pixel_values=proc(images=[a, b, a, c], return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    cls = torch.nn.functional.normalize(cls, dim=-1)
    expected = (cls[:2] @ cls[2:].T).mean(dim=1)
    assert got.per_item == pytest.approx(expected.tolist(), abs=1e-5)
    assert got.per_item[0] > got.per_item[1]  # image a is one of the references
    assert metric.score([a], [""], [a]).value == pytest.approx(1.0, abs=1e-5)


def test_dino_without_a_vision_model_is_an_error_that_says_which_key() -> None:
    with pytest.raises(ValueError, match="vision_model"):
        get_metric("dino", clip=CLIP)
    with pytest.raises(ValidationError, match="vision_model"):
        ev.EvaluatorConfig(generation=EvalSettings(prompts=("x",)), metrics=("clip_t", "dino"))


def test_a_pickle_only_vision_model_is_refused(tmp_path) -> None:
    from trainers.models import PickleRefusedError, ensure_builtin
    from trainers.scoring_models import load_vision_model

    src = ensure_builtin("tiny-vit")
    for f in src.iterdir():
        if f.suffix == ".json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PickleRefusedError, match="safetensors"):
        load_vision_model(str(tmp_path))


def test_composite_is_the_weighted_mean_on_one_scale() -> None:
    # CLIP-T's x100 is undone: 30 -> 0.30; weights need not sum to 1.
    assert mt.composite({"clip_t": 30.0, "clip_i": 0.8}, {"clip_t": 1, "clip_i": 1}) == pytest.approx(0.55)
    assert mt.composite({"clip_t": 30.0, "clip_i": 0.8}, {"clip_t": 3, "clip_i": 1}) == pytest.approx(0.425)
    with pytest.raises(KeyError, match="dino"):
        mt.composite({"clip_t": 30.0}, {"clip_t": 1, "dino": 1})


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(metrics=("clip_t", "fid")), "unknown ['fid']"),
    (dict(weights={"clip_t": 1.0, "dino": 1.0}), "not in metrics"),
    (dict(weights={"clip_t": 0.0, "clip_i": 0.0}), "positive sum"),
    (dict(stepz=3), "stepz"),
])
def test_evaluator_config_errors_name_the_key(kwargs, fragment) -> None:
    import re

    with pytest.raises(ValidationError, match=re.escape(fragment)):
        ev.EvaluatorConfig(generation=EvalSettings(prompts=("x",)), **kwargs)


def test_references_are_the_training_images_as_trained_on(demo_dir) -> None:
    from trainers.data import DataConfig, load_pixels, preflight

    data = DataConfig(path=str(demo_dir), resolution=64)
    cfg = ev.EvaluatorConfig(generation=EvalSettings(prompts=("x",)))
    refs = ev.load_references(cfg, data)
    records = preflight(data)
    assert len(refs) == len(records) == 8 and all(r.size == (64, 64) for r in refs)
    pixels = load_pixels(records[0], data)  # the crop the latent cache encodes
    back = torch.from_numpy(np.asarray(refs[0], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (back - pixels).abs().max() <= 1 / 127.5 + 1e-6


def test_evaluator_scores_writes_samples_and_records_what_the_scores_depend_on(tiny_model, demo_dir, tmp_path) -> None:
    import json

    from trainers.data import DataConfig

    cfg = ev.EvaluatorConfig(
        generation=EvalSettings(prompts=("a photo of {token}", "{token} on a beach"), token="sks toy",
                                seeds=(0, 1, 2), **FAST),
        metrics=("clip_t", "clip_i", "dino"), clip=CLIP, vision_model=VIT, weights={"clip_t": 1, "clip_i": 2})
    refs = ev.load_references(cfg, DataConfig(path=str(demo_dir), resolution=64))
    evaluator = ev.Evaluator(cfg, refs)
    rec = evaluator.run(tiny_model)
    assert set(rec.scores) == {"clip_t", "clip_i", "dino", "composite"}
    assert rec.scores["composite"] == pytest.approx((rec.scores["clip_t"] / 100 + 2 * rec.scores["clip_i"]) / 3)
    assert [(r["prompt"], r["seed"]) for r in rec.rows][:2] == [("a photo of sks toy", 0), ("a photo of sks toy", 1)]
    # The aggregate is the mean of the per-image values (clip_t: before the clamp at 0).
    assert np.mean([r["clip_i"] for r in rec.rows]) == pytest.approx(rec.scores["clip_i"], abs=1e-6)
    ident = rec.identity
    assert ident["clip"]["spec"] == CLIP and len(ident["clip"]["weights_sha256"]) == 64
    assert ident["vision"]["spec"] == VIT and ident["settings"]["generation"]["seeds"] == [0, 1, 2]
    out = ev.write_samples(rec, tmp_path / "s", {"step": 40})
    info = json.loads(out.read_text())
    assert info["step"] == 40 and info["scores"] == rec.scores and len(info["rows"]) == 6
    assert all((tmp_path / "s" / r["file"]).is_file() for r in info["rows"])
    grid = Image.open(tmp_path / "s" / "grid.png")
    assert grid.size == (3 * 64, 2 * 64)  # one column per seed, one row per prompt
    # The same checkpoint, prompts and seeds give the same scores (paired comparisons).
    again = ev.Evaluator(cfg, refs).run(tiny_model)
    assert again.scores == rec.scores and again.identity == rec.identity


def test_vae_round_trip_is_diffusers_own_reconstruction(tiny_model) -> None:
    """Against diffusers' AutoencoderKL.forward (encode, the posterior's mode, decode) and the
    pipeline's own postprocessing (VaeImageProcessor, as every generated image is written)."""
    from diffusers.image_processor import VaeImageProcessor

    images = [_noise_image(1), _gradient_image()]
    got = ev.vae_round_trip(tiny_model.vae, images)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]) / 127.5 - 1
    with torch.no_grad():
        y = tiny_model.vae(x, sample_posterior=False).sample
    expected = VaeImageProcessor().postprocess(y, output_type="pil")
    for a, b in zip(got, expected):
        assert a.size == b.size and np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(images[0], np.int16)).mean() > 1  # it did change them


def test_reference_vae_scores_against_the_references_after_the_models_vae(tiny_model) -> None:
    """`reference_vae: true`: clip_i compares each image with the references passed through the
    model's VAE once (and only once for every later evaluation); false: with the references."""
    refs = [_noise_image(3), _gradient_image()]
    settings = EvalSettings(prompts=("a red cube",), seeds=(0, 1), **FAST)
    records = {}
    for flag in (False, True):
        cfg = ev.EvaluatorConfig(generation=settings, metrics=("clip_i",), clip=CLIP, reference_vae=flag)
        evaluator = ev.Evaluator(cfg, refs)
        records[flag] = evaluator.run(tiny_model)
        if flag:
            passed = evaluator._vae_references
            assert passed is not None and evaluator.run(tiny_model).scores == records[flag].scores
            assert evaluator._vae_references is passed  # one round trip per evaluator
    images = [g.image for g in records[True].images]
    metric = get_metric("clip_i", clip=CLIP)
    assert records[False].scores["clip_i"] == pytest.approx(metric.score(images, ["a red cube"] * 2, refs).value, abs=1e-6)
    assert records[True].scores["clip_i"] == pytest.approx(
        metric.score(images, ["a red cube"] * 2, ev.vae_round_trip(tiny_model.vae, refs)).value, abs=1e-6)
    assert records[True].scores["clip_i"] != pytest.approx(records[False].scores["clip_i"], abs=1e-6)
    assert records[True].identity["settings"]["reference_vae"] is True


def _clip_image_features(images: list[Image.Image]) -> torch.Tensor:
    """Unit-norm CLIP image embeddings straight from transformers (processor + get_image_features)."""
    model, _, processor = mt.get_clip(CLIP)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    feats = getattr(out, "pooler_output", out)
    return feats / feats.norm(dim=-1, keepdim=True)


def test_drift_is_the_cosine_to_the_base_models_image_at_the_same_prompt_and_seed(tiny_model) -> None:
    """The base model's run (``as_base``) scores itself 1 and hands over its embeddings; a changed
    model's drift on the prompts without the token is, image by image, the cosine of its image and
    the base image at the same prompt and seed, computed here with transformers' CLIP directly.
    Images of prompts with the token are not scored; without the base embeddings it refuses."""
    from trainers.devices import sampled_placement

    cfg = ev.EvaluatorConfig(generation=EvalSettings(prompts=("a photo of {token}", "a red cube", "a blue ball"),
                                                     token="sks toy", seeds=(0, 1), **FAST),
                             metrics=("clip_t", "drift", "drift_dino"), clip=CLIP, vision_model=VIT,
                             weights={"clip_t": 1.0, "drift": 1.0})
    base = ev.Evaluator(cfg, []).run(tiny_model, as_base=True)
    prior = [r for r in base.rows if "sks" not in r["prompt"]]
    assert len(prior) == 4 and all(r["drift"] == pytest.approx(1.0, abs=1e-5) for r in prior)
    assert all(r["drift"] is None and r["drift_dino"] is None for r in base.rows if "sks" in r["prompt"])
    assert set(base.base_embeddings) == {"drift", "drift_dino"}
    assert set(base.base_embeddings["drift"]) == {(r["prompt"], r["seed"]) for r in prior}

    with torch.no_grad():  # a different model: the UNet's output layer moved
        for p in tiny_model.unet.conv_out.parameters():
            p.add_(0.5 * torch.randn_like(p))
    evaluator = ev.Evaluator(cfg, [])
    with pytest.raises(ValueError, match="no base-model embeddings for sampling placement"):
        evaluator.run(tiny_model)
    evaluator.set_base({sampled_placement(tiny_model, None): base.base_embeddings})
    rec = evaluator.run(tiny_model)
    pairs = [(g, b) for g, b in zip(rec.images, base.images) if "sks" not in g.prompt]
    assert all((g.prompt, g.seed) == (b.prompt, b.seed) for g, b in pairs)
    expected = (_clip_image_features([g.image for g, _ in pairs]) * _clip_image_features([b.image for _, b in pairs])).sum(-1)
    got = [r["drift"] for r in rec.rows if "sks" not in r["prompt"]]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert rec.scores["drift"] == pytest.approx(float(expected.mean()), abs=1e-5) and min(got) < 0.999
    assert rec.scores["drift_dino"] < 1.0 - 1e-4

    # Deferred (the held-out confirmation draws the base model beside the candidates): no base
    # embeddings needed at run time, drift and composite unscored until complete_drift, then the
    # same per-image values as the transformers reference above.
    later = ev.Evaluator(cfg, []).run(tiny_model, defer_drift=True)
    assert later.scores["drift"] is None and later.scores["composite"] is None
    assert all(r["drift"] is None for r in later.rows) and set(later.pending_drift) == {"drift", "drift_dino"}
    with pytest.raises(ValueError, match="the base model has no image at"):
        ev.complete_drift(dict(later.scores), [dict(r) for r in later.rows], later.pending_drift,
                          {k: dict(list(t.items())[1:]) for k, t in base.base_embeddings.items()}, cfg.composite_weights())
    ev.complete_drift(later.scores, later.rows, later.pending_drift, base.base_embeddings, cfg.composite_weights())
    assert [r["drift"] for r in later.rows if "sks" not in r["prompt"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(r["drift"] is None for r in later.rows if "sks" in r["prompt"])
    assert later.scores == pytest.approx(rec.scores, abs=1e-6)  # composite and drift_dino included

    # Nothing to defer without a drift metric: the record is complete as it comes.
    plain = ev.EvaluatorConfig(generation=cfg.generation, metrics=("clip_t",), clip=CLIP)
    whole = ev.Evaluator(plain, []).run(tiny_model, defer_drift=True)
    assert not whole.pending_drift and whole.scores["composite"] == pytest.approx(0.01 * whole.scores["clip_t"])


def test_an_evaluation_embeds_each_image_once_per_scorer(tiny_model) -> None:
    """CLIP-T (every image), CLIP-I (the subject's) and drift (the others') read one set of CLIP
    embeddings per evaluation, DINO and drift_dino one set of the backbone's: counted at the real
    models' forward passes. The scores are those of each metric run on its own images outside
    an evaluation (each embedding its own batch)."""
    from trainers.devices import sampled_placement

    cfg = ev.EvaluatorConfig(generation=EvalSettings(prompts=("a photo of {token}", "a red cube"), token="sks toy",
                                                     seeds=(0, 1, 2), **FAST),
                             metrics=("clip_t", "clip_i", "dino", "drift", "drift_dino"), clip=CLIP, vision_model=VIT)
    refs = [_noise_image(0), _gradient_image()]
    base = ev.Evaluator(cfg, refs).run(tiny_model, as_base=True)
    clip, vision = mt.get_clip(CLIP)[0], mt.get_vision_model(VIT)[0]
    seen = {"clip": 0, "vision": 0}

    def count(name: str):
        def hook(module, args, kwargs, out):
            seen[name] += kwargs["pixel_values"].shape[0] if "pixel_values" in kwargs else args[0].shape[0]
        return hook

    handles = [clip.vision_model.register_forward_hook(count("clip"), with_kwargs=True),
               vision.register_forward_hook(count("vision"), with_kwargs=True)]
    try:
        evaluator = ev.Evaluator(cfg, refs)
        evaluator.set_base({sampled_placement(tiny_model, None): base.base_embeddings})
        evaluator.references.embeddings(("clip", CLIP, "cpu"), lambda r: mt.image_embeddings(CLIP, r))
        evaluator.references.embeddings(("vision", VIT, "cpu"), lambda r: mt.vision_embeddings(VIT, r))
        seen.update(clip=0, vision=0)  # the references' own embeddings are kept across evaluations anyway
        rec = evaluator.run(tiny_model)
        assert seen == {"clip": 6, "vision": 6}, seen  # 2 prompts x 3 seeds, once each
        pils, prompts = [g.image for g in rec.images], [g.prompt for g in rec.images]
        subject = [i for i, p in enumerate(prompts) if "sks" in p]
        kw = dict(clip=CLIP, vision=VIT, token="sks toy")
        alone = {"clip_t": mt.get_metric("clip_t", **kw).score(pils, prompts, refs).value,
                 "clip_i": mt.get_metric("clip_i", **kw).score([pils[i] for i in subject], [], refs).value,
                 "dino": mt.get_metric("dino", **kw).score([pils[i] for i in subject], [], refs).value}
        prior = [i for i in range(len(pils)) if i not in subject]
        table = {m: base.base_embeddings[m] for m in ("drift", "drift_dino")}
        for name in ("drift", "drift_dino"):
            own = torch.stack([table[name][(prompts[i], rec.images[i].seed)] for i in prior])
            alone[name] = mt.get_metric(name, **kw).score([pils[i] for i in prior], [], None, base=own).value
        assert seen["clip"] > 6 and seen["vision"] > 6  # outside an evaluation nothing is shared
    finally:
        for h in handles:
            h.remove()
    assert {k: rec.scores[k] for k in alone} == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(metrics=("drift",), generation=EvalSettings(prompts=("a photo of {token}",), token="sks toy")),
     "every generation.prompts entry has the token"),
    (dict(metrics=("drift_dino",), generation=EvalSettings(prompts=("a red cube",))), "vision_model is not set"),
])
def test_drift_settings_that_cannot_work_are_refused(kwargs, fragment) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ev.EvaluatorConfig(clip=CLIP, **kwargs)
