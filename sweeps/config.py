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
from typing import Any

from pydantic import Field, field_validator, model_validator

from search_spaces import SearchSpace, build_search_space, load_space, parse_storage_url
from sweeps.sections import (ConfirmSettings, EvaluationSettings, ResourceSettings,  # noqa: F401 (re-exported)
                             SchedulerSettings, SearchSettings)
from sweeps.tracking import TrackingSettings
from trainers.config import METHOD_SECTIONS, ConfigError, Frozen, RunConfig, read_yaml, validate_mapping
from sweeps.searched import check_searched_keys, data_variants, largest_value
from trainers.paths import LOCAL_PATH, absolute_path, path_kind, resolve_config_paths
from trainers.metric_modes import COMPOSITE, REPORTED_METRICS, natural_mode  # noqa: F401 (re-exported)


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
    storage_path: str = Field("runs", json_schema_extra=LOCAL_PATH)
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
        try:  # a searched max_train_steps: the longest trial's
            steps = largest_value(self, "train.max_train_steps")
        except ValueError:
            steps = self.base.train.max_train_steps
        if clock == "step" and s.grace_period and s.grace_period > steps:
            raise ValueError(f"scheduler.grace_period ({s.grace_period:g}) exceeds the most steps a trial trains "
                             f"(train.max_train_steps: {steps})")
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
    return sweep_from_mapping(raw, str(path))


def sweep_from_mapping(raw: Any, source: str) -> SweepConfig:
    """:func:`load_sweep` of an already parsed sweep file (``source`` names it in errors)."""
    cfg = validate_mapping(raw, SweepConfig, source)
    cfg = absolute_paths(cfg, Path.cwd())
    check_space_against_base(cfg, source)
    return cfg


def absolute_paths(cfg: SweepConfig, root: Path) -> SweepConfig:
    """The same config with every relative local path made absolute against ``root``: every field
    marked as a path (``trainers.paths``, one rule for the run config, the evaluation and the
    sweep's own sections), the other searched methods' sections, search space files and the
    Optuna storage file."""
    cfg = resolve_config_paths(cfg, root)
    sections = {}
    for method, section in cfg.method_sections.items():
        settings_cls = _settings_class(method)
        if settings_cls is None or not isinstance(section, dict):
            sections[method] = section  # validated (and refused) by check_space_against_base
            continue
        try:
            settings = settings_cls.model_validate(section)
        except ValueError:
            sections[method] = section  # its errors are named when the trial config is validated
            continue
        resolved = resolve_config_paths(settings, root)
        fields = type(resolved).model_fields
        sections[method] = {**section, **{k: getattr(resolved, k) for k in section
                                          if k in fields and path_kind(fields[k]) is not None}}
    search = cfg.search
    spaces = tuple(absolute_path(s, root, must_exist=True) if isinstance(s, str) and Path(s).suffix in (".yaml", ".yml")
                   else s for s in search.spaces)
    storage = search.storage
    parsed = parse_storage_url(storage)
    if parsed is not None and not parsed[1].is_absolute():
        prefix = "sqlite:///" if parsed[0] == "sqlite" else "journal:"
        storage = prefix + str((root / parsed[1]).resolve())
    search = search.model_copy(update={"spaces": spaces, "storage": storage})
    return cfg.model_copy(update={"search": search, "method_sections": sections})


def _settings_class(method: str) -> type | None:
    """The settings class of ``method``'s section of a run config (None: no such method)."""
    import typing

    section = METHOD_SECTIONS.get(method)
    if section is None:
        return None
    for arg in typing.get_args(RunConfig.model_fields[section].annotation):
        if isinstance(arg, type) and issubclass(arg, Frozen):
            return arg
    return None


def check_space_against_base(cfg: SweepConfig, source: str) -> None:
    """Fail before any work if a method's defaults produce an invalid run config (for example a
    searched key that does not exist, such as ``lora.rnak``, or a bad value in a method's section),
    or if ``base`` holds settings of a method no search space searches (they would be ignored)."""
    try:
        spaces = [load_space(s) for s in cfg.search.spaces]
        build_search_space(spaces)
    except ValueError as err:
        raise ConfigError(f"{source}: search.spaces: {err}") from None
    check_searched_keys(build_search_space(spaces), source)
    variants = data_variants(cfg, source)  # every data configuration the space can produce is valid
    ev = cfg.evaluation
    losses = sorted({"val_loss", "fixed_train_loss"} & {ev.metric, *(ev.objectives or ())})
    if len(variants) > 1 and losses:
        searched_data = sorted({p.key for entries in build_search_space(spaces).entries for p in entries
                                if p.key.startswith("data.")})
        raise ConfigError(f"{source}: evaluation ranks by {losses[0]}, but the search space trains trials on "
                          f"{len(variants)} data configurations ({', '.join(searched_data)}): a loss measured on "
                          "each trial's own latents (another resolution, crop, flip or captions) does not compare "
                          "across them; rank by an image score (evaluation.images) or search no data.* key")
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
