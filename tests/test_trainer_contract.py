"""The contract every registered training method keeps (docs/DESIGN: methods), checked per method.

A new method adds its settings and how a user loads its export to ``METHODS`` below; the first
test fails until it does.
"""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from conftest import model_digest
from search_spaces import available_spaces, load_space
from trainers import TRAINERS, get_trainer_class
from trainers.base import NonFiniteLossError
from trainers.config import METHOD_SECTIONS, RunConfig
from trainers.data import preflight
from trainers.evaluate import EvalSettings, generate
from trainers.latents import build_latent_cache
from trainers.models import load_base_model
from trainers.run import make_trainer
from trainers.toyworld import weights_dir

# The pretrained toy world (docs/TOYWORLD.md): its UNet follows the text, so a method that only
# changes the conditioning (textual inversion) measurably lowers the loss; random tiny weights do not.
MODEL, DATA, RESOLUTION = "builtin:toyworld", "builtin:toystar", 32
TOKEN = "sks shape"  # what the star dataset's captions call the star
PROMPT = "a red sks shape on a blue background"


def _load_lora(pipe: StableDiffusionPipeline, export: Path) -> None:
    pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")


def _load_ti(pipe: StableDiffusionPipeline, export: Path) -> None:
    pipe.load_textual_inversion(str(export / "learned_embeds.safetensors"))


def _load_dreambooth(pipe: StableDiffusionPipeline, export: Path) -> None:
    pipe.unet = UNet2DConditionModel.from_pretrained(str(export / "unet"))


# method -> (settings section, training overrides, how a user loads the export into a pipeline)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any], Callable[[StableDiffusionPipeline, Path], None]]] = {
    "lora": ({"rank": 4, "alpha": 8, "dropout": 0.1}, {"learning_rate": 3e-3}, _load_lora),
    "textual_inversion": ({"vectors_per_token": 2, "initializer": "shape"}, {"learning_rate": 5e-2}, _load_ti),
    "dreambooth": ({}, {"learning_rate": 1e-4}, _load_dreambooth),
}


def _run_config(method: str, tmp_path: Path, **train: Any) -> RunConfig:
    section, overrides, _ = METHODS[method]
    return RunConfig.model_validate({
        "model": MODEL, "data": {"path": DATA, "resolution": RESOLUTION}, "method": method,
        "token": TOKEN, METHOD_SECTIONS[method]: section, "output_dir": str(tmp_path / "out"),
        "train": {"max_train_steps": 12, "train_batch_size": 2, "seed": 3, **overrides, **train}})


def _trainer(model, method: str, tmp_path: Path, **train: Any):
    cfg = _run_config(method, tmp_path, **train)
    cls = get_trainer_class(method)
    data = build_latent_cache(preflight(cfg.data), cfg.data, model, root=tmp_path / "cache",
                              cache_text=cls.caches_text(cfg.settings))
    return make_trainer(cfg, model, data)


@pytest.fixture
def toy_model():
    """A fresh toy-world base model loaded from disk through the real loader."""
    return load_base_model(MODEL)


def _fixed_loss(trainer, micro_steps=range(10_000, 10_006)) -> float:
    """The loss on fixed micro-batches (same images, noise and timesteps every call), no update."""
    with torch.no_grad():
        return sum(float(trainer.compute_loss(m)) for m in micro_steps) / len(micro_steps)


def test_every_registered_method_is_covered_here_and_has_a_settings_section():
    assert set(METHODS) == set(TRAINERS), "add the new method's settings and user loader to METHODS"
    assert {m: s for m, (_, _, s) in TRAINERS.items()} == METHOD_SECTIONS
    assert set(TRAINERS) <= set(available_spaces()), "ship search_spaces/<method>.yaml for every method"
    for method in TRAINERS:
        assert load_space(method).method == method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_is_finite_and_falls_on_fixed_batches(method, toy_model, tmp_path):
    tr = _trainer(toy_model, method, tmp_path, max_train_steps=30)
    before = _fixed_loss(tr)
    history = tr.train()
    assert all(np.isfinite(s.loss) for s in history)
    assert _fixed_loss(tr) < before * 0.97
    tr.teardown()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_export_loads_through_diffusers_own_loader_and_draws_what_the_evaluation_scored(
        method, toy_model, tmp_path):
    tr = _trainer(toy_model, method, tmp_path)
    tr.train()
    export = tmp_path / "export"
    export.mkdir()
    tr.export_weights(export)
    settings = EvalSettings(prompts=(PROMPT,), seeds=(0,), sampler="ddim", steps=3, resolution=RESOLUTION)
    with tr.evaluation_model() as sampled:  # what a sweep's evaluation scores, through its generate()
        scored = np.asarray(generate(sampled, settings)[0].image, dtype=np.int16)
    tr.teardown()

    user = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None)  # a user's fresh load
    user.scheduler = DDIMScheduler.from_config(user.scheduler.config)
    user.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_inference_steps=3, height=RESOLUTION, width=RESOLUTION, guidance_scale=5.0)
    base = np.asarray(user(generator=torch.Generator().manual_seed(0), **kw).images[0], dtype=np.int16)
    METHODS[method][2](user, export)
    shipped = np.asarray(user(generator=torch.Generator().manual_seed(0), **kw).images[0], dtype=np.int16)
    assert np.abs(shipped - base).max() > 8, "the export changes nothing a user sees"
    assert np.abs(shipped - scored).max() <= 1, "the evaluation scored something other than the export"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_exact(method, tmp_path):
    n, k = 6, 3
    kw = dict(max_train_steps=n, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2)
    straight = _trainer(load_base_model(MODEL), method, tmp_path / "a", **kw)
    straight.train()
    first = _trainer(load_base_model(MODEL), method, tmp_path / "b", **kw)
    first.train(until_step=k)
    ckpt = first.save_checkpoint(tmp_path / "b" / "ckpt")
    at_k = {name: p.detach().clone() for name, p in first.named_trainable.items()}
    resumed = _trainer(load_base_model(MODEL), method, tmp_path / "c", **kw)
    resumed.load_checkpoint(ckpt)
    # The spend counters continue from the checkpoint (a resumed trial's budget is its whole spend).
    assert resumed.images_seen == first.images_seen == k * first.examples_per_step
    assert resumed.train_seconds == pytest.approx(first.train_seconds) and first.train_seconds > 0
    resumed.train()
    assert resumed.global_step == n
    assert resumed.images_seen == straight.images_seen == n * 2 * 2  # batch 2 x accumulation 2
    for name, p in straight.named_trainable.items():
        assert torch.equal(p, resumed.named_trainable[name]), name
        assert not torch.equal(p, at_k[name]), f"{name} stopped changing after resume"
    s_opt, r_opt = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for i, st in s_opt["state"].items():
        for slot, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(r_opt["state"][i][slot])), (i, slot)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_teardown_leaves_the_exact_base_model_after_training_an_evaluation_and_raises_before_and_after_backward(
        method, tmp_path):
    model = load_base_model(MODEL)
    before = model_digest(model)
    tr = _trainer(model, method, tmp_path / "ok", gradient_checkpointing=True)
    tr.train(until_step=2)
    with tr.evaluation_model():
        pass
    tr.train(until_step=3)
    tr.teardown()
    assert model_digest(model) == before

    tr = _trainer(model, method, tmp_path / "raise")
    tr.train(until_step=1)
    tr.data.std[:] = float("inf")  # the next step's loss is infinite: raised before backward
    with pytest.raises(NonFiniteLossError):
        tr.train()
    tr.teardown()
    assert model_digest(model) == before

    # Raised after backward, with every trained parameter's gradient filled: out of memory in the
    # optimizer step, and a non-finite gradient norm (the check after clipping).
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.40 GiB")

    for where, broken in (("optimizer", oom), ("clip", lambda *a, **k: torch.tensor(float("inf")))):
        tr = _trainer(model, method, tmp_path / f"raise-{where}")
        tr.train(until_step=1)
        setattr(tr.optimizer if where == "optimizer" else tr.accelerator,
                "step" if where == "optimizer" else "clip_grad_norm_", broken)
        with pytest.raises((torch.OutOfMemoryError, NonFiniteLossError)):
            tr.train()
        assert any(p.grad is not None for p in tr.trainable), f"{where}: raised before backward"
        optimizer = weakref.ref(tr.optimizer.optimizer)  # the torch optimizer behind accelerate's wrapper
        tr.teardown()
        assert model_digest(model) == before, where
        assert optimizer() is None, f"{where}: something still holds the optimizer and its state"
    # The next trial on this worker trains as on a freshly loaded model.
    reused = _trainer(model, method, tmp_path / "next")
    reused.train()
    fresh = _trainer(load_base_model(MODEL), method, tmp_path / "fresh")
    fresh.train()
    for name, p in fresh.named_trainable.items():
        assert torch.equal(p, reused.named_trainable[name]), name
    reused.teardown()
    assert model_digest(model) == before


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_setup_that_raises_after_the_method_changed_the_model_leaves_it_as_it_was(
        method, toy_model, tmp_path, monkeypatch):
    before = model_digest(toy_model)

    def broken(*a, **k):
        raise RuntimeError("optimizer construction failed")

    monkeypatch.setattr(torch.optim, "AdamW", broken)  # raises after configure_trainable ran
    with pytest.raises(RuntimeError, match="optimizer construction failed"):
        _trainer(toy_model, method, tmp_path)
    assert model_digest(toy_model) == before


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_trainer_module_imports_no_coordination_framework(method):
    module = TRAINERS[method][0]
    code = (f"import sys, {module}; bad = sorted(m for m in ('ray', 'optuna', 'wandb') if m in sys.modules); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
