"""LoRA step time: cached latents (ours) vs VAE + text encoder every step (the reference scripts).

diffusers' reference LoRA script (examples/text_to_image/train_text_to_image_lora.py) encodes each
batch with ``vae.encode(pixels).latent_dist.sample()`` and runs the frozen text encoder on every
step. sdsweep reads both from the latent cache. This benchmark runs the SAME trainer on the same
model, data, batch and seeds both ways, interleaving rounds so machine noise hits both equally,
and prints the measured ratio next to the ratio FLOP counts predict.

    python bench/bench_latent_cache.py                      # tiny SD-proportioned model, CPU
    python bench/bench_latent_cache.py --batch 8 --rounds 5

Pixels for the reference are decoded once up front (in memory), which favours the reference:
real scripts also pay image decoding in their data loader.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

from trainers.config import LoraSettings, TrainConfig  # noqa: E402
from trainers.data import DataConfig, load_pixels, preflight, resolve_data_path  # noqa: E402
from trainers.latents import CachedDataset, build_latent_cache  # noqa: E402
from trainers.lora import LoraTrainer  # noqa: E402
from trainers.models import load_base_model  # noqa: E402


@dataclasses.dataclass
class EncodeEveryStep(CachedDataset):
    """Same interface as the cache, but latents come from a VAE encode of the pixels each call."""

    pixels: torch.Tensor | None = None
    flipped: torch.Tensor | None = None
    vae: torch.nn.Module | None = None

    def sample_latents(self, idx: torch.Tensor, flip: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        px = torch.where(flip.view(-1, 1, 1, 1), self.flipped[idx], self.pixels[idx])
        p = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(px.to(p.device, p.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen)
        return ((dist.mean.cpu().float() + dist.std.cpu().float() * eps) - self.shift_factor) * self.scaling_factor


def reference_dataset(cached: CachedDataset, records, data_cfg: DataConfig, vae) -> EncodeEveryStep:
    fields = {f.name: getattr(cached, f.name) for f in dataclasses.fields(CachedDataset)}
    fields["text_embeds"] = None  # -> the trainer runs the text encoder every step
    by_id = {r.id: r for r in records}
    pixels = torch.stack([load_pixels(by_id[i], data_cfg) for i in cached.ids])
    flipped = torch.stack([load_pixels(by_id[i], data_cfg, flip=True) for i in cached.ids])
    return EncodeEveryStep(**fields, pixels=pixels, flipped=flipped, vae=vae)


def step_flops(trainer: LoraTrainer) -> int:
    """FLOPs of one full training step (forward + backward), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    return counter.get_total_flops()


def time_steps(trainer: LoraTrainer, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny-sd")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    data_cfg = DataConfig(path=str(resolve_data_path("builtin:demo")), resolution=args.resolution, random_flip=True)
    records = preflight(data_cfg)
    train_cfg = TrainConfig(learning_rate=1e-4, max_train_steps=10_000, train_batch_size=args.batch)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cached", "reference"):
            model = load_base_model(args.model)
            cached = build_latent_cache(records, data_cfg, model, root=Path(tmp) / "cache")
            data = cached if name == "cached" else reference_dataset(cached, records, data_cfg, model.vae)
            trainers[name] = LoraTrainer(model, data, train_cfg, LoraSettings(rank=8), output_dir=Path(tmp) / name)
        flops = {name: step_flops(tr) for name, tr in trainers.items()}
        for tr in trainers.values():  # warm-up (allocator, kernels)
            time_steps(tr, 3)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, tr in trainers.items():
                times[name].append(time_steps(tr, args.steps))
    med = {name: statistics.median(v) for name, v in times.items()}
    measured = med["reference"] / med["cached"]
    predicted = flops["reference"] / flops["cached"]
    result = {
        "model": args.model, "resolution": args.resolution, "batch": args.batch,
        "device": str(trainers["cached"].device), "threads": torch.get_num_threads(),
        "step_s_cached": med["cached"], "step_s_reference": med["reference"],
        "speedup_measured": measured, "speedup_flop_predicted": predicted,
        "gflop_step_cached": flops["cached"] / 1e9, "gflop_step_reference": flops["reference"] / 1e9,
        "rounds": args.rounds, "steps_per_round": args.steps,
    }
    print(f"model {args.model}  {args.resolution}px  batch {args.batch}  device {result['device']}  "
          f"threads {result['threads']}")
    print(f"{'':24}{'step time (median)':>20}{'GFLOP/step':>14}")
    print(f"{'cached latents (ours)':24}{med['cached'] * 1e3:>17.1f} ms{flops['cached'] / 1e9:>14.3f}")
    print(f"{'VAE+TE every step (ref)':24}{med['reference'] * 1e3:>17.1f} ms{flops['reference'] / 1e9:>14.3f}")
    print(f"speedup measured {measured:.2f}x   FLOP-predicted {predicted:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
