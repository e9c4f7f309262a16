"""Where a trial writes the checkpoint it reports: straight into the run directory, once.

``tune.report(metrics, checkpoint=Checkpoint.from_directory(d))`` (Ray 2.60,
``ray.train._internal.session._TrainSession.report``) first advances the trial's checkpoint index
(``StorageContext._update_checkpoint_index``: +1), then ``persist_current_checkpoint`` creates
``<trial_fs_path>/checkpoint_<index:06d>`` on the storage filesystem and copies the *contents* of
``d`` into it with ``pyarrow.fs.copy_files``; the checkpoint Tune registers is that storage path,
never ``d``. The copy neither deletes nor empties what the destination already holds.

So where the storage is a filesystem this process sees (sdsweep's ``storage_path`` is a local or
shared filesystem path; ``sweeps.trial.storage_trial_dir`` already writes samples there), a trial
computes the directory Tune is about to name, with Ray's own index rule applied to a copy of its
storage context, writes the checkpoint there itself (atomically: ``Trainer.save_checkpoint``
fills a temp directory beside it and renames it into place), and reports an *empty* directory:
Tune copies nothing and registers the files already in place. Before, every checkpoint was written
to a local temp directory and copied (written twice: 27.5 GB per SD 1.5 DreamBooth evaluation;
docs/METHODS.md). After the report the path Tune registered is compared with the one written; a
mismatch (a Ray that names checkpoints otherwise) is an error, not a checkpoint without files.

Elsewhere (storage this process cannot write as a path) the checkpoint goes to a temp directory
and Tune copies it, as before.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ray import tune


def _local_storage() -> Any | None:
    """This trial's Tune storage context when its filesystem is one this process writes as paths."""
    try:
        storage = tune.get_context().get_storage()
    except (AttributeError, RuntimeError):  # an older/newer Ray without the developer API
        return None
    return storage if type(storage.storage_filesystem).__name__ == "LocalFileSystem" else None


def _next_checkpoint_dir(storage: Any) -> Path:
    """The directory the trial's next ``tune.report(checkpoint=...)`` persists to."""
    upcoming = copy.copy(storage)  # Ray's own increment, applied to a copy (the real one moves in report)
    upcoming._update_checkpoint_index({})
    return Path(upcoming.checkpoint_fs_path)


def _drop_unfinished_writes(trial_dir: Path) -> None:
    """Remove checkpoint temp directories a killed writer of this trial left in its directory
    (``.checkpoint_000003.<hex>.tmp``, trainers.tensor_files.atomic_directory); one process at a
    time writes a trial's checkpoints, so any found now is dead."""
    for leftover in trial_dir.glob(".checkpoint_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def checkpoint_to_report() -> Iterator[tuple[Path, tune.Checkpoint]]:
    """``with checkpoint_to_report() as (directory, checkpoint):`` write the checkpoint into
    ``directory`` (with ``Trainer.save_checkpoint``), then ``tune.report(metrics, checkpoint=checkpoint)``
    inside the block. ``directory`` is the run directory's ``checkpoint_NNNNNN`` Tune registers."""
    storage = _local_storage()
    if storage is None:
        with tempfile.TemporaryDirectory(prefix="sdsweep-ckpt-") as tmp:
            yield Path(tmp), tune.Checkpoint.from_directory(tmp)
        return
    target = _next_checkpoint_dir(storage)
    _drop_unfinished_writes(target.parent)
    with tempfile.TemporaryDirectory(prefix="sdsweep-ckpt-empty-") as empty:
        yield target, tune.Checkpoint.from_directory(empty)
    if Path(storage.checkpoint_fs_path) != target:
        raise RuntimeError(f"Tune registered this report's checkpoint as {storage.checkpoint_fs_path}, but the "
                           f"trial wrote it to {target} (sweeps/trial_checkpoints.py expects Ray 2.60's naming)")
