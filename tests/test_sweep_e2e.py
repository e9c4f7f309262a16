"""End to end: a real sweep on a local Ray runtime, then kill -9 the driver and resume.

Slow (each test starts Ray); marked ``slow`` and still run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_files import kill_tree, wandb_steps

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "e2e",
        "base": {"model": "builtin:tiny-sd",
                 "data": {"path": "builtin:demo", "resolution": 64, "random_flip": True},
                 "train": {"max_train_steps": 40, "train_batch_size": 2}},
        # A learning-rate axis with a hopeless value makes ASHA's early stop deterministic enough
        # to test: 1e-7 cannot improve on the base model while 3e-3 does.
        "search": {"spaces": [{"method": "lora", "params": {
            "train.learning_rate": {"type": "categorical", "choices": [1.0e-7, 3.0e-3], "default": 3.0e-3},
            "lora.rank": {"type": "categorical", "choices": [2, 4, 8], "default": 4}}}],
            "sampler": {"type": "random", "seed": 3}, "num_samples": 5, "max_concurrent_trials": 2,
            "warm_start": True},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
        "evaluation": {"every": 10, "metric": "fixed_train_loss"},
        "resources": {"cpu": 1, "gpu": 0},
        "checkpoints_to_keep": 10,
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"wandb": True, "mode": "offline", "project": "sdsweep-test"},
    }
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if cache is not None:
        env["SDSWEEP_CACHE"] = str(cache)
    env.pop("WANDB_API_KEY", None)
    # Trial results reach the run directory when Tune snapshots the experiment state; its "auto"
    # period can outlast a whole tiny sweep, and these tests watch the run directory mid-sweep.
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PYTHONUNBUFFERED="1",
               TUNE_GLOBAL_CHECKPOINT_S="1")
    return env


def _sdsweep(*args: str, timeout: int = 900, cache: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True,
                          env=_env(cache), timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"sdsweep {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _without_end_reported_again(rows: list[dict], recorded_step: int) -> list[dict]:
    """A trial that finished just before the driver was killed, its completion not yet in Tune's
    experiment state, reports its last step once more on resume, in one of two ways: restored from
    its newest checkpoint when the older one Tune names lost its resume tensors, it reports that end
    again (sweeps/trial.py ``resumable_checkpoint``): the same values, nothing trained; restored from
    the checkpoint Tune names (``recorded_step``, one evaluation earlier) while that still held them,
    it retrains the last step: bit-identical losses, a newly measured ``trainer_s`` (seen under
    load: the state named step 50, the trial had completed 60). Check that a trailing repeat is one
    of these, and drop it."""
    if len(rows) >= 2 and rows[-1].get("step") == rows[-2].get("step") and rows[-1].get("trial_status") == "completed":
        for key in ("train_loss", "fixed_train_loss", "images_seen"):
            assert rows[-1][key] == rows[-2][key], (key, rows[-2:])
        if rows[-1]["trainer_s"] != rows[-2]["trainer_s"]:  # retrained: from the checkpoint Tune named
            assert recorded_step == rows[-1]["step"] - 10, (recorded_step, rows[-2:])
        return rows[:-1]
    return rows


def _trial_runs(run_dir: Path) -> list[Path]:
    """The trials' offline W&B run directories (not the sweep-level run, sweeps.tracking.log_sweep_run)."""
    from sweeps.tracking import wandb_run_id

    sweep = wandb_run_id(run_dir.name, "sweep")
    return sorted(d for d in (run_dir / "wandb").glob("offline-run-*") if not d.name.endswith(sweep))


def _trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "params.json").is_file())


def _assert_resumed_from_recorded(name: str, old: list[dict], new: list[dict], from_step: int) -> None:
    """Tune restores the checkpoint its experiment state names (``from_step``: not the step of the
    last result it recorded, which can be one report ahead, sweeps/checkpoint_keeping.py) and
    appends the restored trial's reports to the ``result.json`` it had: ``new`` is ``old``
    unchanged, then the steps after ``from_step``. Those reported before the kill too are trained
    again from that checkpoint (sweeps/rows.py): bit-exactly. Nothing earlier is retrained.

    ``from_step`` 0 (the state named no checkpoint: the kill came before the trial's first one was
    in a saved snapshot): the trial starts afresh, and ``result.json`` holds the new run's rows
    only -- Tune's logger writes it in the new driver session's staging folder and syncs it over
    the stored one, and copies the stored one back only with a checkpoint
    (``LoggerCallback._restore_from_remote``). The steps reported before the kill are then all
    retrained, bit-exactly."""
    steps = [r["step"] for r in new]
    if from_step:
        assert new[: len(old)] == old, f"{name}: the rows reported before the kill changed: {steps}"
        again = new[len(old):]
    else:
        again = new
    assert [r["step"] for r in again] == list(range(from_step + 10, 61, 10)), \
        f"{name}: not resumed from the checkpoint Tune named, at step {from_step}: {steps}"
    for r_old in (r for r in old if r["step"] > from_step):  # reported before the kill, trained again after it
        r_new = next(r for r in again if r["step"] == r_old["step"])
        for key in ("train_loss", "fixed_train_loss", "images_seen"):
            assert r_new[key] == r_old[key], (name, r_old["step"], key, r_old[key], r_new[key])


def _recorded_steps(run_dir: Path) -> dict[str, int]:
    """The step of the checkpoint each trial is restored from, as Tune's newest experiment state
    names it, by trial directory name (0: none, the trial starts afresh)."""
    from sweeps.checkpoint_keeping import restore_points

    return {name: p.step or 0 for name, p in restore_points(run_dir).items()}


def _rows(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def test_sweep_ranks_trials_fails_the_impossible_one_exports_the_best_and_logs_to_wandb(tmp_path):
    """One sweep, 5 trials under ASHA: the warm start, two with a hopeless learning rate and one
    with rank 0, which the run config rejects inside the trial (as a default it would be refused
    before the sweep starts). Random seed 8 proposes (lr, rank) = (3e-3, 4), (1e-7, 2), (1e-7, 4),
    (3e-3, 0), (3e-3, 8)."""
    import optuna

    from sweeps.results import leaderboard
    from sweeps.tracking import read_offline_run

    storage = tmp_path / "study.db"
    path = sweep_file(tmp_path, search={
        "spaces": [{"method": "lora", "params": {
            "train.learning_rate": {"type": "categorical", "choices": [1.0e-7, 3.0e-3], "default": 3.0e-3},
            "lora.rank": {"type": "categorical", "choices": [0, 2, 4, 8], "default": 4}}}],
        "sampler": {"type": "random", "seed": 8}, "num_samples": 5, "max_concurrent_trials": 2,
        "warm_start": True, "storage": f"sqlite:///{storage}", "study_name": "e2e"})
    run_dir = tmp_path / "runs" / "e2e-run"
    # A private cache root: the latent cache is shared between sweeps on purpose, so one another
    # test built on the same data would leave nothing to encode here.
    out = _sdsweep("run", str(path), "--run-dir", str(run_dir), cache=tmp_path / "cache").stdout
    assert "rank" in out and "best: trial" in out and "wandb sync" in out

    state = json.loads((run_dir / "sweep.json").read_text())
    assert state["cache_builds"][0]["images_encoded"] == 16, "expected one encode per image and flip (8 x 2)"
    rows, _ = leaderboard(run_dir)
    assert len(rows) == 5 and len({json.dumps(r.params, sort_keys=True) for r in rows}) == 5
    errored = [r for r in rows if r.status == "error"]
    assert len(errored) == 1 and errored[0].params["lora.rank"] == 0 and "lora.rank" in errored[0].error
    # the leaderboard names the reason under its table (cut to the console's width)
    head = f"  {errored[0].trial_id}: "
    shown = next((ln[len(head):] for ln in out.splitlines() if ln.startswith(head)), None)
    assert shown and errored[0].error.startswith(shown.removesuffix("…")), (shown, out[-2000:])
    statuses = [r.status for r in rows if r.status != "error"]
    assert "stopped" in statuses, f"ASHA stopped no trial early: {statuses}"
    assert all(s in ("completed", "stopped") for s in statuses), statuses

    for trial in _trial_dirs(run_dir):
        evals = [r for r in _rows(trial) if "fixed_train_loss" in r]
        ckpt_steps = sorted(json.loads((c / "trainer_state.json").read_text())["step"]
                            for c in trial.glob("checkpoint_*"))
        assert ckpt_steps == [r["step"] for r in evals], f"{trial.name}: one checkpoint per evaluation"
        assert all(r["steps_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in evals)

    best = json.loads((run_dir / "best" / "best.json").read_text())
    top = rows[0]
    assert best["trial_id"] == top.trial_id and best["metric"]["value"] == pytest.approx(top.best)
    assert best["metric"]["step"] == top.best_step and best["hyperparameters"] == top.params
    assert best["cache_key"] == state["cache_key"] and best["base_model_identity"] == state["base_model_identity"]
    assert (run_dir / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((run_dir / "best").glob("*-lora.safetensors"))) == 1

    # Optuna: the rank-0 trial FAILED with no value; what it was told of the others is what the
    # leaderboard ranks, each finished trial's best checkpoint (under ASHA too: a completed
    # trial's last report reaches the searcher only through on_trial_complete).
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{storage}")
    states = {t.params["lora.rank"]: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    assert all(t.value is None for t in study.trials if t.params["lora.rank"] == 0)
    told = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert told and told == pytest.approx(sorted(r.best for r in rows if r.status == "completed"))
    by_id = {t.user_attrs["sdsweep_trial_id"]: t for t in study.trials}
    assert all(by_id[r.trial_id].state == optuna.trial.TrialState.PRUNED for r in rows if r.status == "stopped")

    offline = _trial_runs(run_dir)
    assert len(offline) == 5
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 6  # and the sweep-level run
    logged = {}
    for d in offline:
        run = read_offline_run(d)
        assert run.group == run_dir.name and run.job_type == "lora"
        logged[run.config["train.learning_rate"], run.config["lora.rank"]] = run
    for r in rows:
        run = logged[r.params["train.learning_rate"], r.params["lora.rank"]]
        # the errored trial's W&B run ends with exit code 1, the others' with 0
        assert run.exit_code == (1 if r.status == "error" else 0), (r.params, run.exit_code)
        if r.status != "error":
            vals = [h["fixed_train_loss"] for h in run.history if "fixed_train_loss" in h]
            assert vals and min(vals) == pytest.approx(r.best)



def test_kill_9_the_driver_then_resume_finishes_without_rerunning(tmp_path):
    # A continuous axis: a searcher that replayed its proposals after resume would repeat values.
    search = {"spaces": [{"method": "lora", "params": {
        "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True, "default": 1.0e-3}}}],
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}, "num_samples": 5,
        "max_concurrent_trials": 2, "warm_start": True}
    path = sweep_file(tmp_path, scheduler={"type": "none"}, search=search,
                      base={"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                            "train": {"max_train_steps": 60, "train_batch_size": 2}},
                      tracking={"wandb": True, "mode": "offline", "project": "sdsweep-test"})
    run_dir = tmp_path / "runs" / "kill-run"
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(path), "--run-dir", str(run_dir)],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    done_before: dict[str, list[int]] = {}
    while time.time() < deadline:
        time.sleep(0.5)
        if not run_dir.exists():
            continue
        trials = {t.name: _rows(t) for t in _trial_dirs(run_dir)}
        done = {n: [r["step"] for r in rows] for n, rows in trials.items()
                if rows and rows[-1].get("trial_status") == "completed"}
        midway = [n for n, rows in trials.items() if rows and rows[-1].get("trial_status") == "running"]
        if done and midway:
            done_before = done
            break
        assert proc.poll() is None, "the sweep ended before it could be killed mid-way"
    assert done_before, "the sweep never reached a state with a finished and a running trial"
    kill_tree(proc)
    before = {t.name: _rows(t) for t in _trial_dirs(run_dir)}
    recorded = _recorded_steps(run_dir)  # what Tune's experiment state holds when the driver died

    _sdsweep("resume", str(run_dir))

    after_rows = {t.name: _without_end_reported_again(_rows(t), recorded.get(t.name, 0)) for t in _trial_dirs(run_dir)}
    after = {name: [r["step"] for r in rows] for name, rows in after_rows.items()}
    assert len(after) == 5, f"finished + new trials should equal num_samples: {sorted(after)}"
    for name, steps in done_before.items():
        assert after[name] == steps, f"finished trial {name} was rerun"
    for name, steps in after.items():
        assert steps[-1] == 60, f"{name} did not finish: {steps}"
        if name not in before:  # started after the resume
            assert steps == sorted(set(steps)), f"{name}: steps restarted or repeated: {steps}"
    resumed = [n for n, rows in before.items() if rows and rows[-1]["step"] < 60]
    assert resumed, "no trial was midway when the driver was killed"
    for name in resumed:
        _assert_resumed_from_recorded(name, before[name], after_rows[name], recorded.get(name, 0))
    # the rest: finished between the check and the kill, or started without a report yet
    for name in set(before) - set(resumed) - set(done_before):
        if after[name] != [r["step"] for r in before[name]]:
            _assert_resumed_from_recorded(name, before[name], after_rows[name], recorded.get(name, 0))
    for t in _trial_dirs(run_dir):  # W&B keeps each step once, over the run's segments before and after
        assert wandb_steps(run_dir, t) == list(range(10, 61, 10)), t.name
    params = [json.loads((t / "params.json").read_text()) for t in _trial_dirs(run_dir)]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == len(params), "duplicate proposals"


def test_a_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path):
    # Infrastructure failure (the worker process dies): retried, unlike errors in trial code.
    path = sweep_file(tmp_path, scheduler={"type": "none"}, max_failures=1, tracking={"wandb": False},
                      base={"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                            "train": {"max_train_steps": 80, "train_batch_size": 2}},
                      search={"spaces": ["lora"], "sampler": {"type": "random", "seed": 0}, "num_samples": 2,
                              "max_concurrent_trials": 2, "warm_start": True})
    run_dir = tmp_path / "runs" / "retry-run"
    log = tmp_path / "sweep.log"  # a file, not a pipe: a full pipe would block the driver
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(path), "--run-dir", str(run_dir)],
                                env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    import psutil

    victim_trial = None
    deadline = time.time() + 600
    while victim_trial is None and time.time() < deadline:
        time.sleep(0.3)
        for t in _trial_dirs(run_dir) if run_dir.exists() else []:
            rows = _rows(t)
            if rows and rows[-1].get("trial_status") == "running" and rows[-1]["step"] >= 20:
                victim_trial = t
                break
        assert proc.poll() is None, "the sweep ended before a trial worker could be killed"
    assert victim_trial is not None, "no trial got far enough to be killed"
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "ImplicitFunc" in " ".join(p.cmdline())]
    pid = json.loads((victim_trial / "result.json").read_text().splitlines()[-1])["pid"]
    victim = next(p for p in workers if p.pid == pid)
    steps_before = [r["step"] for r in _rows(victim_trial)]
    victim.kill()
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]

    rows = _rows(victim_trial)
    steps = [r["step"] for r in rows]
    assert steps[: len(steps_before)] == steps_before, "history before the failure was rewritten"
    assert steps == sorted(set(steps)) and steps[-1] == 80, f"not resumed from its checkpoint: {steps}"
    restarts = [r for r in rows[1:] if r.get("iterations_since_restore") == 1]
    assert len(restarts) == 1, "the trial was not restored exactly once"
    from sweeps.results import leaderboard

    assert [r.status for r in leaderboard(run_dir)[0]] == ["completed", "completed"]


def _image_sweep(tmp_path: Path) -> Path:
    """3 trials, every checkpoint scored by CLIP-T/CLIP-I, multi-objective Optuna on both."""
    return sweep_file(
        tmp_path,
        base={"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
              "train": {"max_train_steps": 30, "train_batch_size": 2}},
        search={"spaces": [{"method": "lora", "params": {
            "train.learning_rate": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True, "default": 1e-3},
            "lora.rank": {"type": "categorical", "choices": [2, 4], "default": 4}}}],
            "sampler": {"type": "tpe", "seed": 1, "n_startup_trials": 2}, "num_samples": 3,
            "max_concurrent_trials": 2, "warm_start": True,
            "storage": f"sqlite:///{tmp_path / 'study.db'}", "study_name": "images"},
        scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2},
        evaluation={"every": 10, "objectives": ["clip_t", "clip_i"], "images": {
            "generation": {"prompts": ["a photo of {token}", "{token} on a beach"], "token": "sks toy",
                           "seeds": [0, 1], "steps": 3},
            "metrics": ["clip_t", "clip_i"], "clip": "builtin:tiny-clip"},
            # The held-out confirmation (~17 s of a tiny sweep) is checked by tests/test_report.py.
            "confirm": None},
        checkpoints_to_keep=1)


def test_image_evaluation_scores_every_checkpoint_against_a_baseline(tmp_path):
    import optuna
    import torch

    from sweeps.config import load_sweep
    from sweeps.results import leaderboard, pareto_front
    from sweeps.tracking import read_offline_run
    from trainers.data import DataConfig
    from trainers.evaluate import Evaluator, load_references
    from trainers.models import load_base_model

    path = _image_sweep(tmp_path)
    run_dir = tmp_path / "runs" / "img-run"
    proc = _sdsweep("run", str(path), "--run-dir", str(run_dir))
    out = proc.stdout
    assert "ranked by composite (max)" in out and "gain over the base model" in out and "Pareto front" in out
    assert (run_dir / "report" / "index.html").is_file()
    # TensorBoard: our logger replaced Tune's (one writer per trial, not two) and the result's image
    # paths no longer make Tune warn.
    assert "invalid value" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    for trial in _trial_dirs(run_dir):
        events = list(trial.glob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 0, (trial.name, events)

    # The baseline: the base model without adapter, scored once, reproducible in this process.
    state = json.loads((run_dir / "sweep.json").read_text())
    base = state["baseline"]
    assert set(base["scores"]) == {"clip_t", "clip_i", "composite"} and (run_dir / "baseline" / "grid.png").is_file()
    cfg = load_sweep(path)
    ev_cfg = cfg.evaluation.images
    again = Evaluator(ev_cfg, load_references(ev_cfg, DataConfig(path="builtin:demo", resolution=64)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's task ran (resources.cpu: 1): same float reduction order
    try:
        rec = again.run(load_base_model("builtin:tiny-sd"))
    finally:
        torch.set_num_threads(threads)
    for k, v in base["scores"].items():
        assert rec.scores[k] == pytest.approx(v, abs=1e-6), k
    assert rec.identity == base["identity"]

    # Every evaluated checkpoint of every trial is scored, with its images and scores on disk.
    rows, _ = leaderboard(run_dir)
    for trial in _trial_dirs(run_dir):
        evals = [r for r in _rows(trial) if "fixed_train_loss" in r]
        assert evals and all({"clip_t", "clip_i", "composite", "eval_s"} <= set(r) for r in evals)
        for r in evals:
            saved = json.loads((trial / "samples" / f"step-{r['step']:06d}" / "scores.json").read_text())
            assert saved["scores"] == {k: r[k] for k in ("clip_t", "clip_i", "composite")}
            assert saved["identity"] == base["identity"]  # same settings + same CLIP weights everywhere

    # Checkpoint-level selection by another metric than the sweep's.
    _sdsweep("best", str(run_dir), "--metric", "clip_t", "--export", str(tmp_path / "by_clip_t"))
    info = json.loads((tmp_path / "by_clip_t" / "best.json").read_text())
    everything = [(r, t) for t in _trial_dirs(run_dir) for r in _rows(t) if "clip_t" in r]
    top, top_dir = max(everything, key=lambda rt: rt[0]["clip_t"])
    kept = {(t.name, json.loads((c / "trainer_state.json").read_text())["step"])
            for t in _trial_dirs(run_dir) for c in t.glob("checkpoint_*")}
    if (top_dir.name, top["step"]) in kept:
        assert (info["metric"]["step"], info["metric"]["value"]) == (top["step"], top["clip_t"])
        assert "not_kept" not in info
    else:  # checkpoints_to_keep=1 keeps each trial's best composite: say so, export the best kept
        assert "has no kept checkpoint" in info["not_kept"]
        best_kept = max(r["clip_t"] for r, t in everything if (t.name, r["step"]) in kept)
        assert info["metric"]["value"] == best_kept
    assert info["gain_over_baseline"]["clip_t"] == pytest.approx(info["metric"]["value"] - base["scores"]["clip_t"])

    # Multi-objective: Optuna's study has both values per finished trial; the Pareto front exports.
    study = optuna.load_study(study_name="images", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(len(t.values) == 2 for t in done)
    front = pareto_front(rows, ["clip_t", "clip_i"], ["max", "max"])
    names = {r.trial_id: r.path.name for r in rows}
    on_disk = [k for k, p in enumerate(front) if (names[p.trial_id], p.step) in kept]
    assert on_disk, "each trial keeps its best-composite checkpoint; some must be on the front"
    k = on_disk[0]
    _sdsweep("best", str(run_dir), "--pareto", str(k), "--export", str(tmp_path / "pareto"))
    pk = json.loads((tmp_path / "pareto" / "best.json").read_text())
    assert (pk["trial_id"], pk["metric"]["step"]) == (front[k].trial_id, front[k].step)
    assert pk["pareto_index"] == k and pk["objectives"] == ["clip_t", "clip_i"]
    gone = [k for k in range(len(front)) if k not in on_disk]
    if gone:  # a front point whose checkpoint was not kept: a clear error naming the kept ones
        proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "best", str(run_dir), "--pareto", str(gone[0]),
                               "--export", str(tmp_path / "gone")], capture_output=True, text=True, env=_env())
        assert proc.returncode == 2 and f"points with one: {on_disk}" in proc.stderr

    # W&B: the grid and the per-prompt table at every evaluation step.
    runs = _trial_runs(run_dir)
    assert len(runs) == len(_trial_dirs(run_dir)), runs
    for d in runs:
        run = read_offline_run(d)
        logged = [h for h in run.history if "clip_t" in h]
        assert logged and all(h["images._type"] == "images/separated" for h in logged)
        assert all(h["samples._type"] == "table-file" and h["samples.nrows"] == 4 for h in logged)
