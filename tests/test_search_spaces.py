"""search_spaces: YAML spaces -> Optuna define-by-run, samplers, storages, and Ray Tune's OptunaSearch.

Every study here is a real Optuna study; the last test runs a real (tiny) Ray Tune sweep.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from search_spaces import (
    CategoricalParam,
    FloatParam,
    IntParam,
    MethodSpace,
    SamplerSettings,
    SearchSpace,
    SearchSpaceError,
    available_spaces,
    build_search_space,
    load_space,
    make_sampler,
    make_storage,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

LORA_DEFAULTS = {
    "train.learning_rate": 1e-4,
    "lora.rank": 8,
    "lora.alpha": 8,
    "lora.dropout": 0.0,
    "train.snr_gamma": 5.0,
    "train.lr_scheduler": "constant",
}
# A second method, inline: shares `train.learning_rate` with LoRA but over a different range.
TI_SPACE = {
    "method": "textual_inversion",
    "params": {
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "default": 5e-3},
        "ti.vectors_per_token": {"type": "int", "low": 1, "high": 8, "default": 1},
    },
}


def run_study(space: SearchSpace, n_trials: int, sampler: optuna.samplers.BaseSampler | None = None,
              enqueue: bool = False) -> tuple[optuna.Study, list[dict[str, Any]]]:
    """Optimize a dummy objective; return the study and every trial's define-by-run output."""
    study = optuna.create_study(direction="maximize", sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    if enqueue:
        for point in space.warm_start_points():
            study.enqueue_trial(point)
    outputs: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = space.define_by_run(trial)
        outputs.append(params)
        # Any deterministic function of the params, so TPE has something to model.
        lr = params["train.learning_rate"]
        return -abs(math.log10(lr) + 3.5) + 0.01 * params.get("lora.rank", 0)

    study.optimize(objective, n_trials=n_trials)
    return study, outputs


def assert_in_space(spec: Any, value: Any) -> None:
    """``value`` is one the declaration allows (range, grid, choice with its type)."""
    if isinstance(spec, FloatParam):
        assert isinstance(value, float) and spec.low <= value <= spec.high
        if spec.step is not None:
            k = (value - spec.low) / spec.step
            assert abs(k - round(k)) < 1e-9, value
    elif isinstance(spec, IntParam):
        assert isinstance(value, int) and spec.low <= value <= spec.high
        assert (value - spec.low) % spec.step == 0
    else:
        assert isinstance(spec, CategoricalParam)
        assert any(type(value) is type(c) and value == c for c in spec.choices), value


# --- loading and define-by-run -------------------------------------------------------------------


def test_shipped_lora_space_loads_with_its_defaults() -> None:
    space = load_space("lora")
    assert "lora" in available_spaces()
    assert space.method == "lora"
    assert space.source.endswith("lora.yaml")
    assert space.defaults() == LORA_DEFAULTS
    # The string form of a path and a Path load the same file.
    assert load_space(Path(space.source)) == space == load_space(space.source)


def test_define_by_run_values_respect_bounds_log_step_and_null_choice() -> None:
    lora = load_space("lora")
    space = build_search_space([lora])
    study, outputs = run_study(space, n_trials=60)
    specs = lora.param_map()
    for out in outputs:
        assert set(out) == set(specs) | {"method"} and out["method"] == "lora"
        for key, spec in specs.items():
            assert_in_space(spec, out[key])
    # Log scale: half of log-uniform draws fall below the geometric middle of [1e-5, 3e-3]
    # (~1.7e-4); a linear scale would put only ~5% there.
    lrs = [o["train.learning_rate"] for o in outputs]
    assert sum(lr < math.sqrt(1e-5 * 3e-3) for lr in lrs) >= 20
    lr_dist = study.trials[0].distributions["train.learning_rate"]
    assert isinstance(lr_dist, optuna.distributions.FloatDistribution) and lr_dist.log
    # Step: dropout lands on the 0.05 grid and more than one grid point is visited.
    dropout_dist = study.trials[0].distributions["lora.dropout"]
    assert isinstance(dropout_dist, optuna.distributions.FloatDistribution) and dropout_dist.step == 0.05
    assert len({round(o["lora.dropout"], 9) for o in outputs}) >= 4
    # Categorical with null: both None and 5.0 are proposed.
    assert {o["train.snr_gamma"] for o in outputs} == {None, 5.0}


def test_int_params_respect_step_and_log() -> None:
    space = build_search_space([load_space({
        "method": "lora",
        "params": {
            "train.max_train_steps": {"type": "int", "low": 100, "high": 1000, "step": 100},
            "lora.rank": {"type": "int", "low": 1, "high": 64, "log": True},
            "train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3},
        },
    })])
    study, outputs = run_study(space, n_trials=40)
    steps = {o["train.max_train_steps"] for o in outputs}
    assert steps <= set(range(100, 1001, 100)) and len(steps) >= 5
    ranks = [o["lora.rank"] for o in outputs]
    assert all(isinstance(r, int) and 1 <= r <= 64 for r in ranks)
    assert sum(r <= 8 for r in ranks) >= 15  # log-uniform: half at or below 8; linear: ~12%
    rank_dist = study.trials[0].distributions["lora.rank"]
    assert isinstance(rank_dist, optuna.distributions.IntDistribution) and rank_dist.log


def test_single_method_uses_plain_optuna_names_and_method_is_a_constant() -> None:
    space = build_search_space([load_space("lora")])
    assert space.methods == ("lora",)
    assert space.fixed() == {"method": "lora"}
    assert space.param_names() == set(LORA_DEFAULTS)
    study, _ = run_study(space, n_trials=3)
    # What optuna-dashboard shows: the dotted keys themselves, no `method` parameter.
    assert set(study.trials[0].params) == set(LORA_DEFAULTS)


def test_two_method_space_suggests_each_methods_params_only_when_chosen() -> None:
    space = build_search_space([load_space("lora"), load_space(TI_SPACE)])
    assert space.fixed() == {}
    assert space.param_names() == set(LORA_DEFAULTS) | {"ti.vectors_per_token", "method"}
    study, outputs = run_study(space, n_trials=30, sampler=make_sampler(SamplerSettings(seed=1)))
    by_method = {m: [o for o in outputs if o["method"] == m] for m in space.methods}
    assert by_method["lora"] and by_method["textual_inversion"]
    for out in by_method["lora"]:
        assert set(out) == set(LORA_DEFAULTS) | {"method"}  # rank yes, vectors_per_token no
        assert 1e-5 <= out["train.learning_rate"] <= 3e-3
    for out in by_method["textual_inversion"]:
        assert set(out) == {"method", "train.learning_rate", "ti.vectors_per_token"}
        assert 1e-3 <= out["train.learning_rate"] <= 1e-2  # TI's own range, not LoRA's
    # In Optuna the shared key is method-qualified; the unshared ones keep their plain names.
    names = set().union(*(t.params for t in study.trials))
    assert {"lora:train.learning_rate", "textual_inversion:train.learning_rate"} <= names
    assert "train.learning_rate" not in names and {"lora.rank", "ti.vectors_per_token"} <= names


def test_flat_params_drops_the_qualified_aliases_ray_adds() -> None:
    space = build_search_space([load_space("lora"), load_space(TI_SPACE)])
    # What OptunaSearch hands a trial: captured suggest_* values merged with the returned dict.
    ray_config = {"method": "textual_inversion", "textual_inversion:train.learning_rate": 0.005,
                  "ti.vectors_per_token": 2, "train.learning_rate": 0.005, "other": 1}
    assert space.flat_params(ray_config) == {
        "method": "textual_inversion", "train.learning_rate": 0.005, "ti.vectors_per_token": 2}
    with pytest.raises(SearchSpaceError, match=r"ti\.vectors_per_token"):
        space.flat_params({"method": "textual_inversion", "train.learning_rate": 0.005})
    with pytest.raises(SearchSpaceError, match="dreambooth.*lora"):
        space.flat_params({"method": "dreambooth"})


def test_search_space_pickles_for_ray_checkpoints() -> None:
    space = build_search_space([load_space("lora"), load_space(TI_SPACE)])
    clone = pickle.loads(pickle.dumps(space.define_by_run)).__self__
    assert clone == space


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-4` as a string; inside choices that would change the type.
    path = tmp_path / "mine.yaml"
    path.write_text("method: lora\nparams:\n  train.learning_rate: "
                    "{type: categorical, choices: [1e-4, 3E-4, '1e-3'], default: 1e-4}\n")
    spec = load_space(path).param_map()["train.learning_rate"]
    assert isinstance(spec, CategoricalParam)
    assert spec.choices == (1e-4, 3e-4, "1e-3") and spec.default == 1e-4


# --- validation errors ---------------------------------------------------------------------------

FLOAT = {"type": "float", "low": 0.1, "high": 1.0}


@pytest.mark.parametrize(
    ("decl", "needles"),
    [
        ({**FLOAT, "lo": 1}, ["field `lo`", "unknown", "remove it"]),
        ({**FLOAT, "low": 1.0, "high": 0.5}, ["field `high`", "greater than low"]),
        ({**FLOAT, "low": 1.0, "high": 1.0}, ["field `high`", "greater than low"]),
        ({**FLOAT, "low": 0.0, "log": True}, ["field `low`", "log: true needs low > 0"]),
        ({"type": "int", "low": 0, "high": 8, "log": True}, ["field `low`", "low > 0"]),
        ({**FLOAT, "log": True, "step": 0.1}, ["field `step`", "mutually exclusive"]),
        ({"type": "int", "low": 1, "high": 9, "log": True, "step": 2}, ["field `step`", "mutually exclusive"]),
        ({**FLOAT, "low": 0.0, "step": 0.3}, ["field `step`", "does not divide"]),
        ({"type": "int", "low": 0, "high": 10, "step": 3}, ["field `step`", "does not divide"]),
        ({**FLOAT, "default": 2.0}, ["field `default`", "outside"]),
        ({"type": "int", "low": 1, "high": 8, "default": 0}, ["field `default`", "outside"]),
        ({**FLOAT, "low": 0.0, "step": 0.25, "default": 0.3}, ["field `default`", "grid"]),
        ({"type": "categorical", "choices": [4, 8], "default": 3}, ["field `default`", "not among choices"]),
        ({"type": "categorical", "choices": [4, 8], "default": 8.0}, ["field `default`", "same type"]),
        ({"type": "categorical", "choices": []}, ["field `choices`", "empty"]),
        ({"type": "categorical", "choices": [1, True]}, ["field `choices`", "twice"]),
        ({"type": "categorical", "choices": [[1, 2]]}, ["field `choices`", "scalar"]),
        ({"type": "floaty", "low": 1}, ["field `type`", "float", "categorical"]),
        ({"low": 0.1, "high": 1.0}, ["field `type`"]),
        ({"type": "float", "low": 0.1}, ["field `high`", "required"]),
        ({"type": "int", "low": 1.0, "high": 8}, ["field `low`", "whole number"]),
        ({**FLOAT, "log": "yes"}, ["field `log`", "true or false"]),
        ({**FLOAT, "default": None}, ["field `default`", "null"]),
        (5, ["not a mapping"]),
    ],
)
def test_invalid_parameter_is_named_with_its_field_and_fix(decl: Any, needles: list[str]) -> None:
    with pytest.raises(SearchSpaceError) as info:
        load_space({"method": "lora", "params": {"lora.some_param": decl}})
    message = str(info.value)
    assert message.startswith("search space inline")
    assert "parameter `lora.some_param`" in message and "Fix:" in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    ("name", "needle"),
    [("lr", "not a dotted run-config key"), ("train.", "not a dotted"), ("method", "cannot be tuned")],
)
def test_bad_parameter_name_is_an_error(name: str, needle: str) -> None:
    with pytest.raises(SearchSpaceError, match=needle) as info:
        load_space({"method": "lora", "params": {name: FLOAT}})
    assert f"parameter `{name}`" in str(info.value)


def test_error_in_a_file_names_the_file_and_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("method: lora\nparams:\n"
                    "  train.learning_rate: {type: float, low: 1.0, high: 0.1}\n"
                    "  lora.rank: {type: categorical, choices: [4, 8], default: 3}\n")
    with pytest.raises(SearchSpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message and "2 problems" in message
    assert "parameter `train.learning_rate`, field `high`" in message
    assert "parameter `lora.rank`, field `default`" in message


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"method": "lora"}, "`params` is missing"),
        ({"method": "lora", "params": {}}, "`params` is empty"),
        ({"method": "lora", "params": {"a.b": FLOAT}, "extra": 1}, "unknown top-level key `extra`"),
        ({"method": "LoRA v2", "params": {"a.b": FLOAT}}, "not a method name"),
    ],
)
def test_bad_top_level_is_an_error(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(SearchSpaceError, match=needle):
        load_space(doc)


def test_unknown_method_name_lists_the_available_space_files() -> None:
    with pytest.raises(SearchSpaceError, match=r"'no_such_method'.*available: \['dreambooth', 'lora', 'textual_inversion'\]"):
        load_space("no_such_method")


def test_missing_space_file_and_bad_yaml_are_named(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nparams: {a.b: [\n")
    with pytest.raises(SearchSpaceError, match=f"{bad}: not valid YAML"):
        load_space(bad)


def test_combining_spaces_rejects_none_and_duplicate_methods() -> None:
    with pytest.raises(SearchSpaceError, match="no search spaces"):
        build_search_space([])
    with pytest.raises(SearchSpaceError, match="two search spaces for method 'lora'.*lora.yaml and inline"):
        build_search_space([load_space("lora"), load_space({"method": "lora", "params": {"a.b": FLOAT}})])


# --- warm start ----------------------------------------------------------------------------------


def test_warm_start_defaults_come_out_first() -> None:
    space = build_search_space([load_space("lora")])
    assert space.warm_start_points() == [LORA_DEFAULTS]
    study, outputs = run_study(space, n_trials=3, sampler=make_sampler(SamplerSettings()), enqueue=True)
    assert study.trials[0].params == LORA_DEFAULTS
    assert outputs[0] == {"method": "lora", **LORA_DEFAULTS}
    assert outputs[1] != outputs[0]


def test_multi_method_warm_start_uses_optuna_names_one_point_per_method() -> None:
    space = build_search_space([load_space("lora"), load_space(TI_SPACE)])
    points = space.warm_start_points()
    assert [p["method"] for p in points] == ["lora", "textual_inversion"]
    assert points[1] == {"method": "textual_inversion",
                         "textual_inversion:train.learning_rate": 5e-3, "ti.vectors_per_token": 1}
    study, outputs = run_study(space, n_trials=3, sampler=make_sampler(SamplerSettings()), enqueue=True)
    assert [t.params for t in study.trials[:2]] == points
    # ...while define-by-run hands back plain keys.
    assert outputs[0] == {"method": "lora", **LORA_DEFAULTS}
    assert outputs[1] == {"method": "textual_inversion", "train.learning_rate": 5e-3, "ti.vectors_per_token": 1}


def test_params_without_default_are_sampled_in_the_warm_start_trial() -> None:
    space = build_search_space([load_space({"method": "lora", "params": {
        "lora.rank": {"type": "categorical", "choices": [4, 8], "default": 4},
        "train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3},
    }})])
    assert space.warm_start_points() == [{"lora.rank": 4}]
    study, outputs = run_study(space, n_trials=1, enqueue=True)
    assert outputs[0]["lora.rank"] == 4 and 1e-5 <= outputs[0]["train.learning_rate"] <= 1e-3


# --- samplers ------------------------------------------------------------------------------------


def rng_state(rng: np.random.RandomState) -> list[int]:
    """The Mersenne-Twister key: equal keys mean equally seeded generators."""
    state = rng.get_state(legacy=True)
    assert isinstance(state, tuple)
    return list(state[1].tolist())


@pytest.mark.parametrize(
    "settings",
    [SamplerSettings(),
     SamplerSettings(seed=7, multivariate=False, group=False, constant_liar=False, n_startup_trials=11)],
)
def test_make_sampler_sets_every_tpe_setting_explicitly(settings: SamplerSettings) -> None:
    sampler = make_sampler(settings)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # Private attributes: Optuna exposes no getters, and these are what the sampler runs on.
    assert sampler._multivariate is settings.multivariate
    assert sampler._group is settings.group
    assert sampler._constant_liar is settings.constant_liar
    assert sampler._n_startup_trials == settings.n_startup_trials
    assert sampler._n_ei_candidates == 24
    assert rng_state(sampler._rng.rng) == rng_state(np.random.RandomState(settings.seed))


def test_make_sampler_random_uses_the_seed() -> None:
    sampler = make_sampler(SamplerSettings(type="random", seed=5))
    assert type(sampler) is optuna.samplers.RandomSampler
    assert rng_state(sampler._rng.rng) == rng_state(np.random.RandomState(5))


def test_make_sampler_does_not_warn() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the `group` ExperimentalWarning is deliberately muted
        make_sampler(SamplerSettings())


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"multivariate": False}, "field `group`"),
        ({"type": "random", "n_startup_trials": 10}, "field `n_startup_trials`"),
        ({"type": "cmaes"}, "type"),
        ({"seeed": 1}, "seeed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampler_settings_are_named(kwargs: dict[str, Any], needle: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        SamplerSettings(**kwargs)


def proposals(seed: int) -> list[dict[str, Any]]:
    space = build_search_space([load_space("lora"), load_space(TI_SPACE)])
    # n_startup_trials=4 of 10: the last six come from the TPE model, not the random start.
    study, _ = run_study(space, n_trials=10, sampler=make_sampler(SamplerSettings(seed=seed)))
    return [t.params for t in study.trials]


def test_same_seed_gives_same_proposals_and_another_seed_differs() -> None:
    first = proposals(seed=3)
    assert proposals(seed=3) == first
    assert proposals(seed=4) != first


# --- storages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["sqlite", "journal"])
def test_storage_persists_a_study_across_storage_objects(tmp_path: Path, form: str) -> None:
    target = tmp_path / "runs" / "sweep-1" / ("optuna.db" if form == "sqlite" else "optuna.log")
    url = f"sqlite:///{target}" if form == "sqlite" else f"journal:{target}"  # absolute: 4 slashes
    space = build_search_space([load_space("lora")])
    study = optuna.create_study(study_name="s", storage=make_storage(url), direction="maximize",
                                sampler=make_sampler(SamplerSettings()))
    study.optimize(lambda t: float(space.define_by_run(t)["lora.rank"]), n_trials=3)
    assert target.is_file()  # parent directories were created
    storage = make_storage(url)
    assert storage is not None
    reopened = optuna.load_study(study_name="s", storage=storage)
    assert len(reopened.trials) == 3
    assert [t.params for t in reopened.trials] == [t.params for t in study.trials]


def test_no_storage_url_means_in_memory() -> None:
    assert make_storage(None) is None


@pytest.mark.parametrize("url", ["postgresql://host/db", "optuna.db", "sqlite:///", "sqlite:///:memory:", "journal:"])
def test_bad_storage_url_names_the_key_and_the_accepted_forms(url: str) -> None:
    with pytest.raises(SearchSpaceError, match=r"search\.storage.*sqlite:///.*journal:"):
        make_storage(url)


# --- Ray Tune ------------------------------------------------------------------------------------


def tune_sweep(space: SearchSpace, storage_path: Path, name: str) -> list[Any]:
    """Run 6 trials (2 at a time) of OptunaSearch over ``space``; results in creation order."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict[str, Any]) -> None:
        # Defined here so Ray pickles it by value (the test module is not importable in workers).
        import math as m

        score = -abs(m.log10(config["train.learning_rate"]) + 3.5) + config.get("lora.rank", 0) / 64
        tune.report({"score": score})

    search = OptunaSearch(
        space=space.define_by_run,
        metric="score",
        mode="max",
        sampler=make_sampler(SamplerSettings(seed=0)),
        points_to_evaluate=space.warm_start_points(),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search, num_samples=6, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(storage_path), name=name, verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 6 and not results.errors
    # Ray 2.60 trial ids are random hex; the experiment tag starts with the creation index.
    trials = [results[i] for i in range(len(results))]
    return sorted(trials, key=lambda r: int(r.metrics["experiment_tag"].split("_")[0]))


@pytest.mark.slow
def test_ray_tune_optuna_search_runs_warm_start_first_then_proposals(tmp_path: Path, ray_local: object) -> None:
    lora, ti = load_space("lora"), load_space(TI_SPACE)
    single = tune_sweep(build_search_space([lora]), tmp_path, "lora")
    both_space = build_search_space([lora, ti])
    both = tune_sweep(both_space, tmp_path, "lora-and-ti")

    # One method: the warm start first, then six different configs, all inside the space.
    assert single[0].config == {"method": "lora", **LORA_DEFAULTS}
    for r in single:
        assert "score" in r.metrics and r.config["method"] == "lora"
        for key, spec in lora.param_map().items():
            assert_in_space(spec, r.config[key])
    assert len({tuple(sorted(map(str, r.config.items()))) for r in single}) == 6

    # Two methods: each method's defaults first; each trial carries only its method's keys
    # (plus the qualified alias OptunaSearch copies in, which flat_params drops).
    flat = [both_space.flat_params(r.config) for r in both]
    assert flat[0] == {"method": "lora", **LORA_DEFAULTS}
    assert flat[1] == {"method": "textual_inversion", "train.learning_rate": 5e-3, "ti.vectors_per_token": 1}
    for r, params in zip(both, flat):
        method_space = lora if params["method"] == "lora" else ti
        assert set(params) == {"method", *method_space.param_map()}
        assert r.config[f"{params['method']}:train.learning_rate"] == params["train.learning_rate"]
        for key, spec in method_space.param_map().items():
            assert_in_space(spec, params[key])
