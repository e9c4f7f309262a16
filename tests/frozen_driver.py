"""A real Ray Tune driver that freezes at a chosen moment, so a test can SIGKILL it exactly there
(tests/test_resume_restore_point.py).

``python tests/frozen_driver.py run|resume RUN_PARENT MOMENT KEEP``: one trial of a small
function trainable (steps 10..60, a checkpoint with each report, the step in ``trainer_state.json``
as sdsweep's trainers write it, a loss per step from :data:`LOSS`), kept with sdsweep's checkpoint
settings (``sweeps.checkpoint_keeping.checkpoint_config``, ``KEEP`` checkpoints by ``loss``).

What makes the moment exact: every controller step writes Tune's experiment state and copies it to
the run directory *synchronously* (``TUNE_GLOBAL_CHECKPOINT_S=0``; the sync waited for), so the
state a killed driver leaves behind is exactly the one at the end of the last step, not whichever
background copy happened to finish. Tune's own snapshots are otherwise untouched. At ``MOMENT`` the
driver stops copying state, writes ``RUN_PARENT/frozen`` and sleeps; the test kills it:

- ``save-pending``: Tune has processed the report of step 20 but not yet the checkpoint it carried
  (the ``save`` round trip to the trial's actor is outstanding): the state names step 10's.
- ``superseded``: Tune has just registered step 30's checkpoint; the state in the run directory
  still names step 20's, which scored worse than step 10's (Tune's ``num_to_keep=1`` deletes it
  on this registration).

``resume`` continues the run with ``Tuner.restore`` (never freezes).

``python tests/frozen_driver.py sdsweep SWEEP.yaml RUN_DIR``: ``sdsweep run`` itself (sdsweep's
real trainable, driver and callbacks), frozen at one moment (the marker is ``RUN_DIR/../frozen``):

- (the only moment here) the state in the run directory stops at the one that recorded the
  checkpoint of step 20 (no later snapshot reaches it); the trial goes on to its last step and
  finishes, sdsweep's driver drops the resume tensors of its older checkpoints
  (``KeepResumeStateInNewest``), then the driver freezes: the state names step 20's checkpoint,
  without its resume tensors, of a trial that has finished.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.execution import experiment_state  # noqa: E402

from sweeps.checkpoint_keeping import checkpoint_config  # noqa: E402
from trainers.checkpoints import STATE_JSON  # noqa: E402

LOSS = {10: 0.1, 20: 0.5, 30: 0.6, 40: 0.7, 50: 0.8, 60: 0.9}  # the best checkpoint is the first
EXPERIMENT = "exp"
FROZEN = {"now": False, "syncs_left": None}  # syncs_left: None = every snapshot is copied


def trainable(config: dict) -> None:
    checkpoint = tune.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / STATE_JSON).read_text())["step"]
    for step in range(start + 10, 61, 10):
        time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / STATE_JSON).write_text(json.dumps({"step": step}))
            tune.report({"step": step, "loss": LOSS[step], "restored_from": start},
                        checkpoint=tune.Checkpoint.from_directory(tmp))


_sync = experiment_state._ExperimentCheckpointManager.sync_up_experiment_state


def _synchronous_sync(self, save_fn, force=False, wait=False):  # noqa: ANN001 - Tune's signature
    if FROZEN["now"] or FROZEN["syncs_left"] == 0:
        return
    if FROZEN["syncs_left"] is not None:
        FROZEN["syncs_left"] -= 1
    _sync(self, save_fn, force=True, wait=True)


class Freeze(tune.Callback):
    """Freezes the driver at ``moment`` (only in the ``run`` process: Tune pickles callbacks into
    its state and a resume restores them, so the process's own argv decides)."""

    def __init__(self, moment: str, marker: str) -> None:
        self.moment, self.marker = moment, marker

    def _freeze(self, why: str) -> None:
        if sys.argv[1] != "run":
            return
        FROZEN["now"] = True
        Path(self.marker).write_text(why)
        time.sleep(3600)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.moment != "save-pending":
            return
        for trial in trials:
            if trial.temporary_state.saving_to is not None and trial.last_result.get("step") == 20:
                self._freeze("step 20 reported, its checkpoint not yet registered")

    def on_trial_save(self, iteration: int, trials: list, trial, **info) -> None:
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        step = latest.metrics.get("step") if latest is not None else None
        if self.moment == "superseded" and step == 30:
            self._freeze("step 30's checkpoint registered")


def sdsweep_run(sweep_file: str, run_dir: str) -> int:
    """``sdsweep run SWEEP --run-dir RUN_DIR``, its ``KeepResumeStateInNewest`` callback extended
    with the ``finished-unrecorded`` moment (it freezes after the callback has done its work)."""
    import sweeps.driver
    from sweeps.cli import main as sdsweep
    from sweeps.trial import KeepResumeStateInNewest

    marker = Path(run_dir).parent / "frozen"

    class ThenFreeze(KeepResumeStateInNewest):
        def on_trial_save(self, iteration: int, trials: list, trial, **info) -> None:
            latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
            if sys.argv[1] == "sdsweep" and latest is not None and latest.metrics.get("step") == 20:
                FROZEN["syncs_left"] = 1  # this step's snapshot (step 20's checkpoint registered), no later one

        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            super().on_trial_complete(iteration, trials, trial, **info)
            if sys.argv[1] == "sdsweep":  # not in a resume, which restores this callback from Tune's state
                FROZEN["now"] = True
                marker.write_text("the trial finished; the state names step 20's checkpoint")
                time.sleep(3600)

    sweeps.driver.KeepResumeStateInNewest = ThenFreeze
    return sdsweep(["run", sweep_file, "--run-dir", run_dir])


def main() -> None:
    experiment_state._ExperimentCheckpointManager.sync_up_experiment_state = _synchronous_sync
    if sys.argv[1] == "sdsweep":
        sys.exit(sdsweep_run(sys.argv[2], sys.argv[3]))
    action, parent, moment, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    runnable = tune.with_resources(trainable, {"cpu": 1})
    if action == "run":
        ckpt_cfg, keeping = checkpoint_config(keep, "loss", "min")
        tuner = tune.Tuner(runnable, tune_config=tune.TuneConfig(num_samples=1, metric="loss", mode="min"),
                           run_config=tune.RunConfig(storage_path=parent, name=EXPERIMENT, checkpoint_config=ckpt_cfg,
                                                     callbacks=[*keeping, Freeze(moment, str(Path(parent) / "frozen"))],
                                                     verbose=0))
    else:
        tuner = tune.Tuner.restore(str(Path(parent) / EXPERIMENT), trainable=runnable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    for result in tuner.fit():
        print("RESULT", json.dumps({"step": result.metrics.get("step"), "error": str(result.error or "")}))
    ray.shutdown()


if __name__ == "__main__":
    main()
