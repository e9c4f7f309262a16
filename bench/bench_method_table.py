"""The toy world's method table: each method at the best recipe a sweep found, retrained on several
seeds and judged on images picking never saw, with ground truth beside the CLIP scores.

The analogue of the DreamBooth paper's Table 1 (DINO / CLIP-I / CLIP-T per method), plus what no
paper has: the toy world's checker (``concept_rate``: the star drawn as asked; ``prior_kept``:
known shapes still drawn right). Input: a finished sweep across methods (``demo-mixed.yaml``).
For every method its best trial by the sweep's metric gives the recipe (hyperparameters, and the
best checkpoint's step as the number of steps); DreamBooth is run twice, with and without prior
preservation, otherwise identical. Each (arm, training seed) trains in its own process through
the product's path (``trial_run_config`` -> the method's ``prepare_extra`` -> ``make_trainer``),
so its peak memory (max RSS) is its own, and is scored by the sweep's held-out evaluator
(``evaluation.confirm`` seeds and prompts: colour pairs and seeds the sweep never picked on).

    python bench/bench_method_table.py RUN_DIR --seeds 0 1 2 --json out.json   # ~15 min, 2 cores

Prints, per arm: mean and spread (min..max over seeds) of concept_rate, prior_kept, CLIP-T,
CLIP-I, the composite the sweep ranks by, trainer seconds, peak RSS and the artifact's bytes; and
whether ranking the methods by the CLIP composite gives the ground-truth order.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

COLUMNS = ("concept_rate", "prior_kept", "clip_t", "clip_i", "composite", "trainer_s", "peak_rss_mb",
           "artifact_bytes")


def recipes(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Arm name -> trial parameters (plain dotted keys, with ``train.max_train_steps`` at the best
    checkpoint's step), from each method's best trial of the sweep."""
    from sweeps.results import best_per_method, leaderboard

    rows, _ = leaderboard(run_dir)
    out: dict[str, dict[str, Any]] = {}
    for method, row in best_per_method(rows).items():
        params = {**row.params, "train.max_train_steps": int(row.best_step or row.steps)}
        if method != "dreambooth":
            out[method] = params
            continue
        out["dreambooth + prior"] = {**params, "dreambooth.prior_loss_weight": 1.0}
        out["dreambooth, no prior"] = {**params, "dreambooth.prior_loss_weight": 0.0}
    return out


def run_arm(run_dir: Path, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one arm with one seed in this process and score it (the subprocess's work)."""
    import torch

    from sweeps.config import SweepConfig, trial_run_config
    from sweeps.results import read_state
    from sweeps.trial import RESUME_STATE
    from trainers import get_trainer_class
    from trainers.evaluate import Evaluator, load_references
    from trainers.models import load_model
    from trainers.run import make_trainer, prepare_data

    torch.set_num_threads(1)
    cfg = SweepConfig.model_validate(read_state(run_dir)["config"])
    with tempfile.TemporaryDirectory(prefix="sdsweep-table-") as tmp:
        run = trial_run_config(cfg, {**params, "train.seed": seed}).model_copy(update={"output_dir": tmp})
        cls = get_trainer_class(run.method)
        model = load_model(run.model)
        data = prepare_data(run, model, cache_text=cls.caches_text(run.settings))
        extra, _ = cls.prepare_extra(run, model, "cpu")
        trainer = make_trainer(run, model, data, None, extra)
        try:
            trainer.train()
            ckpt = trainer.save_checkpoint(Path(tmp) / "ckpt")
            # What the method ships, counted as a sweep's trial counts it (sweeps/trial.py).
            artifact = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name not in RESUME_STATE)
            ev_cfg = cfg.evaluation.heldout_evaluator()
            evaluator = Evaluator(ev_cfg, load_references(ev_cfg, cfg.base.data), device="cpu")
            if any(getattr(m, "prior_only", False) for m in evaluator.metrics):  # drift: the base model's images
                base = evaluator.run(load_model(run.model), as_base=True)
                evaluator.set_base({base.placement: base.base_embeddings})
            with trainer.evaluation_model() as sampled:
                scores = evaluator.run(sampled, prediction_type=trainer.prediction_type).scores
            seconds = trainer.train_seconds
        finally:
            trainer.teardown()
    return {**scores, "trainer_s": seconds, "artifact_bytes": artifact, "steps": run.train.max_train_steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _spawn(run_dir: Path, arm: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, str(run_dir), "--arm-params", json.dumps(params), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {arm:<22} seed {seed}: " + ", ".join(f"{k} {out[k]:.4g}" for k in COLUMNS if k in out), flush=True)
    return {"arm": arm, "seed": seed, **out}


def _summary(results: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, tuple[float, float, float]]]:
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm]
        table[arm] = {c: (statistics.mean(r[c] for r in mine), min(r[c] for r in mine), max(r[c] for r in mine))
                      for c in COLUMNS if all(c in r for r in mine)}
    return table


def _print_table(table: dict[str, dict[str, tuple[float, float, float]]], seeds: list[int]) -> None:
    print(f"\nmean [min..max] over training seeds {seeds}; held-out images (evaluation.confirm)")
    for arm, cols in table.items():
        cells = [f"{c} {m:.3g} [{lo:.3g}..{hi:.3g}]" for c, (m, lo, hi) in cols.items()]
        print(f"  {arm:<22} " + "  ".join(cells))
    by_clip = sorted(table, key=lambda a: -table[a]["composite"][0])
    by_truth = sorted(table, key=lambda a: -table[a]["concept_rate"][0])
    print(f"ranked by the CLIP composite: {by_clip}")
    print(f"ranked by concept_rate (truth): {by_truth}")
    print("the CLIP ranking " + ("agrees with" if by_clip == by_truth else "differs from") + " the ground truth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished sweep across methods (demo-mixed.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--parallel", type=int, default=2, help="arms trained at once (1 thread each)")
    parser.add_argument("--json", help="write every run and the table here")
    parser.add_argument("--arm-params", help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm_params is not None:
        print(json.dumps(run_arm(args.run_dir, json.loads(args.arm_params), args.seed)))
        return
    arms = recipes(args.run_dir)
    for arm, params in arms.items():
        print(f"{arm}: {params}")
    jobs = [(arm, params, seed) for seed in args.seeds for arm, params in arms.items()]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: _spawn(args.run_dir, *j), jobs))
    table = _summary(results, list(arms))
    _print_table(table, args.seeds)
    from sweeps.results import read_confirmation

    conf = read_confirmation(args.run_dir)
    base = next((m["heldout"] for m in (conf or {}).get("models", []) if m["label"] == "baseline"), None)
    if base:
        print("  base model (no training, same held-out images): "
              + "  ".join(f"{c} {base[c]:.3g}" for c in COLUMNS if c in base))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipes": arms, "runs": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
