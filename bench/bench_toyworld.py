"""Sweeps judged by ground truth: the toy world's checker says how good each checkpoint really is.

Runs the demo sweep (sweeps/configs/demo.yaml: LoRA teaching the toy world the star) under three
arms, each with ``--seeds`` sampler seeds, and reads every evaluated checkpoint back:

* ``tpe+asha``   -- the demo as shipped: TPE proposals, ASHA stops weak trials on the CLIP composite;
* ``tpe+full``   -- the same with no early stopping (every trial trains its full budget);
* ``random+asha`` -- random proposals with ASHA, at the same trial count.

Ground-truth quality of a checkpoint: ``truth = (concept_rate + prior_kept) / 2`` -- the star
drawn as asked, and the known shapes still drawn right (a LoRA that draws stars for every prompt
scores 0.5 at best). The sweep itself never sees it: it ranks by the CLIP composite.

Figures (each per sweep, then mean and spread over seeds):

(a) Regret: truth of the best checkpoint by ground truth among all the sweep evaluated, minus the
    truth of the checkpoint it picks (best composite).
(b) ASHA vs full budget: training steps spent in total, and the steps until the sweep's pick so
    far (best composite among the checkpoints reported so far, in report order) first reaches
    a target truth -- the lower of the two arms' final picks for that seed, so both reach it.
(c) TPE vs random: truth of the pick and of the best checkpoint trained, at equal trial counts.
(d) CLIP vs truth: Spearman rank correlation, over every evaluated checkpoint of a sweep, of each
    CLIP score (clip_t, clip_i, composite) with concept_rate and with truth.

    python bench/bench_toyworld.py --seeds 0 1 --json out.json      # ~40 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

from sweeps.config import load_sweep  # noqa: E402
from trainers.metrics import METRICS, composite  # noqa: E402

DEMO = REPO / "sweeps" / "configs" / "demo.yaml"
ARMS: dict[str, dict[str, Any]] = {
    "tpe+asha": {},
    "tpe+full": {"scheduler": {"type": "none"}},
    "random+asha": {"search.sampler": {"type": "random", "seed": 0}},
}
CLIP_SCORES = ("clip_t", "clip_i", "composite")
# CLIP-T split by prompt, from each evaluation's per-image scores.json: the prompts with the token
# (the checker scores them for concept_rate) and the known-shape prompts (scored for prior_kept).
SPLIT_SCORES = ("clip_t_concept", "clip_t_known")


def truth(row: dict[str, Any]) -> float:
    """Ground-truth quality of one evaluated checkpoint."""
    return 0.5 * (float(row["concept_rate"]) + float(row["prior_kept"]))


def read_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of every trial: trial, step, scores and the wall-clock time it reported."""
    out = []
    for result in sorted(run_dir.glob("*/result.json")):
        for line in result.read_text().splitlines():
            r = json.loads(line)
            if "concept_rate" in r and "composite" in r:
                out.append({"trial": r["trial_id"], "step": int(r["step"]), "reported_at": float(r["reported_at"]),
                            **{k: float(r[k]) for k in (*CLIP_SCORES, "concept_rate", "prior_kept")},
                            **_split_clip_t(r.get("samples"))})
    return sorted(out, key=lambda c: c["reported_at"])


def _split_clip_t(scores_json: str | None) -> dict[str, float]:
    """Mean per-image CLIP-T over the concept prompts and over the known prompts of one evaluation.

    ``scores_json``: the evaluation's per-image scores file, as the trial reported it (``samples``).
    """
    samples = Path(scores_json) if scores_json else None
    if samples is None or not samples.is_file():  # a run directory without its samples: no split
        return {}
    rows = json.loads(samples.read_text())["rows"]
    concept = [r["clip_t"] for r in rows if r.get("concept_rate") is not None]
    known = [r["clip_t"] for r in rows if r.get("prior_kept") is not None]
    return {"clip_t_concept": statistics.fmean(concept), "clip_t_known": statistics.fmean(known)} \
        if concept and known else {}


def reweight(ckpts: list[dict[str, Any]], weights: dict[str, float]) -> list[dict[str, Any]]:
    """The same checkpoints with the composite recomputed from their stored scores."""
    return [{**c, "composite": composite(c, weights)} for c in ckpts]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho with average ranks for ties (Pearson correlation of the ranks)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def summarize(ckpts: list[dict[str, Any]], every: int) -> dict[str, Any]:
    """The per-sweep figures: pick, best, regret, steps, the incumbent curve, correlations."""
    pick = max(ckpts, key=lambda c: c["composite"])
    best = max(ckpts, key=truth)
    curve, incumbent, steps = [], None, 0
    for c in ckpts:  # report order: each report stands for `every` more training steps of its trial
        steps += every
        if incumbent is None or c["composite"] > incumbent["composite"]:
            incumbent = c
        curve.append((steps, truth(incumbent)))
    scores = [s for s in (*CLIP_SCORES, *SPLIT_SCORES) if all(s in c for c in ckpts)]
    corr = {f"{s}~{t}": spearman([c[s] for c in ckpts], [truth(c) if t == "truth" else c[t] for c in ckpts])
            for s in scores for t in ("concept_rate", "truth")}
    # Each score's spread over the checkpoints, in the composite's units (CLIP-T/100 is a cosine).
    spread = {s: statistics.pstdev([c[s] * (METRICS[s].scale if s in METRICS else 1.0) for c in ckpts])
              for s in CLIP_SCORES}
    return {"checkpoints": len(ckpts), "trials": len({c["trial"] for c in ckpts}), "train_steps": steps,
            "pick": {**pick, "truth": truth(pick)}, "best": {**best, "truth": truth(best)},
            "regret": truth(best) - truth(pick), "curve": curve, "spearman": corr, "stdev": spread}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Training steps until the incumbent's truth first reaches ``target`` (None: never)."""
    return next((s for s, q in curve if q >= target - 1e-9), None)


def run_arm(arm: str, seed: int, num_samples: int, workdir: Path) -> dict[str, Any]:
    from sweeps.driver import run_sweep

    over: dict[str, Any] = {"search.num_samples": num_samples, "tracking.wandb": False,
                            "search.sampler.seed": seed, "name": f"bench-{_run_name(arm, seed)}"}
    for key, value in ARMS[arm].items():
        if key == "search.sampler":
            over["search.sampler.type"] = value["type"]
        else:
            over[key] = value
    cfg = load_sweep(DEMO, over)
    t0 = time.perf_counter()
    run = run_sweep(cfg, run_dir=workdir / _run_name(arm, seed))
    return summarize_run(run.run_dir, arm, seed, wall_s=time.perf_counter() - t0)


def _run_name(arm: str, seed: int | str) -> str:
    return f"{arm.replace('+', '-')}-{seed}"


def summarize_run(run_dir: Path, arm: str, seed: int, wall_s: float,
                  weights: dict[str, float] | None = None) -> dict[str, Any]:
    """One sweep's figures from its run directory; ``weights``: recompute the composite first."""
    state = json.loads((run_dir / "sweep.json").read_text())
    ckpts = read_checkpoints(run_dir)
    if weights:
        ckpts = reweight(ckpts, weights)
    out = summarize(ckpts, int(state["config"]["evaluation"]["every"]))
    out.update(arm=arm, seed=seed, wall_s=wall_s)
    base = state["baseline"]["scores"]
    out["baseline"] = {**base, "truth": truth(base)}
    return out


def rescore(keep: Path, weights: dict[str, float] | None) -> list[dict[str, Any]]:
    """Re-read the sweeps a ``--keep`` run left (``<arm>-<seed>`` folders), optionally re-weighted.

    Re-weighting changes which checkpoint is picked among those trained and the correlations; it
    cannot show what the sweep would have trained under other weights (ASHA and TPE saw the old
    composite): for that, run the sweeps again.
    """
    results = []
    for arm in ARMS:
        for run_dir in sorted(keep.glob(_run_name(arm, "*"))):
            seed = run_dir.name.rsplit("-", 1)[1]
            if seed.isdigit() and (run_dir / "sweep.json").is_file():
                results.append(summarize_run(run_dir, arm, int(seed), float("nan"), weights))
    if not results:
        raise SystemExit(f"--rescore {keep}: no <arm>-<seed> run folders with a sweep.json (made by --keep)")
    return results


def _weights(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        out = {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: expected e.g. clip_t=0.2,clip_i=0.8") from None
    unknown = set(out) - {"clip_t", "clip_i"}
    if unknown:
        raise argparse.ArgumentTypeError(f"--weights: {sorted(unknown)} not stored per checkpoint; use clip_t, clip_i")
    return out


def _spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def report(results: list[dict[str, Any]]) -> None:
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    print("\nper sweep:")
    for r in results:
        print(f"  {r['arm']:<12} seed {r['seed']}: {r['trials']} trials, {r['checkpoints']} checkpoints, "
              f"{r['train_steps']} steps" + ("" if math.isnan(r["wall_s"]) else f", {r['wall_s']:.0f}s wall") + f"; pick truth {r['pick']['truth']:.3f} "
              f"(concept {r['pick']['concept_rate']:.3f}, prior {r['pick']['prior_kept']:.3f}), best "
              f"{r['best']['truth']:.3f}, regret {r['regret']:.3f}; baseline truth {r['baseline']['truth']:.3f}")
    print("\n(a) regret (truth of the best checkpoint trained - truth of the pick), mean (min, max) over seeds:")
    for arm in ARMS:
        vals = [by[(arm, s)]["regret"] for s in seeds if (arm, s) in by]
        print(f"  {arm:<12} {_spread(vals)}")
    print("\n(b) ASHA vs full budget (TPE both):")
    for s in seeds:
        a, f = by.get(("tpe+asha", s)), by.get(("tpe+full", s))
        if not (a and f):
            continue
        target = min(a["pick"]["truth"], f["pick"]["truth"])
        sa, sf = steps_to_reach(a["curve"], target), steps_to_reach(f["curve"], target)
        print(f"  seed {s}: total steps asha {a['train_steps']} vs full {f['train_steps']} "
              f"({a['train_steps'] / f['train_steps']:.2f}x); steps to reach truth {target:.3f}: "
              f"asha {sa} vs full {sf}" + (f" ({sa / sf:.2f}x)" if sa and sf else ""))
    print("\n(c) TPE vs random (both with ASHA), equal trial counts:")
    for arm in ("tpe+asha", "random+asha"):
        picks = [by[(arm, s)]["pick"]["truth"] for s in seeds if (arm, s) in by]
        bests = [by[(arm, s)]["best"]["truth"] for s in seeds if (arm, s) in by]
        print(f"  {arm:<12} pick truth {_spread(picks)}; best trained {_spread(bests)}")
    print("\n(d) Spearman rank correlation over each sweep's checkpoints, mean (min, max) over sweeps:")
    for key in results[0]["spearman"]:
        print(f"  {key:<26} {_spread([r['spearman'][key] for r in results])}")
    print("\nstandard deviation over each sweep's checkpoints, in composite units, mean (min, max):")
    for key in results[0]["stdev"]:
        print(f"  {key:<26} {_spread([r['stdev'][key] for r in results])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--num-samples", type=int, default=8, help="trials per sweep")
    parser.add_argument("--json", default=None, help="write every figure (and the raw checkpoints' scores) here")
    parser.add_argument("--keep", default=None, help="keep the run directories under this folder")
    parser.add_argument("--rescore", default=None, metavar="DIR",
                        help="run nothing: re-read the sweeps an earlier --keep DIR left")
    parser.add_argument("--weights", type=_weights, default=None,
                        help="with --rescore: recompute the composite, e.g. clip_t=0.2,clip_i=0.8")
    args = parser.parse_args()
    if args.weights and not args.rescore:
        parser.error("--weights needs --rescore (a new sweep takes its weights from demo.yaml)")
    if args.rescore:
        results = rescore(Path(args.rescore), args.weights)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        report(results)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-toyworld-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        for seed in args.seeds:
            for arm in args.arms:
                r = run_arm(arm, seed, args.num_samples, workdir)
                results.append(r)
                print(f"[bench] {arm} seed {seed}: pick truth {r['pick']['truth']:.3f}, regret {r['regret']:.3f}, "
                      f"{r['train_steps']} steps, {r['wall_s']:.0f}s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    report(results)


if __name__ == "__main__":
    main()
