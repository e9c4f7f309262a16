"""Results of a sweep: the leaderboard (the export of the best checkpoint: ``sweeps/export.py``).

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


def confirmation_headline(conf: dict[str, Any]) -> str:
    """One line for ``sdsweep results`` and the report: how the pick was chosen, on what."""
    n = conf["images_per_model"]
    if conf.get("picked_by") == "confirmation":
        changed = ("" if conf["leaderboard_pick"] == conf["winner"] else
                   f", not the leaderboard's best {conf['leaderboard_pick']}")
        return (f"held-out confirmation: the pick is {conf['winner']}{changed}, the best of the top "
                f"{len(conf['models']) - 1} on {conf['pick_images_per_model']} images per model from seeds no "
                f"evaluation used; its margins on {n} more images per model that chose nothing:")
    return f"held-out confirmation ({n} images per model on seeds never used for picking), pick {conf['winner']}:"


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
