"""Held-out validation images: never trained on, and the only images val_loss is measured on."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.config import RunConfig
from trainers.data import DataConfig, DatasetError, preflight, split_validation
from trainers.run import make_trainer, prepare_data, prepare_validation


def _run_cfg(demo_dir: Path, tmp_path: Path, **data) -> RunConfig:
    return RunConfig.model_validate({
        "model": "builtin:tiny-sd", "data": {"path": str(demo_dir), "resolution": 64, "random_flip": True, **data},
        "train": {"max_train_steps": 2, "train_batch_size": 2}, "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache")})


def test_split_is_by_name_hash_whatever_the_listing_order(demo_dir):
    cfg = DataConfig(path=str(demo_dir), resolution=64, validation_split=0.25)
    records = preflight(cfg)
    train, val = split_validation(records, cfg)
    assert len(val) == 2 and len(train) == len(records) - 2
    assert {r.id for r in train}.isdisjoint(r.id for r in val)
    assert {r.id for r in split_validation(list(reversed(records)), cfg)[1]} == {r.id for r in val}
    with pytest.raises(DatasetError, match="validation_split 0.95 of 8 images leaves none"):
        split_validation(records, DataConfig(path=str(demo_dir), resolution=64, validation_split=0.95))


def test_validation_images_are_never_trained_on_and_val_loss_is_measured_on_them(tiny_model, demo_dir, tmp_path):
    cfg = _run_cfg(demo_dir, tmp_path, validation_split=0.25)
    data = prepare_data(cfg, tiny_model, cache_text=True)
    val = prepare_validation(cfg, tiny_model, cache_text=True)
    assert val is not None and len(data) == 6 and len(val) == 2
    assert set(data.captions).isdisjoint(val.captions)  # the demo's captions are one per image
    assert val.flip_mean is None  # val_loss reads each image as it is
    trainer = make_trainer(cfg, tiny_model, data, val)
    trainer.train()
    assert trainer.validation_loss(2) == trainer.fixed_loss(val, 2)
    assert trainer.validation_loss(2) != trainer.fixed_loss(data, 2)
    trainer.teardown()
    assert prepare_validation(_run_cfg(demo_dir, tmp_path), tiny_model, cache_text=True) is None


def test_both_kinds_of_validation_at_once_is_an_error(demo_dir):
    with pytest.raises(ValueError, match="validation_split or validation_path, not both"):
        DataConfig(path=str(demo_dir), resolution=64, validation_split=0.2, validation_path=str(demo_dir))
