"""Does the demo's pick really draw the star? An outside check on colour pairs and seeds the demo
never uses -- not for training, not for picking, not for its own held-out confirmation.

For the exported best LoRA of a demo run (``RUN_DIR/best`` or ``--lora FILE``) and for the base
model, generates "a {colour} sks shape on a {background} background" for ``EXTERNAL_PAIRS`` x
``--seeds`` seeds (64 images by default), with the demo's sampler settings, and lets the toy
world's checker judge each image (star, colour and background right). Prints both concept rates,
the gain, and the one-sided Fisher exact p-value of "the pick draws the star more often" (scipy's
``fisher_exact``), and optionally also the known-shape prompts' prior kept.

    python bench/bench_demo_heldout.py runs/demo-20261201-220000          # uses RUN_DIR/best
    python bench/bench_demo_heldout.py --lora my-lora/pytorch_lora_weights.safetensors
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

from trainers.evaluate import EvalSettings, generate  # noqa: E402
from trainers.lora import LoraTrainer  # noqa: E402
from trainers.metrics import get_metric  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.toyworld.concept import TOKEN, star_triples  # noqa: E402

# Colour pairs used nowhere else: not in builtin:toystar's 8 training captions, not in the demo's
# evaluation prompts (picking), not in its evaluation.confirm prompts (held-out confirmation).
EXTERNAL_PAIRS = (("blue", "green"), ("black", "yellow"), ("red", "white"), ("white", "blue"),
                  ("yellow", "red"), ("green", "black"), ("blue", "black"), ("red", "yellow"))
KNOWN = ("a blue circle on a red background", "a yellow square on a green background",
         "a white triangle on a black background", "a black cross on a white background")


def prompts() -> list[str]:
    """The concept prompts of the external pairs, checked disjoint from the demo's other prompts."""
    from sweeps.config import load_sweep

    demo = load_sweep(REPO / "sweeps" / "configs" / "demo.yaml")
    used = {(c, b) for _, c, b in star_triples()}
    ev = demo.evaluation
    assert ev.images is not None
    texts = list(ev.images.generation.prompts) + list((ev.confirm.prompts if ev.confirm else None) or [])
    for text in texts:
        words = text.split()
        if "{token}" in words:
            used.add((words[1], words[-2]))
    clash = [p for p in EXTERNAL_PAIRS if p in used]
    assert not clash, f"external pairs {clash} are used by the demo; pick others"
    return [f"a {c} {{token}} on a {b} background" for c, b in EXTERNAL_PAIRS]


def judge(model: Any, lora: Path | None, seeds: list[int]) -> dict[str, Any]:
    """Concept rate (and prior kept) of ``model`` (+ ``lora``) on the external prompts."""
    settings = EvalSettings(prompts=(*prompts(), *KNOWN), seeds=tuple(seeds), sampler="ddim", steps=25,
                            guidance_scale=5.0, resolution=32, token=TOKEN)
    loaded = LoraTrainer.loaded_for_evaluation(model, lora.parent) if lora else nullcontext()
    with loaded, torch.no_grad():
        images = generate(model, settings)
    pils, texts = [g.image for g in images], [g.prompt for g in images]
    out: dict[str, Any] = {}
    for name in ("concept_rate", "prior_kept"):
        metric = get_metric(name, checker="builtin:toyworld", token=TOKEN, concept="star")
        r = metric.score(pils, texts, None)
        judged = [v for v in r.per_item if v is not None]
        out[name] = {"rate": r.value, "right": int(sum(judged)), "images": len(judged)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a demo run directory (its best/ export is judged)")
    parser.add_argument("--lora", help="a pytorch_lora_weights.safetensors to judge instead")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per colour pair (default 8: 64 images)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    lora = Path(args.lora) if args.lora else Path(args.run_dir) / "best" / "pytorch_lora_weights.safetensors"
    if not lora.is_file():
        parser.error(f"{lora}: no exported LoRA (run the demo, or pass --lora)")
    torch.set_num_threads(2)
    seeds = list(range(5000, 5000 + args.seeds))
    model = load_base_model("builtin:toyworld")
    base, pick = judge(model, None, seeds), judge(model, lora, seeds)
    b, p = base["concept_rate"], pick["concept_rate"]
    table = [[p["right"], p["images"] - p["right"]], [b["right"], b["images"] - b["right"]]]
    _, pvalue = fisher_exact(table, alternative="greater")
    result = {"lora": str(lora), "pairs": EXTERNAL_PAIRS, "seeds": seeds, "base": base, "pick": pick,
              "concept_gain": p["rate"] - b["rate"], "fisher_p_one_sided": float(pvalue)}
    if args.run_dir and (Path(args.run_dir) / "best" / "best.json").is_file():
        best = json.loads((Path(args.run_dir) / "best" / "best.json").read_text())
        result["picked"] = {"trial": best["trial_id"], "step": best["metric"]["step"],
                            "hyperparameters": best["hyperparameters"], "sweep_scores": best["image_scores"],
                            "heldout": (best.get("heldout") or {}).get("scores")}
    print(f"external check, {p['images']} concept images each ({len(EXTERNAL_PAIRS)} unseen colour pairs x "
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
