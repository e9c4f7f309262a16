"""The export of a sweep's best checkpoint: which one (``select_checkpoint``: the held-out
confirmation's pick when it ran, else the leaderboard's best; ``pick_checkpoint``: one picked by
hand) and its files in the formats people load, with best.json (``export_best``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sweeps.errors import SweepError
from sweeps.results import (
    _BOOKKEEPING,
    TrialRow,
    _candidates,
    _has,
    baseline_scores,
    find_checkpoint,
    image_metrics,
    kept_steps,
    leaderboard,
    metric_and_mode,
    pareto_front,
    read_confirmation,
    read_state,
)
from trainers import get_trainer_class
from trainers.metric_modes import natural_mode
from trainers.tensor_files import atomic_write_text


def confirmed_pick(run_dir: Path, rows: list[TrialRow], metric: str) -> tuple[TrialRow, dict[str, Any], Path,
                                                                               dict[str, Any]] | None:
    """The held-out confirmation's pick (the best of the top K on its pick seeds) as
    ``select_checkpoint`` returns it, when the confirmation chose by ``metric`` among ``rows`` and
    that checkpoint is on disk; else None."""
    conf = read_confirmation(run_dir)
    if not conf or conf.get("picked_by") != "confirmation" or conf["metric"] != metric:
        return None
    win = next(m for m in conf["models"] if m["label"] == conf["winner"])
    row = next((r for r in rows if r.trial_id == win["trial_id"]), None)
    ckpt = find_checkpoint(row.path, int(win["step"])) if row is not None and row.path else None
    if row is None or ckpt is None:
        return None
    h = next((e for e in row.history if e.get("step") == win["step"]), {"step": win["step"]})
    why = {"picked_by": "auto", "chosen_by": "confirmation", "leaderboard_pick": conf["leaderboard_pick"],
           "why": (f"highest {metric} among the leaderboard's top {len(conf['models']) - 1} on the held-out "
                   f"confirmation's pick seeds ({conf['pick_images_per_model']} images per model that no "
                   f"evaluation of the sweep used)"
                   + ("" if conf["leaderboard_pick"] == conf["winner"] else
                      f"; the leaderboard's best, {conf['leaderboard_pick']}, came second or lower there"))}
    return row, h, ckpt, why


def pick_checkpoint(run_dir: Path, trial: str, step: int | None = None, metric: str | None = None
                    ) -> tuple[TrialRow, dict[str, Any], Path, dict[str, Any]]:
    """A checkpoint chosen by hand (``sdsweep best --trial ID --step N``): trial ``trial`` at
    ``step`` (default: that trial's best kept step by ``metric``), as ``select_checkpoint`` returns
    it; ``why`` marks it ``picked_by: manual`` and names the checkpoint the automatic pick exports."""
    rows, state = leaderboard(run_dir, metric)
    metric, mode = metric_and_mode(state, metric)
    by_id = {r.trial_id: r for r in rows}
    if trial not in by_id:
        raise SweepError(f"{run_dir}: --trial {trial}: no such trial; this sweep's trials (best first): "
                         f"{', '.join(r.trial_id for r in rows)}")
    row = by_id[trial]
    kept = kept_steps(row.path)
    if step is None:
        step = next((int(h["step"]) for _, h in _candidates([row], metric, mode) if int(h["step"]) in kept), None)
        if step is None:
            raise SweepError(f"{run_dir}: trial {trial} has no kept checkpoint evaluated on {metric} (kept steps: "
                             f"{kept or 'none'}); give --step N")
    ckpt = find_checkpoint(row.path, step) if row.path else None
    if ckpt is None:
        evaluated = [int(h["step"]) for h in row.history if _has(h, metric)]
        raise SweepError(f"{run_dir}: trial {trial} has no kept checkpoint at step {step}; its kept steps: "
                         f"{kept or 'none'} (evaluated at {evaluated or 'no step'}; the sweep keeps checkpoints_to_keep "
                         "per trial, the best by the sweep's metric: raise it to keep more)")
    h = next((e for e in row.history if e.get("step") == step), {"step": step})
    confirmed = confirmed_pick(run_dir, rows, metric)
    auto = confirmed[:2] if confirmed else next(((r, e) for r, e in _candidates(rows, metric, mode)
                                                 if r.path and find_checkpoint(r.path, int(e["step"])) is not None), None)
    value = f"{metric} {h[metric]:.5g}" if _has(h, metric) else f"not evaluated on {metric}"
    why: dict[str, Any] = {
        "picked_by": "manual", "picked": {"trial_id": trial, "step": step},
        "rank_of_trial": row.rank, "trials": len(rows),
        "auto_pick": {"trial_id": auto[0].trial_id, "step": int(auto[1]["step"]), metric: auto[1][metric]} if auto
        else None,
        "why": (f"picked by hand (sdsweep best --trial {trial} --step {step}): trial {trial}, rank "
                f"{row.rank or '-'} of {len(rows)} by {metric}, at step {step} ({value}); the automatic pick is "
                + (f"trial {auto[0].trial_id} step {int(auto[1]['step'])} ({metric} {auto[1][metric]:.5g})"
                   if auto else "none (no kept checkpoint was evaluated)"))}
    return row, h, ckpt, why


def select_checkpoint(run_dir: Path, metric: str | None = None, pareto: int | None = None,
                      method: str | None = None, confirmed: bool = True
                      ) -> tuple[TrialRow, dict[str, Any], Path, dict[str, Any]]:
    """The checkpoint ``sdsweep best`` exports: ``(trial row, its evaluation, checkpoint dir, why)``.

    The held-out confirmation's pick (the best of the leaderboard's top K on seeds no evaluation
    used: ``sweeps/confirm.py``) when it ran on the sweep's metric and ``confirmed`` (the default)
    and no other choice is asked for. Else by ``metric`` (default: the sweep's) over every
    evaluated checkpoint of every trial; or, with
    ``pareto=k``, the k-th point (0-based, best first on the first objective) of the Pareto front
    of ``evaluation.objectives``. A checkpoint the sweep did not keep (``checkpoints_to_keep`` retains
    the best by the sweep's metric) cannot be exported: the best *kept* one is, and ``why`` says so.
    With ``method``, only that method's trials compete (the best LoRA of a sweep across methods).
    """
    rows, state = leaderboard(run_dir, metric)
    metric, mode = metric_and_mode(state, metric)
    if method is not None:
        methods = sorted({r.method for r in rows})
        if method not in methods:
            raise SweepError(f"{run_dir}: --method {method}: no trial of that method; this sweep's methods: {methods}")
        rows = [r for r in rows if r.method == method]
    if confirmed and metric == metric_and_mode(state)[0] and pareto is None and method is None:
        pick = confirmed_pick(run_dir, rows, metric)
        if pick is not None:
            return pick
    by_id = {r.trial_id: r for r in rows}
    why: dict[str, Any] = {"picked_by": "auto",
                           "evaluated_trials": sum(1 for r in rows if any(_has(e, metric) for e in r.history)),
                           "trials": len(rows), "among_method": method}
    if pareto is not None:
        objectives = state["config"]["evaluation"].get("objectives")
        if not objectives:
            raise SweepError(f"{run_dir}: --pareto needs a multi-objective sweep (evaluation.objectives)")
        front = pareto_front(rows, list(objectives), [natural_mode(o) for o in objectives])
        if not 0 <= pareto < len(front):
            raise SweepError(f"{run_dir}: --pareto {pareto}: the Pareto front has {len(front)} points "
                             f"(0..{len(front) - 1}); `sdsweep results` lists them")
        point = front[pareto]
        row = by_id[point.trial_id]
        if row.path is None or find_checkpoint(row.path, point.step) is None:
            kept = [k for k, p in enumerate(front) if by_id[p.trial_id].path
                    and find_checkpoint(by_id[p.trial_id].path, p.step) is not None]  # type: ignore[arg-type]
            raise SweepError(f"{run_dir}: Pareto point {pareto} (trial {point.trial_id} step {point.step}) has no "
                             f"kept checkpoint; points with one: {kept} (raise checkpoints_to_keep to keep more)")
        cands = [(row, next(h for h in row.history if h["step"] == point.step))]
        why = {"picked_by": "auto", "pareto_index": pareto, "pareto_size": len(front), "objectives": list(objectives)}
    else:
        cands = _candidates(rows, metric, mode)
    if not cands:
        raise SweepError(f"{run_dir}: no trial reported {metric}; nothing to export "
                         "(see `sdsweep results` for each trial's status and error)")
    for i, (row, h) in enumerate(cands):
        ckpt = find_checkpoint(row.path, int(h["step"])) if row.path else None
        if ckpt is not None:
            if i:
                top_row, top = cands[0]
                why["not_kept"] = (f"the best evaluation (trial {top_row.trial_id} step {top['step']}, "
                                   f"{metric} {top[metric]:.5g}) has no kept checkpoint (checkpoints_to_keep "
                                   f"keeps the best by the sweep's metric); exported the best kept one")
            return row, h, ckpt, why
    raise FileNotFoundError(f"{run_dir}: none of the {len(cands)} evaluated checkpoints is on disk")


def export_best(run_dir: Path, dest: Path, metric: str | None = None, pareto: int | None = None,
                method: str | None = None, trial: str | None = None, step: int | None = None) -> dict[str, Any]:
    """Copy the chosen checkpoint's weights to ``dest`` in the formats people load (its method's),
    with best.json (why it won, its step, every score and its gain over the baseline, what the trial
    spent, the evaluator identity). ``method``: the best of that method only. ``trial`` (and
    ``step``): that checkpoint, picked by hand (``picked_by: manual`` in best.json)."""
    if trial is not None:
        row, h, ckpt, why = pick_checkpoint(run_dir, trial, step, metric)
    elif step is not None:
        raise SweepError(f"{run_dir}: --step {step} needs --trial ID (`sdsweep results` lists the trials)")
    else:
        row, h, ckpt, why = select_checkpoint(run_dir, metric, pareto, method)
    state = read_state(run_dir)
    metric, mode = metric_and_mode(state, metric)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = state["config"]
    base = row.gain_base(baseline_scores(state))
    scores = {k: h[k] for k in image_metrics(state) if k in h}
    samples = (row.path / "samples" / f"step-{int(h['step']):06d}" / "scores.json") if row.path else None
    info = {"trial_id": row.trial_id, "method": row.method, "hyperparameters": row.params,
            "metric": {"name": metric, "mode": mode, "value": h.get(metric), "step": int(h["step"])},
            "metrics_at_best": {k: v for k, v in h.items() if k not in _BOOKKEEPING},
            "image_scores": scores, "baseline": base, "cost": row.cost,
            "gain_over_baseline": {k: v - base[k] for k, v in scores.items() if k in base},
            "evaluator": (state.get("baseline") or {}).get("identity"),
            "samples": str(samples) if samples and samples.is_file() else None,
            "base_model": cfg["base"]["model"]["source"], "base_model_identity": state["base_model_identity"],
            "cache_key": _trained_on(ckpt, state), "sweep_file": state.get("sweep_file"),
            "package_version": state.get("package_version"), "run_dir": str(Path(run_dir).resolve()),
            "checkpoint": str(ckpt), **why,
            "why": why["why"] if why["picked_by"] == "manual" or "chosen_by" in why else
                   (f"Pareto point {why['pareto_index']} of {why['pareto_size']} on {why['objectives']}"
                    if "pareto_index" in why else
                    f"{'lowest' if mode == 'min' else 'highest'} {metric} over every evaluated checkpoint "
                    f"of every {method + ' ' if method else ''}trial ({why['evaluated_trials']} of "
                    f"{why['trials']} trials evaluated)")}
    info["heldout"] = _heldout_entry(run_dir, f"{row.trial_id}@{int(h['step'])}")
    provenance = {k: info[k] for k in ("trial_id", "method", "hyperparameters", "metric", "image_scores",
                                       "gain_over_baseline", "base_model", "base_model_identity", "picked_by", "why")}
    info["files"] = _export_weights(ckpt, dest, state, row.method, provenance)
    atomic_write_text(dest / "best.json", json.dumps(info, indent=1, default=str))
    return info


def _trained_on(ckpt: Path, state: dict[str, Any]) -> str:
    """The latent cache key of the data the checkpoint was trained on (its data variant's, when the
    sweep searched data keys), from its own trainer state; else the sweep's first cache key."""
    try:
        return str(json.loads((ckpt / "trainer_state.json").read_text())["dataset_key"])
    except (OSError, ValueError, KeyError):
        return state["cache_key"]


def _heldout_entry(run_dir: Path, label: str) -> dict[str, Any] | None:
    """best.json's account of the held-out confirmation of the exported checkpoint ``label``."""
    conf = read_confirmation(run_dir)
    if conf is None:
        return None
    if conf["winner"] != label:
        return {"note": f"the held-out confirmation's pick is {conf['winner']}, not this checkpoint ({label}); "
                        "its margins are the pick's"}
    by_label = {m["label"]: m for m in conf["models"]}
    return {"metric": conf["metric"], "picked_by": conf.get("picked_by"), "leaderboard_pick": conf.get("leaderboard_pick"),
            "pick_seeds": conf.get("pick_seeds"), "pick_scores": {k: m.get("pick") for k, m in by_label.items()
                                                                   if m.get("pick") is not None},
            "seeds": conf["seeds"], "images_per_model": conf["images_per_model"],
            "scores": by_label[label]["heldout"], "baseline": by_label["baseline"]["heldout"],
            "selection_scores": by_label[label].get("selection"), "margins": conf["margins"],
            "margins_by_metric": conf["margins_by_metric"], "verdict": conf["verdict"]}


def _export_weights(ckpt: Path, dest: Path, state: dict[str, Any], method: str,
                    provenance: dict[str, Any]) -> list[str]:
    """The checkpoint's weights in the formats people load, written by its method's trainer."""
    return get_trainer_class(method).export_files(ckpt, dest, state["run_id"], provenance)
