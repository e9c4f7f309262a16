"""A trial's reported rows as the readers see them (sweeps/rows.py, sweeps/results.py)."""

from __future__ import annotations

import json
from pathlib import Path

from sweeps.results import _trial_row
from sweeps.rows import OWN_ROWS, once_per_step, trial_rows
from sweeps.tune_state import TuneTrial


def _eval(step: int, value: float) -> dict:
    return {"step": step, "composite": value, "train_loss": 0.1, "trial_status": "running", "trial_id": "t1"}


def _error(step: int) -> dict:
    # What sweeps/trial.py `_report_error` reports: the step reached, no metric.
    return {"step": step, "trial_status": "error", "error_type": "NonFiniteLossError",
            "error": "lora: the loss became nan at step 21", "trial_id": "t1"}


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_error_at_the_step_after_an_evaluation_keeps_that_evaluation(tmp_path):
    # The step after the evaluation at 20 raised before global_step moved: the error row says 20.
    rows = [_eval(10, 0.2), _eval(20, 0.5), _error(20)]
    kept = once_per_step(rows)
    assert [(r["step"], r["trial_status"]) for r in kept] == [(10, "running"), (20, "running"), (20, "error")]

    _write(tmp_path / "result.json", rows)
    trial = TuneTrial(trial_id="t1", status="TERMINATED", config={"method": "lora"}, path=tmp_path)
    row = _trial_row(trial, "composite", "max", max_steps=100)
    assert row.status == "error" and "NonFiniteLossError" in row.error
    assert (row.best, row.best_step) == (0.5, 20)  # rankable: the best evaluation is still there
    assert [h["step"] for h in row.history] == [10, 20]  # the error row is no evaluation


def test_evaluations_only_the_trials_own_file_holds_are_filled_in_beside_an_error(tmp_path):
    # Tune's result.json lost the report of step 20 (a restarted trial's staging copy), then the
    # trial errored at step 20; its own file has the evaluation.
    _write(tmp_path / "result.json", [_eval(10, 0.2), _error(20)])
    _write(tmp_path / OWN_ROWS, [_eval(10, 0.2), _eval(20, 0.5)])
    rows = trial_rows(tmp_path)
    assert [(r["step"], r["trial_status"]) for r in rows] == [(10, "running"), (20, "running"), (20, "error")]


def test_a_retrained_step_still_replaces_its_earlier_report_and_errors_replace_errors():
    rows = [_eval(10, 0.2), _eval(20, 0.5), _eval(20, 0.5), _eval(30, 0.4)]
    assert [r["step"] for r in once_per_step(rows)] == [10, 20, 30]
    # A worker replaced after a CUDA error: Ray's retry reports the same error again.
    rows = [_eval(10, 0.2), _error(10), _error(10)]
    assert [(r["step"], r["trial_status"]) for r in once_per_step(rows)] == [(10, "running"), (10, "error")]


def test_each_trials_gain_is_over_the_base_model_at_its_own_placement_or_none():
    from sweeps.results import TrialRow, assign_baselines

    bf16, fp32 = "cuda unet=bfloat16 ...", "cuda unet=float32 ..."
    state = {"baseline": {"scores": {"composite": 0.1}},
             "baselines": {bf16: {"scores": {"composite": 0.1}}, fp32: {"scores": {"composite": 0.3}}}}
    rows = [TrialRow("a", "completed", "lora", {}, placement=bf16),
            TrialRow("b", "completed", "dreambooth", {}, placement=fp32),
            TrialRow("c", "completed", "dreambooth", {}, placement="cuda unet=float16 ..."),  # no baseline there
            TrialRow("d", "completed", "lora", {})]  # recorded no placement (an older sweep)
    assign_baselines(rows, state)
    sweep = state["baseline"]["scores"]
    assert [r.gain_base(sweep).get("composite") for r in rows] == [0.1, 0.3, None, 0.1]
    older = {"baseline": {"scores": {"composite": 0.1}}}  # a sweep without per-placement baselines
    assign_baselines(rows := [TrialRow("e", "completed", "lora", {}, placement=bf16)], older)
    assert rows[0].gain_base(older["baseline"]["scores"]) == {"composite": 0.1}


def test_a_restored_trial_that_had_finished_reports_its_end_as_it_ended(tmp_path, monkeypatch):
    """A trial the scheduler stopped at step 20 of 40, restored after a driver kill: its end is
    reported again as it ended (still running: Optuna PRUNED, the leaderboard "stopped"), never as
    completed; a trial restored at its last step reports completed; an errored one its error."""
    from types import SimpleNamespace

    from ray import tune

    from sweeps import trial
    from sweeps.constants import ERROR_FILE

    told: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: told.append(metrics))
    _write(tmp_path / "result.json", [_eval(10, 0.2), _eval(20, 0.5)])
    stopped = SimpleNamespace(global_step=20, cfg=SimpleNamespace(max_train_steps=40))
    trial._report_end_again(stopped, tmp_path)
    done = SimpleNamespace(global_step=20, cfg=SimpleNamespace(max_train_steps=20))
    trial._report_end_again(done, tmp_path)
    assert [(t["step"], t["trial_status"], t["composite"]) for t in told] == [(20, "running", 0.5),
                                                                              (20, "completed", 0.5)]
    told.clear()
    assert not trial._already_failed(tmp_path)
    (tmp_path / ERROR_FILE).write_text(json.dumps({"error_type": "NonFiniteLossError", "error": "nan", "step": 20,
                                                   "worker_replaced": False}))
    assert trial._already_failed(tmp_path)  # an errored trial is never trained again, whatever restarts it
    assert told == [{"trial_status": "error", "error_type": "NonFiniteLossError", "error": "nan", "step": 20}]
