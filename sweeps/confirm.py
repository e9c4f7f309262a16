"""Held-out confirmation: the sweep's top checkpoints re-scored on evaluation seeds (and optionally
prompts) that the sweep's evaluations never saw; the best of them there is the export, and its
margins over the runner-up and the base model come from a third set of images that chose nothing.

Why: the leaderboard's scores are the maxima over many checkpoints of noisy estimates on the same
few images, so the winner's score is biased upwards (the winner's curse) and its lead over the
runner-up may be noise. Choosing among the top K on fresh seeds (``pick_seeds``) removes the bias
from the choice; the margins are then measured on other seeds (``seeds``), so choosing does not
bias them either. Resampling the prompts and the seeds (a two-way cluster bootstrap,
:mod:`sweeps.bootstrap`) of the images -- the same images for every model, hence *paired* -- gives
each margin's uncertainty; a margin is "too close to call" while its interval reaches 0, and "no
meaningful difference" when separated but smaller than ``min_effect`` times the score's spread
between seeds of one model (:func:`sweeps.bootstrap.seed_spread`).

Written to ``RUN_DIR/confirm/confirm.json`` (plus each model's images and scores.json under
``RUN_DIR/confirm/<label>/``, its pick-seed images under ``.../pick/``); ``sdsweep results``,
``sdsweep best`` (which exports the confirmation's pick), ``best.json`` and the report read it back.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray

from sweeps.bootstrap import paired_bootstrap, seed_spread
from sweeps.config import SweepConfig, trial_run_config
from sweeps.export import select_checkpoint
from sweeps.results import (
    CONFIRM_DIR,
    CONFIRM_FILE,
    TrialRow,
    _candidates,
    find_checkpoint,
    image_metrics,
    leaderboard,
    metric_and_mode,
)
from trainers.metric_modes import natural_mode
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
    """The leaderboard's pick first (``select_checkpoint`` without the confirmation), then the next best trials' best kept
    checkpoints in leaderboard order, ``top_k`` in all."""
    win_row, win_eval, win_ckpt, _ = select_checkpoint(run_dir, confirmed=False)
    rows, state = leaderboard(run_dir)
    metric, mode = metric_and_mode(state)

    def entry(row: TrialRow, h: dict[str, Any], ckpt: Path) -> dict[str, Any]:
        return {"label": f"{row.trial_id}@{int(h['step'])}", "trial_id": row.trial_id, "method": row.method,
                "step": int(h["step"]), "rank": row.rank, "checkpoint": str(ckpt), "params": dict(row.params),
                "selection": {k: h[k] for k in image_metrics(state) if k in h}, "sampled_as": row.placement}

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
    with the held-out evaluator, on each of its seed sets (``item["seed_sets"]``: ``pick`` for the
    top K, ``report`` for every model); return ``{set: scores, per-image rows and files (as bytes,
    so the driver writes them wherever this task ran)}``. One task per model, so they run side by
    side where the cluster has room; a worker that runs several loads the base model and the
    scoring models once (``worker_model``, ``cached_evaluator``)."""
    from sweeps.trial import cached_evaluator, place_base_model, score_to_files, worker_model
    from trainers import get_trainer_class
    from trainers.devices import run_placement

    cfg = SweepConfig.model_validate(sweep)
    # The placement its trial sampled with (the base model: that of the candidates it stands for,
    # confirm_models): the trial's own precision and its method's module dtypes, never a precision shift.
    run = trial_run_config(cfg, item["params"], source=f"held-out confirmation of {item['label']}")
    where = run_placement(run.train.device, run.train.mixed_precision)
    dtypes = get_trainer_class(run.method).base_dtypes(run.settings, where.weight_dtype)
    model, _ = worker_model(run.model, where.precision, dtypes)
    place_base_model(model, where, dtypes)
    ckpt = item.get("checkpoint")
    loaded = get_trainer_class(item["method"]).loaded_for_evaluation(model, Path(ckpt)) if ckpt else nullcontext(model)
    out = {}
    with loaded as sampled:
        for name, seeds in item["seed_sets"].items():
            evaluator = cached_evaluator(cfg.evaluation.heldout_evaluator(seeds), cfg.base.data, where.device)
            evaluator.set_base({})
            # Drift is scored on the driver (complete_drift): the base model draws beside the top K.
            out[name] = score_to_files(evaluator, sampled, where, {"label": item["label"], "heldout": name},
                                       prediction_type=item.get("prediction_type"), as_base=ckpt is None,
                                       defer_drift=ckpt is not None)
    return out


def _prediction_type(ckpt: Path) -> str | None:
    state = ckpt / "trainer_state.json"
    return json.loads(state.read_text())["config"].get("prediction_type") if state.is_file() else None


def confirm_models(run_dir: Path, top_k: int) -> list[dict[str, Any]]:
    """What the confirmation scores: the top ``top_k`` checkpoints (:func:`candidates`, each with
    the prediction type it was trained with), then the base model."""
    picked = candidates(run_dir, top_k)
    for item in picked:
        item["prediction_type"] = _prediction_type(Path(item["checkpoint"]))
    # The base model samples as each candidate does, once per way of sampling among them (one on a
    # CPU, or in a one-method sweep): the pick's margin over the base model is never a precision shift.
    bases: dict[str, dict[str, Any]] = {}
    for item in picked:
        bases.setdefault(sampling_signature(item), {"checkpoint": None, "method": None, "params": item["params"]})
    return [*picked, *({**b, "label": BASELINE if i == 0 else f"{BASELINE}-{i + 1}", "signature": sig}
                       for i, (sig, b) in enumerate(bases.items()))]


def sampling_signature(item: dict[str, Any]) -> str:
    """How a candidate samples: the placement its trial's evaluations recorded (device type, module
    dtypes, autocast: ``trainers.devices.placement_key``); for a trial that recorded none, what
    decides it (its method, ``train.mixed_precision`` and its method's ``Trainer.dtype_keys``, as
    its trial searched them). Candidates with the same signature sample the base model alike
    (``sweeps/baseline.py``)."""
    from trainers import get_trainer_class

    if item.get("sampled_as"):
        return str(item["sampled_as"])
    keys = ("train.mixed_precision", *get_trainer_class(item["method"]).dtype_keys)
    return json.dumps([item["method"], *(item["params"].get(k) for k in keys)], default=str)


def assign_seed_sets(models: list[dict[str, Any]], conf: Any, drift: bool = False) -> list[dict[str, Any]]:
    """Give each model of :func:`confirm_models` its ``seed_sets`` (the top K: the pick seeds
    when there is a choice, and the report seeds; the base model: the report seeds); return the
    top K."""
    picked = [m for m in models if m["checkpoint"] is not None]
    pick_seeds, report_seeds = conf.seed_sets()
    for item in models:
        # The base model draws the pick seeds too when a drift metric compares the top K with it there.
        choosing = (item["checkpoint"] is not None or drift) and len(picked) > 1 and pick_seeds
        item["seed_sets"] = {"report": list(report_seeds), **({"pick": list(pick_seeds)} if choosing else {})}
    return picked


def confirm_sweep(cfg: SweepConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run the held-out confirmation of a finished sweep and write ``confirm/confirm.json``.

    Returns the summary (None when the sweep has no image evaluation, confirmation is off, or no
    trial was evaluated). The pick and the margins are of the sweep's metric when it is an image
    score, else of the composite.
    """
    ev, conf = cfg.evaluation, cfg.evaluation.confirm
    if ev.images is None or conf is None:
        return None
    try:
        models = confirm_models(run_dir, conf.top_k)
    except (ValueError, FileNotFoundError):  # no trial evaluated, or no checkpoint kept
        return None
    from trainers.metrics import METRICS

    drift = any(getattr(METRICS[m], "prior_only", False) for m in ev.images.metrics)
    picked = assign_seed_sets(models, conf, drift)
    res = cfg.resources
    sweep = ray.put(cfg.model_dump(mode="json"))

    def run(items: list[dict[str, Any]]) -> dict[str, Any]:
        tasks = [confirm_task.options(**res.trial_task_options()).remote(sweep, item) for item in items]
        return dict(zip((item["label"] for item in items), ray.get(tasks)))

    every = run(models)  # every model side by side
    if drift:  # the top K's drift: their images against the base model's at each held-out seed
        _complete_drift(cfg, [every[m["label"]] for m in models if m["checkpoint"] is None],
                        [every[item["label"]] for item in picked])
    scored = {item["label"]: every[item["label"]] for item in picked}
    # The base model as the pick samples is the one its margin is over; the others are dropped.
    winner = confirmed_order(picked, scored, _target(cfg))[0]
    base = next(m for m in models if m["checkpoint"] is None and m["signature"] == sampling_signature(winner))
    scored[BASELINE] = every[base["label"]]
    out_dir = Path(run_dir) / CONFIRM_DIR
    for label, recs in scored.items():
        for name, rec in recs.items():
            d = out_dir / label.replace("@", "-step-") / ("" if name == "report" else name)
            d.mkdir(parents=True, exist_ok=True)
            for file, data in rec.pop("files").items():
                (d / file).write_bytes(data)
            rec["dir"] = str(d.relative_to(run_dir))
    summary = summarize(cfg, picked, scored)
    atomic_write_text(out_dir / CONFIRM_FILE, json.dumps(summary, indent=1))
    return summary


def _complete_drift(cfg: SweepConfig, bases: list[dict[str, Any]], candidates: list[dict[str, Any]]) -> None:
    """Score the candidates' deferred drift against the base model's embeddings at their sampling
    placement (``trainers.evaluate.complete_drift``) and put the scores into their files."""
    from trainers.evaluate import complete_drift

    base: dict[str, dict[str, dict[Any, Any]]] = {}
    for recs in bases:
        for rec in recs.values():
            for metric, table in rec["base_embeddings"].items():
                base.setdefault(rec["placement_key"], {}).setdefault(metric, {}).update(table)
    assert cfg.evaluation.images is not None
    weights = cfg.evaluation.images.composite_weights()
    for recs in candidates:
        for rec in recs.values():
            where = rec["placement_key"]
            if where not in base:
                raise ValueError(f"no base-model images at sampling placement {where!r} (the base model was drawn at "
                                 f"{sorted(base)}); its drift cannot be scored")
            complete_drift(rec["scores"], rec["rows"], rec.pop("pending_drift"), base[where], weights, where)
            rewrite_scores_file(rec["files"], rec["scores"], rec["rows"])


def rewrite_scores_file(files: dict[str, bytes], scores: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Put completed ``scores`` and ``rows`` (``trainers.evaluate.complete_drift``) into the
    ``scores.json`` of ``sweeps.trial.score_to_files``'s ``files``."""
    from trainers.evaluate import SCORES_FILE

    info = json.loads(files[SCORES_FILE])
    info["scores"] = scores
    info["rows"] = [{"file": old["file"], **row} for old, row in zip(info["rows"], rows, strict=True)]
    files[SCORES_FILE] = json.dumps(info, indent=1).encode()


def _target(cfg: SweepConfig) -> str:
    """What the confirmation picks by and reports: the sweep's metric when it is an image score,
    else the composite."""
    ev = cfg.evaluation
    assert ev.images is not None
    return ev.metric if ev.metric in ev.images.reported() else "composite"


def confirmed_order(picked: list[dict[str, Any]], scored: dict[str, Any], target: str) -> list[dict[str, Any]]:
    """The top K ordered by ``target`` on their pick seeds, best first (ties keep the leaderboard's
    order); the leaderboard's order when nothing was scored on pick seeds."""
    if not all("pick" in scored[item["label"]] for item in picked):
        return list(picked)
    sign = -1.0 if natural_mode(target) == "max" else 1.0
    return sorted(picked, key=lambda item: sign * scored[item["label"]]["pick"]["scores"][target])


def summarize(cfg: SweepConfig, picked: list[dict[str, Any]], scored: dict[str, Any]) -> dict[str, Any]:
    """confirm.json: the pick (best of the top K on the pick seeds), every model's scores on the
    report seeds, the pick's margins there with intervals and smallest meaningful differences, a
    verdict."""
    ev, conf = cfg.evaluation, cfg.evaluation.confirm
    assert ev.images is not None and conf is not None
    metrics = list(ev.images.metrics)
    target = _target(cfg)
    weights = ev.images.composite_weights()
    heldout = ev.heldout_evaluator().generation
    order = confirmed_order(picked, scored, target)
    winner = order[0]["label"]
    rows = {label: recs["report"]["rows"] for label, recs in scored.items()}

    def margin(other: str, what: str) -> dict[str, Any]:
        stats = paired_bootstrap(rows[winner], rows[other], metrics, what, weights,
                                 resamples=conf.bootstrap, confidence=conf.confidence)
        spread = math.sqrt((seed_spread(rows[winner], metrics, what, weights) ** 2
                            + seed_spread(rows[other], metrics, what, weights) ** 2) / 2)
        smallest = conf.min_effect * spread
        return {"other": other, "metric": what, **stats, "seed_spread": spread, "min_effect": conf.min_effect,
                "min_difference": smallest, "call": call(stats, smallest)}

    others = {"runner_up": order[1]["label"]} if len(order) > 1 else {}
    others["baseline"] = BASELINE
    margins = {name: margin(label, target) for name, label in others.items()}
    by_metric = {name: {m: margin(label, m) for m in metrics} for name, label in others.items()}

    def entry(item: dict[str, Any]) -> dict[str, Any]:
        recs = scored[item["label"]]
        out = {**item, "heldout": recs["report"]["scores"], "dir": recs["report"]["dir"],
               "placement": recs["report"].get("placement_key")}
        if "pick" in recs:
            out.update(pick=recs["pick"]["scores"], pick_dir=recs["pick"]["dir"])
        return out

    models = [entry(item) for item in order]
    models.append(entry({"label": BASELINE}))
    pick_seeds = sorted({r["seed"] for r in scored[winner].get("pick", {}).get("rows", [])})
    n = len(rows[winner])
    return {"metric": target, "winner": winner, "leaderboard_pick": picked[0]["label"],
            "picked_by": "confirmation" if pick_seeds else "leaderboard",
            "pick_seeds": pick_seeds, "pick_images_per_model": len(scored[winner].get("pick", {}).get("rows", [])),
            "seeds": list(heldout.seeds), "prompts": list(heldout.prompts),
            "images_per_model": n, "prompts_count": len(heldout.prompts), "models": models,
            "min_effect": conf.min_effect, "margins": margins, "margins_by_metric": by_metric,
            "verdict": verdict(margins, target, n, len(heldout.prompts))}


def call(stats: dict[str, Any], smallest: float) -> str:
    """What a margin says: ``too close to call`` (its interval reaches 0), ``no meaningful
    difference`` (separated, but smaller than the smallest difference worth reporting), else
    ``better`` or ``worse``."""
    if not stats["separated"]:
        return "too close to call"
    if abs(stats["margin"]) < smallest:
        return "no meaningful difference"
    return "better" if stats["margin"] > 0 else "worse"


def verdict(margins: dict[str, dict[str, Any]], metric: str, n: int, prompts: int) -> list[str]:
    """One plain sentence per margin: what it says, and what would separate it."""
    lines = []
    names = {"runner_up": "the runner-up", "baseline": "the base model"}
    for name, m in margins.items():
        pct = round(100 * m["confidence"])
        span = f"{m['margin']:+.4g} [{m['low']:+.4g}, {m['high']:+.4g}] ({pct}% CI, {n} held-out images)"
        head = f"held-out {metric} margin over {names[name]}: {span}"
        what = m.get("call") or call(m, 0.0)
        if what in ("better", "worse"):
            lines.append(f"{head}: the pick is {what}")
        elif what == "no meaningful difference":
            lines.append(f"{head}: no meaningful difference (separated, but smaller than {m['min_difference']:.3g}, "
                         f"the smallest difference worth reporting: {m['min_effect']:g} x the "
                         f"score's spread between seeds, {m['seed_spread']:.3g})")
        elif m["images_needed"] is None and m.get("limit"):  # more seeds alone would not separate it
            lines.append(f"{head}: too close to call; {m['limit']}")
        elif m["images_needed"] is None:
            lines.append(f"{head}: too close to call (no difference measured)")
        elif m["images_needed"] <= n:
            lines.append(f"{head}: too close to call, borderline at this evaluation size (the interval just "
                         "reaches 0); a few more seeds per prompt would settle it")
        else:
            per_prompt = math.ceil(m["images_needed"] / max(prompts, 1))
            lines.append(f"{head}: too close to call; about {m['images_needed']} images per model ({per_prompt} "
                         f"seeds per prompt) would separate a margin this size")
    return lines

