"""The trial scheduler of a sweep, with its time measured in steps, images seen or trainer seconds.

Which unit is fair depends on the sweep (docs/SWEEPS.md, "Budgets across methods"): within one
method a step costs the same in every trial, so rungs in steps are exact and reproducible; across
methods a step does not (a DreamBooth step updates the whole UNet, a textual-inversion step a few
embedding rows), and ASHA comparing trials at equal steps would compare unequal spends. Every
trial reports all three (``step``, ``images_seen``, ``trainer_s``), so any of them can be the
scheduler's clock, and the leaderboard shows each trial's spend whatever the clock was.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule
from ray.tune.schedulers.async_hyperband import _Bracket

from sweeps.config import SweepConfig
from sweeps.searched import largest_value

# Trainer seconds have no natural ceiling (trials end at their own max_train_steps): a max_t far
# above any trial keeps ASHA's rungs going as long as trials run.
UNBOUNDED_SECONDS = 1e9


class FirstReportGraceASHA(ASHAScheduler):
    """ASHA whose grace period is the first reported value of its clock, when none is given.

    For ``trainer_s``: a good grace period is one evaluation's worth of training, which is known
    only once a trial has trained (it depends on the model, the method, the hardware). The first
    result that carries the clock fixes the grace period and the rungs (grace * rf^k); it is part
    of the scheduler's state, so a resumed sweep keeps the same rungs.
    """

    def __init__(self, *, time_attr: str, max_t: float, reduction_factor: float, grace_period: float | None) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period or max_t,
                         reduction_factor=reduction_factor)
        self.grace_fixed = grace_period is not None
        self.grace_period = grace_period

    def _fix_grace(self, result: dict[str, Any]) -> None:
        if self.grace_fixed or self._time_attr not in result:
            return
        self.grace_period = float(result[self._time_attr])
        self.grace_fixed = True
        # Ray's own rung bookkeeping, rebuilt with the grace period now known (one bracket, as built).
        bracket = _Bracket(self.grace_period, self._max_t, self._reduction_factor, 0)
        for trial_id in self._trial_info:
            self._trial_info[trial_id] = bracket
        self._brackets = [bracket]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._fix_grace(result)
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._fix_grace(result)
        super().on_trial_complete(tune_controller, trial, result)


def clock_defaults(cfg: SweepConfig) -> tuple[float | None, float]:
    """(grace period, max_t) in the sweep's scheduler clock unit, explicit settings first.

    * ``step``: one evaluation (``evaluation.every``) and the most steps any trial trains (a
      searched ``train.max_train_steps`` is each trial's own budget: ``max_t`` must not cut the
      longest trial short).
    * ``images_seen``: one evaluation of instance examples and twice the largest trial's worth
      (an upper bound: DreamBooth's prior preservation puts a class example beside each instance).
    * ``trainer_s``: None (the first report's, see :class:`FirstReportGraceASHA`) and unbounded.
    """
    s, every = cfg.scheduler, cfg.evaluation.every
    steps = largest_value(cfg, "train.max_train_steps")
    per_step = largest_value(cfg, "train.train_batch_size") * largest_value(cfg, "train.gradient_accumulation_steps")
    grace, max_t = {"step": (every, steps),
                    "images_seen": (every * per_step, 2 * steps * per_step),
                    "trainer_s": (None, UNBOUNDED_SECONDS)}[cfg.time_attr]
    return s.grace_period or grace, s.max_t or max_t


def make_scheduler(cfg: SweepConfig) -> Any:
    """The sweep's trial scheduler on its clock (``SweepConfig.time_attr``)."""
    s, clock = cfg.scheduler, cfg.time_attr
    grace, max_t = clock_defaults(cfg)
    if s.type == "asha":
        return FirstReportGraceASHA(time_attr=clock, max_t=max_t, grace_period=grace,
                                    reduction_factor=s.reduction_factor)
    if s.type == "hyperband":
        return HyperBandScheduler(time_attr=clock, max_t=max_t, reduction_factor=s.reduction_factor)
    if s.type == "median":
        assert grace is not None  # sweeps.config.check_space_against_base requires it for trainer_s
        return MedianStoppingRule(time_attr=clock, grace_period=grace, min_samples_required=2)
    return FIFOScheduler()
