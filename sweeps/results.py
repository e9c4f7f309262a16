"""Results of a sweep: the leaderboard and the export of the best checkpoint.

Everything is read back from the run directory (Tune's experiment state, each trial's
``result.json`` and checkpoints, our ``sweep.json``), so it works on a finished, interrupted or
resumed sweep, from another process, without Ray running.

A trial is ranked by the best value of the metric over all its evaluations (checkpoint-level
selection: the step of that evaluation is reported and that checkpoint is the one exported). Any
reported metric can rank (``metric=``), not only the sweep's; with image evaluation the
baseline (the base model without adapter, scored once per sweep) gives each score's gain, and
``pareto_front`` lists the evaluated checkpoints no other checkpoint beats on every objective.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from sweeps.constants import ERROR_FILE
from sweeps.errors import SweepError as SweepError  # re-exported: raised by every reader of a run directory
from sweeps.rows import trial_rows
from sweeps.searched import trial_value
from sweeps.tune_state import TuneTrial, read_trials
from trainers.metric_modes import natural_mode
from trainers.tensor_files import atomic_write_text
from trainers import get_trainer_class

SWEEP_STATE = "sweep.json"
CONFIRM_DIR, CONFIRM_FILE = "confirm", "confirm.json"  # the held-out confirmation (sweeps/confirm.py)


@dataclass
class TrialRow:
    """One line of the leaderboard."""

    trial_id: str
    status: str  # completed | stopped (early, by the scheduler) | error | running | pending
    method: str
    params: dict[str, Any]
    best: float | None = None
    best_step: int | None = None
    steps: int = 0
    wall_s: float = 0.0
    error: str | None = None
    path: Path | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation's numeric results
    cost: dict[str, float] = field(default_factory=dict)  # what the trial spent (COST_KEYS)
    # How its evaluations sampled (trainers.devices.placement_key) and the base model's scores at
    # that placement: gains compare like with like (sweeps/baseline.py). None: the sweep's baseline
    # (a sweep from before placements were recorded); empty: the sweep has no baseline at this
    # trial's placement, so no gain is shown rather than one that is partly a precision shift.
    placement: str | None = None
    baseline: dict[str, float] | None = None

    def gain_base(self, sweep_baseline: dict[str, float]) -> dict[str, float]:
        """The baseline scores this trial's gains are measured against."""
        return sweep_baseline if self.baseline is None else self.baseline


# What a trial spent, as every trial reports it: budgets compare across methods by these (the
# scheduler's clock is one of step / images_seen / trainer_s). artifact_bytes: what its method ships.
COST_KEYS = ("trainer_s", "images_seen", "peak_memory_mb", "artifact_bytes")


@dataclass(frozen=True)
class ParetoPoint:
    """One evaluated checkpoint on the Pareto front of the objectives."""

    trial_id: str
    step: int
    values: dict[str, float]


def read_state(run_dir: Path) -> dict[str, Any]:
    """The sweep's own state file (config, cache key, base model identity)."""
    path = Path(run_dir) / SWEEP_STATE
    if not path.is_file():
        raise SweepError(f"{run_dir}: no {SWEEP_STATE}; not an sdsweep run directory")
    return json.loads(path.read_text())


def read_confirmation(run_dir: Path) -> dict[str, Any] | None:
    """The sweep's held-out confirmation (``confirm/confirm.json``), if it ran."""
    path = Path(run_dir) / CONFIRM_DIR / CONFIRM_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    return trial_rows(trial_dir)


def _numeric(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _has(r: dict[str, Any], metric: str) -> bool:
    v = r.get(metric)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _trial_row(trial: TuneTrial, metric: str, mode: str, max_steps: int) -> TrialRow:
    path = trial.path
    rows = _results(path)
    evals = [r for r in rows if _has(r, metric)]
    last = rows[-1] if rows else {}
    # Multi-method sweeps also carry OptunaSearch's qualified aliases ("lora:train.x"): drop them.
    cfg = {k: v for k, v in dict(trial.config).items() if ":" not in k}
    row = TrialRow(trial_id=trial.trial_id, status="pending", method=str(cfg.get("method", last.get("method", "?"))),
                   params=cfg, steps=int(last.get("step", 0)), wall_s=float(last.get("time_total_s", 0.0)), path=path,
                   history=[_numeric(r) for r in rows if "step" in r and r.get("trial_status") != "error"],
                   placement=next((r["eval_placement"] for r in rows if isinstance(r.get("eval_placement"), str)), None))
    if evals:
        pick = min if mode == "min" else max
        best = pick(evals, key=lambda r: r[metric])
        row.best, row.best_step, row.best_metrics = float(best[metric]), int(best["step"]), best
    # The spend so far (the last report), and the size of the artifact the leaderboard would ship.
    row.cost = {k: float(last[k]) for k in COST_KEYS if _has(last, k)}
    if _has(row.best_metrics, "artifact_bytes"):
        row.cost["artifact_bytes"] = float(row.best_metrics["artifact_bytes"])
    error_file = path / ERROR_FILE
    if last.get("trial_status") == "error" or error_file.is_file():
        info = json.loads(error_file.read_text()) if error_file.is_file() else last
        row.status, row.error = "error", f"{info.get('error_type')}: {info.get('error')}"
    elif trial.status == "ERROR":
        row.status = "error"
        err = path / "error.txt"
        row.error = _exception_line(err.read_text()) if err.is_file() else "Ray reported an error"
    elif trial.status == "TERMINATED":  # each trial's own budget (a searched max_train_steps)
        own = trial_value(dict(trial.config), "train.max_train_steps", max_steps)
        row.status = "completed" if row.steps >= own or last.get("trial_status") == "completed" else "stopped"
    else:
        row.status = "running" if rows else "pending"
    return row


def _exception_line(text: str) -> str:
    """The most specific 'SomeError: message' line of a Ray error.txt traceback."""
    hits = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception)\b", ln)]
    return (hits[-1] if hits else text.strip().splitlines()[-1])[:300]


def metric_and_mode(state: dict[str, Any], metric: str | None = None) -> tuple[str, str]:
    """The ranking metric (the sweep's unless given) and its direction."""
    ev = state["config"]["evaluation"]
    if metric is None or metric == ev["metric"]:
        return ev["metric"], ev.get("mode") or natural_mode(ev["metric"])
    return metric, natural_mode(metric)


def leaderboard(run_dir: Path, metric: str | None = None) -> tuple[list[TrialRow], dict[str, Any]]:
    """All trials, best first by ``metric`` (default: the sweep's), trials without it last."""
    state = read_state(run_dir)
    cfg = state["config"]
    metric, mode = metric_and_mode(state, metric)
    max_steps = cfg["base"]["train"]["max_train_steps"]
    rows = [_trial_row(t, metric, mode, max_steps) for t in read_trials(Path(run_dir))]
    assign_baselines(rows, state)
    reported = {k for r in rows for h in r.history for k in h}
    if reported and metric not in reported:
        raise SweepError(f"{run_dir}: no trial reported {metric!r}; reported metrics: "
                         f"{', '.join(sorted(reported - _BOOKKEEPING))}")
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r.best is None, sign * (r.best if r.best is not None else 0.0), r.trial_id))
    for i, r in enumerate(rows, 1):
        r.rank = i if r.best is not None else None
    return rows, state


# Tune's and our own per-report bookkeeping: never a ranking metric.
_BOOKKEEPING = {"step", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid",
                "time_since_restore", "iterations_since_restore", "reported_at", "started_at", "setup_s",
                "peak_memory_mb", "lr", "eval_s", "trainer_s", "images_seen", "artifact_bytes"}


def image_metrics(state: dict[str, Any]) -> list[str]:
    """The image scores this sweep's trials report (empty without ``evaluation.images``)."""
    images = state["config"]["evaluation"].get("images")
    return [*images["metrics"], "composite"] if images else []


def assign_baselines(rows: list[TrialRow], state: dict[str, Any]) -> None:
    """Give each trial the base model's scores at the placement it sampled with (sweeps/baseline.py):
    those of ``state["baselines"]``; none (no gain shown) when the sweep has no baseline there; the
    sweep's own when the trial recorded no placement (a sweep from before placements were kept)."""
    baselines = state.get("baselines") or {}
    for r in rows:
        if r.placement is not None and baselines:
            r.baseline = baseline_scores(state, r.placement) if r.placement in baselines else {}


def baseline_scores(state: dict[str, Any], placement: str | None = None) -> dict[str, float]:
    """The base model's scores (no adapter): at ``placement`` (a sampling placement key,
    sweeps/baseline.py) when the sweep scored it there, else the sweep's primary baseline (the
    base method's placement); empty if none."""
    entry = (state.get("baselines") or {}).get(placement or "") or state.get("baseline") or {}
    return dict(entry.get("scores") or {})


def pareto_front(rows: list[TrialRow], objectives: list[str], modes: list[str]) -> list[ParetoPoint]:
    """Every evaluated checkpoint (trial, step) that no other beats on all ``objectives``.

    A point dominates another if it is at least as good on every objective and better on one
    (Optuna's definition). Sorted best-first by the first objective.
    """
    sign = {o: (1.0 if m == "max" else -1.0) for o, m in zip(objectives, modes)}
    points = [ParetoPoint(r.trial_id, int(h["step"]), {o: float(h[o]) for o in objectives})
              for r in rows for h in r.history if all(_has(h, o) for o in objectives)]

    def dominates(a: ParetoPoint, b: ParetoPoint) -> bool:
        ge = all(sign[o] * a.values[o] >= sign[o] * b.values[o] for o in objectives)
        return ge and any(sign[o] * a.values[o] > sign[o] * b.values[o] for o in objectives)

    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (-sign[objectives[0]] * p.values[objectives[0]], p.trial_id, p.step))


COST_HEAD = ("train s", "images", "peak MB", "artifact")


def format_cost(cost: dict[str, float]) -> list[str]:
    """A trial's spend as the leaderboard's cost cells (COST_HEAD order)."""
    def get(key: str, fmt: str) -> str:
        return fmt.format(cost[key]) if key in cost else "-"

    size = cost.get("artifact_bytes")
    artifact = "-" if size is None else next(f"{size / 2 ** p:.3g} {u}" for p, u in ((30, "GB"), (20, "MB"), (10, "KB"), (0, "B"))
                                             if size >= 2 ** p or p == 0)
    return [get("trainer_s", "{:.0f}s"), get("images_seen", "{:.0f}"), get("peak_memory_mb", "{:.0f}"), artifact]


def best_per_method(rows: list[TrialRow]) -> dict[str, TrialRow]:
    """The best-ranked trial of every method that has a ranked trial, in rank order."""
    out: dict[str, TrialRow] = {}
    for r in sorted((r for r in rows if r.rank is not None), key=lambda r: r.rank or 0):
        out.setdefault(r.method, r)
    return out


def format_best_per_method(rows: list[TrialRow], metric: str) -> str:
    """One line per method: its best trial, step and score, and what it spent (for mixed sweeps)."""
    lines = [f"best per method (by {metric}):"]
    for method, r in best_per_method(rows).items():
        spend = ", ".join(f"{h} {c}" for h, c in zip(COST_HEAD, format_cost(r.cost)) if c != "-")
        lines.append(f"  {method:<18} rank {r.rank}  {r.trial_id}@{r.best_step}  {metric} {r.best:.4g}  ({spend})")
    return "\n".join(lines)


def find_checkpoint(trial_dir: Path, step: int) -> Path | None:
    """The kept checkpoint directory of ``trial_dir`` whose trainer state is at ``step``."""
    for d in sorted(trial_dir.glob("checkpoint_*")):
        state = d / "trainer_state.json"
        if state.is_file() and json.loads(state.read_text()).get("step") == step:
            return d
    return None


def _candidates(rows: list[TrialRow], metric: str, mode: str) -> list[tuple[TrialRow, dict[str, Any]]]:
    """Every evaluation of every trial that has ``metric``, best first."""
    sign = 1 if mode == "min" else -1
    evals = [(r, h) for r in rows for h in r.history if _has(h, metric)]
    return sorted(evals, key=lambda rh: (sign * rh[1][metric], rh[0].trial_id, rh[1]["step"]))


def kept_steps(trial_dir: Path | None) -> list[int]:
    """The steps of the checkpoints kept for a trial (``checkpoints_to_keep`` of them), in order."""
    if trial_dir is None:
        return []
    steps = []
    for d in trial_dir.glob("checkpoint_*"):
        state = d / "trainer_state.json"
        if state.is_file() and isinstance(step := json.loads(state.read_text()).get("step"), int):
            steps.append(step)
    return sorted(steps)


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
    auto = next(((r, e) for r, e in _candidates(rows, metric, mode)
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
                      method: str | None = None) -> tuple[TrialRow, dict[str, Any], Path, dict[str, Any]]:
    """The checkpoint ``sdsweep best`` exports: ``(trial row, its evaluation, checkpoint dir, why)``.

    By ``metric`` (default: the sweep's) over every evaluated checkpoint of every trial; or, with
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
            "why": why["why"] if why["picked_by"] == "manual" else
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
        return {"note": f"the held-out confirmation re-scored {conf['winner']}, the sweep's own pick, "
                        f"not this checkpoint ({label})"}
    by_label = {m["label"]: m for m in conf["models"]}
    return {"metric": conf["metric"], "seeds": conf["seeds"], "images_per_model": conf["images_per_model"],
            "scores": by_label[label]["heldout"], "baseline": by_label["baseline"]["heldout"],
            "selection_scores": by_label[label].get("selection"), "margins": conf["margins"],
            "margins_by_metric": conf["margins_by_metric"], "verdict": conf["verdict"]}


def _export_weights(ckpt: Path, dest: Path, state: dict[str, Any], method: str,
                    provenance: dict[str, Any]) -> list[str]:
    """The checkpoint's weights in the formats people load, written by its method's trainer."""
    return get_trainer_class(method).export_files(ckpt, dest, state["run_id"], provenance)
