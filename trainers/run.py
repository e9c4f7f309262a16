"""One training run from a validated :class:`~trainers.config.RunConfig`, without Ray.

config -> base model -> dataset preflight -> latent cache -> trainer -> checkpoints -> final weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainers import get_trainer_class
from trainers.base import StepStats, Trainer
from trainers.config import RunConfig
from trainers.data import DataConfig, ImageRecord, preflight, split_validation
from trainers.devices import run_device
from trainers.latents import CachedDataset, build_latent_cache
from trainers.tensor_files import atomic_write_text
from trainers.models import load_model
from trainers.paths import cache_root

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class RunResult:
    """Where the run's final weights went and what it did."""

    output_dir: Path
    weights: Path
    final_step: int
    final_loss: float | None
    resumed_from: Path | None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` directory in ``output_dir``, if any."""
    best: tuple[int, Path] | None = None
    for p in output_dir.glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and (p / "trainer_state.json").is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def prepare_data(cfg: RunConfig, model, *, cache_text: bool,
                 records: list[ImageRecord] | None = None) -> CachedDataset:
    """Preflight every image (all problems reported at once), then build or reuse the cache of
    the training images (without the ``data.validation_split`` share), encoding on the run's
    device (``train.device``, else the GPU when there is one).

    ``records`` are the result of a preflight already done (so it is not done twice)."""
    if records is None:
        records = preflight(cfg.data, require_captions=True)
    train, _ = split_validation(records, cfg.data)
    return build_latent_cache(train, cfg.data, model, root=latent_cache_root(cfg), cache_text=cache_text,
                              device=run_device(cfg.train.device))


def validation_records(cfg: RunConfig, records: list[ImageRecord] | None = None
                       ) -> tuple[list[ImageRecord], DataConfig] | None:
    """The validation images (``data.validation_split`` of the preflighted ``records``, or every
    image of ``data.validation_path``) and the data config they are cached with (never flipped:
    val_loss reads each image as it is); None when the run has none."""
    d = cfg.data
    if not d.has_validation:
        return None
    if d.validation_path is not None:
        vcfg = d.model_copy(update={"path": d.validation_path, "validation_path": None, "random_flip": False})
        return preflight(vcfg, require_captions=True), vcfg
    vcfg = d.model_copy(update={"validation_split": 0.0, "random_flip": False})
    if records is None:
        records = preflight(d, require_captions=True)
    return split_validation(records, d)[1], vcfg


def prepare_validation(cfg: RunConfig, model, *, cache_text: bool,
                       records: list[ImageRecord] | None = None) -> CachedDataset | None:
    """The latent cache of the validation images (:func:`validation_records`), or None.
    ``records``: the training folder's preflight, if already done."""
    found = validation_records(cfg, records)
    if found is None:
        return None
    return build_latent_cache(found[0], found[1], model, root=latent_cache_root(cfg), cache_text=cache_text,
                              device=run_device(cfg.train.device))


def latent_cache_root(cfg: RunConfig) -> Path:
    """Where this run's latent cache lives: ``cache_dir/latents``, else the default root's
    (``$SDSWEEP_CACHE`` or ``~/.cache/sdsweep``, ``trainers.paths.cache_root``)."""
    return Path(cfg.cache_dir) / "latents" if cfg.cache_dir else cache_root() / "latents"


def make_trainer(cfg: RunConfig, model, data: CachedDataset, validation: CachedDataset | None = None,
                 extra: dict[str, CachedDataset] | None = None) -> Trainer:
    """Instantiate the configured method's trainer with its own settings section (and its extra
    datasets, ``Trainer.prepare_extra``)."""
    return get_trainer_class(cfg.method)(model, data, cfg.train, cfg.settings, output_dir=cfg.output_dir,
                                         validation_data=validation, extra=extra)


def train_from_config(
    cfg: RunConfig, *, resume: str | Path | None = None,
    callback: Callable[[StepStats], None] | None = None,
    on_ready: Callable[[Trainer], None] | None = None,
) -> RunResult:
    """Run one training job end to end. ``resume`` is a checkpoint dir or ``"latest"``."""
    model = load_model(cfg.model)
    cache_text = get_trainer_class(cfg.method).caches_text(cfg.settings)
    data = prepare_data(cfg, model, cache_text=cache_text)
    out = Path(cfg.output_dir)
    extra, _ = get_trainer_class(cfg.method).prepare_extra(cfg, model, run_device(cfg.train.device))
    trainer = make_trainer(cfg, model, data, prepare_validation(cfg, model, cache_text=cache_text), extra)
    resumed = None
    if resume is not None:
        resumed = latest_checkpoint(out) if str(resume) == "latest" else Path(resume)
        if resumed is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-N directory in {out}")
        trainer.load_checkpoint(resumed)
    if on_ready is not None:
        on_ready(trainer)
    history = trainer.train(callback=callback)
    out.mkdir(parents=True, exist_ok=True)
    weights = trainer.export_weights(out)
    summary = {"method": cfg.method, "final_step": trainer.global_step,
               "final_loss": history[-1].loss if history else None,
               "resumed_from": str(resumed) if resumed else None, "dataset_key": data.key,
               "cache": data.report.__dict__, "config": cfg.model_dump(mode="json")}
    atomic_write_text(out / "run.json", json.dumps(summary, indent=1))
    return RunResult(out, weights, trainer.global_step, summary["final_loss"], resumed)
