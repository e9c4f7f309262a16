"""The evaluator's cost: its share of trial wall time, and batched vs one-at-a-time generation.

(a) Share of trial time: runs a demo sweep (``--config``, default sweeps/configs/demo.yaml: the
    toy world, 600 steps, evaluation every 150, 6 prompts x 4 seeds, 25 DDIM steps; the first
    figures were taken on tiny-demo.yaml: 60 steps, every 20, 3 x 2, 10 steps) on a local Ray and
    reads every trial's results back: each report carries ``eval_s`` (generation + scoring) and
    Tune's ``time_this_iter_s`` (everything since the previous report: training, validation loss,
    image evaluation, checkpointing). Share = sum(eval_s) / sum(time_this_iter_s), over all trials.

(b) Batched vs one at a time: the same prompts and seeds generated with ``batch_size`` = all
    images vs 1 (or the sizes ``--batch-sizes`` names), on the same model, rounds interleaved so machine
    noise hits both; prints seconds per image and the ratio. The images are the same either way
    (tests/test_evaluate.py), so this is pure speed.

    python bench/bench_evaluator.py                 # both, ~2 min on 2 CPU cores
    python bench/bench_evaluator.py --skip-sweep    # (b) only
    python bench/bench_evaluator.py --skip-sweep --batch-sizes all 8 --rounds 5   # one call vs the default 8

(c) ``--scoring``: where one evaluation's time goes: generating the demo's images once, then
    scoring them with every metric of the sweep file as the evaluator does (each image embedded
    once per scoring model, ``trainers.scoring_models.shared_embeddings``) vs each metric embedding
    its own images, rounds interleaved; prints generation and scoring times and the ratio.

    python bench/bench_evaluator.py --skip-sweep --scoring --rounds 5

Run on a quiet machine: another busy process on 2 cores distorts both figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def batching_ratio(config: Path, rounds: int, threads: int, sizes: list[str]) -> dict[str, Any]:
    """Seconds per image generating the demo's evaluation set at each batch size in ``sizes``
    ("all": every image in one call), rounds interleaved; and the largest pixel difference
    between the sizes' images (0: batching changes nothing but speed)."""
    import numpy as np

    torch.set_num_threads(threads)
    cfg = load_sweep(config)
    gen = cfg.evaluation.images.generation  # type: ignore[union-attr]
    n = len(gen.prompts) * len(gen.seeds)
    model = load_model(cfg.base.model)
    settings = {size: gen.model_copy(update={"batch_size": n if size == "all" else int(size)}) for size in sizes}
    generate(model, EvalSettings(prompts=("warm up",), seeds=(0,), steps=2))
    times: dict[str, list[float]] = {size: [] for size in sizes}
    images: dict[str, list[Any]] = {}
    for _ in range(rounds):
        for size, s in settings.items():
            t0 = time.perf_counter()
            images[size] = generate(model, s)
            times[size].append((time.perf_counter() - t0) / n)
    first = [np.asarray(g.image, dtype=np.float32) for g in images[sizes[0]]]
    diff = max(float(np.abs(a - np.asarray(g.image, dtype=np.float32)).max())
               for size in sizes[1:] for a, g in zip(first, images[size]))
    per_image = {size: statistics.median(v) for size, v in times.items()}
    return {"images": n, "steps": gen.steps, "threads": threads, "rounds": rounds, "s_per_image": per_image,
            "speedup_vs_last": {size: per_image[sizes[-1]] / v for size, v in per_image.items()},
            "max_pixel_difference": diff}


def scoring_ratio(config: Path, rounds: int, threads: int) -> dict[str, Any]:
    """Seconds to generate the demo's evaluation images (base model, drift against itself) and
    to score them with shared embeddings vs without, rounds interleaved (medians)."""
    from trainers.evaluate import Evaluator, load_references
    from trainers.scoring_models import shared_embeddings

    torch.set_num_threads(threads)
    cfg = load_sweep(config)
    ev_cfg = cfg.evaluation.images
    assert ev_cfg is not None
    evaluator = Evaluator(ev_cfg, load_references(ev_cfg, cfg.base.data))
    model = load_model(cfg.base.model)
    base = evaluator.run(model, as_base=True)  # loads the scorers, embeds the references
    evaluator.set_base({base.placement: base.base_embeddings})
    times: dict[str, list[float]] = {"generate": [], "shared": [], "each its own": []}
    values: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        images = generate(model, ev_cfg.generation)
        times["generate"].append(time.perf_counter() - t0)
        pils, prompts = [g.image for g in images], [g.prompt for g in images]
        for arm in ("shared", "each its own"):
            t0 = time.perf_counter()
            with shared_embeddings() if arm == "shared" else contextlib.nullcontext():
                values[arm] = {m.name: (evaluator._drift(m, images, base.placement, False, {})
                                        if getattr(m, "prior_only", False) else evaluator._score(m, pils, prompts)).value
                               for m in evaluator.metrics}
            times[arm].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"images": len(pils), "metrics": [m.name for m in evaluator.metrics], "rounds": rounds, "threads": threads,
            "s": med, "ratio": med["each its own"] / med["shared"],
            "scoring_share_of_evaluation": med["shared"] / (med["generate"] + med["shared"]),
            "largest_score_difference": max(abs(values["shared"][k] - values["each its own"][k]) for k in values["shared"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="the sweep file (default: the demo)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials in the demo sweep for (a)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for (b) (a demo trial has 1 CPU)")
    parser.add_argument("--batch-sizes", nargs="+", default=["all", "1"],
                        help="batch sizes (b) compares, each against the last ('all': one call; default: all 1)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--scoring", action="store_true", help="(c) instead of (b): generation vs scoring, "
                        "shared embeddings vs each metric its own")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    out: dict[str, dict[str, float]] = {}
    if not args.skip_sweep:
        a = out["share"] = evaluator_share(args.config, args.num_samples)
        print(f"(a) evaluator share of trial time, {args.config.name} defaults: {a['share']:.1%} "
              f"({a['eval_s']:.1f} s of {a['trial_s']:.1f} s over {a['evaluations']} evaluations in "
              f"{a['trials']} trials; {a['per_eval_s']:.2f} s per evaluation; baseline {a['baseline_eval_s']:.2f} s)")
    if args.scoring:
        c = out["scoring"] = scoring_ratio(args.config, args.rounds, args.threads)
        print(f"(c) one evaluation, {c['images']} images, metrics {c['metrics']}, {c['threads']} thread(s), median of "
              f"{c['rounds']} interleaved rounds: generate {c['s']['generate']:.2f} s; score {c['s']['shared']:.3f} s "
              f"with shared embeddings vs {c['s']['each its own']:.3f} s each metric its own ({c['ratio']:.2f}x); "
              f"scoring is {c['scoring_share_of_evaluation']:.1%} of the evaluation; largest score difference "
              f"{c['largest_score_difference']:.2g}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return
    b = out["batching"] = batching_ratio(args.config, args.rounds, args.threads, args.batch_sizes)
    last = args.batch_sizes[-1]
    print(f"(b) generation per image, {b['images']} images x {b['steps']} steps, {b['threads']} thread(s), median of "
          f"{b['rounds']} interleaved rounds: " + ", ".join(
              f"batch {size}: {b['s_per_image'][size] * 1000:.1f} ms ({b['speedup_vs_last'][size]:.2f}x batch {last})"
              for size in args.batch_sizes) + f"; largest pixel difference between them {b['max_pixel_difference']:g}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
