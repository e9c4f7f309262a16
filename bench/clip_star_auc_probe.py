"""Probe for issue 21: do the refined CLIPs (bench/clip_vision_refine_probe.py) tell a star from a
failed star on a fine-tuned checkpoint's images? For every kept checkpoint of a LoRA demo run,
draws the star prompts of bench/bench_demo_heldout.py's external colour pairs (seeds 6000-6003),
lets the checker judge each image, and reports per-image AUC against the checker and
per-checkpoint Spearman against the concept rate, for CLIP-I (references raw or VAE-passed) and
the zero-shot star probability, with the shipped CLIP and two refined ones.

    python bench/clip_vision_refine_probe.py 2 800 0 A.safetensors; python bench/clip_vision_refine_probe.py 2 800 8 B.safetensors
    python bench/clip_star_auc_probe.py RUN_DIR A.safetensors B.safetensors
"""
import sys, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from sweeps.cli import quiet_libraries
quiet_libraries()
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_model
from scipy.stats import spearmanr
from bench_demo_heldout import prompts
from trainers import get_trainer_class
from trainers.evaluate import EvalSettings, generate
from trainers.metrics import get_metric
from trainers.models import load_base_model
from trainers.scoring_models import load_clip
from trainers.data import resolve_data_path
from trainers.toyworld import weights_dir
from trainers.toyworld.concept import TOKEN
from trainers.toyworld.gates import auc
from trainers.toyworld.clip import normalize_pixels
from trainers.toyworld.scenes import SHAPES, caption, parse_caption
from trainers.toyworld.vae import round_trip_images

torch.set_num_threads(2)
run = Path(sys.argv[1])
model = load_base_model("builtin:toyworld")
clips = {}
for name, pt in (("shipped", None), ("refined_r+v", sys.argv[2]), ("refined_r+v+g", sys.argv[3])):
    c, tok, _ = load_clip(str(weights_dir() / "clip"))
    if pt: load_model(c, pt)
    clips[name] = c.eval()
refs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(resolve_data_path("builtin:toystar")).glob("*.png"))])
refs_v = round_trip_images(model.vae, refs)
@torch.no_grad()
def emb(c, imgs): return torch.nn.functional.normalize(c.get_image_features(pixel_values=normalize_pixels(imgs)).pooler_output, dim=-1)
ref_e = {(n, v): emb(c, r) for n, c in clips.items() for v, r in (("raw", refs), ("vae", refs_v))}
ckpts = sorted(p for p in run.glob("*/checkpoint_*") if (p / "trainer_state.json").is_file())
print(len(ckpts), "checkpoints", flush=True)
settings = EvalSettings(prompts=tuple(prompts()), seeds=tuple(range(6000, 6004)), sampler="ddim", steps=25, guidance_scale=5.0, resolution=32, token=TOKEN)
metric = get_metric("concept_rate", checker="builtin:toyworld", token=TOKEN, concept="star")
truth, scores, per_ckpt = [], {k: [] for k in ref_e}, []
for ck in ckpts:
    with get_trainer_class("lora").loaded_for_evaluation(model, ck) as m, torch.no_grad():
        gen = generate(m, settings)
    pils = [g.image for g in gen]
    v = metric.score(pils, [g.prompt for g in gen], None).per_item
    arr = np.stack([np.asarray(p.convert("RGB")) for p in pils])
    row = {"ckpt": str(ck.relative_to(run)), "concept": float(np.mean(v))}
    truth += [bool(x) for x in v]
    for (n, var), r in ref_e.items():
        s = (emb(clips[n], arr) @ r.T).mean(1).numpy()
        scores[(n, var)] += list(s); row[f"{n}/{var}"] = float(s.mean())
    for n, c in clips.items():
        e = emb(c, arr)
        zs = []
        for i, g in enumerate(gen):
            _, col, bg = parse_caption(g.prompt.replace(TOKEN, "star"))
            tk = tok(([caption(sh, col, bg) for sh in SHAPES]), padding=True, return_tensors="pt")
            with torch.no_grad():
                te = torch.nn.functional.normalize(c.get_text_features(input_ids=tk["input_ids"], attention_mask=tk["attention_mask"]).pooler_output, dim=-1)
            p = torch.softmax(100 * te @ e[i], 0)
            zs.append(float(p[SHAPES.index("star")]))
        scores.setdefault((n, "zeroshot"), []).extend(zs); row[f"{n}/zeroshot"] = float(np.mean(zs))
    per_ckpt.append(row); print(row, flush=True)
t = np.array(truth)
print(f"{len(t)} images, {t.mean():.3f} drawn as the star")
for k, s in scores.items():
    s = np.array(s); a = auc(s[t], s[~t])
    rho = spearmanr([r["concept"] for r in per_ckpt], [r[f"{k[0]}/{k[1]}"] for r in per_ckpt]).statistic
    print(f"{k[0]:14s} refs {k[1]}: per-image AUC {a:.3f}, per-checkpoint Spearman vs concept rate {rho:+.2f}")
print(json.dumps(per_ckpt, indent=1))
