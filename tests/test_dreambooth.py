"""DreamBooth (first slice) on the toy world: the whole UNet trains in fp32, the text encoder
optionally, the optimizer choice fails loudly, and both export layouts load back in diffusers.
The shared contract (loss, loader, resume, teardown hash) is in test_trainer_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from conftest import model_digest
from trainers.config import DreamBoothSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.dreambooth import INFO_FILE, DreamBoothTrainer
from trainers.latents import build_latent_cache
from trainers.models import load_base_model
from trainers.toyworld import weights_dir


@pytest.fixture
def toy():
    return load_base_model("builtin:toyworld")


def _trainer(model, tmp_path: Path, train: dict | None = None, **db) -> DreamBoothTrainer:
    settings = DreamBoothSettings(**db)
    cfg = DataConfig(path="builtin:toystar", resolution=32)
    data = build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache",
                              cache_text=DreamBoothTrainer.caches_text(settings))
    tcfg = TrainConfig(**{"learning_rate": 1e-4, "max_train_steps": 4, "train_batch_size": 2, **(train or {})})
    return DreamBoothTrainer(model, data, tcfg, settings, tmp_path / "out")


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    h = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), h).sample


def test_the_whole_unet_trains_in_fp32_even_under_bf16_and_the_base_is_not_rounded(toy, tmp_path):
    fresh = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    tr = _trainer(toy, tmp_path, train={"mixed_precision": "bf16"})
    assert {p.dtype for p in toy.unet.parameters()} == {torch.float32}
    assert all(torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items()), "setup rounded the UNet"
    tr.train()
    changed = sum(not torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items())
    assert changed >= 0.9 * len(fresh), f"only {changed} of {len(fresh)} UNet tensors trained"
    tr.teardown()
    assert all(torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items())


def test_the_text_encoder_trains_with_its_own_rate_and_is_restored(toy, tmp_path):
    before = model_digest(toy)
    assert not DreamBoothTrainer.caches_text(DreamBoothSettings(train_text_encoder=True))
    tr = _trainer(toy, tmp_path, train_text_encoder=True, text_encoder_lr=3e-5)
    assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-4, 3e-5]
    te0 = {k: v.clone() for k, v in toy.text_encoder.state_dict().items()}
    tr.train()
    assert any(not torch.equal(v, te0[k]) for k, v in toy.text_encoder.state_dict().items())
    tr.teardown()
    assert model_digest(toy) == before


def test_8bit_adam_on_the_cpu_is_an_error_naming_the_setting_and_changes_nothing(toy, tmp_path):
    before = model_digest(toy)
    with pytest.raises(ValueError, match="dreambooth.optimizer adamw_8bit needs a CUDA GPU"):
        _trainer(toy, tmp_path, optimizer="adamw_8bit")
    assert model_digest(toy) == before


def test_both_exports_load_back_in_diffusers_and_equal_the_trained_unet(toy, tmp_path):
    tr = _trainer(toy, tmp_path, train={"max_train_steps": 3})
    tr.train()
    trained = _unet_out(toy.unet.eval())
    ckpt = tr.save_checkpoint(tmp_path / "ckpt")
    tr.teardown()
    dest = tmp_path / "best"
    dest.mkdir()
    files = DreamBoothTrainer.export_files(ckpt, dest, "run-1", {"trial_id": "t1"})
    assert files == ["unet", INFO_FILE, "run-1-dreambooth.safetensors"]
    # diffusers layout: the fine-tuned UNet beside the base model's other components.
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None,
                                                   unet=UNet2DConditionModel.from_pretrained(str(dest / "unet")))
    assert torch.allclose(_unet_out(pipe.unet), trained, atol=1e-6)
    assert not torch.allclose(_unet_out(toy.unet), trained, atol=1e-3), "the base UNet was left trained"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red sks shape on a blue background", num_inference_steps=2, height=32, width=32).images
    # Single file (A1111 / ComfyUI / kohya): loaded back with diffusers' single-file converters, offline.
    single = load_base_model(str(dest / files[2]), single_file_config=str(weights_dir()))
    assert torch.allclose(_unet_out(single.unet), trained, atol=1e-6)
    assert torch.equal(single.vae.state_dict()["decoder.conv_out.weight"], toy.vae.state_dict()["decoder.conv_out.weight"])
    with safe_open(str(dest / files[2]), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["sdsweep"])
    assert (info["method"], info["step"], info["base_model_identity"]) == ("dreambooth", 3, toy.identity)
    assert json.loads(meta["sdsweep_best"]) == {"trial_id": "t1"}
