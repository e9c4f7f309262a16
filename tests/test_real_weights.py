"""Opt-in checks against a real Stable Diffusion 1.5 on disk (``--real-weights`` and
``SDSWEEP_SD15_DIR``, see tests/conftest.py); everything else in the suite runs on tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SD15_ENV, real_weights_skip_reason
from trainers.config import LoraSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache
from trainers.lora import LoraTrainer
from trainers.models import load_base_model


def test_the_skip_reason_says_what_to_set(tmp_path) -> None:
    assert "--real-weights" in real_weights_skip_reason(False, None)  # type: ignore[operator]
    assert SD15_ENV in real_weights_skip_reason(True, None)  # type: ignore[operator]
    assert "model_index.json" in real_weights_skip_reason(True, str(tmp_path))  # type: ignore[operator]
    (tmp_path / "model_index.json").write_text("{}")
    assert real_weights_skip_reason(True, str(tmp_path)) is None


def _inner_pytest(root: Path, *args: str, env_dir: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != SD15_ENV}
    if env_dir is not None:
        env[SD15_ENV] = env_dir
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(root), *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_marked_tests_are_skipped_with_the_reason_and_run_when_opted_in(tmp_path) -> None:
    root = tmp_path / "suite"
    root.mkdir()
    (root / "conftest.py").write_text(Path(__file__).with_name("conftest.py").read_text())
    (root / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers =\n    real_weights: x\n")
    (root / "test_marked.py").write_text(
        "import pytest\n\n@pytest.mark.real_weights\ndef test_x(sd15_dir):\n"
        "    assert (sd15_dir / 'model_index.json').is_file()\n")
    skipped = _inner_pytest(root, env_dir=None)
    assert "1 skipped" in skipped.stdout and "opt in with" in skipped.stdout, skipped.stdout
    no_dir = _inner_pytest(root, "--real-weights", env_dir=None)
    assert "1 skipped" in no_dir.stdout and f"{SD15_ENV} is not set" in no_dir.stdout, no_dir.stdout
    model = tmp_path / "sd15"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    ran = _inner_pytest(root, "--real-weights", env_dir=str(model))
    assert "1 passed" in ran.stdout, ran.stdout


@pytest.mark.real_weights
def test_sd15_loads_and_two_lora_steps_train_only_the_adapter(sd15_dir, demo_dir, tmp_path) -> None:
    model = load_base_model(str(sd15_dir))
    unet_cfg = model.unet.config
    assert unet_cfg.cross_attention_dim == 768 and unet_cfg.sample_size == 64  # SD 1.x at 512 px
    assert model.tokenizer.model_max_length == 77
    cfg = DataConfig(path=str(demo_dir), resolution=128)  # low resolution: 16x16 latents
    data = build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache")
    assert data.mean.shape[1:] == (4, 16, 16)
    frozen_before = model.unet.conv_in.weight.detach().clone()
    tcfg = TrainConfig(max_train_steps=2, train_batch_size=1, learning_rate=1e-4)
    trainer = LoraTrainer(model, data, tcfg, LoraSettings(rank=4, alpha=4), output_dir=tmp_path / "out")
    try:
        start = {n: p.detach().clone() for n, p in trainer.named_trainable.items()}
        history = trainer.train()
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(s.loss)) for s in history)
        changed = [n for n, p in trainer.named_trainable.items() if not torch.equal(p.detach(), start[n])]
        assert changed, "no LoRA weight moved in two steps"
        assert all(p.dtype == torch.float32 for p in trainer.trainable)
        assert torch.equal(model.unet.conv_in.weight.detach().to(frozen_before), frozen_before)
        assert trainer.export_weights(tmp_path / "export").is_file()
    finally:
        trainer.teardown()
    assert not any("lora" in n for n, _ in model.unet.named_parameters())
