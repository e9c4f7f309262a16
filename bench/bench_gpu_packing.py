"""Packed trials on one GPU: 1, 2 and 4 SD 1.5-size LoRA trials sharing a GPU vs one alone.

    python bench/bench_gpu_packing.py                       # a GPU: SD 1.5-shaped model (random weights), 512 px
    python bench/bench_gpu_packing.py --packs 1 2 --steps 20
    python bench/bench_gpu_packing.py --cpu                 # no GPU: the tiny model, checks this script's wiring

For each packing k the same sweep runs k identical LoRA trials at once with ``resources.gpu: 1/k``
(one evaluation at the end, no image evaluation, no W&B), through sdsweep's driver on a local Ray.
Per trial it reads what the trial reported: samples/s over its training seconds (evaluation and
checkpointing excluded) and its peak GPU memory (``torch.cuda.max_memory_allocated``), and puts
beside them the memory estimate ``sdsweep plan`` packs by (``trainers/memory.py``, the part the
allocator measures). The aggregate is the sum of the packed trials' rates; the table gives it over
the single trial's, and how long the trials' training windows overlapped (a ratio only means
something when they ran at the same time).

The model: SD 1.5's architecture (``trainers.memory.SD15``) with random weights, written once in
the diffusers layout (with the tiny model's tokenizer and scheduler configs) and loaded through the
real loading path. Random weights train at the same speed and memory as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def sd15_random(root: Path) -> Path:
    """SD 1.5's architecture with random weights, in the diffusers layout, under ``root``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainers.memory import SD15
    from trainers.models import builtin_dir

    if (root / "model_index.json").is_file():
        return root
    tiny = builtin_dir("builtin:tiny-sd", "base model")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(tiny / sub, tmp / sub)
    shutil.copy(tiny / "model_index.json", tmp / "model_index.json")
    torch.manual_seed(0)
    UNet2DConditionModel(**SD15.unet).save_pretrained(tmp / "unet")
    AutoencoderKL(**SD15.vae).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(**SD15.text_encoder)).save_pretrained(tmp / "text_encoder")
    tmp.rename(root)
    return root


def sweep(model: str, data: Path, storage: Path, k: int, args: argparse.Namespace, cpu_mode: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    return {
        "name": f"pack{k}", "storage_path": str(storage),
        "base": {"model": model, "data": {"path": str(data), "resolution": args.resolution},
                 "method": "lora", "lora": {"rank": args.rank},
                 "train": {"max_train_steps": args.steps, "train_batch_size": args.batch, "lr_warmup_steps": 0,
                           "mixed_precision": "auto", "gradient_checkpointing": args.gradient_checkpointing}},
        "search": {"spaces": [{"method": "lora", "params": {
            "train.learning_rate": {"type": "categorical", "choices": [1.0e-4]}}}],
            "num_samples": k, "max_concurrent_trials": k, "warm_start": False},
        "scheduler": {"type": "none"},
        "evaluation": {"every": args.steps, "metric": "fixed_train_loss", "confirm": None},
        "resources": {"cpu": max(1, cores // k), "gpu": 0 if cpu_mode else 1.0 / k},
        "tracking": {"wandb": False}, "checkpoints_to_keep": 1,
    }


def run_packing(raw: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Run the sweep; each trial's last reported row."""
    from sweeps.config import SweepConfig
    from sweeps.driver import run_sweep
    from sweeps.rows import trial_rows

    run = run_sweep(SweepConfig.model_validate(raw), run_dir=run_dir)
    rows = []
    for result in run.results:
        history = [r for r in trial_rows(Path(result.path)) if r.get("trainer_s")]
        if not history:
            raise RuntimeError(f"trial {result.path} reported nothing: {result.error}")
        rows.append(history[-1])
    return rows


def estimate_mb(raw: dict[str, Any]) -> float:
    """``sdsweep plan``'s estimate of one trial, the part the allocator measures."""
    from sweeps.config import SweepConfig
    from sweeps.plan import estimate_for

    return estimate_for(SweepConfig.model_validate(raw), {"method": "lora", "train.learning_rate": 1e-4}
                        ).allocated_bytes / 2**20


def overlap(rows: list[dict[str, Any]]) -> float:
    """The share of the longest training window during which every packed trial was training."""
    windows = [(r["reported_at"] - r["trainer_s"], r["reported_at"]) for r in rows]
    common = min(e for _, e in windows) - max(s for s, _ in windows)
    return max(0.0, common) / max(e - s for s, e in windows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="no GPU: the tiny model at 64 px, trials on CPUs")
    parser.add_argument("--workdir", default=None, help="keep the model, data and runs here")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("bench_gpu_packing: no CUDA device; --cpu checks the wiring on the tiny model")
        return 2
    if args.cpu:
        args.resolution = min(args.resolution, 64)
    from sweeps.constants import QUIET_ENV

    for key, value in QUIET_ENV.items():  # what `sdsweep run` sets: library notices off
        os.environ.setdefault(key, value)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdsweep-packing-"))
    os.environ.setdefault("SDSWEEP_CACHE", str(work / "cache"))
    model = "builtin:tiny-sd" if args.cpu else str(sd15_random(work / "sd15-random"))
    from trainers.demo_data import write_demo_dataset

    data = write_demo_dataset(work / "data", n_images=8, size=args.resolution)  # captioned toy images
    device = "CPU (wiring check)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"packing on {device}: LoRA rank {args.rank}, {args.resolution} px, batch {args.batch}, "
          f"{args.steps} steps, model {'tiny' if args.cpu else 'SD 1.5-shaped (random weights)'}")
    table = []
    for k in args.packs:
        raw = sweep(model, data, work / "runs", k, args, args.cpu)
        t0 = time.perf_counter()
        rows = run_packing(raw, work / "runs" / f"pack{k}-{int(time.time())}")
        rates = [r["images_seen"] / r["trainer_s"] for r in rows]  # examples through the UNet per training second
        table.append({"trials": k, "wall_s": time.perf_counter() - t0, "per_trial_samples_s": rates,
                      "aggregate_samples_s": sum(rates), "overlap": overlap(rows),
                      "peak_mb": [r.get("peak_memory_mb") for r in rows], "estimate_mb": estimate_mb(raw)})
    alone = table[0]["aggregate_samples_s"] if table and table[0]["trials"] == 1 else None
    print(f"{'trials':>6} {'per trial samples/s':>22} {'aggregate':>10} {'vs alone':>9} {'overlap':>8} "
          f"{'peak MB per trial':>20} {'estimate MB':>12}")
    for row in table:
        per = "/".join(f"{r:.2f}" for r in row["per_trial_samples_s"])
        peaks = "/".join(f"{p:.0f}" for p in row["peak_mb"] if p is not None)
        vs = f"{row['aggregate_samples_s'] / alone:.2f}x" if alone else "-"
        print(f"{row['trials']:>6} {per:>22} {row['aggregate_samples_s']:>10.2f} {vs:>9} {row['overlap']:>8.0%} "
              f"{peaks:>20} {row['estimate_mb']:>12.0f}")
    if args.cpu:
        print("(CPU: peak MB is the worker's resident memory, not comparable with the GPU estimate)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
