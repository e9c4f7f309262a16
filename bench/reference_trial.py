"""One trial the reference way, for bench/bench_sweep.py: its own process, no cache, no Ray.

Loads the model, decodes the images, and trains with a VAE encode and a text-encoder forward
every step (bench_latent_cache.EncodeEveryStep), computing the same validation loss and writing
the same checkpoints at the same cadence as an sdsweep trial.

    python bench/reference_trial.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_latent_cache import reference_dataset  # noqa: E402  (also quiets library notices)

from sweeps.config import apply_hyperparameters  # noqa: E402
from trainers.config import RunConfig  # noqa: E402
from trainers.data import preflight  # noqa: E402
from trainers.latents import build_latent_cache  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.run import make_trainer  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    base = {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64, "random_flip": True},
            "train": {"max_train_steps": spec["steps"], "train_batch_size": spec["batch"]},
            "output_dir": spec["out"]}
    cfg = RunConfig.model_validate(apply_hyperparameters(base, spec["params"]))
    model = load_base_model(cfg.model.source)
    records = preflight(cfg.data)
    # The cache object only carries ids/captions/shapes here: every step re-encodes the pixels.
    cached = build_latent_cache(records, cfg.data, model, cache_text=False)
    data = reference_dataset(cached, records, cfg.data, model.vae)
    trainer = make_trainer(cfg, model, data)
    while trainer.global_step < spec["steps"]:
        trainer.train(until_step=trainer.global_step + spec["every"])
        trainer.validation_loss()
        trainer.save_checkpoint(Path(spec["out"]) / f"checkpoint-{trainer.global_step}")


if __name__ == "__main__":
    main(sys.argv[1])
