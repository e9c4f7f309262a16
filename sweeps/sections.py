"""The sections of a sweep file besides ``base``: the search, the scheduler, the evaluation (and its
held-out confirmation) and the resources of one trial. ``sweeps/config.py`` puts them together
into the whole sweep file (``SweepConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from search_spaces import SamplerSettings, parse_storage_url
from trainers.config import Frozen
from trainers.evaluate import EvaluatorConfig
from trainers.metric_modes import COMPOSITE, REPORTED_METRICS


class SearchSettings(Frozen):
    """What Optuna searches and how."""

    spaces: tuple[Any, ...] = ("lora",)
    sampler: SamplerSettings = SamplerSettings()
    num_samples: int = Field(8, gt=0, description="trials in total (finished + resumed + new)")
    max_concurrent_trials: int = Field(2, gt=0)
    warm_start: bool = True
    storage: str | None = None
    study_name: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        parse_storage_url(v)  # a bad URL fails here, before preflight, Ray or the cache build
        return v


class SchedulerSettings(Frozen):
    """Early stopping of weak trials.

    ``time_attr`` is what the rungs are measured in, a value every trial reports: ``step``
    (optimizer steps), ``images_seen`` (examples through the UNet: instance plus, with DreamBooth's
    prior preservation, class examples) or ``trainer_s`` (seconds in the training loop, without
    evaluation and checkpointing). ``auto`` is ``step`` when the sweep searches one method and
    ``trainer_s`` when it searches several, whose steps cost different amounts (docs/SWEEPS.md,
    "Budgets across methods"). ``grace_period`` and ``max_t`` are in that unit.
    """

    type: Literal["asha", "hyperband", "median", "none"] = "asha"
    time_attr: Literal["auto", "step", "images_seen", "trainer_s"] = "auto"
    grace_period: float | None = Field(None, gt=0, description="default: one evaluation's worth (see docs/SWEEPS.md)")
    max_t: float | None = Field(None, gt=0, description="default: the most a trial can reach (see docs/SWEEPS.md)")
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _only_what_the_type_uses(self) -> "SchedulerSettings":
        # Compared with defaults (not fields-set) so a dumped config reloads (workers, resume).
        if self.grace_period is not None and self.type in ("hyperband", "none"):
            raise ValueError(f"grace_period is not used by scheduler type {self.type!r}; remove it")
        if self.max_t is not None and self.type in ("median", "none"):
            raise ValueError(f"max_t is not used by scheduler type {self.type!r}; remove it")
        if self.reduction_factor != 2.0 and self.type in ("median", "none"):
            raise ValueError(f"reduction_factor is not used by scheduler type {self.type!r}; remove it")
        return self


class ConfirmSettings(Frozen):
    """Held-out confirmation at the end of a sweep (needs ``evaluation.images``).

    The ``top_k`` leaderboard checkpoints are generated and scored again on ``pick_seeds`` that
    the sweep's evaluations never used, and the best of them there is the checkpoint the sweep
    exports. That pick and the others (the runner-up: second on the pick seeds) and the base
    model are then scored on ``seeds``, used for neither choice (and, if given, on other
    ``prompts``); the pick's margin over the runner-up and over the base model gets a paired
    bootstrap interval from those images alone. A score picked as the best of many on the same
    images is biased upwards (the winner's curse); a margin on images that chose nothing is not.

    ``pick_seeds`` default: the first half of ``seeds`` (the rest report the margins); with
    ``top_k: 1`` there is nothing to choose and every seed reports. A separated margin smaller than
    ``min_effect`` times the score's spread between seeds (the standard deviation of one model's
    score computed on one seed at a time, pooled over the two models) is reported as "no
    meaningful difference" (docs/EVALUATION.md).
    """

    top_k: int = Field(3, ge=1, le=20)
    seeds: tuple[int, ...] = Field(tuple(range(1000, 1008)), min_length=1)
    pick_seeds: tuple[int, ...] | None = Field(None, min_length=1,
                                               description="default: the first half of seeds")
    prompts: tuple[str, ...] | None = Field(None, min_length=1, description="default: the evaluation prompts")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples (prompts and seeds drawn with replacement)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    min_effect: float = Field(0.2, ge=0, description="smallest margin worth reporting, in seed-to-seed spreads")

    @model_validator(mode="after")
    def _seed_sets(self) -> "ConfirmSettings":
        if self.pick_seeds is not None:
            if self.top_k == 1:
                raise ValueError("evaluation.confirm.pick_seeds: with top_k 1 there is nothing to choose between; "
                                 "remove pick_seeds or raise top_k")
            shared = sorted(set(self.pick_seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"evaluation.confirm.pick_seeds {shared} are also evaluation.confirm.seeds: the "
                                 "margin must come from images that chose nothing; choose others")
        elif self.top_k > 1 and len(self.seeds) < 2:
            raise ValueError(f"evaluation.confirm.seeds {list(self.seeds)}: choosing among the top {self.top_k} "
                             "needs seeds of its own: give two or more seeds (the first half pick, the rest "
                             "report the margin), or pick_seeds, or top_k: 1")
        return self

    def seed_sets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the seeds that choose among the top K, the seeds that report the margins)."""
        if self.pick_seeds is not None:
            return self.pick_seeds, self.seeds
        if self.top_k == 1:
            return (), self.seeds
        half = (len(self.seeds) + 1) // 2
        return self.seeds[:half], self.seeds[half:]


class EvaluationSettings(Frozen):
    """When trials evaluate and checkpoint, and what ranks them.

    ``images`` turns on image evaluation (generate + CLIP-based scores) at every evaluation;
    ``metric`` then defaults to ``composite``. ``objectives`` (two or more reported metrics)
    makes the search multi-objective: Optuna samples for the Pareto front of those, while the
    scheduler (ASHA) and checkpoint retention still use the single number ``metric``.
    """

    every: int = Field(10, gt=0, description="evaluate + checkpoint every N training steps")
    # "auto": composite with images, else val_loss with held-out images, else fixed_train_loss
    # (resolved by SweepConfig, which knows the data).
    metric: str = "auto"
    mode: Literal["min", "max"] | None = None
    validation_timesteps: int = Field(4, gt=0)
    images: EvaluatorConfig | None = None
    objectives: tuple[str, ...] | None = None
    # Held-out confirmation of the top checkpoints; on by default with image evaluation, `null` turns it off.
    confirm: ConfirmSettings | None = ConfirmSettings()

    @model_validator(mode="before")
    @classmethod
    def _default_metric(cls, data: Any) -> Any:
        # With image evaluation on, what the user came for is the image score: rank by composite.
        if isinstance(data, dict) and data.get("images") is not None and data.get("metric") in (None, "auto"):
            return {**data, "metric": COMPOSITE}
        return data

    @model_validator(mode="after")
    def _metrics_exist(self) -> "EvaluationSettings":
        available = self.available()
        if self.metric != "auto" and self.metric not in available:
            hint = "" if self.images else " (image metrics need evaluation.images)"
            raise ValueError(f"evaluation.metric {self.metric!r} is not reported by any trial{hint}; "
                             f"choose one of {sorted(available)}")
        if self.images is not None and self.confirm is not None:
            for key, seeds in (("seeds", self.confirm.seeds), ("pick_seeds", self.confirm.pick_seeds or ())):
                reused = sorted(set(seeds) & set(self.images.generation.seeds))
                if reused:
                    raise ValueError(f"evaluation.confirm.{key} {reused} are also evaluation.images.generation.seeds; "
                                     "held-out seeds must never be used by the sweep's own evaluations: choose others")
            self.heldout_evaluator()  # held-out prompts obey the evaluator's rules ({token}, prior prompts)
        if self.objectives is not None:
            bad = [o for o in self.objectives if o not in available]
            if bad or len(set(self.objectives)) < 2:
                raise ValueError(f"evaluation.objectives {list(self.objectives)}: need two or more distinct metrics "
                                 f"from {sorted(available)}" + (f"; unknown {bad}" if bad else ""))
        return self

    def heldout_evaluator(self, seeds: Any = None) -> EvaluatorConfig:
        """The evaluator of the held-out confirmation: ``images`` with ``confirm``'s prompts and
        ``seeds`` (default: the seeds that report the margins, ``ConfirmSettings.seed_sets``)."""
        assert self.images is not None and self.confirm is not None
        gen = self.images.generation.model_dump()
        gen["seeds"] = list(self.confirm.seed_sets()[1] if seeds is None else seeds)
        if self.confirm.prompts is not None:
            gen["prompts"] = list(self.confirm.prompts)
        try:
            return EvaluatorConfig.model_validate({**self.images.model_dump(), "generation": gen})
        except ValueError as err:
            raise ValueError(f"evaluation.confirm.prompts: {err}") from None

    def available(self) -> set[str]:
        """Every metric a trial of this sweep reports."""
        return set(REPORTED_METRICS) | (set(self.images.reported()) if self.images else set())


class ResourceSettings(Frozen):
    """What one trial asks Ray for (fractional GPUs share a GPU between trials).

    ``custom``: Ray custom resources a trial (and the sweep's cache, baseline and confirmation
    tasks) also needs, e.g. ``{a100: 1}`` where nodes were started with ``--resources '{"a100": 4}'``:
    pins the work to the nodes that have them.
    """

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    custom: dict[str, float] = {}
    # The memory of one GPU of the cluster, for checking a fractional-GPU packing before the sweep
    # starts (sweeps/plan.py); default: probed from a GPU the cluster gives the sweep.
    gpu_memory_gib: float | None = Field(None, gt=0)

    @field_validator("custom")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x <= 0 or k in ("CPU", "GPU", "memory")}
        if bad:
            raise ValueError(f"custom resources {bad}: each must be a custom resource name with an amount > 0 "
                             "(CPU and GPU are resources.cpu / resources.gpu)")
        return v

    def task_options(self) -> dict[str, Any]:
        """Ray task options for the sweep's own tasks (cache build, baseline, confirmation): a
        trial's CPUs and custom resources, and a whole GPU when trials use one."""
        return {"num_cpus": self.cpu, "num_gpus": 1 if self.gpu > 0 else 0,
                **({"resources": dict(self.custom)} if self.custom else {})}

    def trial_task_options(self) -> dict[str, Any]:
        """Ray task options for work that needs no more than a trial and runs when the trials are
        done (one held-out confirmation model each): a trial's CPUs, share of a GPU and custom
        resources, so as many run at once as trials did (``sdsweep plan`` checks that packing)."""
        return {"num_cpus": self.cpu, "num_gpus": self.gpu,
                **({"resources": dict(self.custom)} if self.custom else {})}
