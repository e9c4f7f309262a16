"""Sweep-level benchmarks, each measured side by side in one run on the same model and data.

(a) 8 LoRA trials x 40 steps as an sdsweep sweep (shared latent cache, 2 concurrent trials on
    reused workers) vs the same 8 trials (same hyperparameters) run one after another as separate
    processes that VAE-encode and text-encode every step, as the reference scripts do.
(b) per-trial start overhead: the same sweep with reused workers vs a fresh worker per trial.
(c) VAE encodes in the whole 8-trial sweep vs dataset size (x2 with flip).

    python bench/bench_sweep.py            # ~4 minutes on 2 CPU cores
    python bench/bench_sweep.py --json out.json

The sweep uses Optuna's random sampler with a fixed seed, so both sweep runs propose the same 8
configurations; the reference replays those exact configurations from the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

TRIALS, STEPS, EVERY, BATCH = 8, 40, 10, 4


def sweep_dict(storage: Path, reuse: bool) -> dict:
    return {
        "name": "bench", "reuse_workers": reuse,
        "base": {"model": "builtin:tiny-sd",
                 "data": {"path": "builtin:demo", "resolution": 64, "random_flip": True},
                 "train": {"max_train_steps": STEPS, "train_batch_size": BATCH}},
        "search": {"spaces": ["lora"], "sampler": {"type": "random", "seed": 0},
                   "num_samples": TRIALS, "max_concurrent_trials": 2, "warm_start": False},
        "scheduler": {"type": "none"},  # every trial runs all 40 steps in both arms
        "evaluation": {"every": EVERY, "metric": "fixed_train_loss"},
        "resources": {"cpu": 1, "gpu": 0}, "checkpoints_to_keep": 1,
        "storage_path": str(storage), "tracking": {"wandb": False},
    }


def run_ours(storage: Path, reuse: bool) -> dict:
    """One sweep in this process; returns wall time, per-trial in-function time and encodes."""
    import ray

    from sweeps.config import SweepConfig
    from sweeps.driver import run_sweep

    cfg = SweepConfig.model_validate(sweep_dict(storage, reuse))
    t0 = time.perf_counter()
    run = run_sweep(cfg, run_dir=storage / f"reuse-{reuse}")
    wall = time.perf_counter() - t0
    ray.shutdown()
    trials = []
    for r in run.results:
        rows = [json.loads(x) for x in (Path(r.path) / "result.json").read_text().splitlines() if x.strip()]
        trials.append({"params": {k: v for k, v in r.config.items() if ":" not in k},
                       "setup_s": rows[0].get("setup_s"), "model_reused": rows[0].get("model_reused"),
                       "steps": rows[-1]["step"], "started_at": rows[0]["started_at"],
                       "ended_at": rows[-1]["reported_at"]})
    return {"wall_s": wall, "trials": trials, "images_encoded": run.cache_report["images_encoded"]}


def run_reference(trials: list[dict], workdir: Path) -> dict:
    """The same trials, one process each, one after another; VAE + text encoder every step."""
    t0 = time.perf_counter()
    per = []
    for i, t in enumerate(trials):
        spec = workdir / f"ref-{i}.json"
        spec.write_text(json.dumps({"params": t["params"], "steps": STEPS, "every": EVERY, "batch": BATCH,
                                    "out": str(workdir / f"ref-{i}")}))
        s = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "bench" / "reference_trial.py"), str(spec)], check=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        per.append(time.perf_counter() - s)
    return {"wall_s": time.perf_counter() - t0, "per_trial_s": per}


def start_gaps(trials: list[dict], concurrency: int = 2) -> list[float]:
    """For every trial after the first ``concurrency``: seconds from the end of the trial whose
    slot it took (its last report) to the start of its trial function. This is the per-trial
    start overhead: Tune scheduling, plus a worker start and imports when workers are not reused.
    """
    order = sorted(trials, key=lambda t: t["started_at"])
    free = sorted(t["ended_at"] for t in order[:concurrency])
    gaps = []
    for t in order[concurrency:]:
        slot = free[0]  # FIFO: the slot freed first goes to the next trial that starts
        free.remove(slot)
        gaps.append(t["started_at"] - slot)
        free = sorted([*free, t["ended_at"]])
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["SDSWEEP_CACHE"] = str(tmp / "cache")  # fresh cache: (c) counts every encode
        reused = run_ours(tmp / "runs", reuse=True)
        fresh = run_ours(tmp / "runs", reuse=False)
        ref = run_reference(reused["trials"], tmp)
    dataset, views = 8, 2
    res = {
        "a_sweep_wall_s": reused["wall_s"], "a_reference_wall_s": ref["wall_s"],
        "a_ratio": reused["wall_s"] / ref["wall_s"],
        "b_gaps_reuse_s": start_gaps(reused["trials"]), "b_gaps_fresh_s": start_gaps(fresh["trials"]),
        "b_setup_in_trial_reuse_s": [t["setup_s"] for t in reused["trials"]],
        "b_setup_in_trial_fresh_s": [t["setup_s"] for t in fresh["trials"]],
        "b_model_reused": [t["model_reused"] for t in reused["trials"]],
        "b_sweep_wall_fresh_s": fresh["wall_s"],
        "c_images_encoded": reused["images_encoded"], "c_expected": dataset * views,
        "c_images_encoded_second_sweep": fresh["images_encoded"],
        "trials": reused["trials"], "reference_per_trial_s": ref["per_trial_s"],
    }
    print(f"(a) 8 trials x {STEPS} steps: sweep (2 concurrent, cached latents) {res['a_sweep_wall_s']:.1f} s vs "
          f"sequential processes encoding every step {res['a_reference_wall_s']:.1f} s -> {res['a_ratio']:.2f}x")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    res["b_overhead_reuse_s"], res["b_overhead_fresh_s"] = mean(res["b_gaps_reuse_s"]), mean(res["b_gaps_fresh_s"])
    print(f"(b) start overhead per trial (slot freed -> next trial function starts, trials 3..8): reused workers "
          f"{res['b_overhead_reuse_s']:.2f} s (max {max(res['b_gaps_reuse_s']):.2f}) vs fresh worker per trial "
          f"{res['b_overhead_fresh_s']:.2f} s -> {res['b_overhead_reuse_s'] / res['b_overhead_fresh_s']:.2f}x; "
          f"sweep wall {reused['wall_s']:.1f} s vs {fresh['wall_s']:.1f} s")
    print(f"    in-trial setup (model + trainer) reused: {[round(x, 2) for x in res['b_setup_in_trial_reuse_s']]}")
    print(f"    in-trial setup (model + trainer) fresh:  {[round(x, 2) for x in res['b_setup_in_trial_fresh_s']]}")
    print(f"(c) VAE encodes in the 8-trial sweep: {res['c_images_encoded']} (dataset {dataset} images x {views} "
          f"with flip = {res['c_expected']}); second sweep on the same data: {res['c_images_encoded_second_sweep']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
