"""A reused worker waits for the stopped trial's teardown: real Ray Tune with ``reuse_actors``.

Tune hands a stopped trial's worker to the next trial only after the stopped trial's thread has
ended, and by default waits 2 s for it; a longer teardown (a DreamBooth model restored on a busy
CPU) made the *next* trial error with "Trainable runner reuse requires reset_config() to be
implemented and return True". :func:`sweeps.trial.allow_teardown_before_reuse` (called first in
every trial) lets it wait.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TEARDOWN_S = 3.5  # over Tune's 2 s default


def _sweep(tmp_path: Path, *, allow: bool) -> tuple[list, list[dict]]:
    from ray import tune

    log = tmp_path / f"log-{allow}.jsonl"

    def trainable(config: dict) -> None:  # (nested: Ray pickles it by value for its workers)
        import os
        import time

        from sweeps.trial import allow_teardown_before_reuse

        if config["allow"]:
            allow_teardown_before_reuse()
        with open(config["log"], "a") as f:
            f.write(json.dumps({"x": config["x"], "pid": os.getpid(), "start": time.time()}) + "\n")
        try:
            for step in range(4):
                tune.report({"step": step})
        finally:  # the stopped trial's teardown
            time.sleep(TEARDOWN_S)
            with open(config["log"], "a") as f:
                f.write(json.dumps({"x": config["x"], "torn_down": time.time()}) + "\n")

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 2}),  # one at a time on the 2-CPU test Ray
        param_space={"x": tune.grid_search([0, 1]), "allow": allow, "log": str(log)},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / f"runs-{allow}"), stop={"training_iteration": 1},
                                  verbose=0))
    results = tuner.fit()
    return list(results), [json.loads(line) for line in log.read_text().splitlines()]


def test_the_next_trial_on_a_reused_worker_starts_after_the_last_ones_teardown(ray_local, tmp_path):
    results, log = _sweep(tmp_path, allow=True)
    assert [r.error for r in results] == [None, None], [str(r.error)[:300] for r in results]
    starts = [e for e in log if "start" in e]
    assert len(starts) == 2 and starts[0]["pid"] == starts[1]["pid"], starts  # the worker was reused
    first = starts[0]["x"]
    torn_down = next(e["torn_down"] for e in log if e.get("x") == first and "torn_down" in e)
    assert starts[1]["start"] >= torn_down, log  # the second began after the first's teardown ended


def test_tunes_default_wait_is_what_failed(ray_local, tmp_path):
    """The control: the same sweep without the call loses its second trial to Tune's 2 s wait, so
    the test above passes because of the call (and would notice Tune changing its default)."""
    results, _ = _sweep(tmp_path, allow=False)
    errors = [str(r.error) for r in results if r.error is not None]
    assert len(errors) == 1 and "reset_config" in errors[0], errors
