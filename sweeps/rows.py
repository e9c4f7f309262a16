"""A trial's reported rows as the readers use them (no imports of Ray or the rest of sweeps/)."""

from __future__ import annotations

from typing import Any


def once_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's reports with each training step once (the later report of a step wins).

    A trial resumes from the checkpoint Tune's experiment state last recorded: after the driver
    was killed, that can be older than the trial's newest (the state is saved every few seconds,
    ``TUNE_GLOBAL_CHECKPOINT_S``), and the steps since are trained again -- bit-exactly, the
    training is deterministic -- and reported again in ``result.json``. Rows without a step
    (none today) are kept as they are.
    """
    out: list[dict[str, Any]] = []
    for row in rows:
        step = row.get("step")
        if isinstance(step, (int, float)):
            while out and isinstance(out[-1].get("step"), (int, float)) and out[-1]["step"] >= step:
                out.pop()
        out.append(row)
    return out
