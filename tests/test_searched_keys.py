"""A searched key takes effect in every trial or is refused when the sweep file loads
(sweeps/searched.py): data keys get a latent cache per data configuration, a searched step count is
each trial's own budget (ASHA's horizon, the leaderboard's label, the console), and keys a trial
cannot change are refused naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from sweeps.config import load_sweep
from trainers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Image evaluation on the tiny model (one prompt, one seed): what ranks trials trained on different
# data configurations (a loss measured on each trial's own latents would not compare).
IMAGES = {"every": 10, "images": {"generation": {"prompts": ["a photo of {token}"], "token": "sks toy", "seeds": [0],
                                                 "steps": 2},
                                  "clip": "builtin:tiny-clip", "metrics": ["clip_t", "clip_i"]},
          "confirm": None}


def _sweep(tmp_path: Path, params: dict, **over) -> Path:
    cfg = {
        "name": "searched",
        "base": {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                 "train": {"max_train_steps": 40, "train_batch_size": 2}},
        "search": {"spaces": [{"method": "lora", "params": params}],
                   "sampler": {"type": "random", "seed": 1}, "num_samples": 4, "max_concurrent_trials": 2,
                   "warm_start": True},
        "scheduler": {"type": "none"},
        "evaluation": {"every": 10, "metric": "fixed_train_loss"},
        "resources": {"cpu": 1, "gpu": 0},
        "checkpoints_to_keep": 1,
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"wandb": False},
        **over,
    }
    if cfg["search"] is None:  # random seed 4 proposes (resolution, steps) = (64, 20) warm, (32, 20), (64, 40), (32, 40)
        cfg["search"] = {"spaces": [{"method": "lora", "params": params}], "sampler": {"type": "random", "seed": 4},
                         "num_samples": 4, "max_concurrent_trials": 2, "warm_start": True}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("key,why", [
    ("model.source", "one base model"), ("model.revision", "one base model"), ("data.path", "reference images"),
    ("data.validation_split", "same held-out images")])
def test_a_key_no_trial_can_change_is_refused_at_load_naming_it(tmp_path, key, why):
    choices = {"model.source": ["builtin:tiny-sd", "builtin:toyworld"], "model.revision": ["a", "b"],
               "data.path": ["builtin:demo", "builtin:toystar"],
               "data.validation_split": [0.0, 0.25]}[key]
    path = _sweep(tmp_path, {key: {"type": "categorical", "choices": choices}})
    with pytest.raises(ConfigError, match=rf"searches '{key}', which a trial cannot change: .*{why}"):
        load_sweep(path)


def test_a_key_its_method_builds_once_for_every_trial_is_refused(tmp_path):
    path = _sweep(tmp_path, {}, search={"spaces": [{"method": "dreambooth", "params": {
        "dreambooth.class_prompt": {"type": "categorical", "choices": ["a dog", "a photo of a dog"]}}}]})
    with pytest.raises(ConfigError, match=r"searches 'dreambooth.class_prompt', which a trial cannot change: "
                                          r"a sweep draws .* class images once"):
        load_sweep(path)


def test_a_loss_does_not_rank_trials_trained_on_different_data_configurations(tmp_path):
    path = _sweep(tmp_path, {"data.resolution": {"type": "categorical", "choices": [32, 64]}})
    with pytest.raises(ConfigError, match=r"ranks by fixed_train_loss, but .* 2 data configurations "
                                          r"\(data.resolution\).*rank by an image score"):
        load_sweep(path)


def test_a_data_key_searched_as_a_range_or_an_invalid_data_combination_is_refused(tmp_path):
    path = _sweep(tmp_path, {"data.resolution": {"type": "int", "low": 32, "high": 64, "step": 8}},
                  evaluation=IMAGES)
    with pytest.raises(ConfigError, match=r"'data.resolution' as a range.*its own latent cache.*categorical"):
        load_sweep(path)
    path = _sweep(tmp_path, {"data.resolution": {"type": "categorical", "choices": [32, 60]}}, evaluation=IMAGES)
    with pytest.raises(ConfigError, match=r"data.resolution=60 is not a valid data section.*multiple of 8"):
        load_sweep(path)


def test_the_schedulers_horizon_is_the_longest_trials_budget(tmp_path):
    from sweeps.schedulers import clock_defaults

    path = _sweep(tmp_path, {"train.max_train_steps": {"type": "categorical", "choices": [20, 80]},
                             "train.train_batch_size": {"type": "categorical", "choices": [1, 4]}},
                  scheduler={"type": "asha", "grace_period": 10})
    assert clock_defaults(load_sweep(path)) == (10, 80)  # not the base's 40: that would cut 80-step trials
    path = _sweep(tmp_path, {"train.max_train_steps": {"type": "categorical", "choices": [20, 80]},
                             "train.train_batch_size": {"type": "categorical", "choices": [1, 4]}},
                  scheduler={"type": "asha", "time_attr": "images_seen"})
    assert clock_defaults(load_sweep(path)) == (10 * 4, 2 * 80 * 4)


@pytest.mark.slow
def test_under_asha_a_trial_trains_its_own_searched_step_count(ray_local, tmp_path):
    """Real Tune + ASHA from sdsweep's scheduler: a trial with 4 steps must not be cut at the base
    run config's 2 (a scheduler horizon taken from `base` stopped every longer trial there)."""
    from ray import tune

    from sweeps.schedulers import make_scheduler

    def steps(config: dict) -> None:  # reports like a trial; the longer trial is better at every step
        own = config["train.max_train_steps"]
        for step in range(1, own + 1):
            tune.report({"fixed_train_loss": 1.0 / (step * own), "step": step,
                         "trial_status": "completed" if step == own else "running"})

    path = _sweep(tmp_path, {"train.max_train_steps": {"type": "categorical", "choices": [2, 4]}},
                  base={"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                        "train": {"max_train_steps": 2}},
                  evaluation={"every": 1, "metric": "fixed_train_loss"},
                  scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    cfg = load_sweep(path)
    grid = tune.Tuner(steps, param_space={"train.max_train_steps": tune.grid_search([2, 4])},
                      tune_config=tune.TuneConfig(scheduler=make_scheduler(cfg), metric="fixed_train_loss",
                                                  mode="min"),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0)).fit()
    reached = {r.config["train.max_train_steps"]: r.metrics["step"] for r in grid}
    assert reached[4] == 4 and reached[2] <= 2, reached  # (ASHA may stop the worse 2-step trial at its rung)


@pytest.mark.slow
def test_searched_resolution_and_steps_take_effect_in_each_trial(tmp_path):
    """One real sweep over data.resolution x train.max_train_steps: each trial trains on latents of
    its own resolution (read back from its checkpoint's dataset and the cache files), every image is
    encoded once per resolution, and each trial's own step count is what it trains, what the
    leaderboard calls completed and what the console says."""
    from sweeps.results import leaderboard

    path = _sweep(tmp_path, {
        "data.resolution": {"type": "categorical", "choices": [32, 64], "default": 64},
        "train.max_train_steps": {"type": "categorical", "choices": [20, 40], "default": 20},
        "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True, "default": 3.0e-4}},
        search=None, evaluation=IMAGES)
    run_dir, cache = tmp_path / "runs" / "run", tmp_path / "cache"
    env = {**os.environ, "SDSWEEP_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(path), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows, state = leaderboard(run_dir)
    combos = {(r.params["data.resolution"], r.params["train.max_train_steps"]) for r in rows}
    assert {c[0] for c in combos} == {32, 64} and {c[1] for c in combos} == {20, 40}, combos  # both axes sampled
    images = len([p for p in (cache / "builtin").rglob("*.png")])
    assert state["cache_builds"][0]["images_encoded"] == 2 * images == 16, "one encode per image and resolution"
    assert len(state["cache_keys"]) == 2

    for r in rows:
        res, own = r.params["data.resolution"], r.params["train.max_train_steps"]
        ckpt = next(r.path.glob("checkpoint_*"))
        key = json.loads((ckpt / "trainer_state.json").read_text())["dataset_key"]
        manifest = json.loads((cache / "latents" / "manifests" / f"{key}.json").read_text())
        entry = manifest["images"][0]["entry"]
        with safe_open(str(cache / "latents" / "entries" / entry[:2] / f"{entry}.safetensors"), "pt") as f:
            latent_shape = tuple(f.get_tensor("mean").shape)
        assert latent_shape[-2:] == (res // 8, res // 8), (r.trial_id, res, latent_shape)
        # Its own budget: trained to it, labelled completed (the base says 40), said so on the console.
        assert r.steps == own and r.status == "completed", (r.trial_id, own, r.steps, r.status)
        assert f"end   {r.trial_id}  lora  completed {own} steps" in proc.stdout, proc.stdout[-3000:]
