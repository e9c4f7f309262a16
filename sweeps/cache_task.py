"""The sweep's cache task: one Ray task that loads the base model once and builds what every trial
shares -- a latent cache per data configuration, the methods' extra data (DreamBooth's class
images) -- and scores the baseline, streaming its progress to the driver's console."""

from __future__ import annotations

import time
from typing import Any

import ray

from sweeps.baseline import score_baselines
from sweeps.config import SweepConfig, extra_data_run_config
from sweeps.searched import data_variants
from trainers.data import preflight


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
