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
    python bench/bench_ranking.py prior-view lora0.json db.json mixed.json   # a wider known-shape view, ~10 s/ckpt
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
# The checker's verdicts on the sweep's own evaluation images: never a term (a real sweep has no
# checker), but the best any score read from those images could do -- the oracle column of `fit`.
ORACLE = ("concept_rate", "prior_kept")


def _truth(judged: dict[str, Any]) -> float:
    return (judged["concept_rate"]["rate"] + judged["prior_kept"]["rate"]) / 2


def _half_truths(judged: dict[str, Any]) -> list[float]:
    """The truth on the even seeds and on the odd seeds apart: two independent measurements of
    the same checkpoint, whose agreement bounds how well any score can track the measured truth."""
    out = []
    for parity in (0, 1):
        rates = []
        for name in ("concept_rate", "prior_kept"):
            v = [ok for seed, ok in judged[name]["by_seed"] if seed % 2 == parity]
            rates.append(sum(v) / len(v))
        out.append(sum(rates) / 2)
    return out


def image_terms(sample_dir: Path, clip: str, token: str) -> dict[str, float]:
    """Candidate ranking terms a real sweep could compute from an evaluation's own images
    (``samples/step-N``): ``clip_t_known``, CLIP-T on the prompts *without* the token (are the
    known things still drawn as asked; unlike drift it does not penalise a change that fixes an
    image)."""
    from PIL import Image

    from trainers.metrics import get_metric

    rows = json.loads((sample_dir / "scores.json").read_text())["rows"]
    known = [r for r in rows if token not in r["prompt"]]
    if not known:
        return {}
    images = [Image.open(sample_dir / r["file"]).convert("RGB") for r in known]
    r = get_metric("clip_t", clip=clip).score(images, [r["prompt"] for r in known], None)
    return {"clip_t_known": float(sum(r.per_item) / len(r.per_item))}


def augment(path: Path) -> None:
    """Add :func:`image_terms` to a measurement written before they existed."""
    from sweeps.results import leaderboard

    data = json.loads(path.read_text())
    run_dir = Path(data["run_dir"])
    images = read_state_images(run_dir)
    rows = {r.trial_id: r for r in leaderboard(run_dir)[0]}
    for c in data["checkpoints"]:
        trial, step = c["label"].split("@")
        h = next(e for e in rows[trial].history if e.get("step") == int(step) and "composite" in e)
        c["sweep"].update({k: h[k] for k in ORACLE if k in h})
        c["sweep"].update(image_terms(rows[trial].path / "samples" / f"step-{int(step):06d}", images["clip"],
                                      images["generation"]["token"]))
    path.write_text(json.dumps(data, indent=1))


def read_state_images(run_dir: Path) -> dict[str, Any]:
    from sweeps.results import read_state

    return read_state(run_dir)["config"]["evaluation"]["images"]


# Two more known shapes than the demos' evaluation draws (a triangle and a cross, in colour pairs
# that neither the demos, their confirmation nor the held-out check use).
EXTRA_KNOWN = ("a red triangle on a green background", "a yellow cross on a blue background")


def prior_view(path: Path) -> dict[str, Any]:
    """Would a wider in-sweep view of the known shapes track the held-out prior? For every
    checkpoint of a measurement: the demos' two known-shape prompts plus :data:`EXTRA_KNOWN`, the
    evaluation's seeds 0-3 and sampler, drawn again; drift (toy CLIP) against the base model's
    images and the checker's verdicts on the two prompts and on all four, each ranked against the
    held-out ``prior_kept`` and truth."""
    from contextlib import nullcontext

    import torch

    from sweeps.results import find_checkpoint, leaderboard
    from trainers import get_trainer_class
    from trainers.evaluate import EvalSettings, generate
    from trainers.metrics import get_metric, image_embeddings
    from trainers.models import load_base_model

    data = json.loads(path.read_text())
    run_dir = Path(data["run_dir"])
    images = read_state_images(run_dir)
    token = images["generation"]["token"]
    known = [p for p in images["generation"]["prompts"] if "{token}" not in p]
    prompts = (*known, *EXTRA_KNOWN)
    settings = EvalSettings(prompts=prompts, seeds=(0, 1, 2, 3), sampler="ddim", steps=25, guidance_scale=5.0,
                            resolution=32, batch_size=4 * len(prompts))
    checker = get_metric("prior_kept", checker="builtin:toyworld", token=token, concept=images.get("concept"))
    model = load_base_model("builtin:toyworld")

    def draw(ckpt: Path | None, method: str | None) -> tuple[torch.Tensor, list[float]]:
        loaded = get_trainer_class(method).loaded_for_evaluation(model, ckpt) if ckpt and method else nullcontext(model)
        with loaded as m, torch.no_grad():
            out = generate(m, settings)
        emb = image_embeddings(images["clip"], [g.image for g in out])
        verdicts = checker.score([g.image for g in out], [g.prompt for g in out], None).per_item
        return emb / emb.norm(dim=-1, keepdim=True), [float(v) for v in verdicts]

    torch.set_num_threads(2)
    base, _ = draw(None, None)
    rows = {r.trial_id: r for r in leaderboard(run_dir)[0]}
    n = 4 * len(known)
    per = []
    for c in data["checkpoints"]:
        trial, step = c["label"].split("@")
        emb, verdicts = draw(find_checkpoint(rows[trial].path, int(step)), c["method"])
        cos = (emb * base).sum(-1)
        per.append({"label": c["label"], "drift_sweep_prompts": float(cos[:n].mean()), "drift_wider": float(cos.mean()),
                    "checker_sweep_prompts": sum(verdicts[:n]) / n, "checker_wider": sum(verdicts) / len(verdicts),
                    "heldout_prior": c["heldout"]["prior_kept"], "truth": c["truth"]})
    keys = ("drift_sweep_prompts", "drift_wider", "checker_sweep_prompts", "checker_wider")
    rho = {k: {"heldout_prior": _rho([r[k] for r in per], [r["heldout_prior"] for r in per]),
               "truth": _rho([r[k] for r in per], [r["truth"] for r in per])} for k in keys}
    return {"measurement": str(path), "prompts": list(prompts), "rho": rho, "checkpoints": per}


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
            sweep = {k: h[k] for k in ("clip_t", "clip_i", "dino", "drift", "composite", *ORACLE) if k in h}
            sweep.setdefault("drift", drift.get(label))
            sweep.update(image_terms(row.path / "samples" / f"step-{step:06d}", images["clip"],
                                     images["generation"]["token"]))
            out.append({"label": label, "method": row.method, "step": step, "sweep": sweep,
                        "heldout": {k: judged[k]["rate"] for k in ("concept_rate", "prior_kept")},
                        "truth": _truth(judged), "truth_halves": _half_truths(judged)})
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
    return {"rho": _rho(values, truths), "regret": max(truths) - truths[pick],
            "pick_truth": truths[pick], "base_truth": sweep["base"]["truth"], "checkpoints": len(cks)}


def _rho(a: list[float], b: list[float]) -> float:
    """Spearman's rho; 0 where one side is constant (a term that cannot rank, e.g. TI's drift)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return 0.0
    return float(spearmanr(a, b).statistic)


def ceiling(sweep: dict[str, Any]) -> float | None:
    """Split-half agreement of the measured truth: rho between the truth on even and on odd
    seeds over the sweep's checkpoints (None for measurements taken before halves were kept).
    Noise in the truth caps any score's rho with it near this figure (Spearman-Brown: the full
    measurement's reliability is 2r / (1 + r))."""
    cks = sweep["checkpoints"]
    if not cks or "truth_halves" not in cks[0]:
        return None
    return _rho([c["truth_halves"][0] for c in cks], [c["truth_halves"][1] for c in cks])


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
    a = sub.add_parser("augment", help="add the image terms to measurements written before they existed")
    a.add_argument("json_files", nargs="+", type=Path)
    v = sub.add_parser("prior-view", help="the demos' known-shape view vs one with two more shapes (prior_view)")
    v.add_argument("json_files", nargs="+", type=Path)
    v.add_argument("--json", type=Path, help="also write the figures here")
    f = sub.add_parser("fit")
    f.add_argument("--train", nargs="+", type=Path, required=True)
    f.add_argument("--test", nargs="+", type=Path, required=True)
    f.add_argument("--terms", nargs="+", default=["clip_t", "clip_i", "drift"])
    f.add_argument("--step", type=float, default=0.05)
    f.add_argument("--json", type=Path, help="also write the table here")
    f.add_argument("--markdown", action="store_true", help="also print the table as docs/BENCHMARKS.md shows it")
    args = ap.parse_args()
    if args.cmd == "measure":
        args.json.write_text(json.dumps(measure(args.run_dir, args.seeds), indent=1))
        return
    if args.cmd == "prior-view":
        views = [prior_view(path) for path in args.json_files]
        for view in views:
            print(f"{Path(view['measurement']).stem}: rho with held-out prior_kept / with truth: " + ", ".join(
                f"{k} {r['heldout_prior']:+.2f} / {r['truth']:+.2f}" for k, r in view["rho"].items()))
        if args.json:
            args.json.write_text(json.dumps(views, indent=1))
        return
    if args.cmd == "augment":
        for path in args.json_files:
            augment(path)
        return
    train = [json.loads(p.read_text()) for p in args.train]
    test = [(p, json.loads(p.read_text())) for p in args.test]
    weights = fit(train, args.terms, args.step)
    print(f"chosen on {[str(p) for p in args.train]}: weights {weights} "
          f"(mean rho in sample {sum(judged(s, weights)['rho'] for s in train) / len(train):+.3f})")
    print(f"{'sweep':24s} {'ckpts':>5s} {'truth range':>11s} {'split-half':>10s} {'oracle':>7s} {'rho (chosen)':>12s} {'regret':>7s} "
          f"{'rho (sweep)':>11s} {'regret':>7s} " + " ".join(f"{'rho ' + t:>11s}" for t in args.terms)
          + f" {'pick truth':>10s} {'base truth':>10s}")
    table = []
    for path, s in [*((p, json.loads(p.read_text())) for p in args.train), *test]:
        a, b = judged(s, weights), judged(s, None)
        truths = [c["truth"] for c in s["checkpoints"]]
        terms = {t: _rho([c["sweep"][t] for c in s["checkpoints"]], truths) for t in args.terms}
        half = ceiling(s)
        oracle = (_rho([sum(c["sweep"][k] for k in ORACLE) for c in s["checkpoints"]], truths)
                  if all(k in c["sweep"] for c in s["checkpoints"] for k in ORACLE) else None)
        row = {"sweep": str(path), "in_sample": path in args.train, "chosen": a, "sweep_composite": b,
               "terms": terms, "split_half": half, "oracle": oracle, "truth_range": [min(truths), max(truths)]}
        table.append(row)
        print(f"{path.stem + (' (fit)' if row['in_sample'] else ''):24s} {a['checkpoints']:5d} "
              f"{min(truths):5.2f}-{max(truths):4.2f} {'-' if half is None else f'{half:+.2f}':>10s} "
              f"{'-' if oracle is None else f'{oracle:+.2f}':>7s} {a['rho']:+12.3f} "
              f"{a['regret']:7.3f} {b['rho']:+11.3f} {b['regret']:7.3f} "
              + " ".join(f"{terms[t]:+11.3f}" for t in args.terms) + f" {a['pick_truth']:10.3f} {a['base_truth']:10.3f}")
    out = [r for r in table if not r["in_sample"]]
    print(f"out of sample ({len(out)} sweeps): chosen mean rho {sum(r['chosen']['rho'] for r in out) / len(out):+.3f}, "
          f"min {min(r['chosen']['rho'] for r in out):+.3f}, mean regret {sum(r['chosen']['regret'] for r in out) / len(out):.3f}; "
          f"the sweeps' own composites: mean rho {sum(r['sweep_composite']['rho'] for r in out) / len(out):+.3f}, "
          f"mean regret {sum(r['sweep_composite']['regret'] for r in out) / len(out):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"weights": weights, "train": [str(p) for p in args.train], "table": table},
                                        indent=1))
    if args.markdown:
        print(markdown(table, args.terms))


def markdown(table: list[dict[str, Any]], terms: list[str]) -> str:
    """The fit's table as docs/BENCHMARKS.md shows it."""
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:+.2f}".replace("-", "−")

    lines = ["| sweep | checkpoints | truth range (base) | split-half | oracle | **rho, chosen** | regret | "
             "rho, sweep's composite | regret | " + " | ".join(f"rho, {t}" for t in terms) + " |",
             "| --- " * (9 + len(terms)) + "|"]
    for r in table:
        a, b = r["chosen"], r["sweep_composite"]
        name = Path(r["sweep"]).stem + (" (fit)" if r["in_sample"] else "")
        lines.append(f"| {name} | {a['checkpoints']} | {r['truth_range'][0]:.2f}–{r['truth_range'][1]:.2f} "
                     f"({a['base_truth']:.2f}) | {f(r['split_half'])} | {f(r['oracle'])} | **{f(a['rho'])}** | "
                     f"{a['regret']:.3f} | {f(b['rho'])} | {b['regret']:.3f} | "
                     + " | ".join(f(r["terms"][t]) for t in terms) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
