"""Where a run's modules live and in what precision: the one decision every heavy task shares.

A trial's trainer, its evaluator (sampling and scoring), the latent-cache build and the baseline
all need the same answer to "which device, which weight dtype, which autocast", or a score is
partly a device or precision shift (docs/ARCHITECTURE.md, "On a GPU"). :func:`run_placement` gives it from
the run config's ``train.device`` and ``train.mixed_precision``, using the trainer's own
precision rule (:func:`resolve_mixed_precision`), which ``Trainer.__init__`` calls through it, so
the answer cannot drift from what a trainer computes.

Fixed choices, and why:

* Trainable parameters stay fp32; frozen UNet / VAE / text-encoder weights use the weight dtype
  (bf16/fp16 on a GPU, fp32 on CPU) and sampling runs under autocast in that dtype.
* The latent cache encodes with the VAE (and the text encoder) in **fp32**, whatever the run's
  precision: a cache entry's key names the VAE weights, the preprocessing and the *stored* dtype
  but not the compute dtype, so entries encoded at another precision would be mixed silently
  under one key; the encode runs once per image per sweep, so fp32 costs little; and SD-family
  VAEs are known to overflow in fp16 (diffusers' SDXL script keeps its VAE in fp32 for that).
* Scoring models (CLIP, DINO-style backbone, checker) run in fp32 on the trial's device, without
  autocast: a score must not depend on the trial's precision, only on its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

ENCODE_DTYPE = torch.float32  # the latent cache's compute dtype (module docstring)
SCORING_DTYPE = torch.float32  # scoring models' dtype (module docstring)
_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


@dataclass(frozen=True)
class Placement:
    """Device and precision of one run: what the trainer, evaluator and baseline all use."""

    device: torch.device
    precision: str  # accelerate's mixed_precision: "no", "fp16" or "bf16"
    weight_dtype: torch.dtype  # frozen weights

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype sampling autocasts to (None: no autocast), see :func:`sampling_autocast`."""
        return sampling_autocast(self.device, self.weight_dtype)


def run_device(requested: str | None) -> torch.device:
    """``train.device`` if set, else CUDA when torch sees one, else CPU (the trainer's rule).

    Inside a Ray task or trial that reserved a GPU, Ray's ``CUDA_VISIBLE_DEVICES`` makes that GPU
    the only one torch sees, so ``cuda`` is the reserved GPU.
    """
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_placement(device: str | None, mixed_precision: str) -> Placement:
    """The placement a trainer with ``train.device=device`` and ``train.mixed_precision`` gets."""
    dev = _indexed(run_device(device))  # accelerate's device is indexed: compare like with like
    precision = resolve_mixed_precision(mixed_precision, dev)
    return Placement(dev, precision, _WEIGHT_DTYPES.get(precision, torch.float32))


def sampling_autocast(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """Autocast dtype for sampling with frozen weights in ``weight_dtype`` on ``device``.

    With reduced-precision weights, autocast to that dtype (the fp32 LoRA weights then meet
    bf16/fp16 activations as in training): on CUDA, and on a CPU running an explicit bf16 run
    (torch's CPU autocast has bf16). None for fp32 weights.
    """
    if weight_dtype == torch.float32:
        return None
    return weight_dtype


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Move ``module`` to ``device`` (and cast it to ``dtype``), issuing only the moves that change
    something: diffusers' ``ModelMixin.to(dtype)`` logs a spurious float32 warning on every call.

    Only for frozen modules: a cast would also cast trainable (LoRA) weights.
    """
    if not same_device(next(module.parameters()).device, torch.device(device)):
        module.to(device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same, reading an unindexed ``cuda`` as the current GPU."""
    a, b = _indexed(torch.device(a)), _indexed(torch.device(b))
    return a == b


def _indexed(d: torch.device) -> torch.device:
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def module_placements(module: torch.nn.Module) -> set[tuple[str, torch.dtype]]:
    """Every ``(device, dtype)`` a module's parameters and buffers use (checks and smoke tests)."""
    tensors = [*module.parameters(), *module.buffers()]
    return {(str(t.device), t.dtype) for t in tensors if t.is_floating_point()}


def _short(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


def placement_key(device: torch.device | str, unet: torch.dtype, text_encoder: torch.dtype, vae: torch.dtype,
                  autocast: torch.dtype | None) -> str:
    """One string for everything that decides how a model samples: the device type and the dtypes
    of its UNet, text encoder and VAE and of sampling's autocast. An evaluation and the baseline
    it is compared with must have the same key (a gain must never be a precision shift)."""
    return (f"{torch.device(device).type} unet={_short(unet)} text_encoder={_short(text_encoder)} "
            f"vae={_short(vae)} autocast={_short(autocast)}")


def sampled_placement(model: object, autocast: torch.dtype | None) -> str:
    """:func:`placement_key` of a model as it is (read from its modules' parameters), sampled under
    ``autocast``: what an evaluation records of itself."""
    p = {name: next(getattr(model, name).parameters()) for name in ("unet", "text_encoder", "vae")}
    return placement_key(p["unet"].device, p["unet"].dtype, p["text_encoder"].dtype, p["vae"].dtype, autocast)
