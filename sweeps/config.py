"""The sweep file: one typed, frozen config validated before any work starts.

A sweep file holds the ``base`` run config shared by every trial (model, data, fixed
hyperparameters: the same schema as ``sdsweep train``), the search (spaces, sampler, budget),
the scheduler, evaluation (metric, mode, cadence), per-trial resources, storage and tracking.
Each trial's hyperparameters (flat dotted keys such as ``train.learning_rate``) are applied on
top of ``base`` and the result is validated as a :class:`~trainers.config.RunConfig`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from search_spaces import SamplerSettings, SearchSpace, build_search_space, load_space, parse_storage_url
from sweeps.tracking import TrackingSettings
from trainers.config import METHOD_SECTIONS, ConfigError, Frozen, RunConfig, read_yaml, validate_mapping
from trainers.evaluate import EvaluatorConfig
from trainers.metric_modes import COMPOSITE, REPORTED_METRICS, natural_mode  # noqa: F401 (re-exported)


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

    The ``top_k`` leaderboard checkpoints and the base model are generated and scored again on
    ``seeds`` that picking never saw (and, if given, on other ``prompts``); the winner's margin over
    the runner-up and over the base model gets a paired bootstrap interval. A score picked as the
    best of many on the same images is biased upwards (the winner's curse); these are not.
    """

    top_k: int = Field(3, ge=1, le=20)
    seeds: tuple[int, ...] = Field(tuple(range(1000, 1008)), min_length=1)
    prompts: tuple[str, ...] | None = Field(None, min_length=1, description="default: the evaluation prompts")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples (prompts and seeds drawn with replacement)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


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
            reused = sorted(set(self.confirm.seeds) & set(self.images.generation.seeds))
            if reused:
                raise ValueError(f"evaluation.confirm.seeds {reused} are also evaluation.images.generation.seeds; "
                                 "held-out seeds must never be used for picking: choose others")
            self.heldout_evaluator()  # held-out prompts obey the evaluator's rules ({token}, prior prompts)
        if self.objectives is not None:
            bad = [o for o in self.objectives if o not in available]
            if bad or len(set(self.objectives)) < 2:
                raise ValueError(f"evaluation.objectives {list(self.objectives)}: need two or more distinct metrics "
                                 f"from {sorted(available)}" + (f"; unknown {bad}" if bad else ""))
        return self

    def heldout_evaluator(self) -> EvaluatorConfig:
        """The evaluator of the held-out confirmation: ``images`` with ``confirm``'s seeds and prompts."""
        assert self.images is not None and self.confirm is not None
        gen = self.images.generation.model_dump()
        gen["seeds"] = list(self.confirm.seeds)
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


class SweepConfig(Frozen):
    """A whole sweep file."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    base: RunConfig
    # The settings sections of the other searched methods (a sweep across methods): written by the
    # user under `base` beside the base method's own (`base.dreambooth: {...}`), kept here.
    method_sections: dict[str, dict[str, Any]] = {}
    search: SearchSettings = SearchSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    resources: ResourceSettings = ResourceSettings()
    checkpoints_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(1, ge=0, description="retries for infrastructure failures only")
    # One worker process serves trial after trial: the base model loads once per process.
    reuse_workers: bool = True
    storage_path: str = "runs"
    ray_address: str | None = None
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_metric(cls, data: Any) -> Any:
        # Without images the default ranking loss is val_loss only where there are held-out images.
        if not isinstance(data, dict):
            return data
        ev = data.get("evaluation") or {}
        if isinstance(ev, dict) and ev.get("images") is None and ev.get("metric", "auto") == "auto":
            d = ((data.get("base") or {}).get("data") or {}) if isinstance(data.get("base"), dict) else {}
            held = isinstance(d, dict) and (d.get("validation_split") or d.get("validation_path"))
            return {**data, "evaluation": {**ev, "metric": "val_loss" if held else "fixed_train_loss"}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _sections_of_other_methods(cls, data: Any) -> Any:
        # `base` is one method's run config; in a sweep across methods it also carries the other
        # searched methods' sections, which move to `method_sections` (check_space_against_base
        # validates each against its method). Without `base.method`, the method is that of the
        # first search space (or of the one section given).
        if not isinstance(data, dict) or not isinstance(data.get("base"), dict):
            return data
        base = dict(data["base"])
        present = [m for m, sec in METHOD_SECTIONS.items() if base.get(sec) is not None]
        if "method" not in base:
            first = _first_space_method((data.get("search") or {}).get("spaces", ("lora",)))
            base["method"] = first or (present[0] if len(present) == 1 else "lora")
        own = METHOD_SECTIONS.get(base["method"])
        moved = dict(data.get("method_sections") or {})
        for method in present:
            if METHOD_SECTIONS[method] != own:
                section = base.pop(METHOD_SECTIONS[method])
                if not isinstance(section, dict):
                    raise ValueError(f"base.{METHOD_SECTIONS[method]}: expected a mapping of {method} settings, "
                                     f"got {section!r}")
                moved[method] = section
        return {**data, "base": base, "method_sections": moved}

    @model_validator(mode="before")
    @classmethod
    def _token_from_evaluation(cls, data: Any) -> Any:
        # One name for the concept: the evaluation prompts' {token} is what the captions say, so
        # base.token (which a method such as textual inversion reads) defaults to it.
        if not isinstance(data, dict) or not isinstance(data.get("base"), dict):
            return data
        ev = data.get("evaluation") or {}
        images = ev.get("images") if isinstance(ev, dict) else None
        gen = images.get("generation") if isinstance(images, dict) else None
        token = gen.get("token") if isinstance(gen, dict) else None
        base_token = data["base"].get("token")
        if token is None:
            return data
        if base_token is None:
            return {**data, "base": {**data["base"], "token": token}}
        if base_token != token:
            raise ValueError(f"base.token {base_token!r} and evaluation.images.generation.token {token!r} differ; "
                             "they name the same concept (the captions' words): make them equal or drop base.token")
        return data

    @field_validator("storage_path")
    @classmethod
    def _a_filesystem_path(cls, v: str) -> str:
        # A URI would otherwise be read as a relative directory named "s3:" under the current one.
        if "://" in v:
            raise ValueError(f"storage_path {v!r}: URIs (s3://, gs://, ...) are not supported yet; use a filesystem "
                             "path, on a cluster a shared mount every node sees (NFS, EFS; docs/SWEEPS.md)")
        return v

    @model_validator(mode="after")
    def _val_loss_needs_held_out_images(self) -> "SweepConfig":
        ev = self.evaluation
        if not self.base.data.has_validation and "val_loss" in (ev.metric, *(ev.objectives or ())):
            raise ValueError("evaluation: val_loss needs held-out images: set base.data.validation_split "
                             "(e.g. 0.2) or base.data.validation_path, or rank by fixed_train_loss (the same "
                             "deterministic loss measured on the training images)")
        return self

    @model_validator(mode="after")
    def _grace_fits(self) -> "SweepConfig":
        s = self.scheduler
        try:
            clock = self.time_attr
        except ValueError:  # a search space that does not load: check_space_against_base names it
            clock = s.time_attr
        if clock == "step" and s.grace_period and s.grace_period > self.base.train.max_train_steps:
            raise ValueError(f"scheduler.grace_period ({s.grace_period:g}) exceeds "
                             f"base.train.max_train_steps ({self.base.train.max_train_steps})")
        if s.grace_period and s.max_t and s.grace_period > s.max_t:
            raise ValueError(f"scheduler.grace_period ({s.grace_period:g}) exceeds scheduler.max_t ({s.max_t:g})")
        return self

    @property
    def mode(self) -> str:
        """The optimisation direction of the metric (its natural one unless set)."""
        return self.evaluation.mode or natural_mode(self.evaluation.metric)

    @property
    def objective_modes(self) -> list[str]:
        """The direction of each multi-objective metric (empty without ``objectives``)."""
        return [natural_mode(o) for o in self.evaluation.objectives or ()]

    def search_space(self) -> SearchSpace:
        """The compiled define-by-run search space of this sweep."""
        return build_search_space([load_space(s) for s in self.search.spaces])

    @property
    def time_attr(self) -> str:
        """What the scheduler measures time in (``scheduler.time_attr`` with ``auto`` resolved)."""
        if self.scheduler.time_attr != "auto":
            return self.scheduler.time_attr
        return "step" if len(self.search_space().methods) == 1 else "trainer_s"

    def method_section(self, method: str) -> dict[str, Any] | None:
        """The settings section the user gave for ``method`` (None: that method's defaults)."""
        if method == self.base.method:
            return self.base.settings.model_dump(mode="json")
        return self.method_sections.get(method)


def _first_space_method(spaces: Any) -> str | None:
    """The method of the first entry of a raw ``search.spaces`` (None if it does not load: the
    space's own validation reports that later, naming the problem)."""
    try:
        return load_space(spaces[0]).method if spaces else None
    except (ValueError, TypeError, KeyError, IndexError, OSError):
        return None


def apply_hyperparameters(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the ``base`` run-config mapping with dotted ``params`` set in it."""
    out = copy.deepcopy(base)
    for key, value in params.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or a section dumped as null (another method's)
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def trial_run_config(sweep: SweepConfig, params: dict[str, Any], source: str = "trial") -> RunConfig:
    """Validate the run config of one trial: ``base`` with the trial's method (its ``method``
    parameter; default the base's) and that method's settings section only, plus its
    hyperparameters."""
    method = params.get("method", sweep.base.method)
    base = sweep.base.model_dump(mode="json")
    for section in METHOD_SECTIONS.values():
        base[section] = None
    base["method"] = method
    if method in METHOD_SECTIONS:  # else RunConfig's own check names the valid methods
        base[METHOD_SECTIONS[method]] = sweep.method_section(method)
    merged = apply_hyperparameters(base, params)
    return validate_mapping(merged, RunConfig, source)


def extra_data_run_config(sweep: SweepConfig, method: str) -> RunConfig:
    """The run config ``method``'s once-per-sweep extra data (``Trainer.prepare_extra``, e.g.
    DreamBooth's class images) is built for: its ``extra_data_keys`` at the largest values the
    search space can ask for, so every trial's share of it exists."""
    from trainers import get_trainer_class

    space = sweep.search_space()
    largest = {k: space.largest(method, k) for k in get_trainer_class(method).extra_data_keys}
    params = {"method": method, **{k: v for k, v in largest.items() if v is not None}}
    return trial_run_config(sweep, params, source=f"{method} extra data")


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep file; also check that its search space compiles and that every
    searched parameter is a key the run config accepts (trying each method's defaults).
    Relative local paths are resolved against the current directory here, once: Ray runs each
    trial in its own working directory, where they would point elsewhere."""
    raw = read_yaml(path)
    if overrides:
        raw = apply_hyperparameters(raw, overrides)
    cfg = validate_mapping(raw, SweepConfig, str(path))
    cfg = absolute_paths(cfg, Path.cwd())
    check_space_against_base(cfg, str(path))
    return cfg


def _abs(value: str | None, root: Path, *, must_exist: bool = False) -> str | None:
    if value is None or value.startswith("builtin:") or Path(value).is_absolute():
        return value
    candidate = root / value
    if must_exist and not candidate.exists():
        return value  # e.g. a hub id "org/name": not a local path
    return str(candidate.resolve())


def absolute_paths(cfg: SweepConfig, root: Path) -> SweepConfig:
    """The same config with every relative local path made absolute against ``root``."""
    base, search = cfg.base, cfg.search
    model = base.model.model_copy(update={
        "source": _abs(base.model.source, root, must_exist=True),
        "single_file_config": _abs(base.model.single_file_config, root, must_exist=True)})
    data = base.data.model_copy(update={"path": _abs(base.data.path, root),
                                        "validation_path": _abs(base.data.validation_path, root)})
    base = base.model_copy(update={"model": model, "data": data, "cache_dir": _abs(base.cache_dir, root)})
    spaces = tuple(_abs(s, root, must_exist=True) if isinstance(s, str) and Path(s).suffix in (".yaml", ".yml")
                   else s for s in search.spaces)
    storage = search.storage
    parsed = parse_storage_url(storage)
    if parsed is not None and not parsed[1].is_absolute():
        prefix = "sqlite:///" if parsed[0] == "sqlite" else "journal:"
        storage = prefix + str((root / parsed[1]).resolve())
    search = search.model_copy(update={"spaces": spaces, "storage": storage})
    return cfg.model_copy(update={"base": base, "search": search,
                                  "storage_path": _abs(cfg.storage_path, root)})


def check_space_against_base(cfg: SweepConfig, source: str) -> None:
    """Fail before any work if a method's defaults produce an invalid run config (for example a
    searched key that does not exist, such as ``lora.rnak``, or a bad value in a method's section),
    or if ``base`` holds settings of a method no search space searches (they would be ignored)."""
    try:
        spaces = [load_space(s) for s in cfg.search.spaces]
        build_search_space(spaces)
    except ValueError as err:
        raise ConfigError(f"{source}: search.spaces: {err}") from None
    searched = [s.method for s in spaces]
    if cfg.base.method not in searched:
        raise ConfigError(f"{source}: base.method {cfg.base.method!r} is not searched (search.spaces are for "
                          f"{searched}); set base.method to one of them, or omit it (it defaults to the first)")
    clock = _scheduler_clock_problem(cfg)
    if clock:
        raise ConfigError(f"{source}: {clock}")
    unsearched = sorted(set(cfg.method_sections) - set(searched))
    if unsearched:
        section = METHOD_SECTIONS.get(unsearched[0], unsearched[0])
        raise ConfigError(f"{source}: base.{section}: settings of a method this sweep does not search "
                          f"(search.spaces are for {searched}); remove the section or add a {unsearched[0]} space")
    for space in spaces:
        params = {"method": space.method, **space.defaults()}
        try:
            trial_run_config(cfg, params, source=f"{source} ({space.method} search space defaults)")
        except ConfigError as err:
            section = METHOD_SECTIONS.get(space.method, space.method)
            raise ConfigError(f"{err}\n  (keys are of the {space.method} trial's run config: base.{section} or the "
                              f"{space.method} search space sets keys or values it rejects)") from None


def _scheduler_clock_problem(cfg: SweepConfig) -> str | None:
    """A scheduler setting its clock cannot default (named key and fix), or None."""
    s = cfg.scheduler
    if cfg.time_attr != "trainer_s":
        return None
    if s.type == "hyperband" and s.max_t is None:
        return ("scheduler.max_t: hyperband on trainer seconds needs it (its brackets are sized from it); "
                "set the seconds a full trial may train, or use scheduler.time_attr: step")
    if s.type == "median" and s.grace_period is None:
        return ("scheduler.grace_period: the median rule on trainer seconds needs it; set the seconds a trial "
                "trains before it can be stopped, or use scheduler.time_attr: step")
    return None
