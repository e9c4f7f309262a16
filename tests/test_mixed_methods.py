"""A sweep across methods, the parts below the end-to-end demo: one base config holding every
searched method's section (each trial gets its own method's only), the scheduler's clock (steps,
images seen, trainer seconds) and its defaults, and a reused worker that serves methods keeping
the base model's modules in different dtypes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from ray.tune.schedulers import TrialScheduler

from conftest import model_digest
from search_spaces import make_sampler
from sweeps.config import SweepConfig, load_sweep, trial_run_config
from sweeps.schedulers import UNBOUNDED_SECONDS, FirstReportGraceASHA, clock_defaults, make_scheduler
from trainers.config import ConfigError, ModelSpec

REPO = Path(__file__).resolve().parents[1]
MIXED = REPO / "sweeps" / "configs" / "demo-mixed.yaml"


def _raw() -> dict[str, Any]:
    return yaml.safe_load(MIXED.read_text())


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_each_trial_gets_its_own_methods_section_and_parameters_only():
    cfg = load_sweep(MIXED)
    assert cfg.base.method == "lora"  # not written: the first search space's method
    assert set(cfg.method_sections) == {"textual_inversion", "dreambooth"}
    space = cfg.search_space()
    for method in space.methods:
        run = trial_run_config(cfg, {"method": method, **{k: v for k, v in _defaults(cfg, method).items()}})
        assert run.method == method
        present = {m for m in ("lora", "textual_inversion", "dreambooth") if getattr(run, m) is not None}
        assert present == {method}, present
    ti = trial_run_config(cfg, {"method": "textual_inversion"}).textual_inversion
    assert ti is not None and ti.initializer == "shape" and ti.placeholder_token == "sks shape"
    db = trial_run_config(cfg, {"method": "dreambooth"}).dreambooth
    assert db is not None and db.prior_loss_weight == 1.0 and len(db.class_prompt or ()) == 16
    lora = trial_run_config(cfg, {"method": "lora"}).lora
    assert lora is not None and "conv1" in lora.target_modules


def _defaults(cfg: SweepConfig, method: str) -> dict[str, Any]:
    space = cfg.search_space()
    return {p.key: p.spec.default for p in space.entries[space.methods.index(method)] if p.spec.has_default}


def test_the_conditional_space_suggests_only_the_drawn_methods_parameters():
    """A real Optuna study over the mixed space: every trial's parameters belong to its method."""
    import optuna

    cfg = load_sweep(MIXED)
    space = cfg.search_space()
    own = {m: {p.key for p in e} for m, e in zip(space.methods, space.entries)}
    assert cfg.search.sampler.group and cfg.search.sampler.multivariate  # TPE models each method's group
    study = optuna.create_study(sampler=make_sampler(cfg.search.sampler))
    for point in space.warm_start_points():
        study.enqueue_trial(point)
    seen = []
    for i in range(16):
        trial = study.ask()
        params = space.define_by_run(trial)
        assert set(params) - {"method"} == own[params["method"]], params
        trial_run_config(cfg, params)  # every proposal is a valid run config of its method
        seen.append(params["method"])
        study.tell(trial, float(i % 3))
    assert seen[:3] == ["lora", "textual_inversion", "dreambooth"]  # warm start: each default once
    assert set(seen[3:]) == set(space.methods)


def test_a_section_of_a_method_no_space_searches_is_an_error_naming_it(tmp_path):
    raw = _raw()
    raw["search"]["spaces"] = [s for s in raw["search"]["spaces"] if s["method"] != "dreambooth"]
    with pytest.raises(ConfigError, match=r"base\.dreambooth: settings of a method this sweep does not search"):
        load_sweep(_write(tmp_path, raw))
    raw = _raw()
    raw["base"]["method"] = "lora"
    raw["search"]["spaces"] = [s for s in raw["search"]["spaces"] if s["method"] != "lora"]
    del raw["base"]["lora"]
    with pytest.raises(ConfigError, match=r"base\.method 'lora' is not searched"):
        load_sweep(_write(tmp_path, raw))


def test_a_bad_value_in_another_methods_section_is_named_at_load(tmp_path):
    raw = _raw()
    raw["base"]["dreambooth"]["num_class_images"] = 0
    with pytest.raises(ConfigError, match=r"(?s)dreambooth search space defaults.*dreambooth\.num_class_images.*base\.dreambooth"):
        load_sweep(_write(tmp_path, raw))


def test_the_mixed_config_survives_the_dump_reload_round_trip():
    cfg = load_sweep(MIXED)
    again = SweepConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    for method in cfg.search_space().methods:
        assert trial_run_config(again, {"method": method}) == trial_run_config(cfg, {"method": method})


def test_the_clock_is_steps_for_one_method_and_trainer_seconds_for_several(tmp_path):
    cfg = load_sweep(MIXED)
    assert cfg.time_attr == "trainer_s"
    assert clock_defaults(cfg) == (None, UNBOUNDED_SECONDS)
    one = load_sweep(REPO / "sweeps" / "configs" / "demo.yaml")
    assert one.time_attr == "step" and clock_defaults(one) == (150, 600)
    raw = _raw()
    raw["scheduler"]["time_attr"] = "images_seen"
    images = load_sweep(_write(tmp_path, raw))
    assert clock_defaults(images) == (150 * 4, 2 * 450 * 4)
    assert make_scheduler(images)._time_attr == "images_seen"
    raw["scheduler"] = {"type": "hyperband", "time_attr": "trainer_s"}
    with pytest.raises(ConfigError, match=r"scheduler\.max_t: hyperband on trainer seconds needs it"):
        load_sweep(_write(tmp_path, raw))
    raw["scheduler"] = {"type": "median"}
    with pytest.raises(ConfigError, match=r"scheduler\.grace_period: the median rule on trainer seconds"):
        load_sweep(_write(tmp_path, raw))


def _trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)


def test_asha_on_trainer_seconds_takes_its_grace_period_from_the_first_report_and_keeps_it(tmp_path):
    """Ray's own ASHA bookkeeping, with rungs at (first report's seconds) x 2^k."""
    sched = FirstReportGraceASHA(time_attr="trainer_s", max_t=UNBOUNDED_SECONDS, grace_period=None,
                                 reduction_factor=2)
    sched.set_search_properties("composite", "max")
    trials = [_trial(f"t{i}") for i in range(4)]
    for t in trials:
        sched.on_trial_add(None, t)
    # The first report (10 s of training) fixes the rungs at 10, 20, 40, ... seconds.
    assert sched.on_trial_result(None, trials[0], {"trainer_s": 10.0, "composite": 0.9}) == TrialScheduler.CONTINUE
    assert sched.grace_period == 10.0
    milestones = sorted(m for m, _ in sched._brackets[0]._rungs)
    assert milestones[:3] == [10.0, 20.0, 40.0]
    # A slower method's first report arrives at 13 s: compared at the 10 s rung, below the cutoff -> stopped.
    assert sched.on_trial_result(None, trials[1], {"trainer_s": 13.0, "composite": 0.5}) == TrialScheduler.STOP
    # Not yet at a rung: no decision.
    assert sched.on_trial_result(None, trials[2], {"trainer_s": 4.0, "composite": 0.1}) == TrialScheduler.CONTINUE
    # The rungs survive Tune's save/restore of the scheduler (a resumed sweep keeps them).
    path = tmp_path / "sched.pkl"
    sched.save(str(path))
    restored = FirstReportGraceASHA(time_attr="trainer_s", max_t=UNBOUNDED_SECONDS, grace_period=None,
                                    reduction_factor=2)
    restored.restore(str(path))
    assert restored.grace_period == 10.0 and restored.grace_fixed
    # An explicit grace period is Ray's ASHA unchanged.
    fixed = FirstReportGraceASHA(time_attr="trainer_s", max_t=100.0, grace_period=5.0, reduction_factor=2)
    assert sorted(m for m, _ in fixed._brackets[0]._rungs)[:2] == [5.0, 10.0]


def test_a_worker_reloads_when_a_method_needs_the_base_modules_in_another_dtype(tmp_path):
    """bf16 on a CPU: LoRA keeps the frozen UNet in bf16, DreamBooth trains it in fp32. A worker that
    served LoRA must hand DreamBooth an unrounded model (and reuse it for the next DreamBooth)."""
    from sweeps.trial import worker_model
    from trainers import get_trainer_class

    spec = ModelSpec(source="builtin:toyworld")
    lora_dtypes = get_trainer_class("lora").base_dtypes(None, torch.bfloat16)
    db_cls = get_trainer_class("dreambooth")
    from trainers.config import DreamBoothSettings

    db_dtypes = db_cls.base_dtypes(DreamBoothSettings(), torch.bfloat16)
    assert lora_dtypes == (torch.bfloat16, torch.bfloat16) and db_dtypes == (torch.float32, torch.bfloat16)
    first, _ = worker_model(spec, "bf16", lora_dtypes)
    first.unet.to(torch.bfloat16)  # what a LoRA trainer does to the shared model
    second, reused = worker_model(spec, "bf16", db_dtypes)
    assert not reused and second is not first
    assert model_digest(second) == model_digest(worker_model(spec, "no", db_dtypes)[0])
    third, reused = worker_model(spec, "no", (torch.float32, torch.float32))
    assert not reused
    assert worker_model(spec, "no", (torch.float32, torch.float32)) == (third, True)

