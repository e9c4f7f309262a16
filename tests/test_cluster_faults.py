"""Sweeps on a real multi-node Ray cluster started on this machine (tests/ray_cluster.py: a head
without CPUs and worker nodes, each its own `ray start`), and what happens when parts of it die:

* a worker node SIGKILLed while its trial is between two checkpoints, never to come back: the
  trial resumes from its last checkpoint on the other node and finishes with every step, its W&B
  run logs every step exactly once, the Optuna study still has one trial per requested sample,
  and the sweep finishes on the remaining node;
* the driver SIGKILLed while trials run on the worker nodes: `sdsweep resume RUN_DIR --address`
  finishes the sweep without rerunning finished trials or repeating steps;
* `ray job submit --working-dir . -- sdsweep run ...` (the README's cluster workflow) runs a sweep;
* a node that cannot see the storage (a worker in a mount namespace of its own): the sweep is
  refused before any work, naming storage_path and the node.

Only the Ray processes these tests started are ever stopped (by their session id). Slow (~4 min).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_cluster import NODE_RESOURCE, LocalCluster, cluster_env
from run_files import wandb_steps
from sweeps.checkpoint_keeping import restore_points
from sweeps.errors import SweepError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 200, 20  # ~10 s a trial: windows wide enough to kill between checkpoints


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, dashboard=True) as c:
        yield c


def _sweep_file(tmp_path: Path, num_samples: int = 3) -> Path:
    cfg: dict[str, Any] = {
        "name": "cluster",
        "base": {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                 "train": {"max_train_steps": STEPS, "train_batch_size": 2}},
        # A continuous axis: a proposal repeated after a failure would show as a duplicate value.
        "search": {"spaces": [{"method": "lora", "params": {
            "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True,
                                    "default": 1.0e-3}}}],
            "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}, "num_samples": num_samples,
            "max_concurrent_trials": 2, "warm_start": True,
            "storage": f"sqlite:///{tmp_path / 'study.db'}"},
        "scheduler": {"type": "none"},
        "evaluation": {"every": EVERY, "metric": "fixed_train_loss"},
        # Every trial (and the cache task) needs a worker node's custom resource: none run on the head.
        "resources": {"cpu": 1, "gpu": 0, "custom": {NODE_RESOURCE: 1}},
        "checkpoints_to_keep": 10,
        "max_failures": 2,
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"wandb": True, "mode": "offline", "project": "sdsweep-test"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(trial_dir: Path) -> list[dict[str, Any]]:
    """The trial's reports as sdsweep's readers see them (result.json, gaps filled from the
    trial's own sdsweep_results.jsonl; sweeps/rows.py)."""
    from sweeps.rows import trial_rows

    return trial_rows(trial_dir)


def _raw_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """Every row of Tune's result.json as written (a step retrained after a resume appears twice)."""
    path = trial_dir / "result.json"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _trials(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("run_trial_*") if p.is_dir()) if run_dir.exists() else []


def _driver(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the driver
        return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=REPO, env={**cluster_env(), **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, run_dir: Path, ready: Any, what: str, timeout: float = 600) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        found = ready({t: _rows(t) for t in _trials(run_dir)})
        if found:
            return found
        assert proc.poll() is None, f"the sweep ended before {what}"
    raise AssertionError(f"timed out waiting for {what}")


def _study_trials(tmp_path: Path) -> list[Any]:
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(summaries) == 1
    return optuna.load_study(study_name=summaries[0].study_name,
                             storage=f"sqlite:///{tmp_path / 'study.db'}").trials


def test_a_worker_node_killed_mid_trial_the_trial_resumes_on_another_node(cluster, tmp_path):
    run_dir = tmp_path / "runs" / "node-kill"
    log = tmp_path / "driver.log"
    # Tune's experiment state saved every second (not every ~10 s): a ~10 s trial is seen running
    # with a checkpoint in it.
    proc = _driver(["run", str(_sweep_file(tmp_path)), "--address", cluster.address, "--run-dir", str(run_dir)], log,
                   TUNE_GLOBAL_CHECKPOINT_S="1")
    try:
        def victim_ready(trials: dict[Path, list[dict[str, Any]]]) -> tuple[Path, int, int] | None:
            # A row on disk is not yet a checkpoint Tune holds: the trial writes its own row before
            # it reports, and Tune registers the checkpoint only after a save round trip to the
            # worker. The experiment state Tune saved naming one is: the driver holds it in memory.
            try:
                saved = restore_points(run_dir)
            except SweepError:  # no state saved yet
                return None
            for t, rows in trials.items():
                point = saved.get(t.name)
                if (rows and rows[-1].get("trial_status") == "running" and point is not None
                        and point.status == "RUNNING" and (point.step or 0) >= EVERY):
                    node = cluster.node_of(int(rows[-1]["pid"]))
                    if node is not None:
                        return t, node, point.step
            return None

        victim, node, held = _wait_for(proc, run_dir, victim_ready, "a trial had a checkpoint on a worker node")
        steps_before = [r["step"] for r in _rows(victim)]
        killed_at = time.time()
        cluster.kill_worker(node)  # the raylet and the trial's process; this node never comes back
        last_written = _rows(victim)[-1]["step"]  # a checkpoint Tune holds was written by now
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
        recovered_s = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = _rows(victim)
    steps = [r["step"] for r in rows]
    assert steps[: len(steps_before)] == steps_before, "history before the node died was rewritten"
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, f"not resumed from its checkpoint: {steps}"
    # Tune's record of the failure (its result.json rows can be lost around the restart, so not those).
    assert (victim / "error.txt").read_text().count("Failure # ") == 1, "not restored exactly once"
    assert wandb_steps(run_dir, victim) == steps, "W&B logged a step twice or missed one"
    # The node loss reads as one line, not Ray's traceback (the traceback stays in error.txt).
    text = log.read_text()
    trial_id = rows[0]["trial_id"]
    said = [ln for ln in text.splitlines() if ln.startswith(f"trial {trial_id}:")]
    # The line names the checkpoint Tune held when the node died: at or past the one its saved state
    # named then, not past the last step the trial had written when it died. Restored from it, not
    # from the start: the first report (step EVERY, long checkpointed) is in Tune's result.json once.
    assert len(said) == 1 and "requeued from its checkpoint at step " in said[0], said
    named = int(said[0].split("requeued from its checkpoint at step ")[1].split()[0])
    assert held <= named <= last_written and named % EVERY == 0, (held, named, last_written)
    assert [r["step"] for r in _raw_rows(victim)].count(EVERY) == 1, "retrained from the start"
    assert "its worker died" in said[0] and "Traceback" not in text, text[-3000:]
    # Besides it only the first line of Ray's own notices (the node marked dead, its raylet
    # terminated), which every driver prints: not the dead raylet's ~40-line log dump.
    # (Ray sends some notices more than once: 2 or 3 such lines were seen, never a dump line.)
    raylet = [ln for ln in text.splitlines() if "(raylet)" in ln]
    headlines = ("has been marked dead", "Raylet is terminated")
    assert all(any(h in ln for h in headlines) for ln in raylet) and len(raylet) <= 4, raylet

    from sweeps.results import leaderboard

    board, _ = leaderboard(run_dir)
    assert [r.status for r in board] == ["completed"] * 3
    study = _study_trials(tmp_path)
    assert len(study) == 3 and all(t.state.name == "COMPLETE" for t in study), [t.state for t in study]
    lrs = [t.params["train.learning_rate"] for t in study]
    assert len(set(lrs)) == 3, "a proposal was repeated"
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["trial_id"] == board[0].trial_id
    print(f"\nnode {node} killed at step {steps_before[-1]} of {trial_id}; sweep done {recovered_s:.0f} s later: {said[0]}")


def test_the_driver_killed_while_trials_run_on_worker_nodes_then_resume(cluster, tmp_path):
    while cluster.alive_nodes() < 3:  # the previous test's node never came back: add one
        cluster.add_worker()
    run_dir = tmp_path / "runs" / "driver-kill"
    proc = _driver(["run", str(_sweep_file(tmp_path, num_samples=4)), "--address", cluster.address,
                    "--run-dir", str(run_dir)], tmp_path / "driver.log")

    def midway(trials: dict[Path, list[dict[str, Any]]]) -> dict[Path, list[int]] | None:
        # (trials can only run on worker nodes: they need the custom resource only those have)
        running = [t for t, rows in trials.items() if rows and rows[-1].get("trial_status") == "running"
                   and rows[-1]["step"] >= EVERY]
        return {t: [r["step"] for r in trials[t]] for t in trials} if running else None

    try:
        before = _wait_for(proc, run_dir, midway, "a trial was running on a worker node")
        proc.send_signal(signal.SIGKILL)  # the driver only; the cluster stays up
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    resume = subprocess.run([sys.executable, "-m", "sweeps.cli", "resume", str(run_dir), "--address", cluster.address],
                            cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    from sweeps.results import leaderboard
    from sweeps.rows import OWN_ROWS

    trials = _trials(run_dir)
    assert len(trials) == 4, sorted(t.name for t in trials)
    for t in trials:
        steps = [r["step"] for r in _rows(t)]
        assert steps == list(range(EVERY, STEPS + 1, EVERY)), f"{t.name}: {steps}"
        assert steps[: len(before.get(t, []))] == before.get(t, []), f"{t.name} restarted"
        # A step reported twice (resumed from the checkpoint Tune's experiment state had recorded,
        # older than the newest) was retrained bit-exactly: the same losses, in both files.
        by_step: dict[int, list[float]] = {}
        own = [json.loads(ln) for ln in (t / OWN_ROWS).read_text().splitlines()]
        for r in [*_raw_rows(t), *own]:
            by_step.setdefault(r["step"], []).append(r["fixed_train_loss"])
        assert all(len(set(v)) == 1 for v in by_step.values()), by_step
        assert wandb_steps(run_dir, t) == steps, "W&B logged a step twice or missed one"
    assert [r.status for r in leaderboard(run_dir)[0]] == ["completed"] * 4
    study = _study_trials(tmp_path)
    assert len(study) == 4 and all(t.state.name == "COMPLETE" for t in study), [t.state for t in study]


def test_storage_a_node_cannot_see_is_refused_before_any_work(cluster, tmp_path):
    storage = tmp_path / "node-local"
    blind = cluster.add_worker(hide=storage)  # this node sees an empty tmpfs at that path
    try:
        path = _sweep_file(tmp_path)
        cfg = yaml.safe_load(path.read_text())
        cfg["storage_path"] = str(storage)
        path.write_text(yaml.safe_dump(cfg))
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(path), "--address", cluster.address],
                              cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "storage_path: " in proc.stderr and "is not shared storage: 1 of" in proc.stderr, proc.stderr[-3000:]
        assert not any(storage.glob("cluster-*/run_trial_*")), "trials ran before the check"
        print(f"\nrefused in {time.time() - started:.0f} s: {proc.stderr.strip().splitlines()[-1][:200]}")
    finally:
        cluster.kill_worker(blind)


def test_ray_job_submit_runs_a_sweep_from_the_working_directory(cluster, tmp_path):
    while cluster.alive_nodes() < 3:
        cluster.add_worker()
    run_dir = tmp_path / "runs" / "job"
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--",
           "sdsweep", "run", str(_sweep_file(tmp_path, num_samples=2)), "--run-dir", str(run_dir)]
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(cmd, cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=900)
        # Refused before anything ran while the head's job agent is not up yet: Ray's own answer is
        # "please try again later". (It stays refused if the agent could not bind its port, which
        # tests/ray_cluster.py now gives each node.)
        if "No available agent to submit job" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    from sweeps.results import leaderboard

    assert [r.status for r in leaderboard(run_dir)[0]] == ["completed"] * 2
    assert (run_dir / "best" / "best.json").is_file()


CONCURRENT_BUILD = """
import json, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=1, resources={"%(res)s": 1})
def build(root):
    import torch
    from trainers.data import DataConfig, preflight
    from trainers.latents import build_latent_cache
    from trainers.models import load_base_model
    torch.set_num_threads(1)
    cfg = DataConfig(path="builtin:demo", resolution=64, random_flip=True)
    data = build_latent_cache(preflight(cfg), cfg, load_base_model("builtin:tiny-sd"), root=root)
    return {"key": data.key, "encoded": data.report.images_encoded, "reused": data.report.entries_reused,
            "sum": float(data.mean.double().sum()), "node": ray.get_runtime_context().get_node_id()}

ray.init(address=sys.argv[1], logging_level="ERROR")
root = sys.argv[2]
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("%(res)s")][:2]
pinned = lambda n: build.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
first = ray.get([pinned(n).remote(root) for n in nodes])   # two nodes build the same cache at once
again = ray.get(pinned(nodes[1]).remote(root))             # a later sweep, from either node
print("RESULT", json.dumps({"first": first, "again": again}))
"""


def test_two_nodes_building_one_cache_at_once_agree_and_a_later_build_reuses_it(cluster, tmp_path):
    while cluster.alive_nodes() < 3:
        cluster.add_worker()
    script = tmp_path / "build.py"
    script.write_text(CONCURRENT_BUILD % {"res": NODE_RESOURCE})
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(script), cluster.address, str(root)], cwd=REPO, env=cluster_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    a, b = out["first"]
    assert a["node"] != b["node"] and a["key"] == b["key"] and a["sum"] == b["sum"]
    assert out["again"]["encoded"] == 0 and out["again"]["reused"] > 0 and out["again"]["sum"] == a["sum"]
    entries = list((root / "entries").rglob("*.safetensors"))
    assert len(entries) == out["again"]["reused"], "a concurrent build left duplicate or partial entries"
    assert not [p for p in (root / "entries").rglob("*") if p.name.startswith(".")], "temporary files left behind"
