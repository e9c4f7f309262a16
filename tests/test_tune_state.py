"""Tune's experiment state read without Ray (sweeps/tune_state.py), on files written in code; the
same reader against Ray's own ExperimentAnalysis on a real sweep is in tests/test_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.errors import SweepError
from sweeps.tune_state import read_trials


def _trial(trial_id: str, status: str, config: dict, logdir: str) -> list[str]:
    state = {"trial_id": trial_id, "status": status, "config": config, "relative_logdir": logdir,
             "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": "80"}, "results": "80054e2e"}
    return [json.dumps(state), json.dumps({"num_failures": 0})]


def _write(run: Path, name: str, trials: list[list[str]]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(json.dumps({"trial_data": trials, "runner_data": {}, "stats": {}}))


def test_the_newest_state_gives_ids_configs_statuses_and_trial_dirs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, "experiment_state-2026-01-01_10-00-00.json", [_trial("old", "TERMINATED", {}, "old_dir")])
    _write(run, "experiment_state-2026-01-02_10-00-00.json", [
        _trial("a1", "TERMINATED", {"method": "lora", "train.learning_rate": 1e-4, "train.snr_gamma": None},
               "run_trial_a1"),
        _trial("b2", "RUNNING", {"method": "lora"}, "run_trial_b2")])
    trials = read_trials(run)
    assert [t.trial_id for t in trials] == ["a1", "b2"]  # the resumed session's file, not the first one
    assert trials[0].config == {"method": "lora", "train.learning_rate": 1e-4, "train.snr_gamma": None}
    assert trials[0].path == run.resolve() / "run_trial_a1"
    assert [t.status for t in trials] == ["TERMINATED", "PENDING"]  # as Tune reads a running trial back


def test_a_missing_cut_short_or_pickled_state_is_an_error_naming_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SweepError, match="no Tune experiment state"):
        read_trials(run)
    (run / "experiment_state-x.json").write_text('{"trial_data": [["{\\"trial_id')
    with pytest.raises(SweepError, match=r"experiment_state-x.json: not complete JSON .* run the command again"):
        read_trials(run)
    _write(run, "experiment_state-x.json", [_trial("c3", "TERMINATED", {
        "lora.rank": {"_type": "CLOUDPICKLE_FALLBACK", "value": "8004"}}, "d")])
    with pytest.raises(SweepError, match=r"trial c3 config.lora.rank: Tune stored this value as a pickle"):
        read_trials(run)
    _write(run, "experiment_state-x.json", [[json.dumps({"trial_id": "d4"}), "{}"]])
    with pytest.raises(SweepError, match="not a Tune experiment state sdsweep can read"):
        read_trials(run)
