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

import gc
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
from trainers import devices
from sweeps.constants import ERROR_FILE, QUIET_ENV
from sweeps.rows import OWN_ROWS, trial_rows
from sweeps.searched import data_variant_id
from sweeps.trial_checkpoints import checkpoint_to_report
from trainers.evaluate import GRID_FILE, Evaluator, load_references, write_samples
from trainers.checkpoints import STATE_JSON, STATE_TENSORS
from trainers.latents import CachedDataset
from trainers.models import BaseModel, load_model
from trainers import get_trainer_class
from trainers.run import make_trainer

# Worker-process caches: model spec -> loaded base model (frozen weights shared by trials), and
# (evaluation settings, device) -> Evaluator (reference images loaded and embedded once; scoring
# models are cached per process and device by trainers.scoring_models).
_MODELS: dict[tuple[Any, ...], BaseModel] = {}
_EVALUATORS: dict[str, Evaluator] = {}
SAMPLES_DIR = "samples"  # <trial dir>/samples/step-000040/{00.png, grid.png, scores.json}
RESUME_STATE = {STATE_JSON, STATE_TENSORS}  # a checkpoint's files that are not the method's deliverable


def worker_model(spec: Any, precision: str = "no", dtypes: tuple[Any, ...] = ()) -> tuple[BaseModel, bool]:
    """The base model for ``spec``, loaded at most once per process, precision and module dtypes.
    Returns (model, was_cached).

    Keyed by the trial's resolved mixed precision and by the dtypes its method keeps the UNet and
    text encoder in (``Trainer.base_dtypes``): a trainer casts frozen weights to its weight dtype in
    place, and a later trial must not train on weights an earlier one rounded (a sweep that
    searches ``train.mixed_precision``, or mixes LoRA's bf16 UNet with DreamBooth's fp32 one on a
    GPU, reloads when that changes; on a CPU everything is fp32 and one load serves every method).
    """
    key = (spec.source, spec.allow_pickle, spec.single_file_config, spec.revision, precision, *map(str, dtypes))
    if key in _MODELS:
        return _MODELS[key], True
    _MODELS.clear()  # one base model per worker: a sweep never mixes base models; free it before loading
    model = load_model(spec)
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


def worker_evaluator(cfg: SweepConfig, device: torch.device | str = "cpu") -> Evaluator | None:
    """The sweep's image evaluator (None without ``evaluation.images``), built once per process,
    scoring on ``device`` (the trial's device, so its scoring models sit on the trial's GPU).

    Reused across trials, it keeps the reference images' embeddings from the first evaluation.
    """
    ev_cfg = cfg.evaluation.images
    return None if ev_cfg is None else cached_evaluator(ev_cfg, cfg.base.data, device)


def cached_evaluator(ev_cfg: Any, data: Any, device: torch.device | str = "cpu") -> Evaluator:
    """An evaluator for ``ev_cfg`` (an ``EvaluatorConfig``) and the references of ``data``, built
    once per process (the latest two are kept: the held-out confirmation alternates between its
    pick seeds and its report seeds)."""
    key = json.dumps([ev_cfg.model_dump(mode="json"), data.model_dump(mode="json"), str(torch.device(device))],
                     sort_keys=True)
    evaluator = _EVALUATORS.pop(key, None)
    if evaluator is None:
        evaluator = Evaluator(ev_cfg, load_references(ev_cfg, data), device=device)
    _EVALUATORS[key] = evaluator  # the most recent last
    while len(_EVALUATORS) > 2:
        del _EVALUATORS[next(iter(_EVALUATORS))]
    return evaluator


def samples_dir(trial_dir: Path, step: int) -> Path:
    """Where a trial's images and scores of the evaluation at ``step`` go."""
    return trial_dir / SAMPLES_DIR / f"step-{step:06d}"


def evaluate_images(evaluator: Evaluator, trainer: Any, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Generate and score the trainer's current model; write the samples; return report keys.

    ``images`` (the grid) and ``samples`` (scores.json: per-image scores, settings, scorer
    identity) are paths the W&B callback logs as an image and a table.
    """
    # The same rule as the baseline's (sweeps/baseline.py): a gain is never a precision shift. The
    # placement it sampled with (read from the modules) names the baseline it compares with.
    with trainer.evaluation_model() as model:
        record = evaluator.run(model, autocast_dtype=devices.sampling_autocast(trainer.device, trainer.weight_dtype),
                               prediction_type=trainer.prediction_type)
    scores_path = write_samples(record, out_dir, extra)
    return {**record.scores, "eval_s": record.generate_s + record.score_s, "eval_placement": record.placement,
            "images": [str(out_dir / GRID_FILE)], "samples": str(scores_path)}


def place_base_model(model: BaseModel, where: devices.Placement, dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    """Put a base model's UNet, VAE and text encoder where (and in the dtypes) a trial's trainer
    would (what ``Trainer._place`` / ``prepare_for_sampling`` do): the UNet and text encoder in the
    method's ``dtypes`` (``Trainer.base_dtypes``), the VAE in the weight dtype; for the held-out
    confirmation, so its scores are never a device or precision shift. In place: the model comes
    from :func:`worker_model`, keyed by these dtypes."""
    for module, dtype in ((model.unet, dtypes[0]), (model.text_encoder, dtypes[1]), (model.vae, where.weight_dtype)):
        devices.place(module, where.device, dtype)


def score_to_files(evaluator: Evaluator, model: BaseModel, where: devices.Placement, extra: dict[str, Any],
                   prediction_type: str | None = None, as_base: bool = False,
                   defer_drift: bool = False) -> dict[str, Any]:
    """Generate and score ``model`` with the trials' autocast; return its scores, per-image rows,
    evaluator identity, seconds and the written files as bytes (a task's files go back to the
    driver, which writes them wherever the task ran); with ``as_base`` (the base model) also its
    drift embeddings (``EvalRecord.base_embeddings``); with ``defer_drift`` its own, unscored
    (``pending_drift``: ``trainers.evaluate.complete_drift``, then ``sweeps.confirm.rewrite_scores_file``)."""
    record = evaluator.run(model, autocast_dtype=where.autocast_dtype, prediction_type=prediction_type,
                           as_base=as_base, defer_drift=defer_drift)
    with tempfile.TemporaryDirectory(prefix="sdsweep-eval-") as tmp:
        write_samples(record, Path(tmp), extra)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return {"scores": record.scores, "rows": record.rows, "identity": record.identity, "files": files,
            "eval_s": record.generate_s + record.score_s, "placement_key": record.placement,
            "base_embeddings": record.base_embeddings, "pending_drift": record.pending_drift}


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


# Messages of CUDA errors after which the process's CUDA context is unusable: every later kernel
# fails too (CUDA documents these as "sticky": the context must be destroyed), so the worker
# process must go. Out-of-memory is not among them: freeing memory recovers.
_STICKY_CUDA = ("device-side assert", "illegal memory access", "unspecified launch failure",
                "misaligned address", "illegal instruction", "hardware stack error", "uncorrectable ecc")


class WorkerReplaced(RuntimeError):
    """Raised out of a trial after a sticky CUDA error, so Ray ends this worker process and starts
    a fresh one; the trial itself is not rerun (see :func:`run_trial`)."""


def device_failure(err: BaseException) -> str | None:
    """``"oom"`` for a CUDA out-of-memory error, ``"sticky"`` for a CUDA error that leaves the
    process's CUDA context unusable, ``None`` for anything else."""
    if isinstance(err, torch.OutOfMemoryError):
        return "oom"
    text = str(err).lower()
    accel = getattr(torch, "AcceleratorError", ())
    if (isinstance(err, accel) or "cuda error" in text) and any(m in text for m in _STICKY_CUDA):
        return "sticky"
    return None


def free_device_memory() -> None:
    """Return the memory a failed trial held to the CUDA allocator's pool and the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Seconds a reused worker waits for the previous trial's thread to end (its teardown: the model
# restored for the next trial) before Tune gives up on reusing it. Tune's default is 2 s; a
# DreamBooth teardown on a busy CPU took longer and the *next* trial errored ("Trainable runner
# reuse requires reset_config() to be implemented and return True").
REUSE_WAIT_S = "300"


def allow_teardown_before_reuse() -> None:
    """Let Tune wait for a stopped trial's teardown before it hands the worker to the next trial.

    Tune reads ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` in the worker at each reuse, so setting it in the
    worker's own process covers a local Ray, a cluster and a Ray started by someone else alike; a
    value the user set wins."""
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", REUSE_WAIT_S)


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], cache: dict[str, list[Any]],
              base: dict[str, Any] | None = None) -> None:
    """The Ray Tune function trainable. ``config`` holds the trial's dotted hyperparameters;
    ``base`` the base model's drift embeddings by placement (``Evaluator.set_base``).

    Device failures: after CUDA out-of-memory only this trial ends (errored) and its memory is
    freed for the next trial on the worker. After a sticky CUDA error the trial ends errored and
    :class:`WorkerReplaced` is raised so Ray replaces the worker process; Ray's retry of the trial
    finds the error file marked ``worker_replaced`` and ends at once with the same error, so the
    trial is never trained again.
    """
    started, started_at = time.perf_counter(), time.time()
    allow_teardown_before_reuse()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    trial_dir = storage_trial_dir()
    if _already_failed(trial_dir):
        return
    trainer = None
    failure: str | None = None
    try:
        cfg = SweepConfig.model_validate(sweep)
        _threads_for_trial(cfg.resources.cpu)
        params = cfg.search_space().flat_params(config)  # drops OptunaSearch's qualified aliases
        run_cfg = trial_run_config(cfg, params, source=f"trial {tune.get_context().get_trial_id()}")
        placement = devices.run_placement(run_cfg.train.device, run_cfg.train.mixed_precision)
        dtypes = get_trainer_class(run_cfg.method).base_dtypes(run_cfg.settings, placement.weight_dtype)
        model, reused = worker_model(run_cfg.model, placement.precision, dtypes)
        data, validation, extra = trial_datasets(cache, run_cfg.data)
        run_cfg = run_cfg.model_copy(update={"output_dir": str(Path(tune.get_context().get_trial_dir()) / "work")})
        trainer = make_trainer(run_cfg, model, data, validation, extra.get(run_cfg.method))
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)  # reused workers: per-trial peak
        checkpoint = tune.get_checkpoint()
        finished = False
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                restored = resumable_checkpoint(trial_dir, Path(d))
                trainer.load_checkpoint(restored)
                finished = restored != Path(d)  # only a finished trial's checkpoints lose their resume tensors
        if finished or trainer.global_step >= trainer.cfg.max_train_steps:
            _report_end_again(trainer, trial_dir)  # completed, stopped by the scheduler: never trained on
            return
        evaluator = worker_evaluator(cfg, trainer.device)
        if evaluator is not None:
            evaluator.set_base(base or {})
        setup_s = time.perf_counter() - started
        _train_and_report(trainer, cfg, evaluator, trial_dir, setup_s=setup_s, model_reused=reused,
                          started_at=started_at)
    except Exception as err:  # noqa: BLE001 - every trial-code failure ends this trial, see module doc
        failure = device_failure(err)
        _report_error(err, trainer, trial_dir, worker_replaced=failure == "sticky")
        err.__traceback__ = None  # its frames hold the failed step's tensors
    finally:
        if trainer is not None and failure != "sticky":
            trainer.teardown()
        trainer = None
        if failure == "oom":
            free_device_memory()
    if failure == "sticky":
        raise WorkerReplaced("a CUDA error left this worker's CUDA context unusable; Ray replaces the worker")


def trial_datasets(cache: dict[str, list[Any]], data_cfg: Any) -> tuple[CachedDataset, CachedDataset | None,
                                                                        dict[str, Any]]:
    """This trial's latent-cached training data, validation data (or None) and methods' extra data
    ({method: datasets}): the data variant its own ``data`` section names (a searched
    ``data.resolution`` gets the cache built at that resolution; sweeps/searched.py)."""
    vid = data_variant_id(data_cfg)
    if vid not in cache:
        raise RuntimeError(f"no latent cache was built for this trial's data section {data_cfg.model_dump(mode='json')}"
                           f" (built: {sorted(cache)}); the cache task builds one per data configuration the search "
                           "space produces (sweeps.searched.data_variants)")
    refs = cache[vid]
    return ray.get(refs[0]), ray.get(refs[1]), ray.get(refs[2]) or {}


def _append_own_row(trial_dir: Path, metrics: dict[str, Any]) -> None:
    """Append this report to the trial's own ``sdsweep_results.jsonl`` and flush it to disk."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with (trial_dir / OWN_ROWS).open("a") as f:
        f.write(json.dumps({"trial_id": tune.get_context().get_trial_id(), "pid": os.getpid(), **metrics},
                           default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _already_failed(trial_dir: Path) -> bool:
    """A trial that already ended with an error in its own code (its error file exists): re-report
    the error, do not train. Reached on Ray's retry of a trial whose worker was replaced after a
    sticky CUDA error, and on a resumed sweep whose driver was killed before Tune's experiment
    state recorded the error (errors are never retried, whatever restarts the trial)."""
    path = trial_dir / ERROR_FILE
    if not path.is_file():
        return False
    info = json.loads(path.read_text())
    tune.report({"trial_status": "error", "error_type": info["error_type"], "error": info["error"],
                 "step": info["step"]})
    return True


def resumable_checkpoint(trial_dir: Path, given: Path) -> Path:
    """The checkpoint a restored trial loads: the one Tune names, unless its resume tensors are gone.

    They are gone when the trial had finished but the driver was killed before Tune's experiment
    state recorded it: :class:`KeepResumeStateInNewest` had already dropped them from every
    checkpoint but the newest, and the restored state names an older one (seen in the kill -9 e2e
    test). The newest checkpoint that still has them is then the trial's own last state, with
    every step before it reported; :func:`run_trial` reports its end again and never trains on
    (the scheduler may have stopped the trial before its last step: it stays stopped).
    """
    if (given / STATE_TENSORS).is_file() or not trial_dir.is_dir():
        return given
    complete = [d for d in sorted(trial_dir.glob("checkpoint_*")) if (d / STATE_TENSORS).is_file()]
    return complete[-1] if complete else given  # none: load_checkpoint names what is missing


def _report_end_again(trainer: Any, trial_dir: Path) -> None:
    """A restored trial that had already finished (reached its last step, or was stopped by the
    scheduler): report its last row again, as it ended (Tune and Optuna then see it completed, or
    stopped: PRUNED; the readers and W&B keep each step once).

    Without a checkpoint: its checkpoints are all on disk, and Tune would persist one reported here
    as the checkpoint after the one it restored (an older one, :func:`resumable_checkpoint`),
    over a kept checkpoint of another step (tests/test_resume_restore_point.py).
    """
    rows = [r for r in trial_rows(trial_dir) if r.get("step") == trainer.global_step and "trial_status" in r]
    metrics = {k: v for k, v in (rows[-1] if rows else {"step": trainer.global_step}).items()
               if k not in ("trial_id", "pid") and not isinstance(v, dict)}
    if trainer.global_step >= trainer.cfg.max_train_steps:
        metrics["trial_status"] = "completed"
    metrics["reported_at"] = time.time()
    tune.report(metrics)


def _train_and_report(trainer: Any, cfg: SweepConfig, evaluator: Evaluator | None, trial_dir: Path, *,
                      setup_s: float, model_reused: bool, started_at: float) -> None:
    every, total = cfg.evaluation.every, trainer.cfg.max_train_steps
    samples_per_step = trainer.examples_per_step  # examples through the UNet: images_seen's unit
    first = True
    while trainer.global_step < total:
        target = min(total, (trainer.global_step // every + 1) * every)
        t0 = time.perf_counter()
        history = trainer.train(until_step=target)
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": trainer.global_step,
            "train_loss": sum(s.loss for s in history) / len(history),
            "fixed_train_loss": trainer.fixed_loss(trainer.data, cfg.evaluation.validation_timesteps),
            "lr": history[-1].lr,
            "steps_per_s": len(history) / elapsed,
            "samples_per_s": len(history) * samples_per_step / elapsed,
            "peak_memory_mb": peak_memory_mb(trainer.device),
            # What the trial has spent so far (the scheduler's clock is one of step / these two).
            "trainer_s": trainer.train_seconds,
            "images_seen": trainer.images_seen,
            "method": trainer.method,
            "trial_status": "running" if trainer.global_step < total else "completed",
            "reported_at": time.time(),  # Tune's own timestamp is whole seconds
        }
        if trainer.validation_data is not None:  # held-out images: the loss named for what it is
            metrics["val_loss"] = trainer.validation_loss(cfg.evaluation.validation_timesteps)
        if evaluator is not None:
            step = trainer.global_step
            extra = {"trial_id": tune.get_context().get_trial_id(), "step": step}
            metrics.update(evaluate_images(evaluator, trainer, samples_dir(trial_dir, step), extra))
        if first:
            metrics.update(setup_s=setup_s, model_reused=model_reused, started_at=started_at)
            first = False
        # Written once, into the run directory (sweeps/trial_checkpoints.py); the last checkpoint
        # without optimizer state: a resume from it only reports the end again (_report_end_again).
        with checkpoint_to_report() as (directory, checkpoint):
            trainer.save_checkpoint(directory, optimizer_state=trainer.global_step < total)
            # What the method ships (its weight files; not the resume state): budgets compare by it.
            metrics["artifact_bytes"] = sum(f.stat().st_size for f in directory.rglob("*")  # DreamBooth: unet/
                                            if f.is_file() and f.name not in RESUME_STATE)
            _append_own_row(trial_dir, metrics)  # straight to the run directory (sweeps/rows.py)
            tune.report(metrics, checkpoint=checkpoint)


class KeepResumeStateInNewest(tune.Callback):
    """On the driver, once a trial has finished (completed, or stopped by the scheduler): drop the
    resume tensors (optimizer state and whatever trained tensors the export does not hold,
    ``trainer_state.safetensors``) from all its checkpoints but the newest. A finished trial is
    never trained again; its checkpoints keep what is scored and exported (the method's weights)
    and the small JSON state. At SD 1.5 a DreamBooth checkpoint's resume tensors are 6.9 GB
    (AdamW's state; +3.4 GB of live UNet weights with EMA), none in a trial's last checkpoint
    but the live weights with EMA (docs/METHODS.md).

    Not earlier: while a trial runs, Tune may resume it from a checkpoint older than the newest
    (a driver killed before its experiment state caught up restores the last checkpoint that
    state names; the kill -9 e2e test caught a prune-on-every-checkpoint version). The newest is
    kept even when finished: a driver killed right after this callback may still resume the trial.
    """

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        trial_dir = Path(trial.path)
        if not trial_dir.is_dir():  # not a local/shared filesystem path: leave remote storage alone
            return
        for old in sorted(trial_dir.glob("checkpoint_*"))[:-1]:
            (old / STATE_TENSORS).unlink(missing_ok=True)


def _report_error(err: Exception, trainer: Any, trial_dir: Path, *, worker_replaced: bool = False) -> None:
    """End the trial as errored: reason to a file and as the last reported result (no metric)."""
    step = trainer.global_step if trainer is not None else 0
    message = " ".join(line.strip() for line in str(err).splitlines())  # multi-line errors name keys below
    info = {"error_type": type(err).__name__, "error": message[:1000], "step": step,
            "traceback": traceback.format_exc(limit=8), "worker_replaced": worker_replaced}
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / ERROR_FILE).write_text(json.dumps(info, indent=1))
    tune.report({"trial_status": "error", "error_type": info["error_type"], "error": info["error"],
                 "step": step})


def trial_env() -> dict[str, str]:
    """Environment for trial workers: offline hub access mirrors the driver's."""
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SDSWEEP_CACHE", *QUIET_ENV)
    return {k: os.environ[k] for k in keep if k in os.environ}
