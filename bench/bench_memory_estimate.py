"""How good is the GPU memory estimate ``sdsweep plan`` packs trials by (trainers/memory.py)?

    python bench/bench_memory_estimate.py            # all three parts below
    python bench/bench_memory_estimate.py --measure 320 1 0 --channels 64 128 256 256   # one CPU cell (JSON)

1. Activations vs a real backward (CPU): a diffusers UNet (SD-shaped, narrower channels) runs one
   real fp32 forward + backward in a fresh process; the resident memory it adds (the peak RSS,
   VmHWM after resetting it through /proc/self/clear_refs, over the RSS before it) is compared with the estimate's activation term for the same shape, with and
   without gradient checkpointing. The reference is the operating system's count of the pages a
   real step touched; the estimate never runs the model.
2. Whole estimate vs published SD 1.5 DreamBooth figures: the table of a widely used DreamBooth
   fork (ShivamShrirao/diffusers, examples/dreambooth README, Tesla T4, fp16 mixed precision,
   xformers attention, 512 px, VAE and text encoder freed after caching), for the five settings
   it lists at batch 1-2.
3. The SD 1.5 table that docs/SWEEPS.md shows: each method at common settings, and how many
   trials fit a 24, 40 and 80 GiB GPU.

Not here: a comparison with ``torch.cuda.max_memory_allocated`` on a GPU (``bench/gpu_smoke.py``
prints it beside the estimate when a GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (setting, overrides of the DreamBooth shape, published GB) from the fork's README table
PUBLISHED = [
    ("grad ckpt + 8-bit Adam", {"gradient_checkpointing": True, "optimizer": "adamw_8bit"}, 9.92),
    ("8-bit Adam", {"optimizer": "adamw_8bit"}, 11.17),
    ("batch 2, 8-bit Adam", {"optimizer": "adamw_8bit", "batch": 2}, 13.67),
    ("grad ckpt, AdamW", {"gradient_checkpointing": True}, 15.79),
    ("AdamW", {}, 17.7),
]
CPU_CELLS = [(256, 2, False), (384, 2, False), (320, 1, False), (256, 2, True), (384, 2, True), (320, 1, True)]


def measure(resolution: int, batch: int, checkpointing: bool, channels: tuple[int, ...]) -> dict[str, float]:
    """In this (fresh) process: the resident bytes one real fp32 forward + backward adds, and the
    estimate's activation bytes for the same UNet shape."""
    import gc

    import torch
    from diffusers import UNet2DConditionModel

    from trainers.activations import training_activation_bytes

    torch.set_num_threads(1)
    cfg = dict(block_out_channels=channels, cross_attention_dim=256, attention_head_dim=8, sample_size=resolution // 8)
    side = resolution // 8

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def high_water() -> int:  # VmHWM: this process's peak RSS since the last reset
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    x = torch.randn(batch, 4, side, side, requires_grad=True)
    c, t = torch.randn(batch, 77, 256), torch.full((batch,), 10)
    unet(x[:1].detach(), t[:1], c[:1])  # first-call allocations (kernels, thread pools) before measuring
    gc.collect()
    # Reset the peak to the current RSS (Linux >= 4.0). Not getrusage's ru_maxrss: Linux carries it
    # over exec from the forking parent, so under a large parent (a long pytest run) it read low.
    Path("/proc/self/clear_refs").write_text("5")
    before = rss()
    unet(x, t, c).sample.pow(2).mean().backward()
    measured = high_water() - before

    with torch.device("meta"):
        meta = UNet2DConditionModel(**cfg)
    meta.requires_grad_(False)
    xm = torch.empty(batch, 4, side, side, device="meta", requires_grad=True)
    cm = torch.empty(batch, 77, 256, device="meta")
    tm = torch.zeros(batch, dtype=torch.long, device="meta")
    estimate = training_activation_bytes(meta, lambda: meta(xm, tm, cm), checkpointing)
    return {"resolution": resolution, "batch": batch, "checkpointing": checkpointing, "channels": list(channels),
            "measured_mib": measured / 2**20, "estimate_mib": estimate / 2**20, "ratio": measured / estimate}


def measure_in_subprocess(resolution: int, batch: int, checkpointing: bool,
                          channels: tuple[int, ...] = (64, 128, 256, 256)) -> dict[str, float]:
    """:func:`measure` in a fresh Python process (a clean resident-memory high-water mark)."""
    cmd = [sys.executable, __file__, "--measure", str(resolution), str(batch), str(int(checkpointing)),
           "--channels", *map(str, channels)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dreambooth_shape(**overrides: object) -> object:
    import torch

    from trainers.memory import TrialShape

    base = dict(method="dreambooth", resolution=512, batch=1, gradient_checkpointing=False, precision="fp16",
                unet_dtype=torch.float32, text_encoder_dtype=torch.float16, weight_dtype=torch.float16,
                train_unet=True)
    return TrialShape(**{**base, **overrides})  # type: ignore[arg-type]


def sd15_table() -> list[tuple[str, float, str]]:
    """(label, GiB, breakdown) for each method at common settings, SD 1.5, bf16, 512 px."""
    import torch

    from trainers.memory import SD15, TrialShape, estimate_trial_memory

    bf16 = dict(resolution=512, batch=1, gradient_checkpointing=False, precision="bf16",
                weight_dtype=torch.bfloat16, text_encoder_dtype=torch.bfloat16, unet_dtype=torch.bfloat16)
    attn = ("to_q", "to_k", "to_v", "to_out.0")
    rows = [
        ("LoRA rank 4, batch 1", TrialShape(method="lora", lora_rank=4, lora_targets=attn, **bf16)),
        ("LoRA rank 64, batch 4", TrialShape(method="lora", lora_rank=64, lora_targets=attn,
                                             **{**bf16, "batch": 4})),
        ("LoRA rank 64, batch 4, grad ckpt", TrialShape(method="lora", lora_rank=64, lora_targets=attn,
                                                        **{**bf16, "batch": 4, "gradient_checkpointing": True})),
        ("textual inversion, 4 vectors, batch 4", TrialShape(method="textual_inversion", ti_vectors=4,
                                                             **{**bf16, "batch": 4,
                                                                "text_encoder_dtype": torch.float32})),
        ("DreamBooth, AdamW", TrialShape(method="dreambooth", train_unet=True,
                                         **{**bf16, "unet_dtype": torch.float32})),
        ("DreamBooth + prior, AdamW, grad ckpt", TrialShape(method="dreambooth", train_unet=True,
                                                            **{**bf16, "unet_dtype": torch.float32, "batch": 2,
                                                               "gradient_checkpointing": True})),
        ("DreamBooth + prior, 8-bit AdamW, grad ckpt, EMA",
         TrialShape(method="dreambooth", train_unet=True, optimizer="adamw_8bit", ema=True,
                    **{**bf16, "unet_dtype": torch.float32, "batch": 2, "gradient_checkpointing": True})),
    ]
    return [(label, (e := estimate_trial_memory(SD15, shape)).total_gib, e.breakdown()) for label, shape in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", nargs=3, type=int, metavar=("RES", "BATCH", "CKPT"))
    parser.add_argument("--channels", nargs=4, type=int, default=[64, 128, 256, 256])
    args = parser.parse_args()
    if args.measure:
        res, batch, ckpt = args.measure
        print(json.dumps(measure(res, batch, bool(ckpt), tuple(args.channels))))
        return

    print("1. activation estimate vs resident memory of a real fp32 forward + backward (CPU, channels 64-256)")
    print(f"   {'px':>4} {'batch':>5} {'grad ckpt':>9} {'measured MiB':>12} {'estimate MiB':>12} {'measured/est':>12}")
    for res, batch, ckpt in CPU_CELLS:
        r = measure_in_subprocess(res, batch, ckpt)
        print(f"   {res:>4} {batch:>5} {str(ckpt):>9} {r['measured_mib']:>12.0f} {r['estimate_mib']:>12.0f} "
              f"{r['ratio']:>12.2f}")

    from trainers.memory import SD15, estimate_trial_memory

    print("\n2. SD 1.5 DreamBooth, 512 px, fp16: estimate vs published (T4, xformers; GB read as GiB)")
    for label, overrides, published in PUBLISHED:
        e = estimate_trial_memory(SD15, dreambooth_shape(**overrides))  # type: ignore[arg-type]
        print(f"   {label:<26} estimate {e.total_gib:5.1f}  published {published:5.2f}  "
              f"estimate/published {e.total_gib / published:.2f}")

    print("\n3. SD 1.5 per method, bf16, 512 px (trials per GPU: 24 / 40 / 80 GiB)")
    for label, gib, breakdown in sd15_table():
        fits = " / ".join(str(int(m // gib)) for m in (24, 40, 80))
        print(f"   {label:<48} {gib:5.1f} GiB  {fits:>10}   {breakdown}")


if __name__ == "__main__":
    main()
