"""Sweep benchmark, decomposed: cache on/off x reused/fresh workers x concurrency 1/2, plus the
reference, all on the same trials, side by side in one run.

Every cell is a real sdsweep sweep (``sweeps.driver.run_sweep``, Ray Tune + Optuna, the real
trial function and trainer) of the same N LoRA trials x S steps; the hyperparameters come from
Optuna's random sampler with a fixed seed, so every cell runs the same configurations (checked).
The factors:

- cache:       on = trials read latents and text embeddings from the shared cache (sdsweep);
               off = trials VAE-encode the pixels and run the text encoder every step, as the
               reference scripts do (the cache object is swapped in the driver for
               ``bench_latent_cache.EncodeEveryStep``; the trial and trainer code are unchanged)
- workers:     reused (``reuse_workers: true``) / fresh (``false``: a new worker process per trial)
- concurrency: ``max_concurrent_trials`` 2 / 1 (1 CPU per trial)

The reference arm runs the same trials as one process each, one after another, without Ray,
encoding every step (``bench/reference_trial.py``): what a user running the reference scripts
one by one pays. Printed: wall time per cell with its ratio to the reference, each factor's main
effect (geometric mean over the 4 pairs of cells that differ only in it), and the share of the
end-to-end log-ratio that each factor earns.

    python bench/bench_sweep.py --json out.json             # 8 trials x 40 steps (see docs/BENCHMARKS.md)
    python bench/bench_sweep.py --trials 2 --steps 10       # a quick check of the script

Each cell is its own driver process (Ray does not reliably start twice in one process) with its
own empty latent cache, so every cell pays Ray's start and one cache build, as a user's first
sweep does. Cell wall = ``ray.init`` .. ``ray.shutdown`` in that process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

# Workers and subprocesses must import this checkout (an editable install may point elsewhere),
# and the cache-off cells' dataset class lives in bench/bench_latent_cache.py.
PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
EVERY, BATCH = 10, 4
# Level +1 of each factor is sdsweep's default, -1 the reference's.
FACTORS = {"cache": ("on", "off"), "workers": ("reused", "fresh"), "concurrency": (2, 1)}
BEST = ("on", "reused", 2)  # the sdsweep sweep as shipped (the headline cell)
WORST = ("off", "fresh", 1)  # the same sweep machinery doing what the reference does


def cell_name(cell: tuple) -> str:
    return ",".join(f"{k}={v}" for k, v in zip(FACTORS, cell))


def sweep_dict(storage: Path, *, trials: int, steps: int, reuse: bool, concurrency: int) -> dict:
    return {
        "name": "bench", "reuse_workers": reuse,
        "base": {"model": "builtin:tiny-sd",
                 "data": {"path": "builtin:demo", "resolution": 64, "random_flip": True},
                 "train": {"max_train_steps": steps, "train_batch_size": BATCH}},
        "search": {"spaces": ["lora"], "sampler": {"type": "random", "seed": 0},
                   "num_samples": trials, "max_concurrent_trials": concurrency, "warm_start": False},
        "scheduler": {"type": "none"},  # every trial runs all its steps in every arm
        "evaluation": {"every": EVERY, "metric": "fixed_train_loss"},
        "resources": {"cpu": 1, "gpu": 0}, "checkpoints_to_keep": 1,
        "storage_path": str(storage), "tracking": {"wandb": False},
    }


# ----- one cell (runs in its own process: bench_sweep.py --cell ...) ----------------------------

def encode_every_step(build_cache: Any, vae: Any) -> Any:
    """Wrap the driver's cache build so trials get a dataset that encodes every step.

    The build task still runs (same Ray task, same cache, as in a cache-on cell); the driver then
    wraps its result in ``EncodeEveryStep`` (pixels + ``vae``, which travels to each trial with
    the dataset; ``text_embeds`` None, so the trainer runs the text encoder every step), exactly
    the dataset bench/reference_trial.py trains on.
    """
    import ray
    from bench_latent_cache import reference_dataset

    from trainers.data import preflight

    def build(cfg: Any, baseline: bool = False, expect: Any = None, on_progress: Any = None
              ) -> tuple[dict[str, list[Any]], dict]:
        build.calls += 1  # type: ignore[attr-defined]
        refs, summary = build_cache(cfg, baseline, expect, on_progress)  # {variant: [training, validation, extra]}
        data = {vid: reference_dataset(ray.get(r[0]), preflight(cfg.base.data), cfg.base.data, vae)
                for vid, r in refs.items()}
        return {vid: [ray.put(data[vid]), *r[1:]] for vid, r in refs.items()}, summary

    build.calls = 0  # type: ignore[attr-defined]
    return build


def run_cell(spec: dict) -> dict:
    """One sweep; returns wall time (Ray start to shutdown), per-trial stamps and cache encodes."""
    import ray

    from sweeps import driver
    from sweeps.config import SweepConfig

    cache, workers, concurrency = spec["cell"]
    cfg = SweepConfig.model_validate(sweep_dict(Path(spec["storage"]), trials=spec["trials"], steps=spec["steps"],
                                                reuse=workers == "reused", concurrency=concurrency))
    if cache == "off":  # the VAE is loaded before the clock starts: a cache-on cell does not load it here
        from trainers.models import load_model

        vae = load_model(cfg.base.model).vae
        driver.build_cache = encode_every_step(driver.build_cache, vae)  # this process only
    t0 = time.perf_counter()
    run = driver.run_sweep(cfg, run_dir=Path(spec["storage"]) / "run")  # starts and shuts down Ray
    wall = time.perf_counter() - t0
    if cache == "off" and driver.build_cache.calls != 1:  # type: ignore[attr-defined]
        raise SystemExit("run_sweep no longer gets its dataset from sweeps.driver.build_cache: the cache-off "
                         "cells would have trained on cached latents; update encode_every_step")
    if ray.is_initialized():
        ray.shutdown()
    trials = []
    for r in run.results:
        rows = [json.loads(x) for x in (Path(r.path) / "result.json").read_text().splitlines() if x.strip()]
        if rows[-1].get("trial_status") != "completed" or rows[-1]["step"] != spec["steps"]:
            raise SystemExit(f"{cell_name(spec['cell'])}: trial {r.path} did not complete: {rows[-1]}")
        trials.append({"params": {k: v for k, v in r.config.items() if ":" not in k},
                       "setup_s": rows[0].get("setup_s"), "model_reused": rows[0].get("model_reused"),
                       "steps": rows[-1]["step"], "started_at": rows[0]["started_at"],
                       "ended_at": rows[-1]["reported_at"]})
    return {"wall_s": wall, "trials": trials, "images_encoded": run.cache_report["images_encoded"]}


# ----- the arms, each from this (parent) process ----------------------------------------------

def launch_cell(cell: tuple, args: argparse.Namespace, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    spec = {"cell": list(cell), "trials": args.trials, "steps": args.steps, "storage": str(workdir / "runs")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "SDSWEEP_CACHE": str(workdir / "cache")}  # cold cache
    log = workdir / "cell.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, __file__, "--cell", str(workdir / "spec.json")], cwd=REPO, env=env,
                              stdout=None if args.verbose else f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"cell {cell_name(cell)} failed (exit {proc.returncode}); its log ends:\n"
                         + "\n".join(log.read_text().splitlines()[-40:]))
    out = json.loads((workdir / "cell.json").read_text())
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def run_reference(trials: list[dict], args: argparse.Namespace, workdir: Path) -> dict:
    """The same trials, one process each, one after another; VAE + text encoder every step."""
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "SDSWEEP_CACHE": str(workdir / "cache")}
    t0 = time.perf_counter()
    per = []
    for i, t in enumerate(trials):
        spec = workdir / f"ref-{i}.json"
        spec.write_text(json.dumps({"params": t["params"], "steps": args.steps, "every": EVERY, "batch": BATCH,
                                    "out": str(workdir / f"ref-{i}")}))
        s = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "bench" / "reference_trial.py"), str(spec)], check=True,
                       cwd=REPO, env=env)
        per.append(time.perf_counter() - s)
    return {"wall_s": time.perf_counter() - t0, "per_trial_s": per}


def start_gaps(trials: list[dict], concurrency: int) -> list[float]:
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


# ----- the decomposition ----------------------------------------------------------------------

def decompose(wall: dict[tuple, float], reference: float) -> dict[str, Any]:
    """Log-ratio decomposition of the 2^3 factorial and the end-to-end ratio.

    With each factor coded +1 at sdsweep's level and -1 at the reference's, log(wall) =
    mu + sum_A e_A x_A + sum_AB e_AB x_A x_B + e_ABC x_A x_B x_C exactly (8 cells, 8 terms).
    The main effect of A, exp(2 e_A), is the geometric mean of the 4 ratios wall(A=+)/wall(A=-)
    between cells that differ only in A. Between the best cell (all +1) and the worst (all -1)
    the two-factor terms cancel (x_A x_B = +1 at both), so
        log(best / worst) = 2 e_cache + 2 e_workers + 2 e_concurrency + 2 e_ABC,
    and the end-to-end log-ratio adds the harness step, log(worst / reference): Ray, Tune and
    one cache build vs plain processes, both encoding every step on fresh processes one at a time.
    """
    names = list(FACTORS)
    y = {c: math.log(wall[c]) for c in wall}
    x = {c: [1 if c[i] == FACTORS[n][0] else -1 for i, n in enumerate(names)] for c in y}

    def coef(idx: tuple[int, ...]) -> float:
        return sum(y[c] * math.prod(x[c][i] for i in idx) for c in y) / len(y)

    e2e = math.log(wall[BEST] / reference)
    terms = {n: 2 * coef((i,)) for i, n in enumerate(names)}
    terms["three-way interaction"] = 2 * coef((0, 1, 2))
    terms["harness (Ray sweep vs plain processes)"] = math.log(wall[WORST] / reference)
    pairs = {f"{names[i]} x {names[j]}": math.exp(4 * coef((i, j))) for i, j in itertools.combinations(range(3), 2)}
    cache_at = {cell_name(c).replace("cache=on,", ""): wall[c] / wall[("off", *c[1:])] for c in wall if c[0] == "on"}
    return {
        "end_to_end_ratio": math.exp(e2e), "best_over_worst_cell": wall[BEST] / wall[WORST],
        "main_effect_ratio": {n: math.exp(terms[n]) for n in names},
        "log_terms": terms, "share_of_end_to_end": {k: v / e2e for k, v in terms.items()},
        # Ratio of A's effect at B=sdsweep over A's effect at B=reference (geometric mean over C);
        # 1 = no interaction. These cancel in best/worst but say where a factor's effect depends on another.
        "two_way_interaction_ratio": pairs,
        "cache_ratio_by_cell": cache_at,
    }


def print_report(cells: dict[tuple, dict], wall: dict[tuple, float], ref: dict, dec: dict,
                 args: argparse.Namespace) -> None:
    r = ref["wall_s"]
    print(f"\n{args.trials} LoRA trials x {args.steps} steps (batch {BATCH}, 64 px, builtin:tiny-sd, eval + checkpoint "
          f"every {EVERY} steps), same configurations in every arm; {args.repeats} repeat(s), median wall")
    print(f"{'arm':44}{'wall s':>9}{'/ reference':>13}{'/ sdsweep':>11}")
    for c in sorted(wall, key=lambda c: wall[c]):
        print(f"{'sweep ' + cell_name(c):44}{wall[c]:>9.1f}{wall[c] / r:>12.2f}x{wall[c] / wall[BEST]:>10.2f}x")
    print(f"{'reference: sequential processes, no Ray':44}{r:>9.1f}{1:>12.2f}x{r / wall[BEST]:>10.2f}x")
    print(f"\nend to end (sdsweep as shipped / reference scripts one by one): {dec['end_to_end_ratio']:.2f}x; "
          f"counting the sweep driver's own process start and imports too: {dec['end_to_end_ratio_process']:.2f}x")
    print("main effects (geometric mean of the 4 cell pairs differing only in that factor):")
    for n, v in dec["main_effect_ratio"].items():
        print(f"  {n:12} {FACTORS[n][0]!s:>6} / {FACTORS[n][1]!s:<6} {v:.2f}x")
    print("share of the end-to-end log-ratio:")
    for k, v in dec["share_of_end_to_end"].items():
        print(f"  {k:44} {100 * v:6.1f} %   (x{math.exp(dec['log_terms'][k]):.2f})")
    print("  two-factor interactions cancel between the best and worst cells; their sizes (1 = none):")
    print("   " + ", ".join(f"{k} {v:.2f}" for k, v in dec["two_way_interaction_ratio"].items()))
    print("the cache's own ratio (cache on / off, all else equal): "
          + ", ".join(f"{k}: {v:.2f}x" for k, v in dec["cache_ratio_by_cell"].items()))
    on2, fr2 = cells[BEST], cells[("on", "fresh", 2)]
    g_r, g_f = start_gaps(on2["trials"], 2), start_gaps(fr2["trials"], 2)
    if g_r and g_f:
        print(f"per-trial start overhead (slot freed -> next trial function starts), cache on, 2 concurrent: reused "
              f"{statistics.mean(g_r):.2f} s (max {max(g_r):.2f}) vs fresh {statistics.mean(g_f):.2f} s "
              f"-> {statistics.mean(g_r) / statistics.mean(g_f):.2f}x")
    print(f"VAE encodes per cache build (8 images x 2 with flip = 16): "
          f"{sorted({c['images_encoded'] for c in cells.values()})}")


def run_all(args: argparse.Namespace, tmp: Path) -> dict:
    cells_order = list(itertools.product(*FACTORS.values()))
    runs: dict[tuple, list[dict]] = {c: [] for c in cells_order}
    refs = []
    for rep in range(args.repeats):
        order = cells_order if rep % 2 == 0 else cells_order[::-1]  # alternate so drift hits all cells
        if rep % 2:
            print(f"[repeat {rep + 1}/{args.repeats}] reference", flush=True)
            refs.append(run_reference(runs[BEST][0]["trials"], args, tmp / f"r{rep}-reference"))
        for i, c in enumerate(order):
            print(f"[repeat {rep + 1}/{args.repeats}] cell {i + 1}/8 {cell_name(c)}", flush=True)
            runs[c].append(launch_cell(c, args, tmp / f"r{rep}-cell{i}"))
        if rep % 2 == 0:
            print(f"[repeat {rep + 1}/{args.repeats}] reference", flush=True)
            refs.append(run_reference(runs[BEST][0]["trials"], args, tmp / f"r{rep}-reference"))
    configs = {c: sorted(json.dumps(t["params"], sort_keys=True) for t in v[0]["trials"]) for c, v in runs.items()}
    if len({json.dumps(v) for v in configs.values()}) != 1:
        raise SystemExit(f"the cells ran different trial configurations: {configs}")
    return {"runs": runs, "refs": refs, "configs_identical": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="training steps per trial (eval every 10)")
    ap.add_argument("--repeats", type=int, default=1, help="run every arm this many times, order alternating")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true", help="show the cells' Ray Tune output")
    ap.add_argument("--cell", type=Path, default=None, help=argparse.SUPPRESS)  # internal: run one cell
    args = ap.parse_args()
    if args.cell is not None:
        out = run_cell(json.loads(args.cell.read_text()))
        (args.cell.parent / "cell.json").write_text(json.dumps(out))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-") as tmp:
        got = run_all(args, Path(tmp))
    load_after = os.getloadavg()
    runs, refs = got["runs"], got["refs"]
    wall = {c: statistics.median(r["wall_s"] for r in v) for c, v in runs.items()}
    ref = {"wall_s": statistics.median(r["wall_s"] for r in refs), "runs": refs}
    dec = decompose(wall, ref["wall_s"])
    dec["end_to_end_ratio_process"] = statistics.median(r["process_wall_s"] for r in runs[BEST]) / ref["wall_s"]
    cells = {c: v[0] for c, v in runs.items()}
    print_report(cells, wall, ref, dec, args)
    # A busy machine distorts every ratio here (docs/DEVELOPING.md: never time beside another job).
    print(f"all 8 cells ran the same {args.trials} configurations; load average (1 min) before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        res = {"trials": args.trials, "steps": args.steps, "every": EVERY, "batch": BATCH, "repeats": args.repeats,
               "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
               "cells": {cell_name(c): {"wall_s": wall[c], "runs": v} for c, v in runs.items()},
               "reference": ref, "decomposition": dec}
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
