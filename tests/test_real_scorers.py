"""The scoring models a real sweep uses, at toy size: the architectures and preprocessing of
openai/clip-vit-large-patch14 (CLIP-T, CLIP-I, drift) and facebook/dinov2-base (DINO, drift_dino),
randomly initialised with tiny widths, written to disk in the transformers layout and loaded by the
evaluator's own loaders (``trainers.scoring_models``), then scored against transformers called
directly (the reference): the CLS token DINOv2 returns as its pooled output, CLIP's projected
features. No download: the repos' preprocessing settings are written here as the repos publish
them (224 px crops; the resize, resampling and normalisation of each).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers import evaluate as ev
from trainers.generation import EvalSettings

# openai/clip-vit-large-patch14's preprocessor_config.json (CLIPImageProcessor).
CLIP_L14_PROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                          crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                          do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
# facebook/dinov2-base's preprocessor_config.json (BitImageProcessor): resize to 256, crop 224, ImageNet stats.
DINOV2_PROCESSOR = dict(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                        do_convert_rgb=True)


def _write_clip_l14(out: Path) -> None:
    """ViT-L/14's CLIP (quick-GELU, 14 px patches on 224 px, 77 text positions) at toy width."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from trainers.tiny import _text_config, char_tokenizer

    tokenizer = char_tokenizer()
    text = _text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vision = dict(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="quick_gelu")
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(
        out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(**CLIP_L14_PROCESSOR).save_pretrained(out)


def _write_pickscore(model_dir: Path, processor_dir: Path) -> None:
    """PickScore_v1's layout: a CLIP-H/14 (GELU in both towers, 14 px patches on 224 px, 77 text
    positions, logit scale 100) at toy width, weights and config only; its tokenizer and image
    processor in another folder, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K publishes them (the same
    preprocessing as OpenAI's CLIP)."""
    import math

    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from trainers.tiny import _text_config, char_tokenizer

    tokenizer = char_tokenizer()
    text = {**_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id), "hidden_act": "gelu"}
    vision = dict(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="gelu")
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24,
                         logit_scale_init_value=math.log(100.0))).save_pretrained(model_dir, safe_serialization=True)
    assert not any(model_dir.glob("*token*")) and not (model_dir / "preprocessor_config.json").exists()
    tokenizer.save_pretrained(processor_dir)
    CLIPImageProcessorPil(**CLIP_L14_PROCESSOR).save_pretrained(processor_dir)


def _write_dinov2_base(out: Path) -> None:
    """DINOv2-base's backbone (14 px patches, 518 px position grid interpolated to the 224 crop,
    layer scale) at toy width."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=518)).save_pretrained(out, safe_serialization=True)
    BitImageProcessorPil(**DINOV2_PROCESSOR).save_pretrained(out)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("real-scorers")
    _write_clip_l14(root / "clip-vit-large-patch14")
    _write_dinov2_base(root / "dinov2-base")
    return str(root / "clip-vit-large-patch14"), str(root / "dinov2-base")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _reference_dino(path: str, images: list[Image.Image]) -> torch.Tensor:
    from transformers import BitImageProcessorPil, Dinov2Model

    model = Dinov2Model.from_pretrained(path).eval()
    pixels = BitImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (224, 224)
    with torch.no_grad():
        return _unit(model(pixel_values=pixels).pooler_output)  # DINOv2's CLS after its final norm


def _reference_clip(path: str, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (224, 224)
    enc = CLIPTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return _unit(getattr(img, "pooler_output", img)), _unit(getattr(txt, "pooler_output", txt))


def test_clip_l14_and_dinov2_base_score_as_transformers_computes_them(scorers, tiny_model) -> None:
    """Every metric a real sweep computes, through the evaluator, equals transformers' own numbers
    for the same images: CLIP-T (100 x cosine with the prompt, per image; torchmetrics clamps only
    the mean), CLIP-I and DINO (mean cosine with the references), drift and drift_dino (cosine with
    the base model's image at the same prompt and seed)."""
    clip, dino = scorers
    gen = EvalSettings(prompts=("a photo of {token}", "a red cube"), token="sks toy", seeds=(0, 1), steps=2,
                       guidance_scale=3.0)
    refs = [Image.new("RGB", (48, 40), c) for c in ((200, 30, 30), (20, 180, 60))]  # not square: crops apply
    cfg = ev.EvaluatorConfig(generation=gen, metrics=("clip_t", "clip_i", "dino", "drift", "drift_dino"),
                             clip=clip, vision_model=dino)
    base = ev.Evaluator(cfg, refs).run(tiny_model, as_base=True)
    assert base.scores["drift"] == pytest.approx(1.0, abs=1e-5) and base.scores["drift_dino"] == pytest.approx(1.0, abs=1e-5)

    with torch.no_grad():  # a fine-tuned model: its UNet's output layer moved
        for p in tiny_model.unet.conv_out.parameters():
            p.add_(0.5 * torch.randn_like(p))
    evaluator = ev.Evaluator(cfg, refs)
    evaluator.set_base({base.placement: base.base_embeddings})
    rec = evaluator.run(tiny_model)
    images, prompts = [g.image for g in rec.images], [g.prompt for g in rec.images]
    subject = [i for i, p in enumerate(prompts) if "sks toy" in p]
    prior = [i for i, p in enumerate(prompts) if "sks toy" not in p]
    assert len(subject) == len(prior) == 2

    img, txt = _reference_clip(clip, images, prompts)
    ref_img, _ = _reference_clip(clip, refs, prompts[:1])
    base_img, _ = _reference_clip(clip, [g.image for g in base.images], prompts[:1])
    dino_gen, dino_ref = _reference_dino(dino, images), _reference_dino(dino, refs)
    dino_base = _reference_dino(dino, [g.image for g in base.images])
    assert [(g.prompt, g.seed) for g in base.images] == [(g.prompt, g.seed) for g in rec.images]

    def column(name: str, idx: list[int]) -> list[float]:
        return [rec.rows[i][name] for i in idx]

    # CLIP-T, CLIP-I and DINO read the images of prompts with the token (trainers.metrics).
    assert column("clip_t", subject) == pytest.approx([100 * float(img[i] @ txt[i]) for i in subject], abs=1e-3)
    assert column("clip_i", subject) == pytest.approx([float((img[i] @ ref_img.T).mean()) for i in subject], abs=1e-5)
    assert column("dino", subject) == pytest.approx([float((dino_gen[i] @ dino_ref.T).mean()) for i in subject], abs=1e-5)
    assert column("drift", prior) == pytest.approx([float(img[i] @ base_img[i]) for i in prior], abs=1e-5)
    assert column("drift_dino", prior) == pytest.approx([float(dino_gen[i] @ dino_base[i]) for i in prior], abs=1e-5)
    assert min(column("drift_dino", prior)) < 0.9999  # the moved model is seen to drift
    assert (rec.identity["clip"]["spec"], rec.identity["vision"]["spec"]) == (clip, dino)


def test_pickscore_scores_as_its_authors_code_computes_it(tmp_path, tiny_model) -> None:
    """The optional human-preference scorer: a CLIP-H-shaped model whose folder holds weights only,
    its tokenizer and processor from another folder (as PickScore_v1 is used with LAION's CLIP-H
    processor), scored through the evaluator and against the authors' recipe written out with
    transformers: ``exp(logit_scale) * cos(image, text)``, prompts padded and truncated at 77."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model_dir, proc_dir = tmp_path / "PickScore_v1", tmp_path / "CLIP-ViT-H-14"
    _write_pickscore(model_dir, proc_dir)
    long = "a photo of {token} " + "on a very long and winding road " * 4  # over 77 characters: truncated
    gen = EvalSettings(prompts=("a photo of {token}", long), token="sks toy", seeds=(0, 1), steps=2, guidance_scale=3.0)
    # with a concept, the token is read as it (as for CLIP-T); the composite puts the score on its 0.01 scale
    cfg = ev.EvaluatorConfig(generation=gen, metrics=("pickscore",), preference_model=str(model_dir),
                             preference_processor=str(proc_dir), concept="teddy bear")
    rec = ev.Evaluator(cfg, []).run(tiny_model)
    images, prompts = [g.image for g in rec.images], [g.prompt.replace("sks toy", "teddy bear") for g in rec.images]
    assert max(len(p) for p in prompts) > 77 and all("sks" not in p for p in prompts)

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(proc_dir)(images=images, return_tensors="pt")["pixel_values"]
    enc = CLIPTokenizer.from_pretrained(proc_dir)(prompts, padding=True, truncation=True, max_length=77,
                                                  return_tensors="pt")
    with torch.no_grad():
        img = _unit(model.get_image_features(pixel_values=pixels).pooler_output)
        txt = _unit(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                    .pooler_output)
        expected = model.logit_scale.exp() * (img * txt).sum(dim=-1)
        assert float(model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-5)
    assert [r["pickscore"] for r in rec.rows] == pytest.approx(expected.tolist(), abs=1e-3)
    assert rec.scores["pickscore"] == pytest.approx(float(expected.mean()), abs=1e-3)
    assert rec.scores["composite"] == pytest.approx(0.01 * rec.scores["pickscore"], abs=1e-6)
    assert rec.identity["preference"]["spec"] == str(model_dir)
    assert rec.identity["preference"]["processor"] == str(proc_dir)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(metrics=("clip_t", "pickscore")), "preference_model is not set"),
    (dict(metrics=("clip_t",), preference_model="org/model"), "'pickscore' is not in metrics"),
    (dict(metrics=("clip_t", "pickscore"), preference_processor="org/processor"), "preference_model is not"),
])
def test_pickscore_settings_that_would_do_nothing_are_refused_naming_the_key(kwargs, fragment) -> None:
    gen = EvalSettings(prompts=("a photo of {token}",), token="sks toy", seeds=(0,), steps=2)
    with pytest.raises(ValueError, match=fragment):
        ev.EvaluatorConfig(generation=gen, **kwargs)


def test_a_built_in_model_is_not_a_preference_model_whichever_metric_loads_first(tiny_model) -> None:
    """The CLIP cache is keyed by role too: the tiny CLIP loaded for CLIP-T is not handed to
    PickScore, which refuses built-in names (there is no built-in preference model)."""
    gen = EvalSettings(prompts=("a photo of {token}",), token="sks toy", seeds=(0,), steps=2)
    cfg = ev.EvaluatorConfig(generation=gen, metrics=("clip_t", "pickscore"), clip="builtin:tiny-clip",
                             preference_model="builtin:tiny-clip")
    with pytest.raises(Exception, match="preference_model 'builtin:tiny-clip'"):
        ev.Evaluator(cfg, []).run(tiny_model)
