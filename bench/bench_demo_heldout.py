"""Does a demo's pick really draw its concept? An outside check on colour pairs and seeds the demos
never use -- not for training, not for picking, not for their own held-out confirmation.

For the exported best checkpoint of a demo run (``RUN_DIR/best``; any method: it is loaded the way
the evaluator loads it, through its trainer's ``loaded_for_evaluation``) or an export folder
(``--export DIR --method M``) and for the base model, generates "a {colour} sks shape on a
{background} background" for ``EXTERNAL_PAIRS`` x ``--seeds`` seeds (64 images by default), with the
demos' sampler settings, and lets the toy world's checker judge each image (the concept -- the
run's ``evaluation.images.concept``, or ``--concept`` -- colour and background right). Prints both
concept rates, the gain, and the one-sided Fisher exact p-value of "the pick draws the concept more
often" (scipy's ``fisher_exact``), and the known-shape prompts' prior kept.

    python bench/bench_demo_heldout.py runs/demo-20261201-220000          # uses RUN_DIR/best
    python bench/bench_demo_heldout.py --export my-lora/ --method lora --concept star
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

import torch  # noqa: E402
from scipy.stats import fisher_exact  # noqa: E402

from trainers import get_trainer_class  # noqa: E402
from trainers.evaluate import EvalSettings, generate  # noqa: E402
from trainers.metrics import get_metric  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.toyworld.concept import TOKEN, star_triples  # noqa: E402

# Colour pairs used nowhere else: not in the 8 training captions of builtin:toystar and
# builtin:toytriangle (the same pairs), not in the demos' evaluation prompts (picking), not in their
# evaluation.confirm prompts (held-out confirmation).
EXTERNAL_PAIRS = (("blue", "green"), ("black", "yellow"), ("red", "white"), ("white", "blue"),
                  ("yellow", "red"), ("green", "black"), ("blue", "black"), ("red", "yellow"))
KNOWN = ("a blue circle on a red background", "a yellow square on a green background",
         "a white triangle on a black background", "a black cross on a white background")


DEMOS = ("demo.yaml", "demo-ti.yaml", "demo-dreambooth.yaml")


def prompts() -> list[str]:
    """The concept prompts of the external pairs, checked disjoint from the demos' other prompts."""
    from sweeps.config import load_sweep

    used = {(c, b) for _, c, b in star_triples()}
    texts: list[str] = []
    for name in DEMOS:
        ev = load_sweep(REPO / "sweeps" / "configs" / name).evaluation
        assert ev.images is not None
        texts += list(ev.images.generation.prompts) + list((ev.confirm.prompts if ev.confirm else None) or [])
    for text in texts:
        words = text.split()
        if "{token}" in words:
            used.add((words[1], words[-2]))
    clash = [p for p in EXTERNAL_PAIRS if p in used]
    assert not clash, f"external pairs {clash} are used by the demo; pick others"
    return [f"a {c} {{token}} on a {b} background" for c, b in EXTERNAL_PAIRS]


def judge(model: Any, export: Path | None, method: str | None, seeds: list[int], concept: str) -> dict[str, Any]:
    """Concept rate (and prior kept) of ``model`` (+ the ``method`` export in folder ``export``) on
    the external prompts."""
    settings = EvalSettings(prompts=(*prompts(), *KNOWN), seeds=tuple(seeds), sampler="ddim", steps=25,
                            guidance_scale=5.0, resolution=32, token=TOKEN)
    loaded = (get_trainer_class(method).loaded_for_evaluation(model, export) if export and method
              else nullcontext(model))
    with loaded as sampled, torch.no_grad():
        images = generate(sampled, settings)
    pils, texts = [g.image for g in images], [g.prompt for g in images]
    out: dict[str, Any] = {}
    for name in ("concept_rate", "prior_kept"):
        metric = get_metric(name, checker="builtin:toyworld", token=TOKEN, concept=concept)
        r = metric.score(pils, texts, None)
        judged = [v for v in r.per_item if v is not None]
        out[name] = {"rate": r.value, "right": int(sum(judged)), "images": len(judged),
                     "by_seed": [[g.seed, v] for g, v in zip(images, r.per_item) if v is not None]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a demo run directory (its best/ export is judged)")
    parser.add_argument("--export", help="an export folder to judge instead (with --method)")
    parser.add_argument("--method", help="the export's training method (default: from RUN_DIR/best/best.json)")
    parser.add_argument("--concept", help="what the token means (default: the run's evaluation concept)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per colour pair (default 8: 64 images)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not (args.export or args.run_dir):
        parser.error("give a run directory or --export DIR --method M")
    export = Path(args.export) if args.export else Path(args.run_dir) / "best"
    best_file = export / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    method = args.method or best.get("method")
    if not method:
        parser.error(f"{export}: no best.json naming the method; pass --method")
    concept = args.concept
    if concept is None and args.run_dir:
        from sweeps.results import read_state
        concept = (read_state(Path(args.run_dir))["config"]["evaluation"].get("images") or {}).get("concept")
    concept = concept or "star"
    torch.set_num_threads(2)
    seeds = list(range(5000, 5000 + args.seeds))
    model = load_base_model("builtin:toyworld")
    base, pick = judge(model, None, None, seeds, concept), judge(model, export, method, seeds, concept)
    b, p = base["concept_rate"], pick["concept_rate"]
    table = [[p["right"], p["images"] - p["right"]], [b["right"], b["images"] - b["right"]]]
    _, pvalue = fisher_exact(table, alternative="greater")
    result = {"export": str(export), "method": method, "concept": concept, "pairs": EXTERNAL_PAIRS, "seeds": seeds,
              "base": base, "pick": pick, "concept_gain": p["rate"] - b["rate"], "fisher_p_one_sided": float(pvalue)}
    if best:
        result["picked"] = {"trial": best["trial_id"], "step": best["metric"]["step"],
                            "hyperparameters": best["hyperparameters"], "sweep_scores": best["image_scores"],
                            "heldout": (best.get("heldout") or {}).get("scores")}
    print(f"external check of a {method} export, concept {concept!r}, {p['images']} concept images each ({len(EXTERNAL_PAIRS)} unseen colour pairs x "
          f"{len(seeds)} seeds {seeds[0]}..{seeds[-1]}):")
    print(f"  pick: concept_rate {p['rate']:.3f} ({p['right']}/{p['images']}), prior_kept "
          f"{pick['prior_kept']['rate']:.3f}")
    print(f"  base: concept_rate {b['rate']:.3f} ({b['right']}/{b['images']}), prior_kept "
          f"{base['prior_kept']['rate']:.3f}")
    print(f"  gain {result['concept_gain']:+.3f}, one-sided Fisher exact p = {pvalue:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
