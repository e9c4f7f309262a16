"""Generation for evaluation: prompts x seeds, batched, one seeded generator per image so every
image is the same whatever batch it lands in (sweeps compare trials image by image, and
``batch_size`` is a memory knob, not a result knob); the samplers; the VAE round trip that puts
reference images through what generated pixels went through; the grid of an evaluation.

``trainers.evaluate`` scores what this draws (and re-exports these names).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin
from diffusers.utils import make_image_grid
from PIL import Image
from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, model_validator

from trainers import progress
from trainers.model_configs import native_resolution_of
from trainers.models import BaseModel

TOKEN_PLACEHOLDER = "{token}"
SamplerName = Literal["ddim", "dpmsolver++", "euler"]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


class EvalSettings(PydanticModel):
    """What to generate. Frozen; an unknown key or a bad value is a validation error naming it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: tuple[str, ...] = Field(min_length=1)
    seeds: tuple[int, ...] = Field(default=(0, 1), min_length=1)
    sampler: SamplerName = "ddim"
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = 5.0
    resolution: int | None = Field(default=None, ge=8)  # None: the model's native (UNet sample_size x VAE scale)
    negative_prompt: str | None = None
    batch_size: int = Field(default=8, ge=1)
    token: str | None = None  # replaces "{token}" in every prompt, e.g. "sks toy"

    @model_validator(mode="after")
    def _check(self) -> "EvalSettings":
        # SD's VAE downsamples by 8: any other size is silently cropped/rounded by diffusers.
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.token is None:
            bad = [p for p in self.prompts if TOKEN_PLACEHOLDER in p]
            if bad:
                # Otherwise the literal text "{token}" would be sent to the model (rule 1).
                raise ValueError(f"prompt {bad[0]!r} contains {TOKEN_PLACEHOLDER} but no `token` is set")
        return self

    def resolved_prompts(self) -> tuple[str, ...]:
        """The prompts with ``{token}`` replaced (``str.replace``: other braces stay literal)."""
        if self.token is None:
            return self.prompts
        return tuple(p.replace(TOKEN_PLACEHOLDER, self.token) for p in self.prompts)


class GeneratedImage(NamedTuple):
    """One sample: the prompt actually sent to the model (token substituted), its seed, the image."""

    prompt: str
    seed: int
    image: Image.Image


# name -> (scheduler class, extra from_config overrides). DPM-Solver++ is the 2nd-order multistep
# solver people mean by "DPM++ 2M" (diffusers' default algorithm_type, stated to be explicit).
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_sampling_scheduler(name: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A sampling scheduler ``name`` built from the model's own scheduler config (betas etc.)."""
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(dict(scheduler_config), **overrides)


@contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (evaluation mid-training must not sample dropout), then restore."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)


def generate(model: BaseModel, settings: EvalSettings, prediction_type: str | None = None) -> list[GeneratedImage]:
    """Generate one image per (prompt, seed), prompt-major order, ``settings.batch_size`` at a time.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed: its initial noise (and
    any sampler noise) then depends only on (prompt, seed), never on its batch or the device, so
    results compare across trials and machines. ``prediction_type`` overrides the model's own
    (a run trained with ``train.prediction_type``: its UNet predicts that, so the sampler must read
    its output as that).
    """
    sched_cfg = dict(model.scheduler_config)
    if prediction_type is not None:
        sched_cfg["prediction_type"] = prediction_type
    scheduler = make_sampling_scheduler(settings.sampler, sched_cfg)
    pipe = model.pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    size = settings.resolution or native_resolution_of(model.unet.config, model.vae.config, where=model.source)
    jobs = [(p, s) for p in settings.resolved_prompts() for s in settings.seeds]
    out: list[GeneratedImage] = []
    with _eval_mode(model.unet, model.vae, model.text_encoder):
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            prompts = [p for p, _ in batch]
            negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(batch)
            result = pipe(
                prompt=prompts,
                negative_prompt=negative,
                height=size,
                width=size,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(s) for _, s in batch],
                output_type="pil",
            )
            out.extend(GeneratedImage(p, s, img) for (p, s), img in zip(batch, result.images))
            progress.advance("generate", len(out), len(jobs))
    return out


@torch.no_grad()
def vae_round_trip(vae: torch.nn.Module, images: Sequence[Image.Image], chunk: int = 8) -> list[Image.Image]:
    """``images`` encoded by ``vae`` and decoded from the posterior mean, on the VAE's device and
    in its dtype, back to 8-bit RGB as the pipeline writes its output: what every generated
    image's pixels have been through, so a reference compares like with like."""
    param = next(vae.parameters())
    out: list[Image.Image] = []
    with _eval_mode(vae):
        for i in range(0, len(images), chunk):
            x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
                             for im in images[i : i + chunk]])
            x = (x.to(param.device, torch.float32) / 127.5 - 1).to(param.dtype)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample  # type: ignore[attr-defined]
            y = ((y.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out.extend(Image.fromarray(a) for a in y)
    return out


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images tiled row-major, ``columns`` per row (one row per prompt, one column per seed), with
    diffusers' ``make_image_grid``; an evaluation always fills its grid (prompts x seeds)."""
    if len(images) % columns:
        raise ValueError(f"{len(images)} images do not fill rows of {columns}")
    return make_image_grid(list(images), rows=len(images) // columns, cols=columns)
