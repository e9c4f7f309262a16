"""A trial's checkpoint is written once, straight into the run directory Tune registers it in
(sweeps/trial_checkpoints.py), with real Ray Tune: Tune copies nothing, registers the directory
the trial wrote, and an earlier writer's leftovers (a killed write's temp directory, a written but
never reported checkpoint) do not survive into the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_tune_registers_the_directory_the_trial_wrote_and_copies_nothing(ray_local, tmp_path):
    from ray import tune

    log = tmp_path / "persist.jsonl"

    def trainable(config: dict) -> None:  # (nested: Ray pickles it by value for its workers)
        from ray.train._internal.storage import StorageContext

        from sweeps.trial_checkpoints import checkpoint_to_report
        from trainers.tensor_files import atomic_directory

        original = StorageContext.persist_current_checkpoint

        def persist(self, checkpoint):  # what Tune copies: the files of the reported directory
            files = [f for f in Path(checkpoint.path).rglob("*") if f.is_file()]
            with open(config["log"], "a") as f:
                f.write(json.dumps({"files": len(files), "bytes": sum(p.stat().st_size for p in files)}) + "\n")
            return original(self, checkpoint)

        StorageContext.persist_current_checkpoint = persist
        trial_dir = Path(tune.get_context().get_storage().trial_fs_path)
        for step in (1, 2, 3):
            if step == 2:  # a killed writer's temp directory (atomic_directory's naming)
                (trial_dir / ".checkpoint_000007.0123456789ab.tmp").mkdir(parents=True)
            if step == 3:  # a checkpoint written but never reported (the writer died before report)
                (trial_dir / "checkpoint_000002").mkdir()
                (trial_dir / "checkpoint_000002" / "stale.bin").write_bytes(b"x" * 100)
            with checkpoint_to_report() as (directory, checkpoint):
                with atomic_directory(directory) as tmp:  # as Trainer.save_checkpoint writes
                    (tmp / "weights.bin").write_bytes(bytes(1000 * step))
                leftovers = sorted(p.name for p in trial_dir.glob(".checkpoint_*"))
                tune.report({"step": step, "score": float(step), "wrote": str(directory), "leftovers": leftovers},
                            checkpoint=checkpoint)

    tuner = tune.Tuner(trainable, param_space={"log": str(log)}, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), name="straight", verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(
                                                     num_to_keep=2, checkpoint_score_attribute="score")))
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    result = grid[0]
    rows = result.metrics_dataframe.to_dict("records")
    assert [r["step"] for r in rows] == [1, 2, 3]
    copied = [json.loads(line) for line in log.read_text().splitlines()]
    assert copied == [{"files": 0, "bytes": 0}] * 3  # nothing went through Tune's copy
    assert all(r["leftovers"] == [] for r in rows), rows  # the killed write's temp dir was removed
    # Tune registered exactly what the trial wrote, where it wrote it.
    assert result.checkpoint.path == rows[-1]["wrote"]
    kept = sorted(c.path for c, _ in result.best_checkpoints)
    assert kept == sorted(r["wrote"] for r in rows[1:])  # num_to_keep 2 by score: steps 2 and 3
    for r in rows[1:]:
        files = {f.name: f.stat().st_size for f in Path(r["wrote"]).iterdir()}
        assert files == {"weights.bin": 1000 * r["step"]}, files  # no stale file from the unreported write
    assert not os.path.exists(rows[0]["wrote"])  # Tune deleted the one it did not keep
