"""A second opinion on the toy world's checker: does an independent judge agree with it on
*generated* images (the images concept_rate and prior_kept are computed from)?

The second judge is the toy world's CLIP used zero-shot: for an image of a prompt "a {colour}
{shape} on a {background} background" it scores the five captions that differ only in the shape
and takes the best. It is a different network (a contrastive ViT + text transformer, not the
checker's CNN classifier heads), trained with a different objective. Its own shape accuracy is
measured first on fresh renders with known ground truth, then the two judges are compared on:

* the base model's images of every trained prompt (``--seeds`` seeds each), and
* with ``--lora``, a LoRA's images of the star prompts (the demo's concept images).

Reported: each judge's accuracy on renders, the agreement on generated images (share of images
where both name the same shape), Cohen's kappa, and the agreement on "is it the asked shape".

    python bench/bench_checker_agreement.py --seeds 2 [--lora RUN_DIR/best/pytorch_lora_weights.safetensors]
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainers.evaluate import EvalSettings, generate  # noqa: E402
from trainers.lora import LoraTrainer  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.scoring_models import get_checker, image_embeddings, text_embeddings  # noqa: E402
from trainers.toyworld.checker import judge  # noqa: E402
from trainers.toyworld.concept import TOKEN  # noqa: E402
from trainers.toyworld.gates import trained_prompts  # noqa: E402
from trainers.toyworld.scenes import COLOUR_NAMES, SHAPES, caption, make_scenes, parse_caption  # noqa: E402

CLIP = "builtin:toyworld"


def clip_shapes(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
    """CLIP zero-shot: the shape whose caption (colour and background as asked) fits best."""
    img = image_embeddings(CLIP, images)
    img = img / img.norm(dim=-1, keepdim=True)
    out = []
    for i, p in enumerate(prompts):
        _, colour, background = parse_caption(p)
        txt = text_embeddings(CLIP, [caption(s, colour, background) for s in SHAPES])
        txt = txt / txt.norm(dim=-1, keepdim=True)
        out.append(SHAPES[int((txt @ img[i]).argmax())])
    return out


def checker_shapes(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
    return [v.seen[0] for v in judge(get_checker("builtin:toyworld"), list(images), list(prompts))]


def kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two labelings (agreement beyond what their label frequencies give)."""
    labels = sorted(set(a) | set(b))
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(lab) / n) * (b.count(lab) / n) for lab in labels)
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def compare(name: str, images: list[Image.Image], prompts: list[str], asked: list[str],
            save: Path | None = None) -> dict[str, Any]:
    ch, cl = checker_shapes(images, prompts), clip_shapes(images, prompts)
    if save is not None:  # the disagreements, 4x upscaled, for a person to judge
        save.mkdir(parents=True, exist_ok=True)
        for i, (im, s, x, y) in enumerate(zip(images, asked, ch, cl)):
            if x != y:
                im.resize((128, 128), Image.NEAREST).save(save / f"{i:03d}_asked-{s}_checker-{x}_clip-{y}.png")
    same = float(np.mean([x == y for x, y in zip(ch, cl)]))
    right_ch = [x == s for x, s in zip(ch, asked)]
    right_cl = [y == s for y, s in zip(cl, asked)]
    return {"set": name, "images": len(images), "shape_agreement": same, "kappa": kappa(ch, cl),
            "asked_shape_agreement": float(np.mean([p == q for p, q in zip(right_ch, right_cl)])),
            "checker_says_asked": float(np.mean(right_ch)), "clip_says_asked": float(np.mean(right_cl))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per trained prompt (120 prompts)")
    parser.add_argument("--lora", help="also judge this LoRA's star images (e.g. the demo's export)")
    parser.add_argument("--json")
    parser.add_argument("--save-disagreements", metavar="DIR", help="write the images the judges disagree on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    renders = make_scenes(1, seed=4242, shapes=SHAPES)  # 150 fresh renders, every triple once
    pil = [Image.fromarray(x) for x in renders.images]
    truth = [SHAPES[i] for i in renders.shape]
    caps = renders.captions
    results: dict[str, Any] = {
        "renders": {"images": len(pil),
                    "checker_accuracy": float(np.mean([a == b for a, b in zip(checker_shapes(pil, caps), truth)])),
                    "clip_accuracy": float(np.mean([a == b for a, b in zip(clip_shapes(pil, caps), truth)]))}}
    model = load_base_model("builtin:toyworld")
    seeds = tuple(range(300, 300 + args.seeds))
    gen = generate(model, EvalSettings(prompts=tuple(trained_prompts()), seeds=seeds, sampler="ddim", steps=25,
                                       guidance_scale=5.0, resolution=32, batch_size=64))
    prompts = [g.prompt for g in gen]
    save = Path(args.save_disagreements) if args.save_disagreements else None
    results["base_generated"] = compare("base model, trained prompts", [g.image for g in gen], prompts,
                                        [parse_caption(p)[0] for p in prompts], save and save / "base")
    if args.lora:
        pairs = [(c, b) for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]
        star = tuple(f"a {c} {{token}} on a {b} background" for c, b in pairs)
        lora = Path(args.lora)
        with LoraTrainer.loaded_for_evaluation(model, lora.parent) if lora else nullcontext():
            sgen = generate(model, EvalSettings(prompts=star, seeds=seeds, sampler="ddim", steps=25,
                                                guidance_scale=5.0, resolution=32, token=TOKEN, batch_size=64))
        texts = [g.prompt.replace(TOKEN, "star") for g in sgen]
        results["lora_star"] = compare("LoRA, star prompts", [g.image for g in sgen], texts, ["star"] * len(texts),
                                       save and save / "lora")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
