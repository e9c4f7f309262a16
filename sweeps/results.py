"""Results of a sweep: the leaderboard and the export of the best checkpoint.

Everything is read back from the run directory (Tune's experiment state, each trial's
``result.json`` and checkpoints, our ``sweep.json``), so it works on a finished, interrupted or
resumed sweep, from another process, without Ray running.

A trial is ranked by the best value of the metric over all its evaluations (checkpoint-level
selection: the step of that evaluation is reported and that checkpoint is the one exported).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from sweeps.trial import ERROR_FILE
from trainers.tensor_files import atomic_save_safetensors, atomic_write_text
from trainers.lora import LORA_WEIGHTS, kohya_state_dict

SWEEP_STATE = "sweep.json"


class SweepError(ValueError):
    """A sweep-level problem a user can fix; the message names the run directory and the fix."""


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


def read_state(run_dir: Path) -> dict[str, Any]:
    """The sweep's own state file (config, cache key, base model identity)."""
    path = Path(run_dir) / SWEEP_STATE
    if not path.is_file():
        raise SweepError(f"{run_dir}: no {SWEEP_STATE}; not an sdsweep run directory")
    return json.loads(path.read_text())


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trial_row(trial: Any, metric: str, mode: str, max_steps: int) -> TrialRow:
    path = Path(trial.path)  # storage path; trial.local_path needs a live Ray session
    rows = _results(path)
    evals = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    last = rows[-1] if rows else {}
    # Multi-method sweeps also carry OptunaSearch's qualified aliases ("lora:train.x"): drop them.
    cfg = {k: v for k, v in dict(trial.config).items() if ":" not in k}
    row = TrialRow(trial_id=trial.trial_id, status="pending", method=str(cfg.get("method", last.get("method", "?"))),
                   params=cfg, steps=int(last.get("step", 0)), wall_s=float(last.get("time_total_s", 0.0)), path=path)
    if evals:
        pick = min if mode == "min" else max
        best = pick(evals, key=lambda r: r[metric])
        row.best, row.best_step, row.best_metrics = float(best[metric]), int(best["step"]), best
    error_file = path / ERROR_FILE
    if last.get("trial_status") == "error" or error_file.is_file():
        info = json.loads(error_file.read_text()) if error_file.is_file() else last
        row.status, row.error = "error", f"{info.get('error_type')}: {info.get('error')}"
    elif trial.status == "ERROR":
        row.status = "error"
        err = path / "error.txt"
        row.error = _exception_line(err.read_text()) if err.is_file() else "Ray reported an error"
    elif trial.status == "TERMINATED":
        row.status = "completed" if row.steps >= max_steps else "stopped"
    else:
        row.status = "running" if rows else "pending"
    return row


def _exception_line(text: str) -> str:
    """The most specific 'SomeError: message' line of a Ray error.txt traceback."""
    hits = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception)\b", ln)]
    return (hits[-1] if hits else text.strip().splitlines()[-1])[:300]


def leaderboard(run_dir: Path) -> tuple[list[TrialRow], dict[str, Any]]:
    """All trials, best first (trials without a metric value last), plus the sweep state."""
    from ray.tune import ExperimentAnalysis

    state = read_state(run_dir)
    cfg = state["config"]
    metric = cfg["evaluation"]["metric"]
    mode = cfg["evaluation"].get("mode") or _natural_mode(metric)
    analysis = ExperimentAnalysis(str(Path(run_dir).resolve()))
    max_steps = cfg["base"]["train"]["max_train_steps"]
    rows = [_trial_row(t, metric, mode, max_steps) for t in analysis.trials]
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r.best is None, sign * (r.best if r.best is not None else 0.0), r.trial_id))
    for i, r in enumerate(rows, 1):
        r.rank = i if r.best is not None else None
    return rows, state


def _natural_mode(metric: str) -> str:
    from sweeps.config import REPORTED_METRICS

    return REPORTED_METRICS.get(metric, "min")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def format_leaderboard(rows: list[TrialRow], metric: str) -> str:
    """A plain-text table a terminal shows well."""
    keys = sorted({k for r in rows for k in r.params if k != "method"})
    head = ["rank", "trial", "method", *keys, metric, "best@step", "status", "steps", "wall"]
    lines = [head]
    for r in rows:
        lines.append([str(r.rank or "-"), r.trial_id, r.method, *[_fmt(r.params.get(k, "")) for k in keys],
                      f"{r.best:.5f}" if r.best is not None else "-", str(r.best_step or "-"), r.status,
                      str(r.steps), f"{r.wall_s:.0f}s"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        if r.error:
            out.append(f"  {r.trial_id}: {r.error}")
    return "\n".join(out)


def find_checkpoint(trial_dir: Path, step: int) -> Path | None:
    """The kept checkpoint directory of ``trial_dir`` whose trainer state is at ``step``."""
    for d in sorted(trial_dir.glob("checkpoint_*")):
        state = d / "trainer_state.json"
        if state.is_file() and json.loads(state.read_text()).get("step") == step:
            return d
    return None


def export_best(run_dir: Path, dest: Path) -> dict[str, Any]:
    """Copy the best checkpoint's weights to ``dest`` in the formats people load, with best.json."""
    rows, state = leaderboard(run_dir)
    ranked = [r for r in rows if r.rank is not None]
    if not ranked:
        raise SweepError(f"{run_dir}: no trial reported the metric; nothing to export "
                         "(see `sdsweep results` for each trial's status and error)")
    best = ranked[0]
    ckpt = find_checkpoint(best.path, best.best_step) if best.path else None
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: the checkpoint of trial {best.trial_id} at step {best.best_step} "
                                "is not on disk (checkpoints_to_keep too low?)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = _export_weights(ckpt, dest, state)
    cfg = state["config"]
    metric = cfg["evaluation"]["metric"]
    mode = cfg["evaluation"].get("mode") or _natural_mode(metric)
    info = {"trial_id": best.trial_id, "method": best.method, "hyperparameters": best.params,
            "metric": {"name": metric, "mode": mode, "value": best.best, "step": best.best_step},
            "metrics_at_best": {k: v for k, v in best.best_metrics.items() if isinstance(v, (int, float, str))},
            "base_model": cfg["base"]["model"]["source"], "base_model_identity": state["base_model_identity"],
            "cache_key": state["cache_key"], "sweep_file": state.get("sweep_file"),
            "package_version": state.get("package_version"), "run_dir": str(Path(run_dir).resolve()),
            "checkpoint": str(ckpt), "files": files,
            "why": f"{'lowest' if mode == 'min' else 'highest'} {metric} over every evaluated checkpoint "
                   f"of every trial ({len(ranked)} ranked of {len(rows)} trials)"}
    atomic_write_text(dest / "best.json", json.dumps(info, indent=1, default=str))
    return info


def _export_weights(ckpt: Path, dest: Path, state: dict[str, Any]) -> list[str]:
    """diffusers LoRA file as saved + the kohya layout (AUTOMATIC1111 / ComfyUI / kohya)."""
    src = ckpt / LORA_WEIGHTS
    shutil.copy2(src, dest / LORA_WEIGHTS)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
    adapter = json.loads(meta.get("lora_adapter_metadata", "{}"))
    alphas = {c: adapter.get(f"{c}.lora_alpha") for c in ("unet", "text_encoder") if f"{c}.lora_alpha" in adapter}
    kohya = kohya_state_dict(load_file(str(src)), alphas)
    name = f"{state['run_id']}-lora.safetensors"
    atomic_save_safetensors(kohya, dest / name, {"format": "pt", "sdsweep": meta.get("sdsweep", "{}"),
                                                 "ss_network_module": "networks.lora"})
    return [LORA_WEIGHTS, name]
