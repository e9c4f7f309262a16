"""Probe for issue 21 item 1 (not yet a build stage): can the toy world's CLIP become competent on
*generated* images without touching the diffusion model?

Refines only the CLIP's vision tower and projection (``trainers.toyworld.clip.refine_vision``;
the text tower is frozen, so the diffusion model's text encoder -- a copy of it -- and everything
trained on it stay bit-identical) on fresh renders of the four trained shapes, the same renders
passed through the toy VAE, and the base model's own drawings of the trained shapes (seeds 1000..,
labelled by the prompt that drew them; never a star, never a checker verdict). Classification against the frozen text embeddings of all 150 captions.
Measures, before and after: zero-shot shape accuracy (the five shape captions with the asked
colours) on the base model's drawings of every trained prompt at the gate seeds 0-3 (480 images,
seeds the refinement never saw), on fresh renders and on VAE-passed renders, and the build's
true-vs-swapped caption AUC gate.

    python bench/clip_vision_refine_probe.py THREADS STEPS GEN_SEEDS [OUT.safetensors]   # e.g. 2 800 8 (~5 min)
"""
import sys, time
import numpy as np, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweeps.cli import quiet_libraries
quiet_libraries()
from trainers.scoring_models import load_clip
from trainers.toyworld import weights_dir
from trainers.toyworld.scenes import make_scenes, SHAPES, caption, parse_caption, all_triples, training_shapes
from trainers.toyworld.vae import round_trip_images
from trainers.toyworld.clip import normalize_pixels, refine_vision
from trainers.models import load_base_model
from trainers.evaluate import EvalSettings, generate
from trainers.toyworld.gates import trained_prompts, clip_auc

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 800
GEN_SEEDS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
root = weights_dir()
clip, tok, proc = load_clip(str(root / "clip"))
model = load_base_model(str(root))
texts = [caption(*t) for t in all_triples()]
row = {t: i for i, t in enumerate(texts)}
with torch.no_grad():
    enc = tok(texts, padding=True, return_tensors="pt")
    T = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    T = torch.nn.functional.normalize(T, dim=-1)

def to_np(pils): return np.stack([np.asarray(p.convert("RGB")) for p in pils])
def gen(seeds):
    g = generate(model, EvalSettings(prompts=tuple(trained_prompts()), seeds=tuple(seeds), sampler="ddim", steps=25,
                                     guidance_scale=5.0, resolution=32, batch_size=64))
    return to_np([x.image for x in g]), [x.prompt for x in g]

@torch.no_grad()
def zero_shot(images, prompts):
    img = torch.nn.functional.normalize(clip.get_image_features(pixel_values=normalize_pixels(images)).pooler_output, dim=-1)
    right = 0
    for i, p in enumerate(prompts):
        s, c, b = parse_caption(p)
        cand = [row[caption(o, c, b)] for o in SHAPES]
        right += SHAPES[int((T[cand] @ img[i]).argmax())] == s
    return right / len(prompts)

t0 = time.time()
ev_imgs, ev_prompts = gen(range(4))          # the gate's seeds
print(f"gen eval {time.time()-t0:.0f}s", flush=True)
fresh = make_scenes(2, seed=777)
vae = model.vae
def vae_pass(images): return round_trip_images(vae, images)
fresh_vae = vae_pass(fresh.images)
before = {"gen": zero_shot(ev_imgs, ev_prompts), "renders": zero_shot(fresh.images, fresh.captions),
          "vae_renders": zero_shot(fresh_vae, fresh.captions), "auc": clip_auc(clip, tok, proc, fresh)}
print("before", before, flush=True)

t0 = time.time()
R = make_scenes(20, seed=303, shapes=training_shapes())  # never a star
RV = vae_pass(R.images)
G, Gp = gen(range(1000, 1000 + GEN_SEEDS)) if GEN_SEEDS else (np.zeros((0, 32, 32, 3), np.uint8), [])
print(f"data {time.time()-t0:.0f}s: {len(R)} renders, {len(G)} generations", flush=True)
imgs = np.concatenate([R.images, RV, G]) if len(G) else np.concatenate([R.images, RV])
labels = torch.tensor([row[c] for c in R.captions] * 2 + [row[p] for p in Gp])
clip = refine_vision(clip, imgs, labels, texts, STEPS, seed=0)
after = {"gen": zero_shot(ev_imgs, ev_prompts), "renders": zero_shot(fresh.images, fresh.captions),
         "vae_renders": zero_shot(fresh_vae, fresh.captions), "auc": clip_auc(clip, tok, proc, fresh)}
print("after", after, flush=True)
if len(sys.argv) > 4:
    from safetensors.torch import save_model
    save_model(clip, sys.argv[4])
