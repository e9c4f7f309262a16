"""Held-out confirmation: the sweep's top checkpoints and the base model, re-scored on evaluation
seeds (and optionally prompts) that picking never saw, with paired bootstrap intervals.

Why: the leaderboard's scores are the maxima over many checkpoints of noisy estimates on the same
few images, so the winner's score is biased upwards (the winner's curse) and its margin over the
runner-up may be noise. Re-scoring on fresh seeds removes that bias; resampling the prompts and the
seeds (a two-way cluster bootstrap, :mod:`sweeps.bootstrap`) of the images -- the same images for
every model, hence *paired* -- gives the margin's uncertainty.

Written to ``RUN_DIR/confirm/confirm.json`` (plus each model's images and scores.json under
``RUN_DIR/confirm/<label>/``); ``sdsweep results``, ``best.json`` and the report read it back.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import ray

from sweeps.bootstrap import paired_bootstrap
from sweeps.config import SweepConfig, trial_run_config
from sweeps.results import (
    CONFIRM_DIR,
    CONFIRM_FILE,
    TrialRow,
    _candidates,
    find_checkpoint,
    image_metrics,
    leaderboard,
    metric_and_mode,
    read_confirmation,
    select_checkpoint,
)
from trainers.tensor_files import atomic_write_text

BASELINE = "baseline"


# --------------------------------------------------------------------------------------------
# Which checkpoints
# --------------------------------------------------------------------------------------------


def _best_kept(row: TrialRow, metric: str, mode: str) -> tuple[dict[str, Any], Path] | None:
    """The row's best evaluation that has a kept checkpoint, in ``select_checkpoint``'s order."""
    for _, h in _candidates([row], metric, mode):
        ckpt = find_checkpoint(row.path, int(h["step"])) if row.path else None
        if ckpt is not None:
            return h, ckpt
    return None


def candidates(run_dir: Path, top_k: int) -> list[dict[str, Any]]:
    """The exported pick first (``select_checkpoint``), then the next best trials' best kept
    checkpoints in leaderboard order, ``top_k`` in all."""
    win_row, win_eval, win_ckpt, _ = select_checkpoint(run_dir)
    rows, state = leaderboard(run_dir)
    metric, mode = metric_and_mode(state)

    def entry(row: TrialRow, h: dict[str, Any], ckpt: Path) -> dict[str, Any]:
        return {"label": f"{row.trial_id}@{int(h['step'])}", "trial_id": row.trial_id, "method": row.method,
                "step": int(h["step"]), "rank": row.rank, "checkpoint": str(ckpt), "params": dict(row.params),
                "selection": {k: h[k] for k in image_metrics(state) if k in h}}

    out = [entry(win_row, win_eval, win_ckpt)]
    for row in rows:
        if len(out) >= top_k:
            break
        if row.trial_id == win_row.trial_id or row.rank is None:
            continue
        kept = _best_kept(row, metric, mode)
        if kept is not None:
            out.append(entry(row, *kept))
    return out


# --------------------------------------------------------------------------------------------
# Re-scoring (a Ray task: on a GPU where the sweep has them)
# --------------------------------------------------------------------------------------------


@ray.remote
def confirm_task(sweep: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Generate and score one model (a checkpoint, or the base model for ``checkpoint: None``)
    with the held-out evaluator; return its scores, per-image rows and files (as bytes, so the
    driver writes them wherever this task ran). One task per model, so they run side by side
    where the cluster has room; a worker that runs several loads the base model and the scoring
    models once (``worker_model``, ``cached_evaluator``)."""
    from sweeps.trial import cached_evaluator, place_base_model, score_to_files, worker_model
    from trainers import get_trainer_class
    from trainers.devices import run_placement

    cfg = SweepConfig.model_validate(sweep)
    # The placement its trial sampled with (the base model: the winner's, whose margin over it is
    # reported): the trial's own precision and its method's module dtypes, never a precision shift.
    run = trial_run_config(cfg, item["params"], source=f"held-out confirmation of {item['label']}")
    where = run_placement(run.train.device, run.train.mixed_precision)
    dtypes = get_trainer_class(run.method).base_dtypes(run.settings, where.weight_dtype)
    model, _ = worker_model(run.model, where.precision, dtypes)
    place_base_model(model, where, dtypes)
    evaluator = cached_evaluator(cfg.evaluation.heldout_evaluator(), cfg.base.data, where.device)
    ckpt = item.get("checkpoint")
    loaded = get_trainer_class(item["method"]).loaded_for_evaluation(model, Path(ckpt)) if ckpt else nullcontext(model)
    with loaded as sampled:
        return score_to_files(evaluator, sampled, where, {"label": item["label"], "heldout": True},
                              prediction_type=item.get("prediction_type"))


def _prediction_type(ckpt: Path) -> str | None:
    state = ckpt / "trainer_state.json"
    return json.loads(state.read_text())["config"].get("prediction_type") if state.is_file() else None


def confirm_models(run_dir: Path, top_k: int) -> list[dict[str, Any]]:
    """What the confirmation scores: the top ``top_k`` checkpoints (:func:`candidates`, each with
    the prediction type it was trained with), then the base model."""
    picked = candidates(run_dir, top_k)
    for item in picked:
        item["prediction_type"] = _prediction_type(Path(item["checkpoint"]))
    # The base model samples as the winner did: its margin over the base model is the one reported.
    return [*picked, {"label": BASELINE, "checkpoint": None, "method": None, "params": picked[0]["params"]}]


def confirm_sweep(cfg: SweepConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run the held-out confirmation of a finished sweep and write ``confirm/confirm.json``.

    Returns the summary (None when the sweep has no image evaluation, confirmation is off, or no
    trial was evaluated). The margin is of the sweep's metric when it is an image score, else of
    the composite.
    """
    ev, conf = cfg.evaluation, cfg.evaluation.confirm
    if ev.images is None or conf is None:
        return None
    try:
        models = confirm_models(run_dir, conf.top_k)
    except (ValueError, FileNotFoundError):  # no trial evaluated, or no checkpoint kept
        return None
    picked = models[:-1]
    res = cfg.resources
    sweep = ray.put(cfg.model_dump(mode="json"))
    tasks = [confirm_task.options(**res.trial_task_options()).remote(sweep, item) for item in models]
    scored = dict(zip((item["label"] for item in models), ray.get(tasks)))
    out_dir = Path(run_dir) / CONFIRM_DIR
    for label, rec in scored.items():
        d = out_dir / label.replace("@", "-step-")
        d.mkdir(parents=True, exist_ok=True)
        for name, data in rec.pop("files").items():
            (d / name).write_bytes(data)
        rec["dir"] = str(d.relative_to(run_dir))
    summary = summarize(cfg, picked, scored)
    atomic_write_text(out_dir / CONFIRM_FILE, json.dumps(summary, indent=1))
    return summary


def summarize(cfg: SweepConfig, picked: list[dict[str, Any]], scored: dict[str, Any]) -> dict[str, Any]:
    """confirm.json: every model's held-out scores, the winner's margins with intervals, a verdict."""
    ev, conf = cfg.evaluation, cfg.evaluation.confirm
    assert ev.images is not None and conf is not None
    metrics = list(ev.images.metrics)
    target = ev.metric if ev.metric in ev.images.reported() else "composite"
    weights = ev.images.composite_weights()
    heldout = ev.heldout_evaluator().generation
    winner = picked[0]["label"]

    def margin(other: str, what: str) -> dict[str, Any]:
        stats = paired_bootstrap(scored[winner]["rows"], scored[other]["rows"], metrics, what, weights,
                                 resamples=conf.bootstrap, confidence=conf.confidence)
        return {"other": other, "metric": what, **stats}

    others = {"runner_up": picked[1]["label"]} if len(picked) > 1 else {}
    others["baseline"] = BASELINE
    margins = {name: margin(label, target) for name, label in others.items()}
    by_metric = {name: {m: margin(label, m) for m in metrics} for name, label in others.items()}
    models = [{**item, "heldout": scored[item["label"]]["scores"], "dir": scored[item["label"]]["dir"],
               "placement": scored[item["label"]].get("placement_key")} for item in picked]
    models.append({"label": BASELINE, "heldout": scored[BASELINE]["scores"], "dir": scored[BASELINE]["dir"],
                   "placement": scored[BASELINE].get("placement_key")})
    n = len(scored[winner]["rows"])
    return {"metric": target, "winner": winner, "seeds": list(heldout.seeds), "prompts": list(heldout.prompts),
            "images_per_model": n, "prompts_count": len(heldout.prompts), "models": models,
            "margins": margins, "margins_by_metric": by_metric,
            "verdict": verdict(margins, target, n, len(heldout.prompts))}


def verdict(margins: dict[str, dict[str, Any]], metric: str, n: int, prompts: int) -> list[str]:
    """One plain sentence per margin: separated or not, and what would separate it."""
    lines = []
    names = {"runner_up": "the runner-up", "baseline": "the base model"}
    for name, m in margins.items():
        pct = round(100 * m["confidence"])
        span = f"{m['margin']:+.4g} [{m['low']:+.4g}, {m['high']:+.4g}] ({pct}% CI, {n} held-out images)"
        if m["separated"]:
            lines.append(f"held-out {metric} margin over {names[name]}: {span}: the winner is "
                         f"{'better' if m['margin'] > 0 else 'worse'}")
        elif m["images_needed"] is None and m.get("limit"):  # more seeds alone would not separate it
            lines.append(f"held-out {metric} margin over {names[name]}: {span}: indistinguishable at this "
                         f"evaluation size; {m['limit']}")
        elif m["images_needed"] is None:
            lines.append(f"held-out {metric} margin over {names[name]}: {span}: no difference measured")
        elif m["images_needed"] <= n:
            lines.append(f"held-out {metric} margin over {names[name]}: {span}: borderline at this evaluation "
                         "size (the interval just reaches 0); a few more seeds per prompt would settle it")
        else:
            per_prompt = math.ceil(m["images_needed"] / max(prompts, 1))
            lines.append(f"held-out {metric} margin over {names[name]}: {span}: indistinguishable at this "
                         f"evaluation size; about {m['images_needed']} images per model ({per_prompt} seeds "
                         f"per prompt) would separate a margin this size")
    return lines
