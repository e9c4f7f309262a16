"""Checkpoint directories and sweep.json appear complete or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import trainers.checkpoints as checkpoints
from trainers.config import LoraSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache
from trainers.lora import LoraTrainer
from trainers.run import latest_checkpoint


@pytest.fixture
def trainer(tiny_model, demo_dir: Path, tmp_path: Path):
    cfg = DataConfig(path=str(demo_dir), resolution=64, random_flip=False)
    data = build_latent_cache(preflight(cfg), cfg, tiny_model, root=tmp_path / "cache")
    tcfg = TrainConfig(learning_rate=1e-3, max_train_steps=4, train_batch_size=2, checkpointing_steps=2)
    tr = LoraTrainer(tiny_model, data, tcfg, LoraSettings(), output_dir=tmp_path / "out")
    yield tr
    tr.teardown()


def test_an_interrupted_checkpoint_save_leaves_no_checkpoint_dir(trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    out = trainer.output_dir
    trainer.train(until_step=2)  # checkpoint-2, complete
    assert latest_checkpoint(out) == out / "checkpoint-2"

    def disk_full(path: Path, text: str) -> None:  # the last file of a checkpoint fails to write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "atomic_write_text", disk_full)  # the resume state, written last
    with pytest.raises(OSError, match="No space"):
        trainer.train(until_step=4)  # saving checkpoint-4 fails after its weights were written
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"], "a half-written checkpoint or temp dir was left"
    assert latest_checkpoint(out) == out / "checkpoint-2"


def test_a_checkpoint_saved_again_is_replaced_whole_with_the_usual_mode(trainer, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"from an older save")
    old = os.umask(0o022)
    try:
        trainer.save_checkpoint(target)
    finally:
        os.umask(old)
    assert not (target / "stale.bin").exists()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    trainer.load_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sweep_state_is_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    from sweeps.driver import write_sweep_state
    from sweeps.results import SWEEP_STATE

    write_sweep_state(tmp_path, {"cache_builds": [1]})
    # A reader that opened sweep.json before a write (sdsweep results in another process) keeps
    # the complete old file; a write in place would truncate it under the reader.
    with open(tmp_path / SWEEP_STATE) as reader:
        write_sweep_state(tmp_path, {"cache_builds": [1, 2]})
        assert json.load(reader) == {"cache_builds": [1]}
    assert json.loads((tmp_path / SWEEP_STATE).read_text()) == {"cache_builds": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [SWEEP_STATE]
