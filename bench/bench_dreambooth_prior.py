"""What prior preservation buys DreamBooth in the toy world, judged by ground truth.

DreamBooth teaches the star (``builtin:toystar``) by fine-tuning the whole UNet; without prior
preservation the model drifts (known shapes stop being drawn right: the DreamBooth paper's
"language drift"). For each training seed, the same recipe is trained with ``prior_loss_weight``
0 and 1 (class images: the base model's own drawings of known shapes, 64 of them, drawn once), and
every ``--every`` steps the toy world's checker judges the concept prompts (4 colour pairs absent
from training x ``--seeds`` seeds) and the known-shape prompts (4 x ``--seeds``): ``concept_rate``
and ``prior_kept``. Also the step time of each arm (the prior doubles the UNet's batch).

    python bench/bench_dreambooth_prior.py --json out.json        # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

from trainers.config import DreamBoothSettings, RunConfig, TrainConfig  # noqa: E402
from trainers.data import DataConfig, preflight  # noqa: E402
from trainers.dreambooth import DreamBoothTrainer  # noqa: E402
from trainers.evaluate import EvalSettings, generate  # noqa: E402
from trainers.latents import build_latent_cache  # noqa: E402
from trainers.metrics import get_metric  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.toyworld.concept import TOKEN  # noqa: E402

# Class prompts: known shapes in colour pairs (the prior this world has). Judging prompts use
# other colour pairs, so prior_kept is measured on images the class images never showed.
CLASS_PROMPTS = tuple(f"a {c} {s} on a {b} background" for s in ("circle", "square", "triangle", "cross")
                      for c, b in (("red", "blue"), ("green", "white"), ("yellow", "black"), ("white", "red")))
CONCEPT = tuple(f"a {c} {{token}} on a {b} background" for c, b in
                (("green", "red"), ("black", "white"), ("yellow", "blue"), ("white", "green")))
KNOWN = ("a blue circle on a yellow background", "a black square on a green background",
         "a red triangle on a white background", "a green cross on a black background")


def judge(model: Any, seeds: int) -> dict[str, float]:
    """concept_rate and prior_kept of ``model`` on the judging prompts (checker, ground truth)."""
    settings = EvalSettings(prompts=(*CONCEPT, *KNOWN), seeds=tuple(range(2000, 2000 + seeds)), sampler="ddim",
                            steps=25, guidance_scale=5.0, resolution=32, token=TOKEN)
    with torch.no_grad():
        images = generate(model, settings)
    pils, texts = [g.image for g in images], [g.prompt for g in images]
    return {name: get_metric(name, checker="builtin:toyworld", token=TOKEN, concept="star").score(pils, texts, None).value
            for name in ("concept_rate", "prior_kept")}


def run_arm(model: Any, data: Any, root: Path, seed: int, weight: float, args: argparse.Namespace) -> dict[str, Any]:
    db = DreamBoothSettings(prior_loss_weight=weight, class_prompt=CLASS_PROMPTS if weight else None,
                            num_class_images=64, class_steps=25, class_guidance_scale=5.0)
    run = RunConfig.model_validate({"model": "builtin:toyworld", "data": data_cfg().model_dump(),
                                    "method": "dreambooth", "dreambooth": db.model_dump(), "cache_dir": str(root)})
    extra, _ = DreamBoothTrainer.prepare_extra(run, model, "cpu")
    tcfg = TrainConfig(learning_rate=args.lr, max_train_steps=args.steps, train_batch_size=4, lr_warmup_steps=10,
                       seed=seed)
    tr = DreamBoothTrainer(model, data, tcfg, db, root / "out", extra=extra)
    curve, train_s = [], 0.0
    try:
        while tr.global_step < args.steps:
            t0 = time.perf_counter()
            tr.train(until_step=tr.global_step + args.every)
            train_s += time.perf_counter() - t0
            with tr.evaluation_model() as sampled:
                curve.append({"step": tr.global_step, **judge(sampled, args.seeds)})
            print(f"  seed {seed} prior {weight:g} step {tr.global_step}: {curve[-1]}", flush=True)
    finally:
        tr.teardown()
    return {"seed": seed, "prior_loss_weight": weight, "curve": curve, "step_s": train_s / args.steps}


def data_cfg() -> DataConfig:
    return DataConfig(path="builtin:toystar", resolution=32, random_flip=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds", type=int, default=8, help="judging seeds per prompt (default 8: 32 images each)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_base_model("builtin:toyworld")
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-prior-") as tmp:
        root = Path(tmp)
        data = build_latent_cache(preflight(data_cfg()), data_cfg(), model, root=root / "latents", cache_text=True)
        base = judge(model, args.seeds)
        print(f"base model: {base}")
        arms = [run_arm(model, data, root, seed, w, args) for seed in args.train_seeds for w in (0.0, 1.0)]
    print(f"\nlr {args.lr:g}, batch 4 (+4 class images with the prior), judged on {4 * args.seeds} concept and "
          f"{4 * args.seeds} known-shape images per point")
    for w in (0.0, 1.0):
        mine = [a for a in arms if a["prior_loss_weight"] == w]
        print(f"prior_loss_weight {w:g}: step time {sum(a['step_s'] for a in mine) / len(mine) * 1e3:.1f} ms")
        for i, point in enumerate(mine[0]["curve"]):
            cs = [a["curve"][i]["concept_rate"] for a in mine]
            ps = [a["curve"][i]["prior_kept"] for a in mine]
            print(f"  step {point['step']:4d}: concept_rate {' / '.join(f'{c:.3f}' for c in cs)}   "
                  f"prior_kept {' / '.join(f'{p:.3f}' for p in ps)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "args": vars(args), "arms": arms}, indent=1))


if __name__ == "__main__":
    main()
