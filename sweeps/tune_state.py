"""The trials of a sweep as Tune's experiment state records them, read without importing Ray.

``sdsweep results``, ``best`` and ``report`` need each trial's id, status, hyperparameters and
directory. Ray Tune's ``ExperimentAnalysis`` gives them, but importing Ray took most of the
seconds those commands spent (docs/BENCHMARKS.md §10). Tune 2.60 writes its experiment state to
``RUN_DIR/experiment_state-<time>.json`` (the newest name wins, as in Tune's own
``_find_newest_experiment_checkpoint``): ``{"trial_data": [[trial state JSON, run metadata JSON],
...], ...}``. A trial's state holds ``trial_id``, ``status``, ``config`` and ``relative_logdir`` as
plain JSON; only Tune's own objects (storage, resources, results) are cloudpickled, and those are
never read here. The trial's directory is ``RUN_DIR/relative_logdir``, where ``ExperimentAnalysis``
puts it for a run directory on a local or shared filesystem. A hyperparameter Tune could only
cloudpickle (sdsweep's search spaces give numbers, strings, booleans and null) is an error, never
unpickled. The checkpoint a resume restores a trial from is one of those pickled objects (Tune's
checkpoint manager): ``sweeps.checkpoint_keeping.restore_points`` reads it, with Ray. (The last
result, plain JSON here, is not it: it can be one report ahead.) ``tests/test_results_light.py``
checks this reader against ``ExperimentAnalysis`` on a real sweep.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.errors import SweepError

STATE_GLOB = "experiment_state-*.json"  # Tune's TuneController.CKPT_FILE_TMPL
_PICKLED = "CLOUDPICKLE_FALLBACK"  # TuneFunctionEncoder's marker for a value JSON cannot hold


@dataclass(frozen=True)
class TuneTrial:
    """One trial as Tune recorded it."""

    trial_id: str
    status: str  # Tune's PENDING | PAUSED | TERMINATED | ERROR (RUNNING reads back as PENDING, as in Tune)
    config: dict[str, Any]
    path: Path  # the trial's directory in the run directory


def newest_state_file(run_dir: Path) -> Path:
    """The experiment state file Tune wrote last (its names sort by time)."""
    files = sorted(Path(run_dir).glob(STATE_GLOB))
    if not files:
        raise SweepError(f"{run_dir}: no Tune experiment state ({STATE_GLOB}): the sweep has not started its "
                         "trials yet, or this is not a run directory of `sdsweep run`")
    return files[-1]


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, dict) and value.get("_type") == _PICKLED:
        raise SweepError(f"{where}: Tune stored this value as a pickle, which sdsweep does not unpickle; "
                         "search spaces must give numbers, strings, booleans or null")
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    return value


def read_state(path: Path, tries: int = 3) -> Any:
    """The JSON of ``path``; while a sweep runs, Tune copies a new state over it every few seconds
    (not atomically), so a cut-short read is retried before it is reported."""
    for attempt in range(tries):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            if attempt == tries - 1:
                raise SweepError(f"{path}: not complete JSON ({err}); if the sweep is running, Tune may be "
                                 "rewriting it: run the command again") from None
            time.sleep(0.5)


def read_trials(run_dir: Path) -> list[TuneTrial]:
    """Every trial of the run directory's newest experiment state, in Tune's order."""
    run_dir = Path(run_dir).resolve()
    path = newest_state_file(run_dir)
    state = read_state(path)
    try:
        trials = []
        for trial_json, _run_metadata in state["trial_data"]:
            t = json.loads(trial_json)
            status = "PENDING" if t["status"] == "RUNNING" else str(t["status"])  # Trial.__setstate__ does this
            where = f"{path}: trial {t['trial_id']} config"
            trials.append(TuneTrial(trial_id=str(t["trial_id"]), status=status,
                                    config=_plain(dict(t["config"]), where), path=run_dir / t["relative_logdir"]))
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, SweepError):
            raise
        raise SweepError(f"{path}: not a Tune experiment state sdsweep can read ({type(err).__name__}: {err}); "
                         "was it written by another Ray version than this sdsweep's?") from None
    return trials
