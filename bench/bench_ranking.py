"""Does the ranking score track the truth? Every kept checkpoint of finished toy-world sweeps, judged
on images no sweep uses, against the scores the sweep ranked it by; and a composite chosen on some
sweeps, reported on others.

``measure``: for each kept checkpoint of RUN_DIR (loaded as the evaluator loads it, through its
trainer's ``loaded_for_evaluation``) and for the base model, the toy world's checker judges
``bench_demo_heldout``'s external colour pairs x ``--seeds`` seeds (5000...) and its known-shape
prompts: held-out ``concept_rate``, ``prior_kept`` and ``truth = (concept_rate + prior_kept) / 2``.
Beside it, the checkpoint's scores at that step in the sweep (``clip_t``, ``clip_i``, ``composite``,
and ``drift``: the sweep's own, or recomputed from its images as ``bench_drift`` does).

``fit``: on the ``--train`` sweeps' measurements, the composite weights over ``--terms`` (a grid on
the simplex, each term on the composite's scale) with the highest mean Spearman's rho with truth;
then, on the ``--test`` sweeps, that composite's rho with truth over every kept checkpoint, the
regret of its pick (truth of the best checkpoint minus truth of the one it ranks first), and the
same for the sweep's own composite.

    python bench/bench_ranking.py measure RUN_DIR --json lora0.json          # ~15 s per checkpoint, 2 cores
    python bench/bench_ranking.py fit --train lora0.json lora1.json --test lora2.json db.json ti.json mixed.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SCALE = {"clip_t": 0.01}  # the composite's scales (trainers.metrics): CLIP-T's x100 undone


def _truth(judged: dict[str, Any]) -> float:
    return (judged["concept_rate"]["rate"] + judged["prior_kept"]["rate"]) / 2


def measure(run_dir: Path, seeds: int) -> dict[str, Any]:
    import torch

    import bench_drift
    from bench_demo_heldout import judge
    from sweeps.results import find_checkpoint, kept_steps, leaderboard, read_state
    from trainers.models import load_base_model

    torch.set_num_threads(2)
    state = read_state(run_dir)
    images = state["config"]["evaluation"]["images"]
    concept = images.get("concept") or "star"
    seed_list = list(range(5000, 5000 + seeds))
    drift = {c["label"]: c["drift"] for c in bench_drift.measure(run_dir, "clip", None)["per_checkpoint"]}
    model = load_base_model("builtin:toyworld")
    base = judge(model, None, None, seed_list, concept)
    rows, _ = leaderboard(run_dir)
    out = []
    for row in rows:
        for step in kept_steps(row.path):
            ckpt = find_checkpoint(row.path, step)
            h = next((e for e in row.history if e.get("step") == step and "composite" in e), None)
            if ckpt is None or h is None:
                continue
            label = f"{row.trial_id}@{step}"
            judged = judge(model, ckpt, row.method, seed_list, concept)
            sweep = {k: h[k] for k in ("clip_t", "clip_i", "dino", "drift", "composite") if k in h}
            sweep.setdefault("drift", drift.get(label))
            out.append({"label": label, "method": row.method, "step": step, "sweep": sweep,
                        "heldout": {k: judged[k]["rate"] for k in ("concept_rate", "prior_kept")},
                        "truth": _truth(judged)})
            print(f"{label:16s} {row.method:18s} truth {out[-1]['truth']:.3f}  composite {sweep['composite']:.4f}",
                  flush=True)
    return {"run_dir": str(run_dir), "seeds": seed_list, "weights": images.get("weights"),
            "base": {"heldout": {k: base[k]["rate"] for k in ("concept_rate", "prior_kept")}, "truth": _truth(base)},
            "checkpoints": out}


def score(ckpt: dict[str, Any], weights: dict[str, float]) -> float:
    total = sum(weights.values())
    return sum(w * SCALE.get(k, 1.0) * ckpt["sweep"][k] for k, w in weights.items()) / total


def judged(sweep: dict[str, Any], weights: dict[str, float] | None) -> dict[str, float]:
    """Spearman's rho with truth and the regret of the pick, ranking by ``weights`` (None: the
    sweep's own composite)."""
    from scipy.stats import spearmanr

    cks = sweep["checkpoints"]
    values = [c["sweep"]["composite"] if weights is None else score(c, weights) for c in cks]
    truths = [c["truth"] for c in cks]
    pick = max(range(len(cks)), key=lambda i: values[i])
    return {"rho": float(spearmanr(values, truths).statistic), "regret": max(truths) - truths[pick],
            "pick_truth": truths[pick], "base_truth": sweep["base"]["truth"], "checkpoints": len(cks)}


def fit(train: list[dict[str, Any]], terms: list[str], step: float) -> dict[str, float]:
    """The weights on the simplex grid (``step``) with the highest mean rho over ``train``."""
    n = round(1 / step)
    best, best_rho = None, -2.0
    for combo in itertools.product(range(n + 1), repeat=len(terms)):
        if sum(combo) != n:
            continue
        weights = {t: c * step for t, c in zip(terms, combo) if c}
        rho = sum(judged(s, weights)["rho"] for s in train) / len(train)
        if rho > best_rho + 1e-12:
            best, best_rho = weights, rho
    assert best is not None
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("run_dir", type=Path)
    m.add_argument("--seeds", type=int, default=8, help="seeds per external colour pair (default 8)")
    m.add_argument("--json", type=Path, required=True)
    f = sub.add_parser("fit")
    f.add_argument("--train", nargs="+", type=Path, required=True)
    f.add_argument("--test", nargs="+", type=Path, required=True)
    f.add_argument("--terms", nargs="+", default=["clip_t", "clip_i", "drift"])
    f.add_argument("--step", type=float, default=0.05)
    args = ap.parse_args()
    if args.cmd == "measure":
        args.json.write_text(json.dumps(measure(args.run_dir, args.seeds), indent=1))
        return
    train = [json.loads(p.read_text()) for p in args.train]
    test = [(p, json.loads(p.read_text())) for p in args.test]
    weights = fit(train, args.terms, args.step)
    print(f"chosen on {[str(p) for p in args.train]}: weights {weights} "
          f"(mean rho in sample {sum(judged(s, weights)['rho'] for s in train) / len(train):+.3f})")
    print(f"{'sweep':40s} {'ckpts':>5s} {'rho (chosen)':>12s} {'regret':>7s} {'rho (sweep)':>11s} {'regret':>7s} "
          f"{'pick truth':>10s} {'base truth':>10s}")
    for path, s in test:
        a, b = judged(s, weights), judged(s, None)
        print(f"{str(path)[-40:]:40s} {a['checkpoints']:5d} {a['rho']:+12.3f} {a['regret']:7.3f} {b['rho']:+11.3f} "
              f"{b['regret']:7.3f} {a['pick_truth']:10.3f} {a['base_truth']:10.3f}")


if __name__ == "__main__":
    main()
