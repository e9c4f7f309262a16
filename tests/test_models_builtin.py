"""The built-in tiny models: deterministic builds, real loading paths, SD proportions, identities."""

from __future__ import annotations

import hashlib
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from trainers.models import BaseModel, ensure_builtin, load_base_model, module_fingerprint
from trainers.scoring_models import load_clip
from trainers.tiny import char_tokenizer


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_builtin("tiny-sd")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> BaseModel:
    return load_base_model("builtin:tiny-sd")


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_sd_builds_byte_identical_in_two_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    for name in ("a", "b"):
        monkeypatch.setenv("SDSWEEP_CACHE", str(tmp_path / name))
        root = ensure_builtin("tiny-sd")
        assert root == tmp_path / name / "builtin" / "tiny-sd-v1"
        builds.append(_file_hashes(root))
    assert builds[0] == builds[1]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert "unet/diffusion_pytorch_model.safetensors" in builds[0]
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in builds[0])


def test_builtin_build_does_not_disturb_the_callers_rng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSWEEP_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_builtin("tiny-clip")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"builtin:tiny-sd.*builtin:tiny-clip"):
        ensure_builtin("tiny-xl")
    with pytest.raises(ValueError, match="builtin:tiny-sd"):
        load_base_model("builtin:huge")


def test_tiny_sd_directory_loads_with_plain_diffusers_and_generates_64px(tiny_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    out = pipe(
        "a photo of sks dog, 4K!", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    image = out.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


def test_base_model_has_sd1_schedules_and_a_working_pipeline(tiny: BaseModel) -> None:
    cfg = tiny.scheduler_config
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert cfg["num_train_timesteps"] == 1000 and cfg["prediction_type"] == "epsilon"
    assert type(tiny.noise_scheduler).__name__ == "DDPMScheduler"
    assert tiny.noise_scheduler.config.prediction_type == "epsilon"
    assert tiny.vae.config.scaling_factor == 0.18215
    pipe = tiny.pipeline()
    assert pipe.unet is tiny.unet  # generation sees the trained modules, not copies
    assert isinstance(pipe.scheduler, DDIMScheduler)
    img = pipe("x", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_vae_encode_costs_about_one_unet_forward_like_sd15(tiny: BaseModel) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_flops:
        latents = tiny.vae.encode(x).latent_dist.sample()
    assert latents.shape == (1, 4, 8, 8)  # 8x downsampling, 4 latent channels
    context = torch.randn(1, 77, tiny.text_encoder.config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_flops:
        tiny.unet(latents, torch.tensor([500]), context)
    ratio = vae_flops.get_total_flops() / unet_flops.get_total_flops()
    assert 0.7 <= ratio <= 1.5, ratio


def test_tokenizer_encodes_any_ascii_without_unknown_tokens(tiny: BaseModel, tiny_dir: Path) -> None:
    text = string.printable + " A Photo of SKS-dog #42, (van Gogh style)! ~`|\\"
    for tok in (tiny.tokenizer, char_tokenizer()):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert len(ids) == sum(not c.isspace() for c in text)  # one token per character
        assert len(tok) == tok.bos_token_id + 2 == 514
    padded = tiny.tokenizer("hi", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[0] == tiny.tokenizer.bos_token_id
    assert tiny.text_encoder.config.eos_token_id == tiny.tokenizer.eos_token_id
    pipe_tok = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True).tokenizer
    assert pipe_tok(text).input_ids == tiny.tokenizer(text).input_ids


def test_identity_is_stable_across_loads(tiny: BaseModel) -> None:
    again = load_base_model("builtin:tiny-sd")
    assert (again.identity, again.vae_identity, again.text_encoder_identity) == (
        tiny.identity,
        tiny.vae_identity,
        tiny.text_encoder_identity,
    )
    assert len(tiny.identity) == 64 and len({tiny.identity, tiny.vae_identity, tiny.text_encoder_identity}) == 3


def _edited_copy(src: Path, dst: Path, weight_file: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / weight_file
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_identity_tracks_unet_and_vae_changes_separately(tiny: BaseModel, tiny_dir: Path, tmp_path: Path) -> None:
    unet_changed = load_base_model(str(_edited_copy(tiny_dir, tmp_path / "u", "unet/diffusion_pytorch_model.safetensors")))
    assert unet_changed.identity != tiny.identity
    assert unet_changed.vae_identity == tiny.vae_identity
    assert unet_changed.text_encoder_identity == tiny.text_encoder_identity
    vae_changed = load_base_model(str(_edited_copy(tiny_dir, tmp_path / "v", "vae/diffusion_pytorch_model.safetensors")))
    assert vae_changed.vae_identity != tiny.vae_identity
    assert vae_changed.identity not in (tiny.identity, unet_changed.identity)
    assert vae_changed.text_encoder_identity == tiny.text_encoder_identity


def test_module_fingerprint_sees_values_and_dtypes() -> None:
    a = torch.nn.Linear(3, 2)
    before = module_fingerprint(a)
    assert module_fingerprint(a) == before
    with torch.no_grad():
        a.bias[0] += 1e-3
    changed = module_fingerprint(a)
    assert changed != before
    assert module_fingerprint(a.to(torch.bfloat16)) != changed


def test_torch_dtype_is_applied(tiny: BaseModel) -> None:
    half = load_base_model("builtin:tiny-sd", torch_dtype=torch.float16)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.float16}
    assert half.identity != tiny.identity


def test_tiny_clip_gives_projected_image_and_text_embeddings() -> None:
    model, tokenizer, processor = load_clip("builtin:tiny-clip")
    pixels = processor(images=[Image.new("RGB", (50, 40), (200, 10, 10))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    tokens = tokenizer(["a red square", "Two DOGS!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        # transformers 5: get_*_features return a model output; the projection is pooler_output.
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    assert image.shape == (1, 32) and text.shape == (2, 32)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()


def test_load_clip_rejects_non_clip_specs() -> None:
    with pytest.raises(ValueError, match="builtin:tiny-clip"):
        load_clip("builtin:tiny-sd")
    with pytest.raises(ValueError, match="offline|no network"):
        load_clip("nobody-xyz/no-such-clip")


def test_fingerprint_covers_zero_dim_tensors() -> None:
    # CLIP's logit_scale is a 0-dim parameter: it must hash, and a change of it must show.
    from trainers.tensor_files import tensors_digest

    a = tensors_digest({"w": torch.ones(2), "scale": torch.tensor(2.6592)})
    b = tensors_digest({"w": torch.ones(2), "scale": torch.tensor(2.6593)})
    assert a != b and len(a) == 64
