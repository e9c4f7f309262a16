"""A trainer on a shared (reused-worker) base model: setup is transactional, teardown restores
everything, precision may change between trials, and device failures are told apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import model_digest
from trainers.base import NonFiniteLossError
from trainers.devices import make_accelerator
from trainers.config import LoraSettings, ModelSpec, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache
from trainers.lora import LoraTrainer
from trainers.models import load_base_model


def _data(model, demo_dir: Path, tmp_path: Path):
    cfg = DataConfig(path=str(demo_dir), resolution=64, random_flip=False)
    return build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache", cache_text=True)


def _trainer(model, data, tmp_path: Path, lora: dict | None = None, **train) -> LoraTrainer:
    tcfg = TrainConfig(**{"learning_rate": 1e-3, "max_train_steps": 3, "train_batch_size": 2, **train})
    return LoraTrainer(model, data, tcfg, LoraSettings(**(lora or {})), output_dir=tmp_path / "out")


def _weights(tr: LoraTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.named_trainable.items()}


def test_setup_failing_half_way_leaves_the_model_as_it_was_and_the_next_trial_trains_like_a_fresh_one(
        tiny_sd_dir, demo_dir, tmp_path):
    model = load_base_model("builtin:tiny-sd")
    data = _data(model, demo_dir, tmp_path)
    before = model_digest(model)
    # The UNet adapter is added first, then the text encoder's target modules do not exist.
    with pytest.raises(ValueError, match="text_encoder_target_modules"):
        _trainer(model, data, tmp_path / "bad", lora={"train_text_encoder": True,
                                                      "text_encoder_target_modules": ["no_such_proj"]})
    assert model_digest(model) == before
    reused = _trainer(model, data, tmp_path / "next")  # before the fix: "adapter already exists"
    reused.train()
    fresh_model = load_base_model("builtin:tiny-sd")
    fresh = _trainer(fresh_model, _data(fresh_model, demo_dir, tmp_path / "f"), tmp_path / "fresh")
    fresh.train()
    a, b = _weights(reused), _weights(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reused.teardown()
    assert model_digest(model) == before


def test_training_that_raised_is_torn_down_to_the_exact_base_model(tiny_sd_dir, demo_dir, tmp_path):
    model = load_base_model("builtin:tiny-sd")
    data = _data(model, demo_dir, tmp_path)
    before = model_digest(model)
    tr = _trainer(model, data, tmp_path, lora={"train_text_encoder": True, "dropout": 0.1},
                  gradient_checkpointing=True)
    tr.train(until_step=1)
    data.std[:] = float("inf")  # the loss becomes infinite at the next step
    with pytest.raises(NonFiniteLossError):
        tr.train()
    assert model_digest(model) != before
    tr.teardown()
    assert model_digest(model) == before
    assert not model.unet.is_gradient_checkpointing


def test_text_encoder_lora_trains_in_train_mode_and_validates_in_eval_mode(tiny_sd_dir, demo_dir, tmp_path):
    model = load_base_model("builtin:tiny-sd")
    tr = _trainer(model, _data(model, demo_dir, tmp_path), tmp_path,
                  lora={"train_text_encoder": True, "dropout": 0.5})
    modes: list[bool] = []
    hook = model.text_encoder.register_forward_hook(lambda m, i, o: modes.append(m.training))
    tr.train_step()
    assert modes and all(modes), "text-encoder LoRA dropout was inactive during training"
    modes.clear()
    assert tr.validation_loss(2) == tr.validation_loss(2)  # dropout off: deterministic
    assert modes and not any(modes)
    hook.remove()
    tr.teardown()


def test_accelerators_with_another_mixed_precision_follow_each_other_in_one_process():
    cpu = torch.device("cpu")
    first = make_accelerator("bf16", cpu)
    assert first.mixed_precision == "bf16"
    second = make_accelerator("no", cpu)  # accelerate alone raises "already been initialized"
    assert second.mixed_precision == "no"
    assert make_accelerator("bf16", cpu).mixed_precision == "bf16"


def test_a_bf16_trial_then_an_fp32_trial_on_one_worker_train_on_unrounded_weights(tiny_sd_dir, demo_dir, tmp_path):
    from sweeps.trial import worker_model

    spec = ModelSpec(source="builtin:tiny-sd")
    model16, _ = worker_model(spec, "bf16")
    data = _data(model16, demo_dir, tmp_path)
    tr16 = _trainer(model16, data, tmp_path / "bf16", mixed_precision="bf16")
    assert tr16.weight_dtype == torch.bfloat16 and next(model16.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tr16.trainable)  # trainable weights stay fp32
    tr16.train()
    tr16.teardown()
    # The same rounded model must not silently serve an fp32 trial ...
    with pytest.raises(RuntimeError, match="load a fresh base model"):
        _trainer(model16, data, tmp_path / "guard", mixed_precision="no")
    # ... and the worker hands that trial a model of its own precision.
    model32, reused = worker_model(spec, "no")
    assert not reused and model32 is not model16
    tr32 = _trainer(model32, data, tmp_path / "fp32", mixed_precision="no")
    tr32.train()
    fresh_model = load_base_model("builtin:tiny-sd")
    fresh = _trainer(fresh_model, data, tmp_path / "fresh", mixed_precision="no")
    fresh.train()
    a, b = _weights(tr32), _weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_constant_schedule_with_warmup_warms_up(tiny_sd_dir, demo_dir, tmp_path):
    model = load_base_model("builtin:tiny-sd")
    tr = _trainer(model, _data(model, demo_dir, tmp_path), tmp_path, lr_scheduler="constant",
                  lr_warmup_steps=4, max_train_steps=6)
    lrs = [s.lr for s in tr.train()]
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # diffusers ignored the warm-up


@pytest.mark.parametrize("err, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), "sticky"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "sticky"),
    (RuntimeError("CUDA error: invalid argument"), None),
    (ValueError("lora.target_modules ['x']: no such module"), None),
    (NonFiniteLossError("the loss became nan"), None),
])
def test_device_failures_are_told_apart(err, kind):
    from sweeps.trial import device_failure

    assert device_failure(err) == kind


def test_a_prediction_type_override_reaches_the_sampler_and_the_export(tiny_sd_dir, demo_dir, tmp_path):
    """A UNet trained to predict v must be sampled as one: the evaluation's images equal a plain
    diffusers pipeline whose DDIM scheduler is told v_prediction, and differ from epsilon's."""
    import json

    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    from trainers.evaluate import EvalSettings, generate

    model = load_base_model("builtin:tiny-sd")
    assert model.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    settings = EvalSettings(prompts=("a photo of a toy",), seeds=(3,), steps=4, batch_size=1)
    ours = np.asarray(generate(model, settings, prediction_type="v_prediction")[0].image, dtype=float)
    plain = np.asarray(generate(model, settings)[0].image, dtype=float)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    size = model.unet.config.sample_size * 8
    ref = np.asarray(pipe("a photo of a toy", num_inference_steps=4, guidance_scale=settings.guidance_scale,
                          height=size, width=size, generator=torch.Generator().manual_seed(3)).images[0], dtype=float)
    assert np.abs(ours - ref).mean() < 0.5 < np.abs(plain - ref).mean()
    tr = _trainer(model, _data(model, demo_dir, tmp_path), tmp_path, prediction_type="v_prediction")
    weights = tr.export_weights(tmp_path / "export")
    with safe_open(str(weights), framework="pt") as f:
        assert json.loads(f.metadata()["sdsweep"])["prediction_type"] == "v_prediction"
    tr.teardown()
