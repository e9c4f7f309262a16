"""Where a run's modules live and in what precision: the one decision every heavy task shares.

A trial's trainer, its evaluator (sampling and scoring), the latent-cache build and the baseline
all need the same answer to "which device, which weight dtype, which autocast", or a score is
partly a device or precision shift (DESIGN.md, "On a GPU"). :func:`run_placement` gives it from
the run config's ``train.device`` and ``train.mixed_precision``, using the trainer's own
precision rule (:func:`trainers.base.resolve_mixed_precision`), so the answer cannot drift from
what ``Trainer.__init__`` computes.

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

ENCODE_DTYPE = torch.float32  # the latent cache's compute dtype (module docstring)
SCORING_DTYPE = torch.float32  # scoring models' dtype (module docstring)
_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
    # Looked up on the module at each call, so the trainer and this helper always run the very
    # same function; imported here because trainers.base imports trainers.latents, which uses
    # this module.
    from trainers import base

    precision = base.resolve_mixed_precision(mixed_precision, dev)
    return Placement(dev, precision, _WEIGHT_DTYPES.get(precision, torch.float32))


def sampling_autocast(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """Autocast dtype for sampling with frozen weights in ``weight_dtype`` on ``device``.

    On CUDA with reduced-precision weights, autocast to that dtype (the fp32 LoRA weights then
    meet bf16/fp16 activations as in training). Never on CPU, where weights are fp32.
    """
    if device.type != "cuda" or weight_dtype == torch.float32:
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
