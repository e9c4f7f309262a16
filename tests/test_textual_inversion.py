"""Textual inversion on the toy world: tokens, initialisation, frozen rows, precision, exports,
config. The shared contract (loss, loader, resume, teardown) is in test_trainer_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.config import ConfigError, RunConfig, TextualInversionSettings, TrainConfig, validate_mapping
from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache
from trainers.models import load_base_model
from trainers.textual_inversion import COMMUNITY_KEY, WEIGHTS, TextualInversionTrainer
from trainers.toyworld import weights_dir

TOKEN = "sks shape"
PROMPT = "a red sks shape on a blue background"


@pytest.fixture
def toy():
    return load_base_model("builtin:toyworld")


def _data(model, tmp_path: Path, cache_text: bool = False):
    cfg = DataConfig(path="builtin:toystar", resolution=32)
    return build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache", cache_text=cache_text)


def _trainer(model, tmp_path: Path, data=None, train: dict | None = None, **ti) -> TextualInversionTrainer:
    tcfg = TrainConfig(**{"learning_rate": 5e-2, "max_train_steps": 8, "train_batch_size": 2, **(train or {})})
    settings = TextualInversionSettings(**{"placeholder_token": TOKEN, **ti})
    return TextualInversionTrainer(model, data or _data(model, tmp_path), tcfg, settings, tmp_path / "out")


def test_the_placeholder_becomes_one_token_per_vector_and_every_vector_trains(toy, tmp_path):
    tr = _trainer(toy, tmp_path, vectors_per_token=3, initializer="shape")
    assert tr.tokens == ["sks shape", "sks shape_1", "sks shape_2"]  # diffusers' naming
    new_ids = tr.tokenizer.convert_tokens_to_ids(tr.tokens)
    ids = tr.tokenize_captions([PROMPT])[0].tolist()
    start = ids.index(new_ids[0])
    assert ids[start:start + 3] == new_ids, "a training caption does not carry every vector"
    before = tr.learned_embeds()
    tr.train()
    after = tr.learned_embeds()
    assert all(not torch.equal(before[i], after[i]) for i in range(3)), "a vector received no gradient"
    tr.teardown()


def test_only_the_new_rows_change_even_with_weight_decay(toy, tmp_path):
    matrix = toy.text_encoder.get_input_embeddings().weight.detach().clone()
    frozen = {n: p.detach().clone() for m in (toy.unet, toy.vae, toy.text_encoder) for n, p in m.named_parameters()}
    tr = _trainer(toy, tmp_path, train={"adam_weight_decay": 0.5, "max_train_steps": 6}, vectors_per_token=2)
    tr.train()
    (tmp_path / "export").mkdir()
    export = tr.export_weights(tmp_path / "export")
    tr.teardown()
    assert torch.equal(toy.text_encoder.get_input_embeddings().weight, matrix)
    now = {n: p for m in (toy.unet, toy.vae, toy.text_encoder) for n, p in m.named_parameters()}
    assert now.keys() == frozen.keys() and all(torch.equal(now[n], frozen[n]) for n in frozen)
    # Independently of our wrapper: diffusers' loader puts the export beside the same base rows.
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None)
    pipe.load_textual_inversion(str(export))
    loaded = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(loaded[: len(matrix)], matrix)
    assert torch.equal(loaded[len(matrix):], load_file(str(export))[TOKEN])


def test_a_placeholder_already_in_the_vocabulary_is_an_error_and_changes_nothing(toy, tmp_path):
    data = _data(toy, tmp_path)
    vocab = len(toy.tokenizer)
    for taken in ("a", "<|endoftext|>"):
        with pytest.raises(ValueError, match="already a token of the base model's vocabulary"):
            _trainer(toy, tmp_path, data, placeholder_token=taken)
    assert len(toy.tokenizer) == vocab


@pytest.mark.parametrize("text,vectors,picked", [
    ("red", 6, [0, 0, 1, 1, 2, 2]),  # 3 tokens over 6 vectors: in order, two each
    ("red", 2, [0, 1]),  # 3 tokens over 2 vectors: the first and the middle one
    ("a", 3, [0, 0, 0]),  # a single token fills every vector
])
def test_the_initializer_is_spread_over_the_vectors_in_order(toy, tmp_path, text, vectors, picked):
    ids = toy.tokenizer(text, add_special_tokens=False).input_ids
    matrix = toy.text_encoder.get_input_embeddings().weight.detach()
    tr = _trainer(toy, tmp_path, vectors_per_token=vectors, initializer=text)
    assert torch.equal(tr.learned_embeds(), matrix[[ids[j] for j in picked]])
    tr.teardown()


def test_without_an_initializer_the_vectors_start_at_the_vocabulary_mean(toy, tmp_path):
    matrix = toy.text_encoder.get_input_embeddings().weight.detach()
    tr = _trainer(toy, tmp_path, vectors_per_token=2)
    assert torch.allclose(tr.learned_embeds(), matrix.mean(dim=0).expand(2, -1))
    tr.teardown()


def test_an_initializer_without_tokens_is_an_error_naming_it(toy, tmp_path):
    with pytest.raises(ValueError, match=r"textual_inversion.initializer '   ': the tokenizer cannot encode"):
        _trainer(toy, tmp_path, initializer="   ")


def test_captions_without_the_placeholder_or_too_long_once_expanded_are_errors(toy, tmp_path):
    data = _data(toy, tmp_path)
    with pytest.raises(ValueError, match="appears in none of the training captions"):
        _trainer(toy, tmp_path, data, placeholder_token="<zorp>")
    with pytest.raises(ValueError, match="more than the text encoder's 77"):
        _trainer(toy, tmp_path, data, vectors_per_token=75)


def test_text_encoder_runs_in_fp32_beside_a_bf16_unet_and_never_reads_the_text_cache(toy, tmp_path):
    data = _data(toy, tmp_path, cache_text=True)
    data.text_embeds[:] = float("nan")  # a trainer reading the frozen-encoder cache would go NaN
    assert not TextualInversionTrainer.caches_text(TextualInversionSettings())
    tr = _trainer(toy, tmp_path, data, train={"mixed_precision": "bf16", "max_train_steps": 3})
    assert next(toy.unet.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in toy.text_encoder.parameters()} == {torch.float32}
    history = tr.train()
    assert all(np.isfinite(s.loss) for s in history)
    tr.teardown()


def test_scale_lr_multiplies_by_batch_and_accumulation_and_the_rate_used_is_logged(toy, tmp_path):
    tr = _trainer(toy, tmp_path, train={"learning_rate": 1e-3, "scale_lr": True, "train_batch_size": 2,
                                        "gradient_accumulation_steps": 3, "max_train_steps": 1})
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(6e-3)
    assert tr.train()[0].lr == pytest.approx(6e-3)
    meta = json.loads(safe_open(str(tr.export_weights(tmp_path)), "pt").metadata()["sdsweep"])
    assert meta["learning_rate_as_used"] == pytest.approx(6e-3)
    tr.teardown()


def test_exports_in_both_layouts_load_in_diffusers_and_draw_the_same(toy, tmp_path):
    tr = _trainer(toy, tmp_path, vectors_per_token=2, initializer="shape")
    tr.train()
    ckpt = tr.save_checkpoint(tmp_path / "ckpt")
    with tr.evaluation_model() as sampled:  # evaluation prompts get the multi-vector expansion
        assert sampled.pipeline().maybe_convert_prompt(PROMPT, sampled.tokenizer) == \
            "a red sks shape sks shape_1 on a blue background"
    tr.teardown()
    dest = tmp_path / "best"
    dest.mkdir()
    files = TextualInversionTrainer.export_files(ckpt, dest, "run-1", {"trial_id": "t1", "metric": {"value": 0.5}})
    assert files == [WEIGHTS, "sks-shape.safetensors"]  # A1111 / ComfyUI names it by the stem; no spaces
    diffusers_sd = load_file(str(dest / WEIGHTS))
    assert list(diffusers_sd) == [TOKEN] and diffusers_sd[TOKEN].shape == (2, 64)
    with safe_open(str(dest / files[1]), "pt") as f:
        assert list(f.keys()) == [COMMUNITY_KEY]  # one tensor: A1111 refuses files with more
        meta = f.metadata()
    info = json.loads(meta["sdsweep"])
    assert (info["base_model_identity"], info["step"], info["vectors_per_token"]) == (toy.identity, 8, 2)
    assert json.loads(meta["sdsweep_best"])["trial_id"] == "t1" and meta["sdsweep_placeholder"] == TOKEN

    images = []
    for path, token in ((dest / WEIGHTS, None), (dest / files[1], TOKEN)):
        pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_textual_inversion(str(path), token=token)
        images.append(pipe(PROMPT, num_inference_steps=3, height=32, width=32, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
    assert np.array_equal(images[0], images[1])


def _run(**extra) -> dict:
    return {"model": "builtin:toyworld", "data": {"path": "builtin:toystar", "resolution": 32}, **extra}


def test_run_config_selects_the_method_section_and_takes_the_placeholder_from_token():
    cfg = validate_mapping(_run(method="textual_inversion", token=TOKEN), RunConfig, "run.yaml")
    assert cfg.settings.placeholder_token == TOKEN and cfg.lora is None
    own = validate_mapping(_run(method="textual_inversion", token=TOKEN,
                                textual_inversion={"placeholder_token": "<star>"}), RunConfig, "run.yaml")
    assert own.settings.placeholder_token == "<star>"
    with pytest.raises(ConfigError, match=r"(?s)run.yaml: .*\n  lora: a settings section of another method"):
        validate_mapping(_run(method="textual_inversion", token=TOKEN, lora={"rank": 4}), RunConfig, "run.yaml")
    with pytest.raises(ConfigError, match="textual_inversion.placeholder_token: not set and no `token`"):
        validate_mapping(_run(method="textual_inversion"), RunConfig, "run.yaml")
    with pytest.raises(ConfigError, match="textual_inversion.vectors_per_token"):
        validate_mapping(_run(method="textual_inversion", token=TOKEN, textual_inversion={"vectors_per_token": 0}),
                         RunConfig, "run.yaml")


def test_a_single_run_trains_textual_inversion_without_caching_text(tmp_path):
    from trainers.run import train_from_config

    cfg = validate_mapping(_run(method="textual_inversion", token=TOKEN, output_dir=str(tmp_path / "out"),
                                cache_dir=str(tmp_path / "cache"),
                                train={"max_train_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2}),
                           RunConfig, "run.yaml")
    result = train_from_config(cfg)
    assert result.weights.name == WEIGHTS and result.final_step == 4
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["method"] == "textual_inversion"
    assert run["cache"]["texts_encoded"] == 0 and run["cache"]["images_encoded"] == 8  # the trainer said: no text
    resumed = train_from_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_train_steps": 6})}),
                                resume="latest")
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-4" and resumed.final_step == 6
