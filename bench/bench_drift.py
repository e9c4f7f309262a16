"""The drift score, validated against the toy world's checker on finished sweeps.

Drift (issue 21): for each evaluation prompt *without* the concept token, the cosine between a
checkpoint's image and the base model's image at the same prompt and seed, in a scorer's image
embedding space; a checkpoint's drift is the mean over those images (1 = drawn as the base model
draws it). It needs no judge, so a real sweep can compute it. Here it is read back from what a
finished sweep already wrote (every evaluation's images and per-image verdicts under
``samples/step-*/``, the base model's under ``baseline/``) and compared with the checker:

* per image: the AUC of the cosine against the checker's verdict on that image (``prior_kept``:
  the known shape drawn right), over every evaluated checkpoint's prior-prompt images;
* per checkpoint: Spearman's rho of drift with ``prior_kept`` (the share of those images drawn
  right) and with ``concept_rate``, over every evaluated checkpoint.

Both on the sweep's own evaluation images (what the ranking sees), so they say how well the
score reads the truth on the images it is computed from, not how a pick generalises.

    python bench/bench_drift.py RUN_DIR [RUN_DIR ...] [--scorer clip|vision] [--json OUT]

``--scorer clip`` (default) embeds with the sweep's ``evaluation.images.clip``; ``vision`` with
``evaluation.images.vision_model`` (or ``--vision SPEC``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.stats import mannwhitneyu, spearmanr  # noqa: E402

from trainers.metrics import image_embeddings, vision_embeddings  # noqa: E402


def auc(scores: list[float], labels: list[float]) -> float:
    """The probability that a positive's score exceeds a negative's (ties half): Mann-Whitney's U
    over (positives x negatives)."""
    pos = [s for s, y in zip(scores, labels) if y == 1.0]
    neg = [s for s, y in zip(scores, labels) if y == 0.0]
    if not pos or not neg:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))


def embed(scorer: str, spec: str, paths: list[Path]) -> torch.Tensor:
    images = [Image.open(p).convert("RGB") for p in paths]
    fn = image_embeddings if scorer == "clip" else vision_embeddings
    out = torch.cat([fn(spec, images[i:i + 64]) for i in range(0, len(images), 64)])
    return out / out.norm(dim=-1, keepdim=True)


def evaluations(run_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(label, samples dir, scores.json) of every evaluation of every trial."""
    out = []
    for trial in sorted(run_dir.glob("run_trial_*")):
        tid = trial.name.split("_")[2]
        for d in sorted(trial.glob("samples/step-*")):
            if (d / "scores.json").is_file():
                out.append((f"{tid}@{int(d.name.split('-')[1])}", d, json.loads((d / "scores.json").read_text())))
    return out


def measure(run_dir: Path, scorer: str, vision: str | None) -> dict[str, Any]:
    state = json.loads((run_dir / "sweep.json").read_text())
    images_cfg = state["config"]["evaluation"]["images"]
    spec = images_cfg["clip"] if scorer == "clip" else (vision or images_cfg.get("vision_model"))
    if not spec:
        raise SystemExit(f"{run_dir}: no {scorer} scorer (give --vision SPEC)")
    token = images_cfg["generation"]["token"]
    base_dir = run_dir / state["baseline"]["dir"]
    base_rows = json.loads((base_dir / "scores.json").read_text())["rows"]
    base = {(r["prompt"], r["seed"]): base_dir / r["file"] for r in base_rows if token not in r["prompt"]}
    keys = sorted(base)
    base_emb = dict(zip(keys, embed(scorer, spec, [base[k] for k in keys])))
    per_image: list[tuple[float, float]] = []
    per_ckpt: list[dict[str, Any]] = []
    for label, d, scores in evaluations(run_dir):
        rows = [r for r in scores["rows"] if token not in r["prompt"]]
        emb = embed(scorer, spec, [d / r["file"] for r in rows])
        cos = [float(e @ base_emb[(r["prompt"], r["seed"])]) for e, r in zip(emb, rows)]
        per_image += [(c, r["prior_kept"]) for c, r in zip(cos, rows) if r.get("prior_kept") is not None]
        agg = scores.get("scores", {})
        per_ckpt.append({"label": label, "drift": float(np.mean(cos)), "prior_kept": agg.get("prior_kept"),
                         "concept_rate": agg.get("concept_rate"), "composite": agg.get("composite")})
    rho = {k: float(spearmanr([c["drift"] for c in per_ckpt], [c[k] for c in per_ckpt]).statistic)
           for k in ("prior_kept", "concept_rate") if all(c[k] is not None for c in per_ckpt)}
    return {"run_dir": str(run_dir), "scorer": f"{scorer}:{spec}", "checkpoints": len(per_ckpt),
            "images": len(per_image), "wrong_images": sum(1 for _, y in per_image if y == 0.0),
            "image_auc_vs_prior_kept": auc([c for c, _ in per_image], [y for _, y in per_image]),
            "spearman": rho, "per_checkpoint": per_ckpt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--scorer", choices=("clip", "vision"), default="clip")
    ap.add_argument("--vision", help="a vision model spec for --scorer vision (default: the sweep's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [measure(r, args.scorer, args.vision) for r in args.run_dirs]
    print(f"{'sweep':48s} {'ckpts':>5s} {'images (wrong)':>15s} {'AUC':>6s} {'rho prior':>9s} {'rho concept':>11s}")
    for r in results:
        print(f"{r['run_dir'][-48:]:48s} {r['checkpoints']:5d} {r['images']:8d} ({r['wrong_images']:3d}) "
              f"{r['image_auc_vs_prior_kept']:6.3f} {r['spearman'].get('prior_kept', float('nan')):+9.2f} "
              f"{r['spearman'].get('concept_rate', float('nan')):+11.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
