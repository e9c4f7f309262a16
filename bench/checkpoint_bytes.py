"""Bytes a DreamBooth trial writes in checkpoints, before and after the checkpoint-size design
(docs/METHODS.md, DreamBooth, "What a checkpoint holds"), from SD 1.5's real module shapes.

SD 1.5's UNet and text encoder are built from their configs on PyTorch's meta device (shapes only,
no weights, no memory), and each design is applied tensor by tensor (fp32 weights, AdamW's two
moments and its 0-dim step per parameter tensor, EMA shadow weights and its int64 step count).
Counted are tensor bytes; safetensors headers and the JSON files add well under 1 MB per
checkpoint (printed). The same functions, applied to the toy world's modules, are what
tests/test_dreambooth.py and tests/test_dreambooth_sweep.py compare written checkpoints with.

    python bench/checkpoint_bytes.py                     # 1000 steps, an evaluation every 250
    python bench/checkpoint_bytes.py --steps 1000 --every 100 --keep 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FP32 = 4


def weight_bytes(params: Iterable[torch.Tensor]) -> int:
    """fp32 bytes of ``params`` (the exported weights, or one copy of the trained ones)."""
    return sum(p.numel() * FP32 for p in params)


def adamw_bytes(params: Iterable[torch.Tensor]) -> int:
    """torch AdamW's state for ``params``: ``exp_avg`` and ``exp_avg_sq`` (fp32, each the
    parameter's size) and ``step`` (a 0-dim fp32 tensor) per parameter tensor."""
    return sum(2 * p.numel() * FP32 + FP32 for p in params)


def checkpoint_bytes(unet: list[torch.Tensor], text_encoder: list[torch.Tensor] | None, *, ema: bool,
                     design: str, last: bool = False) -> dict[str, int]:
    """Tensor bytes of one DreamBooth checkpoint: ``export`` (``unet/`` + ``text_encoder/``) and
    ``resume`` (``trainer_state.safetensors``). ``design``: ``before`` (every resume tensor stored
    beside the export) or ``after`` (none stored twice; no optimizer state in a trial's ``last``)."""
    trained = [*unet, *(text_encoder or [])]
    export = weight_bytes(trained)  # the EMA weights for the UNet when ema: the same size
    ema_step = 8  # EMAModel.optimization_step, int64
    if design == "before":
        resume = weight_bytes(trained) + adamw_bytes(trained) + (weight_bytes(unet) + ema_step if ema else 0)
    elif design == "after":
        # The export holds the trained weights (no EMA) or the EMA weights (EMA: the live UNet stays).
        resume = (0 if last else adamw_bytes(trained)) + (weight_bytes(unet) + ema_step if ema else 0)
    else:
        raise ValueError(design)
    return {"export": export, "resume": resume}


def trial_bytes(unet: list[torch.Tensor], text_encoder: list[torch.Tensor] | None, *, ema: bool, design: str,
                evaluations: int) -> int:
    """Bytes written by one trial's checkpoints: ``before``, each evaluation's checkpoint went to a
    local temp directory and Tune copied it into the run directory (written twice); ``after``, it
    is written once, in place, the last one without optimizer state."""
    total = 0
    for i in range(evaluations):
        c = checkpoint_bytes(unet, text_encoder, ema=ema, design=design, last=i == evaluations - 1)
        total += (2 if design == "before" else 1) * (c["export"] + c["resume"])
    return total


def kept_bytes(unet: list[torch.Tensor], text_encoder: list[torch.Tensor] | None, *, ema: bool, design: str,
               keep: int) -> int:
    """On disk once the trial finished, its last evaluation among its best ``keep`` (Tune keeps
    the best ``keep`` and always the latest): the last checkpoint whole, the others' exports
    (sweeps.trial.KeepResumeStateInNewest dropped their resume tensors)."""
    last = checkpoint_bytes(unet, text_encoder, ema=ema, design=design, last=True)
    return last["export"] + last["resume"] + (keep - 1) * last["export"]


def header_bytes(named: dict[str, torch.Tensor]) -> int:
    """About the safetensors header of a file holding ``named`` (JSON of names, dtypes, shapes, offsets)."""
    return 8 + len(json.dumps({n: {"dtype": "F32", "shape": list(t.shape), "data_offsets": [10**9, 10**9]}
                               for n, t in named.items()}))


def sd15_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    """SD 1.5's UNet and CLIP text encoder on the meta device (bench/flops_sd15.py's configs)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from flops_sd15 import SD15_TEXT, SD15_UNET

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET), CLIPTextModel(SD15_TEXT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250, help="evaluation.every")
    ap.add_argument("--keep", type=int, default=2, help="checkpoints_to_keep")
    args = ap.parse_args()
    from sweeps.cli import quiet_libraries

    quiet_libraries()
    unet, te = sd15_modules()
    u, t = list(unet.parameters()), list(te.parameters())
    evaluations = -(-args.steps // args.every)
    gb = 1e9
    print(f"SD 1.5 UNet {sum(p.numel() for p in u) / 1e6:.2f} M parameters ({len(u)} tensors), text encoder "
          f"{sum(p.numel() for p in t) / 1e6:.2f} M ({len(t)}); a {args.steps}-step trial, {evaluations} "
          f"evaluations, checkpoints_to_keep {args.keep}; GB = 1e9 bytes of tensors")
    from_export = {f"param.unet.{n}": ["unet/diffusion_pytorch_model.safetensors", n] for n, _ in unet.named_parameters()}
    moments = {f"optim.{i}.{k}": p for i, p in enumerate([*u, *t]) for k in ("exp_avg", "exp_avg_sq", "step")}
    print(f"not counted, per checkpoint: safetensors headers of the export ~"
          f"{(header_bytes(dict(unet.named_parameters())) + header_bytes(dict(te.named_parameters()))) / 1e3:.0f} kB"
          f" and of the resume state <= ~{header_bytes(moments) / 1e3:.0f} kB; trainer_state.json's map of "
          f"tensors read from the export ~{len(json.dumps(from_export, indent=1)) / 1e3:.0f} kB")
    variants = {"UNet only": (None, False), "+ train_text_encoder": (t, False), "+ use_ema": (None, True)}
    rows = [("checkpoint before (export + resume)", lambda e, x: sum(checkpoint_bytes(u, e, ema=x, design="before").values())),
            ("checkpoint after, not the last", lambda e, x: sum(checkpoint_bytes(u, e, ema=x, design="after").values())),
            ("checkpoint after, the last", lambda e, x: sum(checkpoint_bytes(u, e, ema=x, design="after", last=True).values())),
            ("written per trial, before", lambda e, x: trial_bytes(u, e, ema=x, design="before", evaluations=evaluations)),
            ("written per trial, after", lambda e, x: trial_bytes(u, e, ema=x, design="after", evaluations=evaluations)),
            ("kept after the trial, before", lambda e, x: kept_bytes(u, e, ema=x, design="before", keep=args.keep)),
            ("kept after the trial, after", lambda e, x: kept_bytes(u, e, ema=x, design="after", keep=args.keep))]
    print("\n| | " + " | ".join(variants) + " |\n| --- |" + " --- |" * len(variants))
    for label, fn in rows:
        print(f"| {label} | " + " | ".join(f"{fn(e, x) / gb:.2f} GB" for e, x in variants.values()) + " |")


if __name__ == "__main__":
    main()
