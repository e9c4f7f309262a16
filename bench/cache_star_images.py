"""Issue 21 probes: a run's kept checkpoints' star images, cached once for bench/dino_probe.py.

Every kept checkpoint of RUN_DIR draws bench_demo_heldout.py's external colour pairs (the star
prompts, seeds 6000-6003); the checker judges each image. Writes OUT.safetensors (images uint8,
truth 1/0, checkpoint index) and OUT.json (each checkpoint's path, concept rate and prompts).

    python bench/cache_star_images.py RUN_DIR OUT [METHOD]   # ~20 s per checkpoint
"""
import sys, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from sweeps.cli import quiet_libraries
quiet_libraries()
import numpy as np, torch
from safetensors.torch import save_file
from bench_demo_heldout import prompts
from trainers import get_trainer_class
from trainers.evaluate import EvalSettings, generate
from trainers.metrics import get_metric
from trainers.models import load_base_model
from trainers.toyworld.concept import TOKEN
torch.set_num_threads(1)
run = Path(sys.argv[1]); out = Path(sys.argv[2]); method = sys.argv[3] if len(sys.argv) > 3 else "lora"
model = load_base_model("builtin:toyworld")
ckpts = sorted(p for p in run.glob("*/checkpoint_*") if (p / "trainer_state.json").is_file())
P = tuple(prompts())
settings = EvalSettings(prompts=P, seeds=tuple(range(6000, 6004)), sampler="ddim", steps=25, guidance_scale=5.0, resolution=32, token=TOKEN)
metric = get_metric("concept_rate", checker="builtin:toyworld", token=TOKEN, concept="star")
imgs, truth, ck_idx, meta = [], [], [], []
for i, ck in enumerate(ckpts):
    with get_trainer_class(json.loads((ck / "trainer_state.json").read_text()).get("method", method)).loaded_for_evaluation(model, ck) as m, torch.no_grad():
        gen = generate(m, settings)
    v = metric.score([g.image for g in gen], [g.prompt for g in gen], None).per_item
    imgs += [np.asarray(g.image.convert("RGB")) for g in gen]; truth += [float(x) for x in v]; ck_idx += [i] * len(gen)
    meta.append({"ckpt": str(ck.relative_to(run)), "concept": float(np.mean(v)), "prompts": [g.prompt for g in gen]})
    print(i, meta[-1]["ckpt"], meta[-1]["concept"], flush=True)
save_file({"images": torch.from_numpy(np.stack(imgs)), "truth": torch.tensor(truth), "ckpt": torch.tensor(ck_idx)}, str(out) + ".safetensors")
Path(str(out) + ".json").write_text(json.dumps(meta, indent=1))
