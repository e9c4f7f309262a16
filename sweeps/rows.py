"""A trial's reported rows as the readers use them (no imports of Ray or the rest of sweeps/).

Two files hold them, both in the trial's directory of the run: Tune's ``result.json`` (written by
the driver, with Tune's own keys such as ``time_total_s``) and sdsweep's own
``sdsweep_results.jsonl`` (:data:`OWN_ROWS`, appended by the trial itself, on whatever node it
runs, before each report). Tune's file can lose a row: the driver writes it into a staging
directory and copies it to the run directory every few seconds, and when a trial restarts (its
node died) Tune first copies the run directory's older copy back over the staging one, dropping
the rows reported since (seen: the report of step 40, just before the node was killed). The
trial's own file is written straight into the run directory, so the readers fill such gaps from
it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OWN_ROWS = "sdsweep_results.jsonl"


def is_error_row(row: dict[str, Any]) -> bool:
    """Whether ``row`` is a trial's error report (``trial_status: error``, no metric): it records
    why the trial ended beside the evaluations before it and never replaces one of them."""
    return row.get("trial_status") == "error"


def once_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's reports with each training step once (the later report of a step wins).

    A trial resumes from the checkpoint Tune's experiment state last recorded: after the driver
    was killed, that can be older than the trial's newest (the state is saved every few seconds,
    ``TUNE_GLOBAL_CHECKPOINT_S``, and a checkpoint is recorded a moment after its result;
    sweeps/checkpoint_keeping.py), and the steps since are trained again -- bit-exactly, the
    training is deterministic -- and reported again in ``result.json``. Rows without a step
    (none today) are kept as they are.

    An error row (:func:`is_error_row`) carries the step the trial had reached, which is the step
    of its last evaluation when the very next step failed: it is kept *beside* that evaluation
    (after it), which stays rankable and exportable; it only replaces an earlier error row (a
    retried trial whose worker was replaced reports its error again).
    """
    out: list[dict[str, Any]] = []
    for row in rows:
        step = row.get("step")
        if isinstance(step, (int, float)):
            error = is_error_row(row)
            while (out and isinstance(out[-1].get("step"), (int, float)) and out[-1]["step"] >= step
                   and (is_error_row(out[-1]) or not error)):
                out.pop()
        out.append(row)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the rows before it stand
            continue
    return rows


def trial_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation a trial reported, each step once, in step order (an error row after the
    evaluation of its step): Tune's ``result.json`` rows, with evaluations that only the trial's
    own ``sdsweep_results.jsonl`` holds filled in."""
    tune_rows = once_per_step(_read_jsonl(Path(trial_dir) / "result.json"))
    have = {r.get("step") for r in tune_rows if not is_error_row(r)}
    missing = [r for r in once_per_step(_read_jsonl(Path(trial_dir) / OWN_ROWS))
               if r.get("step") not in have and not is_error_row(r)]
    if not missing:
        return tune_rows
    merged = tune_rows + missing
    return sorted(merged, key=lambda r: (r.get("step") is None, r.get("step") or 0, is_error_row(r)))
