"""Sweep file validation, hyperparameter application, and how trial outcomes reach Optuna."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

from sweeps.config import SweepConfig, apply_hyperparameters, load_sweep, trial_run_config
from trainers.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo.yaml"
TINY_DEMO = REPO / "sweeps" / "configs" / "tiny-demo.yaml"


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    mutate(raw)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_the_demo_sweep_validates():
    cfg = load_sweep(DEMO)
    assert cfg.search.num_samples == 8 and cfg.scheduler.type == "asha"
    # The demo ranks by the CLIP composite (the default metric once image evaluation is on).
    assert cfg.evaluation.metric == "composite" and cfg.mode == "max"
    images = cfg.evaluation.images
    assert images is not None and images.clip == "builtin:toyworld" and cfg.base.model.source == "builtin:toyworld"
    # Ground truth is reported beside the CLIP scores but the composite ranks by CLIP alone.
    assert {"concept_rate", "prior_kept"} <= set(images.metrics)
    assert set(images.composite_weights()) == {"clip_t", "clip_i"}
    assert cfg.search_space().fixed() == {"method": "lora"}


def test_the_tiny_demo_sweep_validates():
    cfg = load_sweep(TINY_DEMO)
    assert cfg.evaluation.images is not None and cfg.evaluation.images.clip == "builtin:tiny-clip"
    assert cfg.base.model.source == "builtin:tiny-sd" and cfg.evaluation.metric == "composite"


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c.update(schedular={"type": "asha"}), ["schedular", "unknown key"]),
    (lambda c: c["evaluation"].update(metric="clip_score"), ["evaluation.metric", "clip_score", "val_loss"]),
    (lambda c: c["scheduler"].update(grace_period=1000), ["grace_period", "max_train_steps"]),
    (lambda c: c["search"].update(num_samples=0), ["search.num_samples"]),
    (lambda c: c["resources"].update(gpu=-1), ["resources.gpu"]),
    (lambda c: c["base"]["train"].update(learning_rat=1), ["base.train.learning_rat", "unknown key"]),
    (lambda c: c["search"].update(spaces=[{"method": "lora", "params": {
        "lora.rnak": {"type": "categorical", "choices": [4, 8], "default": 4}}}]), ["lora.rnak"]),
    (lambda c: c["search"].update(spaces=[{"method": "lora", "params": {
        "train.learning_rate": {"type": "float", "low": 1.0, "high": 0.1}}}]), ["train.learning_rate", "low"]),
    (lambda c: c["search"].update(spaces=["no_such_method"]), ["no_such_method", "available"]),
])
def test_bad_sweep_file_is_rejected_before_any_work_naming_the_key(tmp_path, mutate, words):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_hyperparameters_are_applied_to_nested_keys_without_touching_the_base():
    base = {"train": {"learning_rate": 1e-4, "seed": 3}, "lora": {"rank": 4}}
    out = apply_hyperparameters(base, {"train.learning_rate": 1e-3, "lora.alpha": 16, "method": "lora"})
    assert out == {"train": {"learning_rate": 1e-3, "seed": 3}, "lora": {"rank": 4, "alpha": 16}, "method": "lora"}
    assert base["train"]["learning_rate"] == 1e-4


def test_an_impossible_trial_combination_is_a_config_error_naming_the_key():
    cfg = load_sweep(TINY_DEMO)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        trial_run_config(cfg, {"method": "lora", "train.lr_warmup_steps": 10_000})
    ok = trial_run_config(cfg, {"method": "lora", "train.learning_rate": 5e-4, "lora.rank": 16})
    assert ok.train.learning_rate == 5e-4 and ok.lora.rank == 16 and ok.train.max_train_steps == 60


def _searcher(cfg: SweepConfig):
    from sweeps.driver import make_search

    search = make_search(cfg)
    search.set_search_properties(cfg.evaluation.metric, cfg.mode, {})
    return search


def test_errored_trials_are_told_to_optuna_as_failed_never_as_a_score():
    cfg = load_sweep(DEMO, {"evaluation.metric": "val_loss", "base.data.validation_split": 0.25})
    search = _searcher(cfg)
    for tid in ("ok", "nan", "crashed"):
        assert search.suggest(tid) is not None
    search.on_trial_result("ok", {"val_loss": 0.5, "step": 20, "training_iteration": 1})
    done = {"val_loss": 0.4, "step": 40, "training_iteration": 2, "trial_status": "completed"}
    search.on_trial_result("ok", done)
    search.on_trial_complete("ok", done)
    # Reported once, then raised: Ray's own OptunaSearch would tell COMPLETE with 0.3 here.
    search.on_trial_result("nan", {"val_loss": 0.3, "step": 20, "training_iteration": 1})
    error_report = {"trial_status": "error", "error": "loss became nan", "step": 21, "training_iteration": 2}
    search.on_trial_result("nan", error_report)  # no metric in it: must not raise
    search.on_trial_complete("nan", error_report)
    search.on_trial_complete("crashed", None, error=True)
    trials = search._ot_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.FAIL]
    assert trials[0].value == 0.4 and trials[1].value is None and trials[2].value is None


def test_optuna_is_told_the_best_checkpoint_the_leaderboard_ranks_and_early_stops_as_pruned():
    cfg = load_sweep(DEMO)  # ranks by composite (max)
    search = _searcher(cfg)
    for tid in ("peaked", "stopped"):
        search.suggest(tid)
    curve = [0.50, 0.62, 0.55, 0.58]  # the best checkpoint is the second evaluation, not the last
    for i, v in enumerate(curve, 1):
        r = {"composite": v, "step": 150 * i, "training_iteration": i,
             "trial_status": "completed" if i == len(curve) else "running"}
        search.on_trial_result("peaked", r)
    search.on_trial_complete("peaked", r)  # Ray's OptunaSearch would tell the last value, 0.58
    early = {"composite": 0.7, "step": 150, "training_iteration": 1, "trial_status": "running"}
    search.on_trial_result("stopped", early)
    search.on_trial_complete("stopped", early)  # ASHA stopped it after its first evaluation
    peaked, stopped = search._ot_study.get_trials(deepcopy=False)
    assert peaked.state == optuna.trial.TrialState.COMPLETE and peaked.value == max(curve)
    assert stopped.state == optuna.trial.TrialState.PRUNED  # not COMPLETE: it never ran to the end
    assert stopped.intermediate_values == {1: 0.7}  # what TPE ranks pruned trials by (step, value)


@pytest.mark.slow
def test_under_asha_optuna_is_told_the_last_evaluation_when_it_is_the_best(ray_local, tmp_path):
    """Ray Tune itself decides which reports the searcher sees: under ASHA, the report on which the
    scheduler stops a trial -- at max_t, the completed trial's last -- goes to on_trial_complete
    only. A searcher that kept its best from on_trial_result alone told Optuna an earlier value."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweeps.driver import make_search

    def rising_curve(config: dict) -> None:  # (nested: Ray pickles it by value for its workers)
        """Reports as a trial does; composite rises, so the last report is the best."""
        for step in (1, 2, 3):
            tune.report({"composite": 0.1 * step, "step": step,
                         "trial_status": "completed" if step == 3 else "running"})

    cfg = load_sweep(DEMO, {"search.num_samples": 2})  # ranks by composite (max)
    search = make_search(cfg)
    asha = ASHAScheduler(time_attr="step", max_t=3, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(rising_curve, tune_config=tune.TuneConfig(
        search_alg=search, scheduler=asha, num_samples=2, metric="composite", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0))
    grid = tuner.fit()
    assert not grid.errors
    study = search._ot_study
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert done, [t.state for t in study.get_trials(deepcopy=False)]
    for t in done:  # each trial that ran to step 3: its best, the last report, is what Optuna has
        assert t.value == pytest.approx(0.3) and t.user_attrs["sdsweep_best_step"] == 3, (t.value, t.user_attrs)


def test_multi_objective_search_tells_optuna_both_values_and_keeps_a_pareto_front():
    cfg = load_sweep(DEMO, {"evaluation.objectives": ["clip_t", "clip_i"]})
    assert cfg.evaluation.metric == "composite"  # what ASHA and checkpoint retention still use
    search = _searcher(cfg)
    assert search.metric == ["clip_t", "clip_i"] and search.mode == ["max", "max"]
    assert [d.name for d in search._ot_study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    for tid in ("a", "b", "c", "err"):
        search.suggest(tid)
    def finish(tid: str, clip_t: float, clip_i: float) -> None:
        r = {"clip_t": clip_t, "clip_i": clip_i, "composite": 0.5 * (clip_t / 100 + clip_i), "step": 40,
             "training_iteration": 2, "trial_status": "completed"}
        search.on_trial_result(tid, r)
        search.on_trial_complete(tid, r)

    search.on_trial_result("a", {"clip_t": 20.0, "clip_i": 0.4, "composite": 0.3, "step": 20})
    finish("a", 21.0, 0.50)
    finish("b", 19.0, 0.70)
    finish("c", 18.0, 0.60)  # dominated by b
    search.on_trial_complete("err", {"trial_status": "error", "step": 3})
    study = search._ot_study
    assert [t.values for t in study.get_trials(deepcopy=False)][:3] == [[21.0, 0.5], [19.0, 0.7], [18.0, 0.6]]
    assert study.get_trials(deepcopy=False)[3].state == optuna.trial.TrialState.FAIL
    assert sorted(t.values for t in study.best_trials) == [[19.0, 0.7], [21.0, 0.5]]
    # optuna-dashboard's Pareto front and axes by sdsweep's names, each trial labelled as the leaderboard does
    assert study.metric_names == ["clip_t", "clip_i"]
    attrs = [t.user_attrs for t in study.get_trials(deepcopy=False)]
    assert [a["sdsweep_trial_id"] for a in attrs] == ["a", "b", "c", "err"]
    assert [a["sdsweep_status"] for a in attrs] == ["completed", "completed", "completed", "error"]
    assert attrs[0]["sdsweep_best_step"] == 40 and "sdsweep_best_step" not in attrs[3]


@pytest.mark.parametrize("objectives, fragment", [
    (["clip_t"], "two or more"),
    (["clip_t", "clip_t"], "two or more"),
    (["clip_t", "fid"], "unknown ['fid']"),
])
def test_bad_objectives_are_errors_naming_the_key(tmp_path, objectives, fragment):
    p = _write(tmp_path, lambda c: c["evaluation"].update(objectives=objectives))
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        load_sweep(p)
    assert "evaluation.objectives" in str(err.value)


def test_image_metrics_need_image_evaluation(tmp_path):
    def no_images(c):
        c["evaluation"].pop("images")
        c["evaluation"]["metric"] = "clip_t"
    with pytest.raises(ConfigError, match=r"image metrics need evaluation.images"):
        load_sweep(_write(tmp_path, no_images))
    plain = _write(tmp_path, lambda c: c["evaluation"].pop("images"))
    # The default without images: the deterministic loss, on the training images -- and named so.
    assert load_sweep(plain).evaluation.metric == "fixed_train_loss"
    with pytest.raises(ConfigError, match=r"val_loss needs held-out images.*validation_split"):
        load_sweep(_write(tmp_path, lambda c: (c["evaluation"].pop("images"),
                                               c["evaluation"].update(metric="val_loss"))))
    split = _write(tmp_path, lambda c: (c["evaluation"].pop("images"), c["base"]["data"].update(validation_split=0.25)))
    assert load_sweep(split).evaluation.metric == "val_loss"  # held-out images: the real thing


def test_warm_start_enqueues_the_known_good_defaults_first():
    cfg = load_sweep(TINY_DEMO)  # search_spaces/lora.yaml's defaults
    first = _searcher(cfg).suggest("t0")
    assert first["train.learning_rate"] == 1e-4 and first["lora.rank"] == 8 and first["method"] == "lora"


def test_scheduler_choices_build_with_steps_as_time():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    from sweeps.driver import make_scheduler

    cfg = load_sweep(DEMO)
    kinds = {"asha": ASHAScheduler, "hyperband": HyperBandScheduler, "median": MedianStoppingRule,
             "none": FIFOScheduler}
    for name, cls in kinds.items():
        sched = make_scheduler(cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update={"type": name})}))
        assert isinstance(sched, cls)
        if name != "none":
            assert sched._time_attr == "step"


@pytest.mark.parametrize("sampler", [{"type": "tpe", "seed": 1}, {"type": "random", "seed": 2}])
def test_a_sweep_config_survives_the_dump_reload_round_trip_workers_and_resume_use(tmp_path, sampler):
    path = _write(tmp_path, lambda c: c["search"].update(sampler=sampler))
    cfg = load_sweep(path)
    assert SweepConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_relative_paths_are_resolved_at_load_because_trials_run_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "my-data").mkdir()
    path = _write(tmp_path, lambda c: (c["base"]["data"].update(path="my-data"),
                                       c["search"].update(storage="sqlite:///studies/s.db"),
                                       c.update(storage_path="my-runs")))
    monkeypatch.chdir(tmp_path)
    cfg = load_sweep(path)
    assert cfg.base.data.path == str(tmp_path / "my-data")
    assert cfg.search.storage == f"sqlite:///{tmp_path / 'studies' / 's.db'}"
    assert cfg.storage_path == str(tmp_path / "my-runs")
    assert cfg.base.model.source == "builtin:toyworld"


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c["search"].update(storage="postgres://db/x"), ["search.storage", "postgres"]),
    (lambda c: c.update(storage_path="s3://bucket/runs"), ["storage_path", "s3://bucket/runs", "shared mount"]),
    (lambda c: c["scheduler"].update(type="hyperband", grace_period=10), ["grace_period", "hyperband"]),
    (lambda c: c["scheduler"].update(type="median", grace_period=10, reduction_factor=3), ["reduction_factor"]),
])
def test_settings_that_would_fail_late_or_be_ignored_are_rejected_at_load(tmp_path, mutate, words):
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, mutate))
    for w in words:
        assert w in str(err.value)


def test_a_worker_builds_the_evaluator_once_and_reuses_it_across_trials(monkeypatch):
    from sweeps import trial
    from trainers import metrics, scoring_models

    calls = []
    real = scoring_models.load_clip
    monkeypatch.setattr(scoring_models, "load_clip", lambda spec, *args: calls.append(spec) or real(spec, *args))
    metrics.clear_clip_cache()
    trial._EVALUATORS.clear()
    cfg = load_sweep(DEMO)
    first = trial.worker_evaluator(cfg)
    second = trial.worker_evaluator(load_sweep(DEMO))  # the next trial on this worker
    assert first is not None and first is second
    first.identity()  # touches the CLIP (weights fingerprint)
    second.identity()
    assert calls == ["builtin:toyworld"]
    # Different evaluation settings: a new evaluator, the CLIP still cached.
    other = trial.worker_evaluator(load_sweep(DEMO, {"evaluation.images.generation.steps": 3}))
    assert other is not first and other.cfg.generation.steps == 3
    other.identity()
    assert calls == ["builtin:toyworld"]
    assert trial.worker_evaluator(load_sweep(DEMO, {"evaluation.images": None})) is None
