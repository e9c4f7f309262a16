"""Readers for what a finished sweep left in its run directory, shared by the e2e tests."""

from __future__ import annotations

import json
from pathlib import Path


def wandb_steps(run_dir: Path, trial_dir: Path) -> list[int]:
    """Every `step` the trial's W&B run logged, over all its offline segments, in order."""
    from sweeps.tracking import read_offline_run, wandb_run_id

    trial_id = json.loads((trial_dir / "result.json").read_text().splitlines()[0])["trial_id"]
    run_id = wandb_run_id(run_dir.name, trial_id)
    segments = sorted(p.parent for p in (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert segments, f"no W&B run for {trial_id}"
    return [int(h["step"]) for seg in segments for h in read_offline_run(seg).history if "step" in h]
