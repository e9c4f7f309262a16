"""Coverage of the held-out confirmation's intervals, measured by simulation with a known truth.

Each dataset is a confirmation's per-image margins between two models on every prompt x every seed:
``margin + prompt effect + seed effect + noise`` (normal), or a binary ground-truth metric like
``concept_rate`` (each model draws the concept right or not, with a prompt-dependent rate, a gain that
varies by prompt, and a seed effect both models share). For every design and mix of variances it
prints the share of datasets whose 95 % interval contains the true margin, for

* ``two-way t``: sdsweep's interval (sweeps/bootstrap.py: prompts and seeds resampled, t interval);
* ``two-way pct``: the percentile interval of the same two-way resamples;
* ``iid pct``: sdsweep's former interval, the images resampled one by one (percentile).

    python bench/bench_bootstrap_coverage.py [--repeats 4000] [--resamples 1000]
    python bench/bench_bootstrap_coverage.py --run-dir RUN_DIR   # a finished sweep's confirmation

With ``--run-dir`` it re-evaluates a confirmed sweep's margins (``confirm/*/scores.json``) both
ways instead: sdsweep's interval with its prompt and seed parts, and the former image-by-image one.

The Monte-Carlo standard error of each figure is sqrt(c (1 - c) / repeats) (0.0034 at 0.95 with
4000 repeats). Figures: docs/EVALUATION.md ("How sure").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sweeps.bootstrap import _aggregate, _values, bootstrap_margins, cluster_weights, paired_bootstrap

NORMAL_MIXES = {  # sd of the prompt effect, the seed effect and the per-image noise on the margin
    "prompts dominate (1, 0, 1)": (1.0, 0.0, 1.0),
    "seeds dominate (0, 1, 1)": (0.0, 1.0, 1.0),
    "prompts + seeds (1, 1, 0.2)": (1.0, 1.0, 0.2),
    "all three (0.5, 0.5, 1)": (0.5, 0.5, 1.0),
    "some prompt (0.5, 0.2, 1)": (0.5, 0.2, 1.0),
    "noise only (0, 0, 1)": (0.0, 0.0, 1.0),
}


def design(prompts: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(prompts), seeds), np.tile(np.arange(seeds), prompts)


def normal(prompts: int, seeds: int, sds: tuple[float, float, float], repeats: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    p, s = design(prompts, seeds)
    d = (0.1 + rng.normal(0, sds[0], (repeats, prompts))[:, p] + rng.normal(0, sds[1], (repeats, seeds))[:, s]
         + rng.normal(0, sds[2], (repeats, prompts * seeds)))
    return d, np.zeros_like(d), 0.1


def binary(prompts: int, seeds: int, gain_sd: float, repeats: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Base model: logit rate N(-2, 1) per prompt; the winner adds a gain N(1.5, gain_sd) per
    prompt; a seed shifts both models' logit by N(0, 1). Truth: the expected difference of rates
    over new prompts and seeds (Monte Carlo, 10^6 draws)."""
    def sig(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    n = 1_000_000
    base, gain, shift = rng.normal(-2, 1, n), rng.normal(1.5, gain_sd, n), rng.normal(0, 1, n)
    truth = float(np.mean(sig(base + gain + shift) - sig(base + shift)))
    p, s = design(prompts, seeds)
    base = rng.normal(-2, 1, (repeats, prompts))[:, p]
    gain = rng.normal(1.5, gain_sd, (repeats, prompts))[:, p]
    logit = base + rng.normal(0, 1, (repeats, seeds))[:, s]
    a = (rng.random(logit.shape) < sig(logit + gain)).astype(float)
    b = (rng.random(logit.shape) < sig(logit)).astype(float)
    return a, b, truth


def coverage(a: np.ndarray, b: np.ndarray, truth: float, prompts: int, seeds: int, resamples: int,
             rng: np.random.Generator) -> dict[str, float]:
    p, s = design(prompts, seeds)
    out = bootstrap_margins(a[..., None], b[..., None], p, s, ["m"], "m", {"m": 1.0}, {"m": 1.0},
                            resamples=resamples)
    got = {"two-way t": np.mean((out["low"] <= truth) & (truth <= out["high"]))}
    both, _, _ = cluster_weights(p, s, resamples, rng)
    d = a - b
    reps = (d @ both.T) / both.sum(axis=1)
    low, high = np.quantile(reps, [0.025, 0.975], axis=1)
    got["two-way pct"] = np.mean((low <= truth) & (truth <= high))
    n = d.shape[1]
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n
    low, high = np.quantile(d @ w.T, [0.025, 0.975], axis=1)
    got["iid pct"] = np.mean((low <= truth) & (truth <= high))
    return {k: float(v) for k, v in got.items()}


def real_run(run_dir: Path, resamples: int) -> None:
    """Both intervals of every margin of a confirmed sweep's winner."""
    from trainers.metrics import METRICS

    conf = json.loads((run_dir / "confirm" / "confirm.json").read_text())
    images = json.loads((run_dir / "sweep.json").read_text())["config"]["evaluation"]["images"]
    metrics = list(images["metrics"])
    weights = images.get("weights") or {m: 1.0 for m in metrics if m in ("clip_t", "clip_i", "dino")}
    scales = {k: METRICS[k].scale for k in metrics}
    rows = {m["label"]: json.loads((run_dir / m["dir"] / "scores.json").read_text())["rows"] for m in conf["models"]}
    rng = np.random.default_rng(0)
    print(f"{'vs':9s} {'metric':12s} {'margin':>9s}  {'images one by one':>20s}  {'two-way t (sdsweep)':>20s} "
          f"{'se':>7s} {'prompts':>7s} {'seeds':>7s} {'df':>5s}  PxS")
    for name in ("runner_up", "baseline"):
        if name not in conf["margins"]:
            continue
        a, b = rows[conf["winner"]], rows[conf["margins"][name]["other"]]
        for target in ("composite", *metrics):
            r = paired_bootstrap(a, b, metrics, target, weights, resamples=resamples, scales=scales)
            n = len(a)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
            va, vb = _values(a, metrics), _values(b, metrics)
            d = _aggregate(va, w, metrics, target, weights, scales) - _aggregate(vb, w, metrics, target, weights, scales)
            low, high = np.nanquantile(d, [0.025, 0.975])
            print(f"{name:9s} {target:12s} {r['margin']:+9.4f}  [{low:+8.4f}, {high:+8.4f}]  "
                  f"[{r['low']:+8.4f}, {r['high']:+8.4f}] {r['se']:7.4f} {r['se_prompts']:7.4f} "
                  f"{r['se_seeds']:7.4f} {r['df']:5.1f}  {r['prompts']}x{r['seeds']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=4000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--run-dir", type=Path, help="re-evaluate this confirmed sweep instead of simulating")
    args = ap.parse_args()
    if args.run_dir:
        real_run(args.run_dir, max(args.resamples, 2000))
        return
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"{'design':8s} {'mix':30s} {'two-way t':>10s} {'two-way pct':>12s} {'iid pct':>8s}")
    for prompts, seeds in ((6, 8), (4, 16), (6, 16)):
        cases = [(name, normal(prompts, seeds, sds, args.repeats, rng)) for name, sds in NORMAL_MIXES.items()]
        cases += [(f"binary, gain sd {g}", binary(prompts, seeds, g, args.repeats, rng)) for g in (0.0, 1.0)]
        for name, (a, b, truth) in cases:
            c = coverage(a, b, truth, prompts, seeds, args.resamples, rng)
            print(f"{prompts}x{seeds:<6d} {name:30s} {c['two-way t']:10.3f} {c['two-way pct']:12.3f} {c['iid pct']:8.3f}")
    print(f"{args.repeats} datasets per row, {args.resamples} resamples each; "
          f"Monte-Carlo s.e. at 0.95: {np.sqrt(0.95 * 0.05 / args.repeats):.4f}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
