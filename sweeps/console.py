"""What the sweep driver prints about failures it recovers from.

A trial's own errors (a NaN loss, out of memory) end the trial with a reported result
(sweeps/trial.py) and never reach Ray as exceptions. What does reach Ray is infrastructure: the
trial's worker process or its whole node died. Ray Tune prints a full traceback for each such
failure (and the raylet adds its own dump); :class:`FailureLines` replaces that with one line per
failure -- which trial, on which node and process, at which step, and whether it was requeued from
its last checkpoint -- while the traceback stays in the trial's ``error.txt``. The driver turns
Tune's own printing off with ``TUNE_PRINT_ALL_TRIAL_ERRORS=0`` (``QUIET_TRIAL_ERRORS``).
"""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback

QUIET_TRIAL_ERRORS = {"TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}


def _where(trial: Any) -> str:
    last = trial.last_result or {}
    node, pid = last.get("node_ip"), last.get("pid")
    return f" on node {node} (pid {pid})" if node else ""


_WORKER_LOST = ("ActorUnavailableError", "ActorDiedError", "RayActorError", "NodeDiedError", "OwnerDiedError",
                "WorkerCrashedError")


def _cause(trial: Any) -> str:
    """The trial's latest failure in words, from the exception Tune pickled beside its error.txt
    (the text alone does not name the exception's class)."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            err = cloudpickle.load(f)
        name = type(err).__name__
    except Exception:  # noqa: BLE001 - a missing or unreadable file must not stop the sweep
        name = "see error.txt"
    if name in _WORKER_LOST:
        return f"its worker died ({name}: the node or the process was lost)"
    return f"it failed outside the trial's code ({name})"


def _checkpoint_step(trial: Any) -> int | None:
    result = getattr(trial, "latest_checkpoint_result", None)
    metrics = getattr(result, "metrics", None) or {}
    step = metrics.get("step")
    return int(step) if step is not None else None


class FailureLines(Callback):
    """One line per trial whose worker or node died: requeued from its checkpoint, or given up."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step", 0)
        ckpt = _checkpoint_step(trial)
        again = f"from its checkpoint at step {ckpt}" if ckpt is not None else "from the start (no checkpoint yet)"
        print(f"trial {trial.trial_id}: {_cause(trial)}{_where(trial)} at step {step}; requeued {again} "
              f"(retry {trial.run_metadata.num_failures} of {self.max_failures})", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step", 0)
        print(f"trial {trial.trial_id}: {_cause(trial)}{_where(trial)} at step {step}; no retries left "
              f"(max_failures {self.max_failures}); traceback: {trial.error_file}", file=sys.stderr, flush=True)


def condense_ray_notices() -> None:
    """Keep only the first line of each cluster notice Ray prints on the driver.

    Ray's driver prints the GCS's error notices (a node marked dead, a raylet terminated) whatever
    ``log_to_driver`` says, and a terminated raylet's notice carries the last ~40 lines of its log.
    The first line says what happened; the rest stays in that node's Ray logs. Ray calls the
    module-level ``print_to_stdstream`` of ``ray._private.worker`` for them (tagged pid "raylet"),
    so that name is wrapped (Ray is pinned; without the function this is a no-op).
    """
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "sdsweep_condensed", False):
        return

    def condensed(data: dict[str, Any], ignore_prefix: bool) -> Any:
        if data.get("pid") == "raylet":
            data = {**data, "lines": [str(line).splitlines()[0] if str(line) else line for line in data["lines"]]}
        return original(data, ignore_prefix)

    condensed.sdsweep_condensed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = condensed
