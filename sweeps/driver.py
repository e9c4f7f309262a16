"""The sweep driver: preflight, one latent-cache build, Ray Tune + Optuna trials, resume.

Data flow: sweep file -> SweepConfig -> dataset preflight (driver, CPU) -> latent cache built once
by a Ray task (reused from disk when its content key exists) whose result stays in Ray's object
store -> Tuner(OptunaSearch, scheduler, reused workers) -> trials (sweeps/trial.py) -> results in
the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search_spaces import make_sampler, make_storage
from sweeps.baseline import save_baselines, score_baselines
from sweeps.checkpoint_keeping import checkpoint_config
from sweeps.config import SweepConfig, extra_data_run_config
from sweeps.searched import data_variant_id, data_variants
from sweeps.confirm import confirm_sweep
from sweeps.console import QUIET_TRIAL_ERRORS, FailureLines, condense_ray_notices
from sweeps.live import LiveConsole
from sweeps.preflight import preflight_sweep
from sweeps.ray_auth import token_auth_for_local_ray
from sweeps.results import SWEEP_STATE, SweepError
from sweeps.schedulers import make_scheduler
from sweeps.shared_storage import check_shared_storage, storage_roots
from sweeps.tracking import log_sweep_run, make_callbacks, offline_sync_command, tensorboard_callbacks
from sweeps.trial import KeepResumeStateInNewest, run_trial, trial_env
from trainers.data import preflight
from trainers.tensor_files import atomic_write_text



class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch told what the leaderboard ranks: errors as FAIL, early stops as PRUNED, and a
    finished trial's value(s) at its best evaluated checkpoint.

    Ray's OptunaSearch tells COMPLETE with the *last* reported value -- but the leaderboard ranks
    and exports a trial's best checkpoint, so TPE would model a number the user never gets. Here
    the result with the best ``rank_metric`` (the sweep's ``evaluation.metric``) is remembered and
    its value (multi-objective: each objective's value at that checkpoint) is told. A trial the
    scheduler stopped early (``trial_status`` still "running") is told PRUNED: its intermediate
    values (reported per evaluation, single-objective) are what TPE ranks pruned trials by, and a
    trial stopped at step 150 is not comparable with one that ran to the end. A trial ending with
    ``trial_status == "error"`` (sweeps/trial.py) or ``error=True`` is FAIL.
    """

    def __init__(self, *args: Any, rank_metric: str, rank_mode: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank = (rank_metric, rank_mode)
        self._best: dict[str, dict] = {}

    def __setstate__(self, state: dict) -> None:
        # A searcher pickled by an sdsweep before this class tracked best results (resume).
        state.setdefault("_best", {})
        state.setdefault("_rank", (state.get("_metric"), state.get("_mode")))
        self.__dict__.update(state)

    def _setup_study(self, mode: Any) -> None:
        # The objectives by their sdsweep names, so optuna-dashboard and the leaderboard agree
        # (without names the dashboard says "Objective 0").
        super()._setup_study(mode)
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("sdsweep_trial_id", trial_id)
        return config

    def _keep_best(self, trial_id: str, result: dict) -> None:
        metric, mode = self._rank
        value = result.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self._best.get(trial_id)
            if best is None or (value > best[metric] if mode == "max" else value < best[metric]):
                self._best[trial_id] = dict(result)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._keep_best(trial_id, result)
        # An errored trial's last report carries no metric; Ray's version would raise KeyError.
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune hands a trial's last report to the searcher here only, never to on_trial_result:
        # a trial whose best evaluation is its last must not be told to Optuna as an earlier one.
        if result:
            self._keep_best(trial_id, result)
        best = self._best.pop(trial_id, None)
        status = "error" if error or (result or {}).get("trial_status") == "error" else \
            "completed" if (result or {}).get("trial_status") == "completed" else "stopped"
        self._label(trial_id, status, best)
        if status == "error":
            super().on_trial_complete(trial_id, result=None, error=True)
        elif (result or {}).get("trial_status") != "completed" or best is None:
            super().on_trial_complete(trial_id, result=None, error=False)  # no value: PRUNED
        else:
            super().on_trial_complete(trial_id, result=best, error=False)

    def _label(self, trial_id: str, status: str, best: dict | None) -> None:
        """What the leaderboard says of the trial, as Optuna user attributes (optuna-dashboard
        shows them): its status (completed, stopped early, error), best step and best value."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        ot_trial.set_user_attr("sdsweep_trial_id", trial_id)
        ot_trial.set_user_attr("sdsweep_status", status)
        if best is not None:
            ot_trial.set_user_attr("sdsweep_best_step", int(best.get("step", 0)))
            ot_trial.set_user_attr(f"sdsweep_best_{self._rank[0]}", float(best[self._rank[0]]))


PROGRESS_EVERY_S = 0.5  # the cache task sends at most this often a progress report per kind


@ray.remote(num_returns="streaming")
def build_cache_task(sweep: dict[str, Any], baseline: bool, expect: dict[str, Any] | None = None) -> Any:
    """:func:`build_cache_work` in a thread, as a streaming generator: first progress reports
    (``{"progress": (stage, done, total)}``, at most every ``PROGRESS_EVERY_S`` per stage, and
    each stage's last), then ``{"done": True, "variants": [data variant ids]}``, then for each data
    variant its three datasets (training, validation or None, the methods' extra data) as three
    objects, then the summary (the datasets stay in the object store: the driver passes their
    references on unread)."""
    import queue
    import threading

    from trainers import progress

    reports: queue.Queue = queue.Queue()
    out: dict[str, Any] = {}
    phase = ["data"]
    last: dict[str, float] = {}

    def sink(kind: str, done: int, total: int) -> None:
        stage = {"encode": "encode images", "class images": "class images"}.get(kind)
        if kind == "generate" and phase[0] == "baseline":
            stage = "baseline images"
        now = time.monotonic()
        if stage and (done >= total or now - last.get(stage, 0.0) >= PROGRESS_EVERY_S):
            last[stage] = now
            reports.put((stage, done, total))

    def work() -> None:
        try:
            with progress.listening(sink):
                out["value"] = build_cache_work(sweep, baseline, expect, phase)
        except BaseException as err:  # noqa: BLE001 - re-raised in the generator, where Ray sees it
            out["error"] = err
        finally:
            reports.put(None)

    thread = threading.Thread(target=work, name="sdsweep-cache-build", daemon=True)
    thread.start()
    while (item := reports.get()) is not None:
        yield {"progress": item}
    thread.join()
    if "error" in out:
        raise out["error"]
    caches, summary = out["value"]
    yield {"done": True, "variants": list(caches)}
    for datasets in caches.values():
        for obj in datasets:  # (not `yield from`: Ray drives the generator with send())
            yield obj
    yield summary


def build_cache_work(sweep: dict[str, Any], baseline: bool, expect: dict[str, Any] | None = None,
                     phase: list[str] | None = None) -> tuple[dict[str, tuple[Any, Any, Any]], dict[str, Any]]:
    """Build (or reuse from disk) the latent cache of every data configuration a trial can train on
    (``sweeps.searched.data_variants``: one, unless the space searches ``data.*`` keys) with its
    validation images and the extra data of the methods that use it (DreamBooth's class images),
    and, if asked, score the base model.

    Returns ``({variant id: (dataset, validation dataset or None, {method: {name: dataset}})},
    summary)``; the task sends each dataset as its own object, so they go from this task into the
    object store and on to the trials that use them, never via the driver. Extra data is built by
    the method's trainer (``Trainer.prepare_extra``) with its ``extra_data_keys`` at the largest
    value the search space can give them, so one build serves every trial (a trial takes the part
    it needs). The VAE encodes on the device a trial would get (this task's reserved GPU when
    ``resources.gpu > 0``; ``trainers.run.prepare_data``), in fp32. The baseline (the base model
    without any adapter, through the sweep's evaluator) shares this task's model load; its files
    come back as bytes in the summary so the driver writes them wherever this ran. With ``expect``
    (a resume: ``{variant id: [training key, validation key]}`` the sweep started with) every key
    is computed first, without encoding, and if any differs the task returns ``({}, {"keys":
    ...})`` having built and scored nothing.
    """
    from trainers.data import split_validation
    from trainers.latents import BuildReport, dataset_key
    from trainers.models import load_model
    from trainers.run import prepare_data, prepare_validation, validation_records

    cfg = SweepConfig.model_validate(sweep)
    model = load_model(cfg.base.model)
    variants = {vid: (cfg.base.model_copy(update={"data": data}), methods)
                for vid, (data, methods) in data_variants(cfg).items()}
    records = {vid: preflight(run.data, require_captions=True) for vid, (run, _) in variants.items()}
    if expect is not None:
        keys: dict[str, list[str | None]] = {}
        for vid, (run, _) in variants.items():
            held = validation_records(run, records[vid])
            keys[vid] = [dataset_key(split_validation(records[vid], run.data)[0], run.data, model),
                         dataset_key(held[0], held[1], model) if held else None]
        if keys != {k: list(v) for k, v in expect.items()}:
            return {}, {"keys": keys}
    caches: dict[str, tuple[Any, Any, Any]] = {}
    described: dict[str, Any] = {}
    total = BuildReport()
    extra_reports: dict[str, Any] = {}
    for vid, (run, methods) in variants.items():
        data = prepare_data(run, model, cache_text=True, records=records[vid])
        validation = prepare_validation(run, model, cache_text=True, records=records[vid])
        extra, extra_report = build_extra(cfg, model, data=run.data, methods=methods)
        caches[vid] = (data, validation, extra)
        for k, v in data.report.__dict__.items():
            if isinstance(v, int):
                setattr(total, k, getattr(total, k) + v)
        total.encode_device = data.report.encode_device
        for method, rep in extra_report.items():
            extra_reports.setdefault(method, rep)
        described[vid] = {"key": data.key, "validation_key": validation.key if validation is not None else None,
                          "data": run.data.model_dump(mode="json"), "methods": list(methods),
                          "report": dict(data.report.__dict__), "extra": extra_report}
    first = next(iter(described.values()))
    first_validation = next(iter(caches.values()))[1]
    summary = {"report": dict(total.__dict__), "key": first["key"], "model_identity": model.identity,
               "validation_key": first["validation_key"], "variants": described,
               "validation_images": len(first_validation) if first_validation is not None else 0,
               "extra": extra_reports}
    if baseline:
        if phase is not None:
            phase[0] = "baseline"  # the progress of generating is the baseline's now
        summary["baseline"] = score_baselines(cfg, model)
    return caches, summary


def build_extra(cfg: SweepConfig, model: Any, data: Any = None,
                methods: tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The extra datasets (and their build reports) of every searched method, or of ``methods``,
    keyed by method; built for ``data`` (a data variant; default ``base.data``)."""
    from trainers import get_trainer_class
    from trainers.devices import run_device

    extra: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for method in methods if methods is not None else cfg.search_space().methods:
        run_cfg = extra_data_run_config(cfg, method)
        if data is not None:
            run_cfg = run_cfg.model_copy(update={"data": data})
        built, report = get_trainer_class(method).prepare_extra(run_cfg, model, run_device(run_cfg.train.device))
        if built:
            extra[method], reports[method] = built, report
    return extra, reports


@dataclass
class SweepRun:
    """What a finished (or interrupted-and-resumed) sweep produced."""

    run_dir: Path
    results: Any  # ray.tune.ResultGrid
    cache_report: dict[str, int]
    sync_command: str | None


def make_search(cfg: SweepConfig) -> SweepOptunaSearch:
    """OptunaSearch over the sweep's define-by-run space, with explicit sampler and storage."""
    space = cfg.search_space()
    # Multi-objective: Optuna's samplers (TPE / random) handle several values natively and its
    # study keeps the Pareto front; Tune's own metric (ASHA, checkpoints) stays evaluation.metric.
    objectives = cfg.evaluation.objectives
    return SweepOptunaSearch(
        space=space.define_by_run,
        metric=list(objectives) if objectives else cfg.evaluation.metric,
        mode=cfg.objective_modes if objectives else cfg.mode,
        sampler=make_sampler(cfg.search.sampler), storage=make_storage(cfg.search.storage),
        study_name=cfg.search.study_name or cfg.name,
        points_to_evaluate=space.warm_start_points() if cfg.search.warm_start else None,
        rank_metric=cfg.evaluation.metric, rank_mode=cfg.mode,
    )


def ensure_ray(cfg: SweepConfig) -> bool:
    """Connect to the configured cluster or start a local Ray. Returns True if we started it.

    The cluster is ``ray_address`` (``sdsweep run --address``), else ``RAY_ADDRESS`` (set by
    ``ray job submit``). It is checked first (:func:`check_cluster_reachable`), so a wrong or dead
    address fails within seconds instead of Ray retrying its GCS connection forever. Without
    either, a local Ray is always *started* (``address="local"``): plain ``ray.init()`` would join
    whatever cluster Ray's address file in /tmp/ray names, a dead one included.

    Worker and raylet output is not forwarded to the driver's console (``log_to_driver=False``):
    trials report through Tune, their failures come back as results or one line each
    (sweeps/console.py), and a dying node's raylet would otherwise dump its state there (~40-100
    lines). It stays in each node's Ray session logs (``/tmp/ray/session_latest/logs``).
    """
    if ray.is_initialized():
        return False
    condense_ray_notices()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_cluster_reachable(address)
        # On a cluster the job's own runtime env (ray job submit) applies; adding ours would make
        # Ray refuse to merge any key both set (cluster.yaml sets the node environment).
        ray.init(address=address, log_to_driver=False, logging_level=_ray_log_level())
        return False
    token_auth_for_local_ray()  # auth on, as Ray's default, without its notice (sweeps/ray_auth.py)
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": trial_env()}, log_to_driver=False,
             logging_level=_ray_log_level())
    return True


def _ray_log_level() -> int:
    """Ray's driver-side log level: INFO with --verbose (Tune's classic output is off only without
    it), WARNING otherwise ("Started a local Ray instance", Tune's "Wrote the latest version ...")."""
    import logging

    return logging.INFO if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") != "0" else logging.WARNING


CONNECT_TIMEOUT_S = 5.0  # a live GCS accepts a TCP connection at once; Ray's own retry loop never ends


def check_cluster_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`SweepError` naming ``address`` and the fix unless a Ray cluster answers there:
    ``host:port`` (the head's GCS), ``ray://host:port`` (Ray Client) or ``auto`` (the cluster Ray's
    address file names)."""
    import socket

    from ray._private.utils import read_ray_address

    target = read_ray_address() if address == "auto" else address
    fix = ("start it (`ray start --head`, or `ray up cluster.yaml`), correct the address, or run without "
           "--address / ray_address / RAY_ADDRESS to let sdsweep start a local Ray")
    if not target:
        raise SweepError(f"ray_address 'auto': no running Ray cluster found on this machine. Fix: {fix}")
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"ray_address {address!r}: not host:port or ray://host:port. Fix: use the address "
                         "`ray start --head` printed (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        named = f"{address!r}" + (f" (Ray's address file names {target})" if address == "auto" else "")
        raise SweepError(f"ray_address {named}: no Ray cluster answers at {host}:{port} ({err}). Fix: {fix}") from None




def build_cache(cfg: SweepConfig, baseline: bool = False, expect: dict[str, Any] | None = None,
                on_progress: Any = None) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Run the cache build (and the baseline) as a Ray task; return ({data variant id: [training
    ref, validation ref, extra ref]}, summary). See ``build_cache_work`` for ``expect``.
    ``on_progress(stage, done, total)`` hears the task's progress ("encode images", "class images",
    "baseline images")."""
    res = cfg.resources
    stream = build_cache_task.options(**res.task_options()).remote(cfg.model_dump(mode="json"), baseline, expect)
    try:
        for ref in stream:
            item = ray.get(ref)
            if "done" in item:
                break
            if on_progress is not None:
                on_progress(*item["progress"])
        refs = {vid: [next(stream) for _ in range(3)] for vid in item["variants"]}
        summary = ray.get(next(stream))
    except ray.exceptions.RayTaskError as err:  # surface the cause (bad dataset, model) as itself
        raise err.as_instanceof_cause() from None
    return refs, summary


def _trainable(cfg: SweepConfig, data_refs: dict[str, list[Any]]) -> Any:
    # The refs travel inside a dict of lists so Ray hands trials the references, not driver-side
    # copies; each trial takes its own data variant's.
    fn = tune.with_parameters(run_trial, sweep=cfg.model_dump(mode="json"), cache=dict(data_refs))
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


@ray.remote(num_cpus=0)
def _gpu_memory_task() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


GPU_PROBE_TIMEOUT_S = 120.0


def check_gpu_packing(cfg: SweepConfig, after_ray: bool) -> None:
    """Refuse a fractional-GPU packing that cannot fit (sweeps/plan.py), before any trial starts.

    The GPU's memory is ``resources.gpu_memory_gib``, else (a local Ray) this machine's GPU: both
    checked before Ray starts (``after_ray=False``). On a cluster it is probed once Ray is up
    (``after_ray=True``) by a task holding the trials' GPU share; if no GPU is free within
    ``GPU_PROBE_TIMEOUT_S`` the packing goes unchecked, with a note.
    """
    if cfg.resources.gpu <= 0:
        return
    from sweeps.plan import check_packing, local_gpu_memory_gib

    on_cluster = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    memory = cfg.resources.gpu_memory_gib
    if memory is None and not on_cluster:
        memory = local_gpu_memory_gib()
    if not after_ray:
        if memory is not None:
            _print_plan(check_packing(cfg, memory))
        return
    if memory is not None or not on_cluster:
        return  # checked before Ray started, or a local Ray without a GPU (trials would never start)
    res = cfg.resources
    ref = _gpu_memory_task.options(num_gpus=min(res.gpu, 1.0), **({"resources": dict(res.custom)} if res.custom
                                                                  else {})).remote()
    ready, _ = ray.wait([ref], timeout=GPU_PROBE_TIMEOUT_S)
    if not ready:
        ray.cancel(ref, force=True)
        print(f"note: no GPU answered within {GPU_PROBE_TIMEOUT_S:.0f} s, so the GPU packing is unchecked; set "
              "resources.gpu_memory_gib to check it (`sdsweep plan SWEEP.yaml --gpu-memory GIB`)")
        return
    _print_plan(check_packing(cfg, ray.get(ref)))


def _print_plan(plan: Any) -> None:
    if plan is not None:
        big = plan.largest
        print(f"GPU plan: up to {plan.sharing} trial(s) per GPU x ~{big.estimate.total_gib:.1f} GiB "
              f"({big.method}, worst case) <= {plan.gpu_memory_gib:.1f} GiB ({plan.memory_source})", flush=True)


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
        results = _tuner(cfg, run_dir, _trainable(cfg, data_refs), run_dir.name, console).fit()
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
            _refuse_changed_data(run_dir, expect, summary["keys"])
        report = {**summary["report"], "extra": summary["extra"]}
        if "baseline" in summary:
            state["baseline"], state["baselines"] = save_baselines(run_dir, summary["baseline"])
        state["cache_builds"].append(report)
        write_sweep_state(run_dir, state)
        tuner = tune.Tuner.restore(str(run_dir), trainable=_trainable(cfg, data_refs), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        results = tuner.fit()
        _confirm(cfg, run_dir)
        _sweep_run(cfg, run_dir, state["run_id"])
    finally:
        if started:
            ray.shutdown()
    return SweepRun(run_dir, results, report, offline_sync_command(run_dir))


def _refuse_changed_data(run_dir: Path, expect: dict[str, Any], found: dict[str, Any]) -> None:
    """Raise the error that says what changed since the sweep started: its dataset or base model
    (a training cache key), its validation images, or the data configurations it searches."""
    if set(found) != set(expect):
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
