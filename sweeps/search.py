"""The Optuna searcher of a sweep: Ray Tune's OptunaSearch, told what the leaderboard ranks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from search_spaces import make_sampler, make_storage
from sweeps.config import SweepConfig


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch told what the leaderboard ranks: errors as FAIL, early stops as PRUNED, and a
    finished trial's value(s) at its best evaluated checkpoint.

    Ray's OptunaSearch tells COMPLETE with the *last* reported value -- but the leaderboard ranks
    and exports a trial's best checkpoint, so TPE would model a number the user never gets. Here
    the result with the best ``rank_metric`` (the sweep's ``evaluation.metric``) is remembered and
    its value (multi-objective: each objective's value at that checkpoint) is told. A trial the
    scheduler stopped early (``trial_status`` still "running") is told PRUNED: its intermediate
    values (reported per evaluation, single-objective) are what TPE ranks pruned trials by, and a
    trial stopped at step 150 is not comparable with one that ran to the end. A trial ending with
    ``trial_status == "error"`` (sweeps/trial.py) or ``error=True`` is FAIL.
    """

    def __init__(self, *args: Any, rank_metric: str, rank_mode: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank = (rank_metric, rank_mode)
        self._best: dict[str, dict] = {}

    def __setstate__(self, state: dict) -> None:
        # A searcher pickled by an sdsweep before this class tracked best results (resume).
        state.setdefault("_best", {})
        state.setdefault("_rank", (state.get("_metric"), state.get("_mode")))
        self.__dict__.update(state)

    def _setup_study(self, mode: Any) -> None:
        # The objectives by their sdsweep names, so optuna-dashboard and the leaderboard agree
        # (without names the dashboard says "Objective 0").
        super()._setup_study(mode)
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("sdsweep_trial_id", trial_id)
        return config

    def _keep_best(self, trial_id: str, result: dict) -> None:
        metric, mode = self._rank
        value = result.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self._best.get(trial_id)
            if best is None or (value > best[metric] if mode == "max" else value < best[metric]):
                self._best[trial_id] = dict(result)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._keep_best(trial_id, result)
        # An errored trial's last report carries no metric; Ray's version would raise KeyError.
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune hands a trial's last report to the searcher here only, never to on_trial_result:
        # a trial whose best evaluation is its last must not be told to Optuna as an earlier one.
        if result:
            self._keep_best(trial_id, result)
        best = self._best.pop(trial_id, None)
        status = "error" if error or (result or {}).get("trial_status") == "error" else \
            "completed" if (result or {}).get("trial_status") == "completed" else "stopped"
        self._label(trial_id, status, best)
        if status == "error":
            super().on_trial_complete(trial_id, result=None, error=True)
        elif (result or {}).get("trial_status") != "completed" or best is None:
            super().on_trial_complete(trial_id, result=None, error=False)  # no value: PRUNED
        else:
            super().on_trial_complete(trial_id, result=best, error=False)

    def _label(self, trial_id: str, status: str, best: dict | None) -> None:
        """What the leaderboard says of the trial, as Optuna user attributes (optuna-dashboard
        shows them): its status (completed, stopped early, error), best step and best value."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        ot_trial.set_user_attr("sdsweep_trial_id", trial_id)
        ot_trial.set_user_attr("sdsweep_status", status)
        if best is not None:
            ot_trial.set_user_attr("sdsweep_best_step", int(best.get("step", 0)))
            ot_trial.set_user_attr(f"sdsweep_best_{self._rank[0]}", float(best[self._rank[0]]))


def make_search(cfg: SweepConfig) -> SweepOptunaSearch:
    """OptunaSearch over the sweep's define-by-run space, with explicit sampler and storage."""
    space = cfg.search_space()
    # Multi-objective: Optuna's samplers (TPE / random) handle several values natively and its
    # study keeps the Pareto front; Tune's own metric (ASHA, checkpoints) stays evaluation.metric.
    objectives = cfg.evaluation.objectives
    return SweepOptunaSearch(
        space=space.define_by_run,
        metric=list(objectives) if objectives else cfg.evaluation.metric,
        mode=cfg.objective_modes if objectives else cfg.mode,
        sampler=make_sampler(cfg.search.sampler), storage=make_storage(cfg.search.storage),
        study_name=cfg.search.study_name or cfg.name,
        points_to_evaluate=space.warm_start_points() if cfg.search.warm_start else None,
        rank_metric=cfg.evaluation.metric, rank_mode=cfg.mode,
    )
