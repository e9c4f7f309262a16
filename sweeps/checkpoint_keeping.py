"""Which checkpoints a sweep keeps, and the checkpoint a resume restores each trial from.

A resumed sweep (``sdsweep resume``, ``Tuner.restore``) restores every unfinished trial from the
checkpoint that Tune's experiment state *in the run directory* names as the trial's latest. That
state is a snapshot: the driver writes it every ~10 s (``TUNE_GLOBAL_CHECKPOINT_S``) into a
staging directory and copies it to the run directory in a background thread. Two consequences,
both reproduced with a real Tune run whose driver was killed at a chosen moment
(``tests/test_resume_restore_point.py``):

- **The restore point can be one report behind the last result.** A report's result and its
  checkpoint reach the driver separately: Tune records the result (``Trial.last_result``), then
  asks the trial's actor for the checkpoint (a ``save`` round trip) and registers it only when
  that answer is processed. A snapshot taken in between names the previous checkpoint beside the
  new result (seen in CI under load: last result step 20, restored from step 10). Read the
  restore point with :func:`restore_points`, never from the last result.
- **Tune's own ``CheckpointConfig(num_to_keep)`` can delete the checkpoint a resume needs.** Ray
  2.60's ``_CheckpointManager.register_checkpoint`` deletes, on the driver and at once, every
  checkpoint outside the best ``num_to_keep`` by the score except the newest. The newest
  checkpoint it keeps only while it is the newest: a checkpoint that scored worse than the best N
  is deleted when the next one is registered, while the snapshot in the run directory may still
  name it for up to a snapshot period. A driver killed then leaves a trial that cannot be
  restored ("Could not recover from checkpoint as it does not exist on storage anymore"; the
  trial errors on resume). Ray forces a snapshot after ``num_to_keep`` checkpoints of one trial,
  which narrows this but does not close it (one registration suffices).

So sdsweep gives Tune no ``num_to_keep`` and keeps ``checkpoints_to_keep`` itself
(:class:`KeepBestCheckpoints`): Tune's rule (the best N by the sweep's metric, plus the newest),
applied only to checkpoints *older* than the one the run directory's experiment state names for
the trial. Snapshots only move forward (a later one names the same checkpoint or a newer one), so
such a checkpoint is never restored again; the others wait (on disk at most a snapshot period of
checkpoints longer than under Tune's rule) and are deleted once the state has moved past them, or
once it records the trial finished (Tune never restores a TERMINATED or ERROR trial; ``sdsweep
resume`` does not restart errored ones). Once it records the trial finished, every resume-tensor
file that holds optimizer state goes, the newest checkpoint's too: a trial the scheduler stopped
(or that errored) kept its newest checkpoint's AdamW state (2x the trained weights) until then. A
completed trial's last checkpoint was written without optimizer state and keeps its small file.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from sweeps.errors import SweepError
from sweeps.rows import trial_rows
from sweeps.tune_state import newest_state_file, read_state
from trainers.checkpoints import STATE_JSON, STATE_TENSORS

FINISHED = ("TERMINATED", "ERROR")  # Tune statuses a resume never restores from a checkpoint
RETRY_S = 5.0  # how often deferred deletions are retried while no trial reports


@dataclass(frozen=True)
class RestorePoint:
    """One trial in the run directory's newest experiment state, as ``Tuner.restore`` sees it."""

    status: str  # Tune's status as saved (RUNNING: restored like PENDING)
    checkpoint: str | None  # the checkpoint directory Tune restores the trial from (None: starts afresh)
    step: int | None  # the training step that checkpoint holds (the ``step`` its report carried)
    last_step: int | None  # the step of the last *result* Tune recorded: can be one report ahead


def restore_points(run_dir: Path) -> dict[str, RestorePoint]:
    """Every trial of the run directory's newest experiment state by trial directory name: the
    checkpoint ``Tuner.restore`` would restore it from, decoded with Ray's own reader of the state
    (``_TrainingRunMetadata.from_json_state``, what Tune's restore calls). Needs Ray; unlike
    ``sweeps.tune_state`` this unpickles Tune's own objects (its checkpoint manager)."""
    trials = _saved_trials(Path(run_dir))
    return {name: _decode(*saved) for name, saved in trials.items()}


_CACHE: dict[Path, tuple[tuple[str, int, int], dict[str, tuple[str, str]]]] = {}


def _saved_trials(run_dir: Path) -> dict[str, tuple[str, str]]:
    """{trial directory name: (status, run metadata JSON)} of the newest state file, parsed once
    per version of the file (the pruner asks after every checkpoint)."""
    path = newest_state_file(run_dir)
    stat = path.stat()
    version = (path.name, stat.st_mtime_ns, stat.st_size)
    if run_dir in _CACHE and _CACHE[run_dir][0] == version:
        return _CACHE[run_dir][1]
    trials = {}
    for trial_json, metadata_json in read_state(path)["trial_data"]:
        trial = json.loads(trial_json)
        trials[Path(trial["relative_logdir"]).name] = (str(trial["status"]), metadata_json)
    _CACHE.clear()  # one run directory per driver
    _CACHE[run_dir] = (version, trials)
    return trials


def _decode(status: str, metadata_json: str) -> RestorePoint:
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    metadata = _TrainingRunMetadata.from_json_state(metadata_json)
    manager = metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result if manager is not None else None
    step = latest.metrics.get("step") if latest is not None else None
    last = (metadata.last_result or {}).get("step")
    return RestorePoint(status=status, checkpoint=Path(latest.checkpoint.path).name if latest is not None else None,
                        step=int(step) if isinstance(step, (int, float)) else None,
                        last_step=int(last) if isinstance(last, (int, float)) else None)


def checkpoint_index(path: Path) -> int | None:
    """``checkpoint_000007`` -> 7 (Tune's directory names); None for any other name."""
    head, _, number = path.name.partition("_")
    return int(number) if head == "checkpoint" and number.isdigit() else None


def _checkpoints(trial_dir: Path) -> list[tuple[int, int, Path]]:
    """(index, step, directory) of each complete checkpoint (its trainer state written) of a trial."""
    found = []
    for d in trial_dir.glob("checkpoint_*"):
        index = checkpoint_index(d)
        try:
            step = json.loads((d / STATE_JSON).read_text()).get("step")
        except (OSError, ValueError):  # being written, or not a trainer's checkpoint: never a candidate
            continue
        if index is not None and isinstance(step, int):
            found.append((index, step, d))
    return sorted(found)


def holds_optimizer_state(checkpoint: Path) -> bool:
    """Whether a checkpoint's resume tensors include the optimizer's state (a trial's last
    checkpoint is written without it: trainers/checkpoints.py)."""
    try:
        state = json.loads((checkpoint / STATE_JSON).read_text())
    except (OSError, ValueError):
        return False
    return bool(state.get("optimizer_state", True)) and (checkpoint / STATE_TENSORS).is_file()


def superfluous(trial_dir: Path, keep: int, metric: str, mode: str) -> list[tuple[int, Path]]:
    """The checkpoints Tune's ``num_to_keep`` rule would have deleted: all but the best ``keep``
    by ``metric`` (``mode`` min or max; the later of two equal scores counts as better and NaN as
    worst, as in Ray's ``_CheckpointManager``) and the newest. A checkpoint whose step reported
    no ``metric`` is never dropped (sdsweep reports the metric with every checkpoint)."""
    ckpts = _checkpoints(trial_dir)
    if not ckpts:
        return []
    scores: dict[int, float] = {}
    for row in trial_rows(trial_dir):
        value = row.get(metric)
        if isinstance(row.get("step"), int) and isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[row["step"]] = float(value)
    sign = 1.0 if mode == "max" else -1.0
    scored = [(i, s, d) for i, s, d in ckpts if s in scores]
    ranked = sorted(scored, key=lambda c: (not math.isnan(scores[c[1]]),
                                           sign * scores[c[1]] if not math.isnan(scores[c[1]]) else -math.inf, c[0]))
    kept = {i for i, _, _ in ranked[-keep:]} | {ckpts[-1][0]}
    return [(i, d) for i, _, d in ranked if i not in kept]


def deletable_below(trial_dir: Path) -> float:
    """Checkpoints of this trial with a lower index are never restored again: the index of the
    checkpoint the run directory's experiment state names, infinity once it records the trial
    finished, 0 (none) while it does not know the trial or names no checkpoint for it (a snapshot
    on its way may name any) or cannot be read."""
    try:
        saved = _saved_trials(trial_dir.parent).get(trial_dir.name)
        point = _decode(*saved) if saved is not None else None
    except (SweepError, OSError, ValueError, KeyError, TypeError):  # no state yet, or one being copied
        return 0
    if point is None:
        return 0
    if point.status in FINISHED:
        return math.inf
    index = checkpoint_index(Path(point.checkpoint)) if point.checkpoint else None
    return index if index is not None else 0


class KeepBestCheckpoints(tune.Callback):
    """``checkpoints_to_keep`` on the driver, never deleting a checkpoint a resume may restore
    (module doc): after each checkpoint Tune registers, when a trial finishes, every few seconds
    while deletions wait, and at the end of the experiment (after Tune's final snapshot)."""

    def __init__(self, keep: int, metric: str, mode: str) -> None:
        self.keep, self.metric, self.mode = keep, metric, mode
        self._waiting: set[Path] = set()
        self._retried = 0.0

    def prune(self, trial_dir: Path | None) -> None:
        """Delete what may go now; remember the trial if some deletions must wait."""
        if trial_dir is None or not trial_dir.is_dir():  # not started, or not a local/shared filesystem path
            return
        drop = superfluous(trial_dir, self.keep, self.metric, self.mode)
        floor = deletable_below(trial_dir)
        for index, path in drop:
            if index < floor:
                shutil.rmtree(path, ignore_errors=True)
        if floor == math.inf:  # recorded finished: never restored, so no checkpoint needs its optimizer state
            for _, _, path in _checkpoints(trial_dir):
                if holds_optimizer_state(path):
                    (path / STATE_TENSORS).unlink(missing_ok=True)
        if any(index >= floor for index, _ in drop):
            self._waiting.add(trial_dir)
        else:
            self._waiting.discard(trial_dir)

    def on_trial_save(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.prune(_trial_dir(trial))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.prune(_trial_dir(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.prune(_trial_dir(trial))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._waiting and time.monotonic() - self._retried >= RETRY_S:
            self._retried = time.monotonic()
            for trial_dir in list(self._waiting):
                self.prune(trial_dir)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:
            self.prune(_trial_dir(trial))


def _trial_dir(trial: Any) -> Path | None:
    """The trial's directory in the run directory; None for a trial that never started (Ray 2.60's
    ``Trial.path`` raises until the trial has a directory name: a sweep interrupted with trials
    still pending ends its experiment with such trials)."""
    try:
        return Path(trial.path)
    except RuntimeError:
        return None


def checkpoint_config(keep: int, metric: str, mode: str) -> tuple[tune.CheckpointConfig, list[tune.Callback]]:
    """The Tune checkpoint settings of a sweep keeping ``keep`` checkpoints per trial by ``metric``:
    Tune deletes none itself (no ``num_to_keep``); :class:`KeepBestCheckpoints` does."""
    return (tune.CheckpointConfig(checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            [KeepBestCheckpoints(keep, metric, mode)])
