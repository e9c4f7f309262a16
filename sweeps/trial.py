"""One Ray Tune trial: train with the proposed hyperparameters, evaluate, report, checkpoint.

Runs inside a Ray worker process. The base model is loaded once per worker process and kept in
:data:`_MODELS` (with ``reuse_actors`` the same process serves trial after trial; each trial's
adapters are removed by ``Trainer.teardown``). The latent cache arrives through Ray's object store.

Failure policy: anything this trial's own code raises (a NaN loss, out of memory, an impossible
hyperparameter combination, a bug) ends the trial as *errored*: the reason is reported as the
trial's last result (``trial_status = "error"``, no metric) and written to ``sdsweep_error.json``
in the trial directory; the driver tells Optuna the trial FAILED and never retries it. Only a
worker or node that dies (a Ray actor error) is retried, up to ``max_failures``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from sweeps.config import SweepConfig, trial_run_config
from sweeps.constants import ERROR_FILE, QUIET_ENV
from trainers.evaluate import GRID_FILE, Evaluator, load_references, write_samples
from trainers.latents import CachedDataset
from trainers.models import BaseModel, load_base_model
from trainers.run import make_trainer

# Worker-process caches: model spec -> loaded base model (frozen weights shared by trials), and
# evaluation settings -> Evaluator (reference images loaded once; scoring models are cached
# per process by trainers.metrics).
_MODELS: dict[tuple[Any, ...], BaseModel] = {}
_EVALUATORS: dict[str, Evaluator] = {}
SAMPLES_DIR = "samples"  # <trial dir>/samples/step-000040/{00.png, grid.png, scores.json}


def worker_model(spec: Any) -> tuple[BaseModel, bool]:
    """The base model for ``spec``, loaded at most once per process. Returns (model, was_cached)."""
    key = (spec.source, spec.allow_pickle, spec.single_file_config, spec.revision)
    if key in _MODELS:
        return _MODELS[key], True
    model = load_base_model(spec.source, allow_pickle=spec.allow_pickle,
                            single_file_config=spec.single_file_config, revision=spec.revision)
    _MODELS.clear()  # one base model per worker: a sweep never mixes base models
    _MODELS[key] = model
    return model, False


def storage_trial_dir() -> Path:
    """This trial's directory in the sweep's storage (``RUN_DIR/<trial>``), for files the driver,
    ``sdsweep results`` and the report read (samples, the error file).

    Tune's ``get_trial_dir()`` is a per-session working directory under ``/tmp/ray`` that reaches
    storage only through artifact syncing; sdsweep's ``storage_path`` is a local or shared
    filesystem path, so trials write straight to it (synchronously, before reporting).
    """
    ctx = tune.get_context()
    try:
        storage = ctx.get_storage()
        if type(storage.storage_filesystem).__name__ == "LocalFileSystem":
            return Path(storage.trial_fs_path)
    except (AttributeError, RuntimeError):  # an older/newer Ray without the developer API
        pass
    return Path(ctx.get_trial_dir())


def worker_evaluator(cfg: SweepConfig) -> Evaluator | None:
    """The sweep's image evaluator (None without ``evaluation.images``), built once per process."""
    ev_cfg = cfg.evaluation.images
    if ev_cfg is None:
        return None
    key = json.dumps([ev_cfg.model_dump(mode="json"), cfg.base.data.model_dump(mode="json")], sort_keys=True)
    if key not in _EVALUATORS:
        _EVALUATORS.clear()
        _EVALUATORS[key] = Evaluator(ev_cfg, load_references(ev_cfg, cfg.base.data))
    return _EVALUATORS[key]


def samples_dir(trial_dir: Path, step: int) -> Path:
    """Where a trial's images and scores of the evaluation at ``step`` go."""
    return trial_dir / SAMPLES_DIR / f"step-{step:06d}"


def evaluate_images(evaluator: Evaluator, trainer: Any, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Generate and score the trainer's current model; write the samples; return report keys.

    ``images`` (the grid) and ``samples`` (scores.json: per-image scores, settings, scorer
    identity) are paths the W&B callback logs as an image and a table.
    """
    trainer.prepare_for_sampling()
    dtype = trainer.weight_dtype if trainer.weight_dtype != torch.float32 else None
    record = evaluator.run(trainer.model, autocast_dtype=dtype)
    scores_path = write_samples(record, out_dir, extra)
    return {**record.scores, "eval_s": record.generate_s + record.score_s,
            "images": [str(out_dir / GRID_FILE)], "samples": str(scores_path)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: this trial's CUDA allocator peak on GPU; on CPU the worker process's max RSS
    (a high-water mark that a reused worker carries over from earlier trials)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _threads_for_trial(cpus: float) -> None:
    # Oversubscribed OpenMP threads spin against each other (measured 40x slowdown on 2 cores,
    # docs/DEVELOPING.md): use exactly the CPUs Ray gave this trial.
    torch.set_num_threads(max(1, int(cpus)))


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], cache: list[Any]) -> None:
    """The Ray Tune function trainable. ``config`` holds the trial's dotted hyperparameters."""
    started, started_at = time.perf_counter(), time.time()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    trial_dir = storage_trial_dir()
    trainer = None
    try:
        cfg = SweepConfig.model_validate(sweep)
        _threads_for_trial(cfg.resources.cpu)
        params = cfg.search_space().flat_params(config)  # drops OptunaSearch's qualified aliases
        run_cfg = trial_run_config(cfg, params, source=f"trial {tune.get_context().get_trial_id()}")
        model, reused = worker_model(run_cfg.model)
        data: CachedDataset = ray.get(cache[0])
        run_cfg = run_cfg.model_copy(update={"output_dir": str(Path(tune.get_context().get_trial_dir()) / "work")})
        trainer = make_trainer(run_cfg, model, data)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)  # reused workers: per-trial peak
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.load_checkpoint(d)
        evaluator = worker_evaluator(cfg)
        setup_s = time.perf_counter() - started
        _train_and_report(trainer, cfg, evaluator, trial_dir, setup_s=setup_s, model_reused=reused,
                          started_at=started_at)
    except Exception as err:  # noqa: BLE001 - every trial-code failure ends this trial, see module doc
        _report_error(err, trainer, trial_dir)
    finally:
        if trainer is not None:
            trainer.teardown()


def _train_and_report(trainer: Any, cfg: SweepConfig, evaluator: Evaluator | None, trial_dir: Path, *,
                      setup_s: float, model_reused: bool, started_at: float) -> None:
    every, total = cfg.evaluation.every, trainer.cfg.max_train_steps
    samples_per_step = trainer.cfg.train_batch_size * trainer.cfg.gradient_accumulation_steps
    first = True
    while trainer.global_step < total:
        target = min(total, (trainer.global_step // every + 1) * every)
        t0 = time.perf_counter()
        history = trainer.train(until_step=target)
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": trainer.global_step,
            "train_loss": sum(s.loss for s in history) / len(history),
            "val_loss": trainer.validation_loss(cfg.evaluation.validation_timesteps),
            "lr": history[-1].lr,
            "steps_per_s": len(history) / elapsed,
            "samples_per_s": len(history) * samples_per_step / elapsed,
            "peak_memory_mb": peak_memory_mb(trainer.device),
            "method": trainer.method,
            "trial_status": "running" if trainer.global_step < total else "completed",
            "reported_at": time.time(),  # Tune's own timestamp is whole seconds
        }
        if evaluator is not None:
            step = trainer.global_step
            extra = {"trial_id": tune.get_context().get_trial_id(), "step": step}
            metrics.update(evaluate_images(evaluator, trainer, samples_dir(trial_dir, step), extra))
        if first:
            metrics.update(setup_s=setup_s, model_reused=model_reused, started_at=started_at)
            first = False
        with tempfile.TemporaryDirectory(prefix="sdsweep-ckpt-") as tmp:
            trainer.save_checkpoint(tmp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _report_error(err: Exception, trainer: Any, trial_dir: Path) -> None:
    """End the trial as errored: reason to a file and as the last reported result (no metric)."""
    step = trainer.global_step if trainer is not None else 0
    message = " ".join(line.strip() for line in str(err).splitlines())  # multi-line errors name keys below
    info = {"error_type": type(err).__name__, "error": message[:1000],
            "step": step, "traceback": traceback.format_exc(limit=8)}
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / ERROR_FILE).write_text(json.dumps(info, indent=1))
    tune.report({"trial_status": "error", "error_type": info["error_type"], "error": info["error"],
                 "step": step})


def trial_env() -> dict[str, str]:
    """Environment for trial workers: offline hub access mirrors the driver's."""
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SDSWEEP_CACHE", *QUIET_ENV)
    return {k: os.environ[k] for k in keep if k in os.environ}
