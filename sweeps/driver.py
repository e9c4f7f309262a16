"""The sweep driver: run and resume a sweep.

Data flow (docs/ARCHITECTURE.md): sweep file -> SweepConfig -> preflight (driver, CPU) -> Ray
(sweeps/ray_setup.py) -> the cache task (sweeps/cache_task.py: a latent cache per data
configuration, built once, reused from disk when its content key exists, kept in Ray's object
store; the baseline) -> Tuner(the Optuna searcher of sweeps/search.py, the scheduler, reused
workers) -> trials (sweeps/trial.py) -> held-out confirmation -> results in the run directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sweeps.baseline import load_base_embeddings, save_baselines
from sweeps.cache_task import build_cache, build_extra  # noqa: F401 (build_extra re-exported: bench/gpu_smoke.py)
from sweeps.checkpoint_keeping import checkpoint_config
from sweeps.config import SweepConfig
from sweeps.confirm import confirm_sweep
from sweeps.console import QUIET_TRIAL_ERRORS, FailureLines
from sweeps.live import LiveConsole
from sweeps.preflight import preflight_sweep
from sweeps.ray_setup import check_cluster_reachable, check_gpu_packing, ensure_ray  # noqa: F401 (re-exported)
from sweeps.results import SWEEP_STATE, SweepError
from sweeps.schedulers import make_scheduler
from sweeps.search import SweepOptunaSearch, make_search  # noqa: F401 (re-exported)
from sweeps.searched import data_variant_id
from sweeps.shared_storage import check_shared_storage, storage_roots
from sweeps.tracking import log_sweep_run, make_callbacks, offline_sync_command, tensorboard_callbacks
from sweeps.trial import KeepResumeStateInNewest, run_trial
from trainers.tensor_files import atomic_write_text


@dataclass
class SweepRun:
    """What a finished (or interrupted-and-resumed) sweep produced."""

    run_dir: Path
    results: Any  # ray.tune.ResultGrid
    cache_report: dict[str, int]
    sync_command: str | None


def _trainable(cfg: SweepConfig, data_refs: dict[str, list[Any]], run_dir: Path, state: dict[str, Any]) -> Any:
    # The refs travel inside a dict of lists so Ray hands trials the references, not driver-side
    # copies; each trial takes its own data variant's. The base model's drift embeddings (empty
    # without a drift metric) are read back from the baselines' files, on a resume too.
    fn = tune.with_parameters(run_trial, sweep=cfg.model_dump(mode="json"), cache=dict(data_refs),
                              base=load_base_embeddings(run_dir, state))
    return tune.with_resources(fn, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu, **cfg.resources.custom})


def _tuner(cfg: SweepConfig, run_dir: Path, trainable: Any, run_id: str, console: Any = None) -> tune.Tuner:
    tune_cfg = tune.TuneConfig(
        metric=cfg.evaluation.metric, mode=cfg.mode, search_alg=make_search(cfg), scheduler=make_scheduler(cfg),
        num_samples=cfg.search.num_samples, max_concurrent_trials=cfg.search.max_concurrent_trials,
        reuse_actors=cfg.reuse_workers)
    # checkpoints_to_keep is applied by sdsweep, never deleting what a resume restores (sweeps/checkpoint_keeping.py)
    checkpoint_cfg, keeping = checkpoint_config(cfg.checkpoints_to_keep, cfg.evaluation.metric, cfg.mode)
    run_cfg = tune.RunConfig(
        name=run_dir.name, storage_path=str(run_dir.parent), checkpoint_config=checkpoint_cfg,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        callbacks=[*make_callbacks(cfg.tracking, run_dir=run_dir, sweep_name=cfg.name, run_id=run_id,
                                   metric=cfg.evaluation.metric, metric_mode=cfg.mode),
                   *tensorboard_callbacks(), *keeping, KeepResumeStateInNewest(), FailureLines(cfg.max_failures),
                   *([console] if console is not None else [])],
        verbose=0 if console is not None else 1)  # Ray Tune's own tables only with --verbose
    return tune.Tuner(trainable, tune_config=tune_cfg, run_config=run_cfg)


def _prepare(cfg: SweepConfig, verbose: bool = False) -> None:
    # Errored trials end with a result that deliberately carries no metric (sweeps/trial.py); the
    # sweep config already guarantees the metric exists, so Tune's strict check is redundant.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.update(QUIET_TRIAL_ERRORS)  # one line per lost worker instead (sweeps/console.py)
    preflight_sweep(cfg)  # every bad file (each data variant) and each method's own checks, before Ray
    # Tune deletes no checkpoint itself (sweeps/checkpoint_keeping.py), so its experiment state lists
    # every checkpoint of every trial: with each entry's metrics (~2.5 KB) it would grow by that per
    # evaluation. Only the score is needed there (the latest keeps all its metrics, for restoring).
    os.environ["TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE"] = "1"
    if not verbose:
        # Tune's newer console output prints its experiment box and paths at any verbosity; its
        # classic one prints nothing at verbose=0 (sdsweep's live view replaces both).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Optuna's INFO lines ("A new study created"); Ray's are set by ensure_ray.
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_sweep(cfg: SweepConfig, *, sweep_file: str | None = None, run_dir: Path | None = None,
              verbose: bool = False) -> SweepRun:
    """Run a new sweep into ``run_dir`` (default ``storage_path/<name>-<timestamp>``). The console
    shows sdsweep's live view (sweeps/live.py), or Ray Tune's own tables with ``verbose``."""
    _prepare(cfg, verbose)
    console = None if verbose else LiveConsole(cfg)
    check_gpu_packing(cfg, after_ray=False)
    run_dir = (run_dir or Path(cfg.storage_path) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SweepError(f"{run_dir} already holds a sweep; use `sdsweep resume {run_dir}` or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    _leave_job_package(run_dir)
    started = ensure_ray(cfg)
    try:
        check_shared_storage(storage_roots(cfg))
        check_gpu_packing(cfg, after_ray=True)
        data_refs, summary = build_cache(cfg, baseline=cfg.evaluation.images is not None,
                                         on_progress=console.progress if console else None)
        report = {**summary["report"], "extra": summary["extra"]}
        state = {"run_id": run_dir.name, "sweep_file": sweep_file, "config": cfg.model_dump(mode="json"),
                 "cache_key": summary["key"], "validation_key": summary["validation_key"],
                 "cache_keys": {vid: [v["key"], v["validation_key"]] for vid, v in summary["variants"].items()},
                 "data_variants": {vid: v["data"] for vid, v in summary["variants"].items()},
                 "base_model_identity": summary["model_identity"],
                 "cache_builds": [report], "package_version": _version(), "started": time.time()}
        if "baseline" in summary:
            state["baseline"], state["baselines"] = save_baselines(run_dir, summary["baseline"])
        write_sweep_state(run_dir, state)
        results = _tuner(cfg, run_dir, _trainable(cfg, data_refs, run_dir, state), run_dir.name, console).fit()
        _confirm(cfg, run_dir)
        _sweep_run(cfg, run_dir, run_dir.name)
    finally:
        if started:
            ray.shutdown()
    return SweepRun(run_dir, results, report, offline_sync_command(run_dir))


def _sweep_run(cfg: SweepConfig, run_dir: Path, run_id: str) -> None:
    """The sweep-level W&B run (leaderboard table, baseline images); its failure loses nothing."""
    import sys

    try:
        log_sweep_run(cfg.tracking, run_dir=run_dir, sweep_name=cfg.name, run_id=run_id)
    except Exception as err:  # noqa: BLE001 - the sweep's results are on disk whatever W&B does
        print(f"warning: the sweep-level W&B run was not written ({type(err).__name__}: {err})", file=sys.stderr)


def _confirm(cfg: SweepConfig, run_dir: Path) -> None:
    """The held-out confirmation; its failure (a checkpoint that does not load, out of memory)
    is reported and never loses the finished sweep's results, export or report."""
    import sys

    try:
        confirm_sweep(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - the sweep itself is done; say so and go on
        cause = err.as_instanceof_cause() if isinstance(err, ray.exceptions.RayTaskError) else err
        print(f"warning: the held-out confirmation failed ({type(cause).__name__}: {cause}); the sweep's "
              f"results are complete; rerun it with `sdsweep confirm {run_dir}`", file=sys.stderr)


def _leave_job_package(run_dir: Path) -> None:
    """Under ``ray job submit --working-dir``, the driver's current directory is the uploaded
    package in the head's runtime-env cache, which Ray deleted while the sweep ran (seen on a
    local cluster whose head runs no workers; ``wandb.init``'s ``os.getcwd()`` then failed).
    Every path of the sweep is absolute by now, so the driver moves to its run directory."""
    if "runtime_resources" in Path.cwd().parts:
        os.chdir(run_dir)


def resume_sweep(run_dir: Path, address: str | None = None, verbose: bool = False) -> SweepRun:
    """Continue an interrupted sweep: finished trials stay, running ones continue from their last
    checkpoint, and the searcher's state (Optuna study) is restored so no proposal repeats.
    ``address``: the Ray cluster to continue on (default: the sweep's ``ray_address``)."""
    run_dir = Path(run_dir).resolve()
    state_file = run_dir / SWEEP_STATE
    if not state_file.is_file() or not tune.Tuner.can_restore(str(run_dir)):
        raise SweepError(f"{run_dir}: not a resumable sdsweep run (no {SWEEP_STATE} or Tune state)")
    state = json.loads(state_file.read_text())
    cfg = SweepConfig.model_validate(state["config"])
    if address is not None:
        cfg = cfg.model_copy(update={"ray_address": address})
    _prepare(cfg, verbose)
    check_gpu_packing(cfg, after_ray=False)
    _leave_job_package(run_dir)
    started = ensure_ray(cfg)
    try:
        check_shared_storage(storage_roots(cfg))
        check_gpu_packing(cfg, after_ray=True)
        need_baseline = cfg.evaluation.images is not None and "baseline" not in state
        # The keys are checked inside the task before anything is encoded or scored.
        # (A sweep started before data variants existed recorded one key pair: its base data's.)
        expect = state.get("cache_keys") or {data_variant_id(cfg.base.data): [state["cache_key"],
                                                                              state.get("validation_key")]}
        console = None if verbose else LiveConsole(cfg)  # the trials' view is the one the sweep started with
        data_refs, summary = build_cache(cfg, baseline=need_baseline, expect=expect,
                                         on_progress=console.progress if console else None)
        if "keys" in summary:  # nothing was encoded or scored
            _refuse_changed_data(run_dir, expect, summary["keys"], recorded="cache_keys" in state)
        report = {**summary["report"], "extra": summary["extra"]}
        if "baseline" in summary:
            state["baseline"], state["baselines"] = save_baselines(run_dir, summary["baseline"])
        state["cache_builds"].append(report)
        write_sweep_state(run_dir, state)
        tuner = tune.Tuner.restore(str(run_dir), trainable=_trainable(cfg, data_refs, run_dir, state), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        results = tuner.fit()
        _confirm(cfg, run_dir)
        _sweep_run(cfg, run_dir, state["run_id"])
    finally:
        if started:
            ray.shutdown()
    return SweepRun(run_dir, results, report, offline_sync_command(run_dir))


def _refuse_changed_data(run_dir: Path, expect: dict[str, Any], found: dict[str, Any], *,
                         recorded: bool = True) -> None:
    """Raise the error that says what changed since the sweep started: its dataset or base model
    (a training cache key), its validation images, or the data configurations it searches.
    ``recorded``: the sweep recorded its data configurations (``cache_keys``, since searched data
    keys take effect); an older sweep recorded one key pair, its base data's."""
    if set(found) != set(expect):
        if not recorded:
            raise SweepError(f"{run_dir}: this sweep started before searched data.* keys took effect (every trial "
                             "then trained on base.data, whatever it searched); resuming it now would train its "
                             f"remaining trials on {len(found)} data configurations: start a new sweep")
        raise SweepError(f"{run_dir}: the data configurations the search space produces changed since the sweep "
                         "started (data.* keys or their choices); start a new sweep")
    for vid, (key, val_key) in found.items():
        if key != expect[vid][0]:
            raise SweepError(f"{run_dir}: the dataset or base model changed since the sweep started "
                             f"(cache key {key[:12]} != {str(expect[vid][0])[:12]}); start a new sweep")
        if val_key != expect[vid][1]:
            raise SweepError(f"{run_dir}: the validation images (data.validation_split / validation_path) "
                             "changed since the sweep started, so val_loss would not compare; start a new sweep")


def write_sweep_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``sweep.json`` atomically: ``sdsweep results``/``report`` and a resume, possibly in
    another process, read it, and a crash mid-write must not leave it torn."""
    atomic_write_text(run_dir / SWEEP_STATE, json.dumps(state, indent=1))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdsweep")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"
