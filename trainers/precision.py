"""Where a run trains and in what precision: the one place that picks the device, accelerate's
mixed precision and the frozen weights' dtype (DESIGN.md, "On a GPU": device and dtype handling
in few places). Trainers, the held-out confirmation and the GPU smoke script all call these.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from trainers.config import TrainConfig


def resolve_device(requested: str | None) -> torch.device:
    """The device a run trains on: ``train.device`` if set, else the GPU Ray gave the trial (or
    the first visible one), else the CPU. The one place that picks a training device."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """Map the config's precision to accelerate's: "auto" is bf16/fp16 on CUDA and fp32 on CPU.

    bf16 may be asked for explicitly on a CPU (torch autocasts bf16 there); fp16 needs a GPU
    (CPU autocast has no fp16 and accelerate's grad scaler is CUDA-only).
    """
    if device.type != "cuda":
        if requested == "fp16":
            raise ValueError(
                f"train.mixed_precision=fp16 needs a CUDA GPU, but training runs on {device}; "
                "use mixed_precision: auto, no or bf16"
            )
        return "bf16" if requested == "bf16" else "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def run_precision(cfg: TrainConfig) -> tuple[torch.device, str, torch.dtype]:
    """(device, accelerate mixed_precision, frozen-weight dtype) of a run with ``cfg``."""
    device = resolve_device(cfg.device)
    precision = resolve_mixed_precision(cfg.mixed_precision, device)
    return device, precision, WEIGHT_DTYPES[precision]


def make_accelerator(precision: str, device: torch.device) -> Accelerator:
    """A single-process Accelerator with ``precision``, whatever earlier runs in this process used.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second ``Accelerator``
    with another ``mixed_precision`` ("AcceleratorState has already been initialized"). A reused
    Ray worker runs trial after trial, each with the precision its config asks for, and a trial
    is a single-process run with no distributed state worth keeping, so the accelerator part of
    the state is reset (its ``PartialState``, which holds the device, is kept).
    """
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
