"""Which checkpoint a restored trial loads (sweeps/trial.py ``resumable_checkpoint``).

The race it covers, seen in the kill -9 e2e test: a trial finishes, the driver's callback drops the
resume tensors from every checkpoint but the newest (KeepResumeStateInNewest), and the driver is
killed before Tune's experiment state records the completion; the restored state names an older
checkpoint, which can no longer be resumed from.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.trial import resumable_checkpoint
from trainers.checkpoints import STATE_JSON, STATE_TENSORS, read_trainer_state


def _checkpoint(trial: Path, n: int, tensors: bool) -> Path:
    d = trial / f"checkpoint_{n:06d}"
    d.mkdir(parents=True)
    (d / STATE_JSON).write_text("{}")
    if tensors:
        (d / STATE_TENSORS).write_bytes(b"x")
    return d


def test_tunes_checkpoint_is_used_while_it_can_be_resumed_from(tmp_path) -> None:
    old = _checkpoint(tmp_path, 3, tensors=True)
    _checkpoint(tmp_path, 4, tensors=True)
    assert resumable_checkpoint(tmp_path, old) == old  # the restore semantics Tune chose are kept


def test_a_pruned_checkpoint_gives_way_to_the_newest_complete_one(tmp_path) -> None:
    pruned = [_checkpoint(tmp_path, n, tensors=False) for n in range(5)]
    _checkpoint(tmp_path, 5, tensors=True)
    newest = _checkpoint(tmp_path, 6, tensors=True)
    assert resumable_checkpoint(tmp_path, pruned[4]) == newest


def test_with_no_complete_checkpoint_the_given_one_is_loaded_and_names_what_is_missing(tmp_path) -> None:
    given = _checkpoint(tmp_path, 0, tensors=False)
    assert resumable_checkpoint(tmp_path, given) == given
    with pytest.raises(FileNotFoundError, match=f"{STATE_TENSORS}: missing"):  # what Trainer.load_checkpoint reads with
        read_trainer_state(None, resumable_checkpoint(tmp_path, given))  # (the files are checked before the trainer)
