"""Evaluate a (fine-tuned) model: generate with fixed prompts and seeds, then score the images.

Two halves, usable separately:

* ``generate(model, EvalSettings(...))`` -- prompts x seeds, batched, one seeded generator per
  image so every image is the same whatever batch it lands in (sweeps compare trials image by
  image, and ``batch_size`` is a memory knob, not a result knob).
* Metrics (``METRICS`` registry, ``get_metric(name)``): ``clip_t`` (prompt-image alignment,
  torchmetrics' CLIPScore definition) and ``clip_i`` (similarity to the training images,
  DreamBooth's definition). CLIP models are loaded once per process (``get_clip``).

``evaluate(...)`` ties both together. Nothing here imports ray, optuna or wandb.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, NamedTuple, Protocol, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin
from PIL import Image
from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, model_validator

from trainers.models import BaseModel, load_clip

# The CLIP most text-to-image papers (and torchmetrics' CLIPScore default) score with. Needs the
# Hub or a local copy; tests use builtin:tiny-clip.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
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
    resolution: int | None = Field(default=None, ge=8)  # None: the UNet's sample_size * 8
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


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
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


def generate(model: BaseModel, settings: EvalSettings) -> list[GeneratedImage]:
    """Generate one image per (prompt, seed), prompt-major order, ``settings.batch_size`` at a time.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed: its initial noise (and
    any sampler noise) then depends only on (prompt, seed), never on its batch or the device, so
    results compare across trials and machines.
    """
    scheduler = make_scheduler(settings.sampler, model.scheduler_config)
    pipe = model.pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    size = settings.resolution or int(model.unet.config.sample_size) * 8
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
    return out


# --------------------------------------------------------------------------------------------
# CLIP, loaded once per process
# --------------------------------------------------------------------------------------------

_CLIP_CACHE: dict[str, tuple[Any, Any, Any]] = {}
_CLIP_LOCK = threading.Lock()


def get_clip(spec: str = DEFAULT_CLIP) -> tuple[Any, Any, Any]:
    """``(CLIPModel, tokenizer, image processor)`` for ``spec``, loaded on first use and cached.

    A sweep evaluates every few hundred steps; ViT-L/14 takes seconds to load (1.7 GB), so it is
    loaded once per process. The cached model is shared: do not train or move it.
    """
    with _CLIP_LOCK:
        if spec not in _CLIP_CACHE:
            _CLIP_CACHE[spec] = load_clip(spec)
        return _CLIP_CACHE[spec]


def clear_clip_cache() -> None:
    """Drop every cached CLIP model (frees its memory; the next ``get_clip`` reloads)."""
    with _CLIP_LOCK:
        _CLIP_CACHE.clear()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def image_embeddings(spec: str, images: Sequence[Image.Image], chunk: int = 32) -> torch.Tensor:
    """Projected CLIP image embeddings (not normalised), one row per image, float32 on CPU."""
    model, _, processor = get_clip(spec)
    rows = []
    for i in range(0, len(images), chunk):
        pixels = processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        # transformers 5: the projected embedding is the output object's pooler_output.
        rows.append(model.get_image_features(pixel_values=pixels.to(_device(model))).pooler_output.float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def text_embeddings(spec: str, texts: Sequence[str]) -> torch.Tensor:
    """Projected CLIP text embeddings (not normalised), tokenized exactly as torchmetrics does.

    torchmetrics pads to the longest prompt and, for prompts over the model's
    ``max_position_embeddings``, slices ids and mask to that length (it does not use the
    tokenizer's truncation); we copy that so scores match its CLIPScore.
    """
    model, tokenizer, _ = get_clip(spec)
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    limit = int(model.config.text_config.max_position_embeddings)
    ids, mask = enc["input_ids"][..., :limit], enc["attention_mask"][..., :limit]
    dev = _device(model)
    return model.get_text_features(input_ids=ids.to(dev), attention_mask=mask.to(dev)).pooler_output.float().cpu()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Plain division by the L2 norm, as torchmetrics does (not F.normalize's eps clamp), so the
    # arithmetic matches operation for operation.
    return x / x.norm(p=2, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricResult:
    """A metric's aggregate ``value`` and its per-image scores (same order as the images)."""

    value: float
    per_item: tuple[float, ...]


class Metric(Protocol):
    """The metric interface (DESIGN.md "New metric"): register the class in ``METRICS``."""

    name: str
    higher_is_better: bool

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None
    ) -> MetricResult:
        """Score ``images`` (generated from ``prompts``) against optional ``references``."""
        ...


class _ClipMetric:
    """Shared by the CLIP-based metrics: which CLIP to embed with (loaded once per process)."""

    name: str
    higher_is_better = True

    def __init__(self, clip: str = DEFAULT_CLIP) -> None:
        self.clip = clip


class ClipTScore(_ClipMetric):
    """CLIP-T: torchmetrics' CLIPScore, ``max(mean_i 100 * cos(E_img_i, E_text_i), 0)``.

    Range [0, 100]. ``per_item`` holds the unclamped ``100 * cos`` per image, as torchmetrics
    accumulates them; only the mean is clamped at 0 (torchmetrics ``CLIPScore.compute``).
    """

    name = "clip_t"

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score each image against its own prompt (``prompts[i]`` for ``images[i]``)."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"clip_t needs one prompt per image; got {len(images)} images, {len(prompts)} prompts")
        img = _normalize(image_embeddings(self.clip, images))
        txt = _normalize(text_embeddings(self.clip, prompts))
        per_item = 100 * (img * txt).sum(dim=-1)
        value = torch.clamp(per_item.mean(), min=0.0)
        return MetricResult(float(value), tuple(float(v) for v in per_item))


class ClipIScore(_ClipMetric):
    """CLIP-I: mean cosine similarity of each generated image to every reference image.

    DreamBooth's subject-fidelity metric (Ruiz et al. 2023, sec. 4.1: "average pairwise cosine
    similarity between CLIP embeddings of generated and real images"), reported as a plain cosine
    in [-1, 1] (their tables read e.g. 0.803), not x100 and not clamped: this keeps the number
    comparable with the paper. ``per_item[i]`` is image i's mean over the references.
    """

    name = "clip_i"

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score ``images`` against ``references`` (the training images); prompts are unused."""
        if not references:
            raise ValueError("clip_i needs reference images (the training images); none were given")
        if not images:
            raise ValueError("clip_i needs at least one generated image")
        gen = _normalize(image_embeddings(self.clip, images))
        ref = _normalize(image_embeddings(self.clip, references))
        per_item = (gen @ ref.T).mean(dim=1)
        return MetricResult(float(per_item.mean()), tuple(float(v) for v in per_item))


# Plain dict registry (DESIGN.md): one line per metric.
METRICS: dict[str, type] = {
    "clip_t": ClipTScore,
    "clip_i": ClipIScore,
}


def get_metric(name: str, **kwargs: Any) -> Metric:
    """An instance of metric ``name``; an unknown name lists the valid ones."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(METRICS))}")
    metric: Metric = METRICS[name](**kwargs)
    return metric


@dataclass(frozen=True)
class EvalResult:
    """Generated images and each metric's result, keyed by metric name."""

    images: list[GeneratedImage]
    scores: dict[str, MetricResult]


def evaluate(
    model: BaseModel,
    settings: EvalSettings,
    metrics: Sequence[str] = ("clip_t",),
    references: Sequence[Image.Image] | None = None,
    clip: str = DEFAULT_CLIP,
) -> EvalResult:
    """Generate with ``settings`` and score with each named metric (all using CLIP ``clip``)."""
    scorers = [get_metric(n, clip=clip) for n in metrics]  # unknown names fail before generating
    images = generate(model, settings)
    pils = [g.image for g in images]
    prompts = [g.prompt for g in images]
    return EvalResult(images, {m.name: m.score(pils, prompts, references) for m in scorers})
