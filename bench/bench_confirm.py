"""Held-out confirmation: one Ray task per model (sdsweep now) vs one task scoring every model in
turn (sdsweep before), side by side on one finished sweep.

Both ways call the same per-model function (``sweeps.confirm.confirm_task``'s body) on the same
models: the sweep's top ``confirm.top_k`` checkpoints and the base model. Each measurement starts
a fresh local Ray with ``--cpus`` CPUs and the sweep's own task resources (a trial's), times from
submitting the work to having every result back (worker start, imports and model loading
included, as in a real sweep's tail), then shuts Ray down. The two ways alternate within a round.
Printed: seconds per way and round, the ratio of the medians, and whether both ways gave
identical per-image scores (they must: each image's noise depends only on its seed).

    python bench/bench_confirm.py RUN_DIR --cpus 2 --rounds 2

RUN_DIR is a finished sweep with image evaluation and confirmation (e.g. the TI demo:
``sdsweep run sweeps/configs/demo-ti.yaml --run-dir /tmp/ti``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray

from sweeps.config import SweepConfig
from sweeps.confirm import assign_seed_sets, confirm_models, confirm_task
from sweeps.results import read_state

score_one = confirm_task._function  # the per-model body both ways run


@ray.remote
def all_in_one_task(sweep: dict[str, Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """sdsweep's former confirmation: one task generating and scoring every model in turn."""
    return [score_one(sweep, item) for item in items]


def measure(way: str, cfg: SweepConfig, items: list[dict[str, Any]], cpus: int) -> tuple[float, list[Any]]:
    env = {k: v for k, v in os.environ.items() if k in ("SDSWEEP_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        sweep = cfg.model_dump(mode="json")
        opts = cfg.resources.trial_task_options()
        t0 = time.perf_counter()
        if way == "per model":
            out = ray.get([confirm_task.options(**opts).remote(sweep, item) for item in items])
        else:
            out = ray.get(all_in_one_task.options(**opts).remote(sweep, items))
        return time.perf_counter() - t0, [{k: v["rows"] for k, v in r.items()} for r in out]
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cfg = SweepConfig.model_validate(read_state(args.run_dir)["config"])
    items = confirm_models(args.run_dir, cfg.evaluation.confirm.top_k)
    assign_seed_sets(items, cfg.evaluation.confirm)
    prompts = len(cfg.evaluation.heldout_evaluator().generation.prompts)
    n = " / ".join(f"{prompts * sum(len(v) for v in i['seed_sets'].values())}" for i in items)
    print(f"{len(items)} models ({', '.join(i['label'] for i in items)}), {n} held-out images each, "
          f"{args.cpus} CPUs, task resources {cfg.resources.trial_task_options()}")
    times: dict[str, list[float]] = {"one task": [], "per model": []}
    rows: dict[str, list[Any]] = {}
    for r in range(args.rounds):
        for way in (("one task", "per model") if r % 2 == 0 else ("per model", "one task")):
            s, rows[way] = measure(way, cfg, items, args.cpus)
            times[way].append(s)
            print(f"round {r + 1}  {way:9s}  {s:6.1f} s")
    a, b = statistics.median(times["one task"]), statistics.median(times["per model"])
    print(f"median: one task {a:.1f} s, one task per model {b:.1f} s: {a / b:.2f}x")
    print("identical per-image scores:", rows["one task"] == rows["per model"])


if __name__ == "__main__":
    main()
