"""Probe for issue 21 item 1: the toy world's self-supervised DINO stand-in (trainers/toyworld/dino.py).

Trains it on renders of the four trained shapes, their VAE round trips and (GEN_SEEDS > 0) the base
model's drawings of the trained prompts (seeds 1000..; unlabelled), then measures:
  * the gate: nearest-reference shape accuracy on the base model's drawings of every trained prompt
    at the gate seeds 0-3 (references: fresh renders of all five shapes, raw and VAE-passed);
  * what the metric is for: on a cached run's star images (bench/cache_star_images.py), per-image
    AUC of the DINO score (mean cosine to the 8 training stars, raw / VAE-passed) against the
    checker's verdicts, and per-checkpoint Spearman against the concept rate.

    python bench/dino_probe.py THREADS STEPS GEN_SEEDS CACHE OUT_DIR [resnet|vit [TEMPERATURE [SUPPORT [SEED]]]]   # e.g. 2 1500 8 lora_demo_gen d resnet 0.2 0 0
"""
import sys, json, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(REPO))
from sweeps.cli import quiet_libraries
quiet_libraries()
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import spearmanr
from trainers.data import resolve_data_path
from trainers.models import load_base_model
from trainers.toyworld import weights_dir
from trainers.toyworld.dino import embed, save_dino, train_dino
from trainers.toyworld.gates import auc
from trainers.toyworld.scenes import make_scenes
from trainers.toyworld.scorers import dino_shape_accuracy, scorer_images
from trainers.toyworld.vae import round_trip_images

torch.set_num_threads(int(sys.argv[1]))
STEPS, GEN_SEEDS, CACHE = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ARCH = sys.argv[6] if len(sys.argv) > 6 else "resnet"
TEMPERATURE = float(sys.argv[7]) if len(sys.argv) > 7 else 0.2
SUPPORT = int(sys.argv[8]) if len(sys.argv) > 8 else 0  # > 0: NNCLR's support queue
SEED = int(sys.argv[9]) if len(sys.argv) > 9 else 0  # the backbone's training seed
model = load_base_model(str(weights_dir()))


t0 = time.time()
images, partner = scorer_images(model, 20, GEN_SEEDS, seed=401)
refs = make_scenes(2, seed=5)
stars = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(resolve_data_path("builtin:toystar")).glob("*.png"))])
stars_v = round_trip_images(model.vae, stars)
cache = load_file(str(Path(CACHE).with_suffix(".safetensors")))
meta = json.loads(Path(CACHE).with_suffix(".json").read_text())
print(f"data {time.time() - t0:.0f}s: {len(images)} training images", flush=True)

t0 = time.time()
dino = train_dino(images, partner, STEPS, seed=SEED, batch=128, log_every=100, arch=ARCH, temperature=TEMPERATURE, support=SUPPORT)
print(f"trained {STEPS} steps in {time.time() - t0:.0f}s", flush=True)

gate = dino_shape_accuracy(dino, model, refs, range(4))
print(f"gate: nearest-reference shape accuracy on {gate['images']} drawings, refs raw: {gate['raw_references']:.3f}")
print(f"gate: nearest-reference shape accuracy on {gate['images']} drawings, refs vae: {gate['vae_references']:.3f}")
gen = cache["images"].numpy()
truth = cache["truth"].numpy() > 0.5
ck = cache["ckpt"].numpy()
eg = embed(dino, gen)
for name, r in (("raw", stars), ("vae", stars_v)):
    s = (eg @ embed(dino, r).T).mean(1).numpy()
    per = [s[ck == i].mean() for i in range(len(meta))]
    rho = spearmanr([m["concept"] for m in meta], per).statistic
    print(f"star images ({len(s)}, {truth.mean():.3f} stars): refs {name}: per-image AUC {auc(s[truth], s[~truth]):.3f}, "
          f"per-checkpoint Spearman vs concept rate {rho:+.2f}")
if len(sys.argv) > 5:
    save_dino(dino, Path(sys.argv[5]))
