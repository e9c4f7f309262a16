"""Where a resume restores a trial from, with the driver killed at a chosen moment of a real Ray
Tune run (tests/frozen_driver.py: a small function trainable, sdsweep's checkpoint settings, the
experiment state copied to the run directory at the end of every controller step).

Both moments were found reading Ray 2.60 after the kill -9 e2e test failed under load (a trial
whose last recorded report was step 20 restarted from step 10): sweeps/checkpoint_keeping.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_files import kill_tree
from sweeps.checkpoint_keeping import restore_points, superfluous
from trainers.checkpoints import STATE_JSON

pytestmark = pytest.mark.timeout(900)
slow = pytest.mark.slow  # each starts Ray twice

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "frozen_driver.py"
LOSS = {10: 0.1, 20: 0.5, 30: 0.6, 40: 0.7, 50: 0.8, 60: 0.9}  # as in frozen_driver.py


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}



def _run_then_kill(parent: Path, moment: str, keep: int) -> Path:
    """Start the driver, wait until it froze at ``moment``, SIGKILL it; return the trial's directory."""
    parent.mkdir(parents=True)
    log = parent / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(DRIVER), "run", str(parent), moment, str(keep)], env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (parent / "frozen").exists():
            assert proc.poll() is None, f"the driver ended without reaching '{moment}':\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the driver never reached '{moment}'"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
    (trial,) = [d for d in (parent / "exp").iterdir() if d.is_dir() and d.name.startswith("trainable_")]
    return trial


def _resume(parent: Path) -> str:
    done = subprocess.run([sys.executable, str(DRIVER), "resume", str(parent), "-", "0"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]


def _steps_on_disk(trial: Path) -> dict[str, int]:
    return {d.name: json.loads((d / STATE_JSON).read_text())["step"] for d in sorted(trial.glob("checkpoint_*"))}


@slow
def test_killed_between_a_report_and_its_checkpoint_the_trial_resumes_from_the_checkpoint_tune_named(tmp_path):
    trial = _run_then_kill(tmp_path / "p", "save-pending", keep=10)
    point = restore_points(tmp_path / "p" / "exp")[trial.name]
    # The CI case: Tune had recorded the result of step 20, not yet the checkpoint it carried, which
    # is complete on disk all the same; the state names step 10's.
    assert (point.last_step, point.step, point.checkpoint) == (20, 10, "checkpoint_000000")
    assert _steps_on_disk(trial) == {"checkpoint_000000": 10, "checkpoint_000001": 20}
    _resume(tmp_path / "p")
    rows = _rows(trial)
    again = [r for r in rows if r["restored_from"] > 0]  # reported by the restored trial
    assert {r["restored_from"] for r in again} == {point.step}, "not restored from the checkpoint Tune named"
    assert [r["step"] for r in rows] == [10, 20, 20, 30, 40, 50, 60]  # step 20 trained again, nothing earlier
    # The index Tune restored with rewrote checkpoint_000001 with step 20 again: each directory
    # still holds the step first written there.
    assert _steps_on_disk(trial) == {f"checkpoint_{i:06d}": s for i, s in enumerate(range(10, 61, 10))}


@slow
def test_killed_after_a_worse_checkpoint_was_superseded_the_trial_still_resumes(tmp_path):
    trial = _run_then_kill(tmp_path / "p", "superseded", keep=1)
    point = restore_points(tmp_path / "p" / "exp")[trial.name]
    assert point.step == 20  # the state names step 20's checkpoint: no longer the best (step 10) nor the newest
    assert (trial / point.checkpoint / STATE_JSON).is_file(), \
        f"the checkpoint a resume restores was deleted: {point.checkpoint} not in {sorted(_steps_on_disk(trial))}"
    out = _resume(tmp_path / "p")
    assert '"step": 60, "error": ""' in out, out[-3000:]
    rows = _rows(trial)
    assert [r["step"] for r in rows if r["restored_from"] == 20] == [30, 40, 50, 60]
    assert restore_points(tmp_path / "p" / "exp")[trial.name].status == "TERMINATED"
    # checkpoints_to_keep=1 in the end, as Tune's rule has it: the best by loss and the newest.
    best = min(LOSS, key=LOSS.get)
    assert sorted(_steps_on_disk(trial).values()) == sorted({best, max(LOSS)})


def test_the_kept_checkpoints_are_the_ones_rays_own_manager_keeps(tmp_path, monkeypatch):
    """``superfluous`` against Ray 2.60's ``_CheckpointManager`` fed the same reports (equal
    scores, NaN; min and max; several ``keep``).

    Ray's rule as it documents it (the best N and the newest) holds only without
    TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE: with it the manager stores a copy of the newest
    result, which then fails its own "except the newest" test and is deleted at once. sdsweep's
    driver sets that variable in its process (a sweep run earlier in this pytest process left it
    set), but lets Tune delete nothing (checkpoint_config), so that quirk never reaches a sweep."""
    monkeypatch.delenv("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", raising=False)
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    values = [0.5, 0.3, math.nan, 0.3, 0.9, 0.1, 0.3, 0.7, math.nan, 0.2, 0.2, 0.6]
    for mode in ("min", "max"):
        for keep in (1, 2, 4):
            trial = tmp_path / f"{mode}-{keep}"
            trial.mkdir()
            manager = _CheckpointManager(CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="loss",
                                                          checkpoint_score_order=mode))
            rows = []
            for i, value in enumerate(values):
                d = trial / f"checkpoint_{i:06d}"
                d.mkdir()
                (d / STATE_JSON).write_text(json.dumps({"step": 10 * (i + 1)}))
                rows.append({"step": 10 * (i + 1), "loss": value})
                manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint.from_directory(str(d)),
                                                            metrics=rows[-1]))
            (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
            ray_kept = sorted(d.name for d in trial.glob("checkpoint_*"))
            assert len(ray_kept) < len(values)
            # The same reports with every checkpoint on disk: the rule drops what Ray deleted.
            for i in range(len(values)):
                d = trial / f"checkpoint_{i:06d}"
                if not d.exists():
                    d.mkdir()
                    (d / STATE_JSON).write_text(json.dumps({"step": 10 * (i + 1)}))
            dropped = {p.name for _, p in superfluous(trial, keep, "loss", mode)}
            assert sorted({d.name for d in trial.glob("checkpoint_*")} - dropped) == ray_kept, (mode, keep)


@slow
def test_a_trial_that_finished_unrecorded_is_reported_again_without_rewriting_a_kept_checkpoint(tmp_path):
    """sdsweep's own driver and trainable: the trial finished, its older checkpoints lost their
    resume tensors (KeepResumeStateInNewest), and the driver was killed while the state in the run
    directory still named step 20's checkpoint. The restored trial loads its newest complete
    checkpoint and reports its end again (sweeps/trial.py ``resumable_checkpoint``): that report
    must not land in a checkpoint directory that holds another step (Tune names the next one
    after the checkpoint it restored, ``checkpoint_000002``, step 30's)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "name": "unrecorded",
        "base": {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                 "train": {"max_train_steps": 60, "train_batch_size": 2}},
        "search": {"spaces": ["lora"], "sampler": {"type": "random", "seed": 0}, "num_samples": 1,
                   "max_concurrent_trials": 1, "warm_start": True},
        "scheduler": {"type": "none"}, "evaluation": {"every": 10, "metric": "fixed_train_loss"},
        "resources": {"cpu": 1, "gpu": 0}, "checkpoints_to_keep": 10,
        "storage_path": str(tmp_path / "runs"), "tracking": {"wandb": False}}))
    run_dir = tmp_path / "runs" / "run"
    env = {**_env(), "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(DRIVER), "sdsweep", str(sweep), str(run_dir)], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (tmp_path / "runs" / "frozen").exists():
            assert proc.poll() is None, f"the sweep ended without freezing:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "the sweep never froze"
            time.sleep(0.3)
    finally:
        kill_tree(proc)
    (trial,) = [d for d in run_dir.iterdir() if d.is_dir() and (d / "params.json").is_file()]
    point = restore_points(run_dir)[trial.name]
    assert (point.status, point.step) == ("RUNNING", 20)
    first_written = {f"checkpoint_{i:06d}": s for i, s in enumerate(range(10, 61, 10))}
    assert _steps_on_disk(trial) == first_written
    assert [d.name for d in sorted(trial.glob("checkpoint_*")) if (d / "trainer_state.safetensors").is_file()] \
        == ["checkpoint_000005"]
    done = subprocess.run([sys.executable, "-m", "sweeps.cli", "resume", str(run_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _steps_on_disk(trial) == first_written, "a checkpoint directory now holds another step"
    from sweeps.results import leaderboard

    (row,), _ = leaderboard(run_dir)
    assert row.status == "completed" and [h["step"] for h in row.history] == list(range(10, 61, 10))


def test_keeping_ends_an_experiment_with_trials_that_never_started(tmp_path):
    """An interrupted sweep ends its experiment with trials still pending, which have no directory
    yet (a real Tune ``Trial``: its ``path`` raises until it starts)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from sweeps.checkpoint_keeping import KeepBestCheckpoints

    pending = Trial("f", stub=True, storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp"))
    with pytest.raises(RuntimeError):
        pending.path
    KeepBestCheckpoints(1, "loss", "min").on_experiment_end(trials=[pending])
