"""The evaluator's cost: its share of trial wall time, and batched vs one-at-a-time generation.

(a) Share of trial time: runs a demo sweep (``--config``, default sweeps/configs/demo.yaml: the
    toy world, 600 steps, evaluation every 150, 6 prompts x 4 seeds, 25 DDIM steps; the first
    figures were taken on tiny-demo.yaml: 60 steps, every 20, 3 x 2, 10 steps) on a local Ray and
    reads every trial's results back: each report carries ``eval_s`` (generation + scoring) and
    Tune's ``time_this_iter_s`` (everything since the previous report: training, validation loss,
    image evaluation, checkpointing). Share = sum(eval_s) / sum(time_this_iter_s), over all trials.

(b) Batched vs one at a time: the same prompts and seeds generated with ``batch_size`` = all
    images (the default takes up to 8) vs 1, on the same model, rounds interleaved so machine
    noise hits both; prints seconds per image and the ratio. The images are the same either way
    (tests/test_evaluate.py), so this is pure speed.

    python bench/bench_evaluator.py                 # both, ~2 min on 2 CPU cores
    python bench/bench_evaluator.py --skip-sweep    # (b) only

Run on a quiet machine: another busy process on 2 cores distorts both figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

from sweeps.config import load_sweep  # noqa: E402
from trainers.evaluate import EvalSettings, generate  # noqa: E402
from trainers.models import load_model  # noqa: E402

DEMO = REPO / "sweeps" / "configs" / "demo.yaml"


def evaluator_share(config: Path, num_samples: int) -> dict[str, float]:
    """Run the demo sweep; return the evaluator's share of trial time (and the parts)."""
    from sweeps.driver import run_sweep

    cfg = load_sweep(config, {"search.num_samples": num_samples, "tracking.wandb": False})
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-eval-") as tmp:
        run = run_sweep(cfg, run_dir=Path(tmp) / "run")
        eval_s = iter_s = 0.0
        reports = 0
        for trial in run.run_dir.iterdir():
            result = trial / "result.json"
            if not result.is_file():
                continue
            for line in result.read_text().splitlines():
                r = json.loads(line)
                if "eval_s" in r:
                    eval_s += r["eval_s"]
                    iter_s += r["time_this_iter_s"]
                    reports += 1
        baseline_s = json.loads((run.run_dir / "sweep.json").read_text())["baseline"]["eval_s"]
    return {"trials": num_samples, "evaluations": reports, "eval_s": eval_s, "trial_s": iter_s,
            "share": eval_s / iter_s, "per_eval_s": eval_s / reports, "baseline_eval_s": baseline_s}


def batching_ratio(config: Path, rounds: int, threads: int) -> dict[str, float]:
    """Seconds per image generating the demo's evaluation set batched vs one image per call."""
    torch.set_num_threads(threads)
    cfg = load_sweep(config)
    gen = cfg.evaluation.images.generation  # type: ignore[union-attr]
    n = len(gen.prompts) * len(gen.seeds)
    model = load_model(cfg.base.model)
    batched = gen.model_copy(update={"batch_size": n})
    single = gen.model_copy(update={"batch_size": 1})
    generate(model, EvalSettings(prompts=("warm up",), seeds=(0,), steps=2))
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(rounds):
        for name, settings in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            generate(model, settings)
            times[name].append((time.perf_counter() - t0) / n)
    b, s = statistics.median(times["batched"]), statistics.median(times["single"])
    return {"images": n, "steps": gen.steps, "threads": threads, "rounds": rounds,
            "batched_s_per_image": b, "single_s_per_image": s, "speedup": s / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="the sweep file (default: the demo)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials in the demo sweep for (a)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for (b) (a demo trial has 1 CPU)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    out: dict[str, dict[str, float]] = {}
    if not args.skip_sweep:
        a = out["share"] = evaluator_share(args.config, args.num_samples)
        print(f"(a) evaluator share of trial time, {args.config.name} defaults: {a['share']:.1%} "
              f"({a['eval_s']:.1f} s of {a['trial_s']:.1f} s over {a['evaluations']} evaluations in "
              f"{a['trials']} trials; {a['per_eval_s']:.2f} s per evaluation; baseline {a['baseline_eval_s']:.2f} s)")
    b = out["batching"] = batching_ratio(args.config, args.rounds, args.threads)
    print(f"(b) generation per image, {b['images']} images x {b['steps']} steps, {b['threads']} thread(s): "
          f"batched {b['batched_s_per_image'] * 1000:.1f} ms vs one at a time {b['single_s_per_image'] * 1000:.1f} ms "
          f"-> batched is {b['speedup']:.2f}x faster (median of {b['rounds']} interleaved rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
